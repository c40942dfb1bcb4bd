"""Pure vxlan planning: entry shapes, device compatibility, MACs (no root needed)."""

import random
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannelpy.backends.vxlan.plan import (
    Fdb,
    Neigh,
    PeerPlan,
    Route,
    VxlanDeviceFacts,
    VxlanDeviceSpec,
    addresses_to_remove,
    device_name,
    incompatibilities,
    is_on_link,
    peer_plan,
    random_vtep_mac,
    stale_entries,
)
from flannelpy.subnet.lease import Lease, LeaseAttrs

A = IPv4Address


def vx_lease(subnet: str, public: str, mac: str | None = "0a:00:00:00:00:01", btype: str = "vxlan") -> Lease:
    data = {"VNI": 1, "VtepMAC": mac} if mac else None
    return Lease(IPv4Network(subnet), LeaseAttrs(A(public), btype, data))


def test_device_name():
    assert device_name(1) == "flannel.1"
    assert device_name(4096) == "flannel.4096"


def test_random_mac_is_locally_administered_unicast():
    rng = random.Random(7)
    for _ in range(500):
        mac = random_vtep_mac(rng)
        first = int(mac.split(":")[0], 16)
        assert first & 0x01 == 0, mac  # unicast
        assert first & 0x02 == 0x02, mac  # locally administered
        assert len(mac) == 17 and mac == mac.lower()
    assert random_vtep_mac() != random_vtep_mac()


def test_peer_plan_matches_flanneld_entries():
    plan = peer_plan(vx_lease("10.5.72.0/24", "192.168.1.20", "0A:BB:CC:DD:EE:FF"), direct=False)
    assert plan.neigh == Neigh(A("10.5.72.0"), "0a:bb:cc:dd:ee:ff")
    assert plan.fdb == Fdb("0a:bb:cc:dd:ee:ff", A("192.168.1.20"))
    assert plan.route == Route(IPv4Network("10.5.72.0/24"), A("10.5.72.0"), on_vxlan=True)
    assert not plan.direct


def test_direct_plan_is_only_an_underlay_route():
    plan = peer_plan(vx_lease("10.5.72.0/24", "192.168.1.20"), direct=True)
    assert plan == PeerPlan(route=Route(IPv4Network("10.5.72.0/24"), A("192.168.1.20"), on_vxlan=False))
    assert plan.direct


def test_lease_without_mac_is_rejected_with_its_subnet():
    with pytest.raises(ValueError, match="10.5.3.0/24.*VtepMAC"):
        peer_plan(vx_lease("10.5.3.0/24", "1.2.3.4", mac=None), direct=False)


def test_new_mac_makes_old_fdb_stale_but_not_neigh_or_route():
    old = peer_plan(vx_lease("10.5.1.0/24", "192.168.1.2", "0a:00:00:00:00:01"), False)
    new = peer_plan(vx_lease("10.5.1.0/24", "192.168.1.2", "0a:00:00:00:00:02"), False)
    stale = stale_entries(old, new)
    assert stale is not None
    assert stale.fdb == Fdb("0a:00:00:00:00:01", A("192.168.1.2"))
    assert stale.neigh is None  # overwritten by the replace


def test_same_mac_new_public_ip_is_overwritten_not_stale():
    old = peer_plan(vx_lease("10.5.1.0/24", "192.168.1.2"), False)
    new = peer_plan(vx_lease("10.5.1.0/24", "192.168.1.3"), False)
    assert stale_entries(old, new) is None
    assert stale_entries(old, old) is None


def test_switch_to_direct_leaves_neigh_and_fdb_stale():
    old = peer_plan(vx_lease("10.5.1.0/24", "192.168.1.2"), False)
    new = peer_plan(vx_lease("10.5.1.0/24", "192.168.1.2"), True)
    stale = stale_entries(old, new)
    assert stale is not None and stale.neigh == old.neigh and stale.fdb == old.fdb
    assert stale_entries(new, old) is None


def test_on_link_needs_exactly_one_gatewayless_route():
    assert is_on_link([None])
    assert not is_on_link([A("192.168.1.1")])
    assert not is_on_link([])
    assert not is_on_link([None, None])


SPEC = VxlanDeviceSpec("flannel.1", 1, 3, A("192.168.1.2"), 8472, False, False, 1450)


def facts(**kw):
    base = dict(kind="vxlan", vni=1, vtep_index=3, local=A("192.168.1.2"), port=8472,
                gbp=False, learning=False, mac="0a:00:00:00:00:01")
    base.update(kw)
    return VxlanDeviceFacts(**base)


def test_compatible_device_is_reused():
    assert incompatibilities(SPEC, facts()) == []


@pytest.mark.parametrize(
    "change,word",
    [
        (dict(vni=2), "vni"),
        (dict(port=4789), "port"),
        (dict(vtep_index=9), "vtep device index"),
        (dict(local=A("192.168.1.9")), "local address"),
        (dict(gbp=True), "gbp"),
        (dict(learning=True), "learning"),
        (dict(kind="veth"), "veth"),
    ],
)
def test_incompatible_device_says_why(change, word):
    reasons = incompatibilities(SPEC, facts(**change))
    assert reasons and word in reasons[0]


def test_addresses_to_remove_keeps_base_32_and_outside_addresses():
    net = IPv4Network("10.5.0.0/16")
    have = [(A("10.5.7.0"), 32), (A("10.5.3.0"), 32), (A("10.5.7.0"), 16), (A("172.16.0.1"), 24)]
    assert addresses_to_remove(have, A("10.5.7.0"), net) == [(A("10.5.3.0"), 32), (A("10.5.7.0"), 16)]
