"""Dual stack (EnableIPv6, issue #14): the pure decisions between etcd and the kernel.

Which keys a store reads, how the peer tracker treats the two keys a subnet can have, what admission
refuses on a lease's IPv6 side, the IPv6 address of the external interface, and which backends and
rule modes the agent refuses with EnableIPv6.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from flannelpy.agent import backend_refusal
from flannelpy.errors import FlannelError, LeaseValueError
from flannelpy.etcd.store import WatchBatch
from flannelpy.hostnet.interface import (
    ExternalInterface,
    HostSnapshot,
    LinkFacts,
    check_flags,
    choose_interface,
    usable_addresses6,
)
from flannelpy.subnet.admission import Admission, AdmissionRules
from flannelpy.subnet.lease import EventKind, Lease, LeaseAttrs, LeaseEvent, parse_store_key
from flannelpy.subnet.tracker import LeaseTracker

A, A6, N, N6 = IPv4Address, IPv6Address, IPv4Network, IPv6Network
P = "/coreos.com/network/subnets/"


def lease(v4: str, v6: str | None = None, ip: str = "10.250.0.12", ip6: str | None = "fd99::c",
          mac: str = "02:00:00:00:00:02", mac6: str | None = "02:00:00:00:06:02") -> Lease:
    return Lease(N(v4), LeaseAttrs(A(ip), "vxlan", {"VNI": 1, "VtepMAC": mac},
                                   A6(ip6) if ip6 and v6 else None,
                                   {"VNI": 1, "VtepMAC": mac6} if mac6 and v6 else None),
                 ipv6_subnet=N6(v6) if v6 else None)


# --- keys -----------------------------------------------------------------------------------


def test_store_keys_dual_stack_only_with_enable_ipv6():
    dual = P + "10.42.63.0-24&fd42:0:0:1f::-64"
    assert parse_store_key(dual, P, True) == (N("10.42.63.0/24"), N6("fd42:0:0:1f::/64"))
    assert parse_store_key(P + "10.42.63.0-24", P, True) == (N("10.42.63.0/24"), None)
    assert parse_store_key(P + "10.42.63.0-24", P, False) == (N("10.42.63.0/24"), None)
    with pytest.raises(LeaseValueError, match="dual-stack key, in a network without EnableIPv6"):
        parse_store_key(dual, P, False)
    for bad in ("10.42.63.0-24&FD42::-64", "10.42.63.0-24&fd42:0:0:1f:0::-64", "0.0.0.0-0&fd42::-64",
                "10.42.63.0-24&fd42::-64x"):
        with pytest.raises(LeaseValueError):
            parse_store_key(P + bad, P, True)


def test_lease_key_property_is_the_dual_key():
    assert lease("10.42.63.0/24", "fd42:0:0:1f::/64").key == "10.42.63.0-24&fd42:0:0:1f::-64"
    assert lease("10.42.63.0/24").key == "10.42.63.0-24"


# --- tracker: two keys for one IPv4 subnet ---------------------------------------------------


def batch(*events: LeaseEvent) -> WatchBatch:
    return WatchBatch(events=events)


def added(x: Lease) -> LeaseEvent:
    return LeaseEvent(EventKind.ADDED, x)


def removed(x: Lease) -> LeaseEvent:
    return LeaseEvent(EventKind.REMOVED, x)


def test_tracker_first_key_keeps_the_subnet_the_other_waits():
    dual, plain = lease("10.5.1.0/24", "fd42:0:0:1::/64"), lease("10.5.1.0/24", ip="10.250.0.66")
    t = LeaseTracker(N("10.5.9.0/24"))
    assert t.update(batch(added(dual))) == [added(dual)]
    assert t.update(batch(added(plain))) == []  # held back: no turn-taking on the peer's routes
    assert t.update(batch(removed(plain))) == []  # the held-back key went: nothing to undo
    assert t.get(N("10.5.1.0/24")) == dual
    assert t.update(batch(added(plain))) == []
    # The holder goes: the other key takes its place in the same step.
    assert t.update(batch(removed(dual))) == [removed(dual), added(plain)]
    assert t.get(N("10.5.1.0/24")) == plain


def test_tracker_changed_ipv6_subnet_is_a_new_value():
    a, b = lease("10.5.1.0/24", "fd42:0:0:1::/64"), lease("10.5.1.0/24", "fd42:0:0:1::/64", mac6="02:00:00:00:06:09")
    t = LeaseTracker()
    t.update(batch(added(a)))
    assert t.update(batch(added(b))) == [removed(a), added(b)]


def test_tracker_snapshot_hands_a_subnet_to_its_remaining_key():
    dual, plain = lease("10.5.1.0/24", "fd42:0:0:1::/64"), lease("10.5.1.0/24", ip="10.250.0.66")
    t = LeaseTracker()
    t.reset([dual])
    assert t.reset([plain]) == [removed(dual), added(plain)]
    assert t.reset([plain, dual]) == []  # listed in key order: the known one keeps it


def test_tracker_backlog_by_key():
    dual, plain = lease("10.5.1.0/24", "fd42:0:0:1::/64"), lease("10.5.1.0/24", ip="10.250.0.66")
    t = LeaseTracker()
    t.update(batch(added(dual)))
    # A backlog where the plain key came and went: the dual lease is untouched.
    assert t.update_many([batch(added(plain)), batch(removed(plain))]) == []
    assert t.get(N("10.5.1.0/24")) == dual


# --- admission: the IPv6 side ----------------------------------------------------------------


RULES = AdmissionRules(network=N("10.5.0.0/16"), own_subnet=N("10.5.9.0/24"), own_public_ip=A("10.250.0.11"),
                       ipv6_network=N6("fd42::/48"), own_ipv6_subnet=N6("fd42:0:0:9::/64"),
                       own_public_ipv6=A6("fd99::b"), own_vtep_mac_v6="02:00:00:00:06:01")


@pytest.mark.parametrize("bad, code, says", [
    (lease("10.5.1.0/24", "fd43:0:0:1::/64"), "outside_network", "outside IPv6Network fd42::/48"),
    (lease("10.5.1.0/24", "fd42::/49"), "prefix_length", "/50 or longer"),
    (lease("10.5.1.0/24", "fd42:0:0:9::/64"), "own_subnet", "our own IPv6 subnet"),
    (lease("10.5.1.0/24", "fd42:0:0:1::/64", ip6=None), "public_ip", "without a PublicIPv6"),
    (lease("10.5.1.0/24", "fd42:0:0:1::/64", ip6="fe80::1"), "public_ip", "link-local"),
    (lease("10.5.1.0/24", "fd42:0:0:1::/64", ip6="ff02::1"), "public_ip", "multicast"),
    (lease("10.5.1.0/24", "fd42:0:0:1::/64", ip6="::1"), "public_ip", "loopback"),
    (lease("10.5.1.0/24", "fd42:0:0:1::/64", ip6="fd99::b"), "own_address", "an address of this host"),
    (lease("10.5.1.0/24", "fd42:0:0:1::/64", ip6="fd42:0:0:1::5"), "public_ip", "the lease's own IPv6 subnet"),
    (lease("10.5.1.0/24", "fd42:0:0:1::/64", ip6="fd42:0:0:9::5"), "public_ip", "our own IPv6 subnet"),
    (lease("10.5.1.0/24", "fd42:0:0:1::/64", mac6=None), "vtep_mac", "without a VtepMAC in BackendV6Data"),
    (lease("10.5.1.0/24", "fd42:0:0:1::/64", mac6="03:00:00:00:00:01"), "vtep_mac", "multicast"),
    (lease("10.5.1.0/24", "fd42:0:0:1::/64", mac6="02:00:00:00:06:01"), "vtep_mac", "our own device's"),
])
def test_admission_refuses_bad_ipv6_sides(bad, code, says):
    step = Admission(RULES).apply([added(bad)])
    assert step.events == [] and len(step.refused) == 1
    assert step.refused[0].code == code and says in step.refused[0].reason, step.refused[0].reason


def test_admission_ipv6_conflicts_between_peers_and_readmission():
    first = lease("10.5.1.0/24", "fd42:0:0:1::/64")
    overlap = lease("10.5.2.0/24", "fd42:0:0:1::/64", ip="10.250.0.13", ip6="fd99::d", mac="02:00:00:00:00:03",
                    mac6="02:00:00:00:06:03")
    same_mac6 = lease("10.5.3.0/24", "fd42:0:0:3::/64", ip="10.250.0.14", ip6="fd99::e", mac="02:00:00:00:00:04")
    inside = lease("10.5.4.0/24", "fd42:0:0:4::/64", ip="10.250.0.15", ip6="fd42:0:0:1::7", mac="02:00:00:00:00:05",
                   mac6="02:00:00:00:06:05")
    adm = Admission(RULES)
    step = adm.apply([added(first), added(overlap), added(same_mac6), added(inside)])
    assert step.events == [added(first)]
    assert [(r.subnet, r.code) for r in step.refused] == [
        (N("10.5.2.0/24"), "overlap"), (N("10.5.3.0/24"), "duplicate_vtep_mac"), (N("10.5.4.0/24"), "public_ip")]
    # The accepted lease goes: all three are judged again; the one whose PublicIPv6 sits in the IPv6
    # subnet the overlapping lease now holds stays refused, waiting for that one.
    step = adm.apply([removed(first)])
    assert step.events[0] == removed(first)
    assert {e.lease.subnet for e in step.events[1:]} == {N("10.5.2.0/24"), N("10.5.3.0/24")}
    assert adm.refused[N("10.5.4.0/24")].blocker == N("10.5.2.0/24")


def test_admission_ipv4_only_peer_in_a_dual_stack_network_and_ipv4_only_rules():
    v4_only = lease("10.5.1.0/24")
    assert Admission(RULES).apply([added(v4_only)]).events == [added(v4_only)]
    # Without IPv6Network (an IPv4-only network) the IPv6 side is not judged (the stores give none).
    rules4 = AdmissionRules(network=N("10.5.0.0/16"), own_subnet=N("10.5.9.0/24"))
    odd = lease("10.5.1.0/24", "fd43::/64", ip6="fe80::1")
    assert Admission(rules4).apply([added(odd)]).events == [added(odd)]


def test_admission_changed_ipv6_subnet_replaces():
    a = lease("10.5.1.0/24", "fd42:0:0:1::/64")
    b = lease("10.5.1.0/24", "fd42:0:0:2::/64")
    adm = Admission(RULES)
    adm.apply([added(a)])
    step = adm.apply([added(b)])
    assert step.events == [removed(a), added(b)]


# --- the external interface's IPv6 address ---------------------------------------------------


SNAP = HostSnapshot(links=(
    LinkFacts("lo", 1, 65536, (A("127.0.0.1"),), (A6("::1"),)),
    LinkFacts("eth0", 2, 1500, (A("10.250.0.11"),), (A6("fe80::1"), A6("fd99::b"), A6("fd99::bb"))),
    LinkFacts("eth1", 3, 1500, (A("10.9.0.1"),), (A6("fe80::3"),)),
    LinkFacts("eth2", 4, 1500, (A("10.8.0.1"),), ()),
), default_index=2)


def test_usable_ipv6_addresses_global_first_then_link_local():
    assert usable_addresses6(SNAP.links[1]) == [A6("fd99::b"), A6("fd99::bb"), A6("fe80::1")]
    assert usable_addresses6(SNAP.links[0]) == []


def test_choose_interface_ipv6():
    ext = choose_interface(SNAP, check_flags([], [], "", "", ipv6=True))
    assert (ext.name, ext.ip6, ext.public_ipv6) == ("eth0", A6("fd99::b"), A6("fd99::b"))
    ext = choose_interface(SNAP, check_flags(["eth0"], [], "", "", "2001:db8::7", ipv6=True))
    assert (ext.ip6, ext.public_ipv6) == (A6("fd99::b"), A6("2001:db8::7"))
    # flanneld falls back to a link-local address, as for IPv4
    assert choose_interface(SNAP, check_flags(["eth1"], [], "", "", ipv6=True)).ip6 == A6("fe80::3")
    with pytest.raises(FlannelError, match="EnableIPv6: interface eth2 has no IPv6 address"):
        choose_interface(SNAP, check_flags(["eth2"], [], "", "", ipv6=True))
    # Without EnableIPv6 nothing IPv6 is chosen, whatever the flag says.
    ext = choose_interface(SNAP, check_flags([], [], "", "", "2001:db8::7"))
    assert ext.ip6 is None and ext.public_ipv6 is None


@pytest.mark.parametrize("text, says", [("10.0.0.1", "not a valid IPv6"), ("nonsense", "not a valid IPv6"),
                                         ("::", "not an address peers can reach"), ("ff02::1", "not an address peers"),
                                         ("::ffff:10.0.0.1", "not an address peers")])
def test_public_ipv6_flag_checked(text, says):
    with pytest.raises(FlannelError, match=f"-public-ipv6={text}: {says}"):
        check_flags([], [], "", "", text, ipv6=True)


# --- what the agent refuses --------------------------------------------------------------------


def test_ipv6_refused_for_host_gw_through_nat():
    # (EnableIPv6 with udp is refused by the config check: tests/test_dualstack_config.py)
    ext = ExternalInterface("eth0", 2, A("10.0.0.5"), A("10.0.0.5"), 1500, A6("fd99::5"), A6("2001:db8::5"))
    assert "public IPv6 2001:db8::5 differs from interface eth0 address fd99::5" in backend_refusal("host-gw", ext)
    assert backend_refusal("vxlan", ext) is None
