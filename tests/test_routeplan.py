"""Pure planning of the kernel backends: vxlan entry shapes, device compatibility, MACs, and the
reconciliation diffs of vxlan and host-gw; the monitor's message decoding (no root needed)."""

import random
import socket
import struct
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannelpy.backends.hostgw import plan as hgplan
from flannelpy.backends.vxlan.plan import (
    Fdb,
    Neigh,
    PeerPlan,
    Route,
    VxlanDeviceFacts,
    VxlanDeviceSpec,
    addresses_to_remove,
    change_matters,
    device_name,
    device_repair,
    entry_diff,
    incompatibilities,
    is_on_link,
    peer_plan,
    random_vtep_mac,
    stale_entries,
)
from flannelpy.hostnet.monitor import OVERFLOW, KernelChange, parse_changes
from flannelpy.hostnet.netlink import FLANNEL_RTPROT, KernelFdb, KernelNeigh, KernelRoute
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


# --- reconciliation diffs (issue #12): what should be there vs what is there ----------------

NET = IPv4Network("10.5.0.0/16")
DEV, UL = 7, 3  # flannel.1's and the underlay's ifindex
N2 = IPv4Network("10.5.2.0/24")


def vx_wanted(*specs):
    """(subnet, plan) pairs for vxlan peers "10.5.N.0/24" at 192.168.1.N with MAC 0a::0N."""
    out = []
    for n in specs:
        out.append((IPv4Network(f"10.5.{n}.0/24"),
                    peer_plan(vx_lease(f"10.5.{n}.0/24", f"192.168.1.{n}", f"0a:00:00:00:00:0{n}"), False)))
    return out


def vx_present(*specs):
    """The kernel entries exactly as our programming leaves them for those peers."""
    routes, neighs, fdbs = [], [], []
    for n in specs:
        routes.append(KernelRoute(IPv4Network(f"10.5.{n}.0/24"), A(f"10.5.{n}.0"), DEV, FLANNEL_RTPROT, onlink=True))
        neighs.append(KernelNeigh(A(f"10.5.{n}.0"), f"0a:00:00:00:00:0{n}", True))
        fdbs.append(KernelFdb(f"0a:00:00:00:00:0{n}", A(f"192.168.1.{n}"), True))
    return routes, neighs, fdbs


def diff(wanted, routes, neighs, fdbs, remove=True):
    # One-shot iterators, as a repair pass feeds the kernel's entries straight from its dumps: each
    # table's diff must take its entries in a single pass.
    return entry_diff(iter(wanted), iter(routes), iter(neighs), iter(fdbs), device_index=DEV, underlay_index=UL,
                      network=NET, remove_unexplained=remove)


def test_vxlan_diff_nothing_to_do_when_kernel_matches():
    assert diff(vx_wanted(2, 3), *vx_present(2, 3)).empty


def test_vxlan_diff_restores_missing_entries_per_peer():
    routes, neighs, fdbs = vx_present(2, 3)
    d = diff(vx_wanted(2, 3), routes[1:], neighs[:1], [])
    assert [s for s, _ in d.add_routes] == [N2]
    assert [s for s, _ in d.add_neighs] == [IPv4Network("10.5.3.0/24")]
    assert [f.mac for _, f in d.add_fdbs] == ["0a:00:00:00:00:02", "0a:00:00:00:00:03"]
    assert not (d.remove_routes or d.remove_neighs or d.remove_fdbs)


def test_vxlan_diff_wrong_entries_are_replaced_not_deleted():
    routes, neighs, fdbs = vx_present(2)
    wrong_route = KernelRoute(N2, A("10.5.2.0"), DEV, 3, onlink=True)  # proto boot: an older run or flanneld
    wrong_neigh = KernelNeigh(A("10.5.2.0"), "0a:00:00:00:00:99", True)
    moved_fdb = KernelFdb("0a:00:00:00:00:02", A("192.168.1.99"), True)
    d = diff(vx_wanted(2), [wrong_route], [wrong_neigh], [moved_fdb])
    assert len(d.add_routes) == len(d.add_neighs) == len(d.add_fdbs) == 1
    assert not (d.remove_routes or d.remove_neighs or d.remove_fdbs)  # "replace" overwrites each


def test_vxlan_diff_removes_only_our_unexplained_entries():
    routes, neighs, fdbs = vx_present(2, 9)
    others = [
        KernelRoute(IPv4Network("10.5.1.0/24"), None, 12, 2),  # docker0's connected route (proto kernel)
        KernelRoute(IPv4Network("10.5.8.0/24"), A("192.168.1.8"), UL, 3),  # someone's route in Network
        KernelRoute(IPv4Network("192.168.77.0/24"), A("192.168.1.1"), UL, FLANNEL_RTPROT),  # ours? not in Network
        KernelRoute(IPv4Network("10.5.9.0/24"), A("192.168.1.9"), 12, FLANNEL_RTPROT),  # our proto, other device
    ]
    ours_direct = KernelRoute(IPv4Network("10.5.10.0/24"), A("192.168.1.10"), UL, FLANNEL_RTPROT)
    bogus_on_dev = KernelRoute(IPv4Network("172.20.0.0/16"), None, DEV, 3)
    arp_cache = KernelNeigh(A("10.5.44.0"), "0a:00:00:00:00:44", False)
    learned = KernelFdb("0a:00:00:00:00:45", A("192.168.1.45"), False)
    d = diff(vx_wanted(2), routes + others + [ours_direct, bogus_on_dev], neighs + [arp_cache], fdbs + [learned])
    assert d.remove_routes == [routes[1], ours_direct, bogus_on_dev]
    assert d.remove_neighs == [neighs[1]] and d.remove_fdbs == [fdbs[1]]
    assert not (d.add_routes or d.add_neighs or d.add_fdbs)
    # Before the agent has the whole peer set, nothing is removed.
    kept = diff(vx_wanted(2), routes + [ours_direct], neighs, fdbs, remove=False)
    assert kept.empty


def test_vxlan_diff_second_remote_for_a_mac_is_removed():
    routes, neighs, fdbs = vx_present(2)
    extra = KernelFdb("0a:00:00:00:00:02", A("192.168.1.99"), True)
    d = diff(vx_wanted(2), routes, neighs, fdbs + [extra])
    assert d.remove_fdbs == [extra] and not d.add_fdbs


def test_vxlan_diff_direct_route_is_matched_on_the_underlay():
    plan = peer_plan(vx_lease("10.5.2.0/24", "192.168.1.2"), True)
    have = KernelRoute(N2, A("192.168.1.2"), UL, FLANNEL_RTPROT)
    assert diff([(N2, plan)], [have], [], []).empty
    on_dev = KernelRoute(N2, A("192.168.1.2"), DEV, FLANNEL_RTPROT)
    assert [s for s, _ in diff([(N2, plan)], [on_dev], [], []).add_routes] == [N2]


def test_device_repair_decisions():
    mac = "0a:00:00:00:00:01"
    assert device_repair(SPEC, mac, None).recreate == "it was missing"
    assert "vni" in device_repair(SPEC, mac, facts(vni=9)).recreate
    assert not device_repair(SPEC, mac, facts(mtu=1450)).needed
    r = device_repair(SPEC, mac, facts(mac="0a:00:00:00:00:99", mtu=1300, up=False))
    assert (r.recreate, r.set_mac, r.set_mtu, r.set_up) == (None, True, True, True)
    assert r.describe(SPEC, facts(mac="0a:00:00:00:00:99", mtu=1300), mac) == \
        "flannel.1: MAC 0a:00:00:00:00:99 -> 0a:00:00:00:00:01, MTU 1300 -> 1450, was down, set up"


def test_which_kernel_changes_wake_the_vxlan_repair():
    def m(change):
        return change_matters(change, device_index=DEV, device="flannel.1", underlay_index=UL, network=NET)

    assert m(OVERFLOW)
    assert m(KernelChange("link", True, 0, ifindex=DEV))
    assert m(KernelChange("link", False, 0, ifindex=99, ifname="flannel.1"))  # someone made one by our name
    assert not m(KernelChange("link", False, 0, ifindex=42, ifname="eth9"))
    assert m(KernelChange("addr", True, 5, family=2, ifindex=DEV))
    assert not m(KernelChange("addr", False, 5, family=10, ifindex=DEV))  # IPv6 link-local
    assert m(KernelChange("route", True, 5, family=2, ifindex=DEV, table=254, dst=IPv4Network("1.2.3.0/24")))
    assert m(KernelChange("route", False, 5, family=2, ifindex=12, table=254, dst=IPv4Network("10.5.7.0/24")))
    assert not m(KernelChange("route", False, 5, family=2, ifindex=12, table=254, dst=IPv4Network("172.16.0.0/12")))
    assert not m(KernelChange("route", False, 5, family=2, ifindex=DEV, table=255, dst=IPv4Network("10.5.1.0/32")))
    assert m(KernelChange("neigh", True, 123, family=7, ifindex=DEV, state=0x80))  # bridge fdb del
    assert m(KernelChange("neigh", True, 0, family=2, ifindex=DEV, state=0x80))
    assert not m(KernelChange("neigh", False, 0, family=2, ifindex=DEV, state=0x02))  # the kernel's ARP churn
    assert not m(KernelChange("neigh", True, 123, family=2, ifindex=UL, state=0x80))


def test_hostgw_diff():
    gw = A("192.168.1.2")
    want = [(N2, hgplan.Route(N2, gw, UL))]
    exact = KernelRoute(N2, gw, UL, FLANNEL_RTPROT)
    kw = dict(underlay_index=UL, network=NET, remove_unexplained=True)
    # The kernel's routes as one-shot iterators, as a repair pass feeds them from its dump.
    assert hgplan.route_diff(want, iter([exact]), **kw).empty
    assert hgplan.route_diff(want, iter([]), **kw).add == want
    users = KernelRoute(N2, A("192.168.1.77"), UL, 3)  # someone else's route to the peer's subnet: replaced
    d = hgplan.route_diff(want, iter([users]), **kw)
    assert d.add == want and d.remove == []
    stale = KernelRoute(IPv4Network("10.5.3.0/24"), A("192.168.1.3"), UL, FLANNEL_RTPROT)
    metric = KernelRoute(N2, gw, UL, FLANNEL_RTPROT, priority=100)  # ours, but not what we make
    not_ours = [KernelRoute(IPv4Network("10.5.4.0/24"), A("192.168.1.4"), UL, 4),
                KernelRoute(IPv4Network("0.0.0.0/0"), A("192.168.1.1"), UL, FLANNEL_RTPROT),
                KernelRoute(IPv4Network("10.5.5.0/24"), A("192.168.1.5"), 9, FLANNEL_RTPROT)]
    d = hgplan.route_diff(want, iter([exact, stale, metric] + not_ours), **kw)
    assert d.add == [] and d.remove == [stale, metric]
    assert hgplan.route_diff(want, iter([exact, stale]), underlay_index=UL, network=NET, remove_unexplained=False).empty


def test_which_kernel_changes_wake_the_hostgw_repair():
    def m(change):
        return hgplan.change_matters(change, underlay_index=UL, network=NET)

    assert m(OVERFLOW) and m(KernelChange("link", False, 0, ifindex=UL))
    assert m(KernelChange("route", True, 77, family=2, table=254, dst=IPv4Network("10.5.2.0/24")))
    assert not m(KernelChange("route", True, 77, family=2, table=254, dst=IPv4Network("192.168.9.0/24")))
    assert not m(KernelChange("neigh", True, 77, family=2, ifindex=UL, state=0x80))


def _nlmsg(mtype: int, sender: int, body: bytes, attrs: list[tuple[int, bytes]] = ()) -> bytes:
    payload = body
    for kind, value in attrs:
        rta = struct.pack("=HH", 4 + len(value), kind) + value
        payload += rta + b"\0" * (-len(rta) % 4)
    return struct.pack("=IHHII", 16 + len(payload), mtype, 0, 0, sender) + payload


def test_monitor_parses_the_fields_a_backend_needs():
    route = _nlmsg(25, 4242, struct.pack("=BBBBBBBBI", 2, 24, 0, 0, 254, 70, 0, 1, 0),
                   [(1, bytes([10, 5, 2, 0])), (4, struct.pack("=I", DEV))])
    link = _nlmsg(17, 0, struct.pack("=BBHiII", 0, 0, 1, DEV, 0, 0), [(3, b"flannel.1\0")])
    neigh = _nlmsg(29, 99, struct.pack("=BBHiHBB", socket.AF_BRIDGE, 0, 0, DEV, 0x80, 2, 0))
    addr = _nlmsg(21, 5, struct.pack("=BBBBI", 2, 32, 0, 0, DEV))
    junk = _nlmsg(3, 0, b"") + _nlmsg(24, 1, b"\x02")  # NLMSG_DONE, and a route too short to decode
    changes = parse_changes(route + link + neigh + addr + junk)
    assert changes == [
        KernelChange("route", True, 4242, 2, DEV, None, 254, IPv4Network("10.5.2.0/24"), 70),
        KernelChange("link", True, 0, 0, DEV, "flannel.1"),
        KernelChange("neigh", True, 99, socket.AF_BRIDGE, DEV, state=0x80),
        KernelChange("addr", True, 5, 2, DEV),
    ]
    assert parse_changes(b"\x01\x02") == []  # a truncated datagram is skipped, never raised


def test_monitor_reads_the_mac_of_an_fdb_notification():
    neigh = _nlmsg(28, 0, struct.pack("=BBHiHBB", socket.AF_BRIDGE, 0, 0, DEV, 0x80, 2, 0),
                   [(2, bytes.fromhex("0a0000000102")), (1, bytes([192, 168, 1, 2]))])
    assert parse_changes(neigh)[0].lladdr == "0a:00:00:00:01:02"


def test_monitor_drops_our_own_notifications_and_unread_kinds_on_the_header():
    route = _nlmsg(25, 4242, struct.pack("=BBBBBBBBI", 2, 24, 0, 0, 254, 70, 0, 1, 0),
                   [(1, bytes([10, 5, 2, 0])), (4, struct.pack("=I", DEV))])
    foreign = _nlmsg(25, 0, struct.pack("=BBBBBBBBI", 2, 24, 0, 0, 254, 3, 0, 1, 0), [(1, bytes([10, 5, 3, 0]))])
    # One notification per datagram, as the kernel sends them: ours (port 4242) is not decoded.
    assert parse_changes(route, skip_senders={4242}) == []
    assert parse_changes(foreign, skip_senders={4242})[0].dst == IPv4Network("10.5.3.0/24")
    # A kind no backend reads (RTM_NEWRULE) is dropped too; a datagram of several messages is
    # read message by message, so ours among them does not hide the others.
    assert parse_changes(_nlmsg(32, 0, b"\0" * 12)) == []
    (change,) = parse_changes(route + foreign, skip_senders={4242})
    assert change.dst == IPv4Network("10.5.3.0/24") and change.sender == 0


def test_echo_filter_drops_our_own_announcement_once_and_only_while_fresh():
    from flannelpy.backends.repair import EchoFilter

    now = [100.0]
    echoes = EchoFilter(ttl=2.0, clock=lambda: now[0])
    echoes.expect(("0a:00:00:00:00:01", False))
    assert echoes.consume(("0a:00:00:00:00:01", False))
    assert not echoes.consume(("0a:00:00:00:00:01", False))  # a second one is someone else's
    echoes.expect(("0a:00:00:00:00:02", True))
    assert not echoes.consume(("0a:00:00:00:00:02", False))  # an addition is not our deletion
    now[0] += 2.5
    echoes.expect(("0a:00:00:00:00:03", False))
    now[0] += 2.5
    assert not echoes.consume(("0a:00:00:00:00:03", False))  # expired: the kernel never announced it


def test_echo_filter_gives_back_a_starts_table_once_every_echo_came():
    import sys

    from flannelpy.backends.repair import EchoFilter

    echoes = EchoFilter(ttl=2.0, clock=lambda: 100.0)
    keys = [(f"0a:00:00:00:{i >> 8:02x}:{i & 255:02x}", False) for i in range(1000)]
    for key in keys:
        echoes.expect(key)
    assert sys.getsizeof(echoes._expected) > 20_000
    assert all(echoes.consume(key) for key in keys)
    assert sys.getsizeof(echoes._expected) < 1_000  # not the 1000-entry table, for good


def test_stable_vtep_mac_is_the_same_for_the_same_host_and_differs_between_hosts():
    from ipaddress import IPv4Address

    from flannelpy.backends.vxlan.plan import stable_vtep_mac

    mid = "0123456789abcdef0123456789abcdef"
    mac = stable_vtep_mac(mid, IPv4Address("10.0.0.11"), 1)
    assert mac == stable_vtep_mac(mid + "\n", IPv4Address("10.0.0.11"), 1)  # as read from the file
    first = int(mac.split(":")[0], 16)
    assert first & 0x01 == 0 and first & 0x02 == 0x02  # unicast, locally administered
    # a cloned image (same machine-id) on another address, another VNI, another machine: all differ
    others = {stable_vtep_mac(mid, IPv4Address("10.0.0.12"), 1), stable_vtep_mac(mid, IPv4Address("10.0.0.11"), 2),
              stable_vtep_mac("f" * 32, IPv4Address("10.0.0.11"), 1)}
    assert mac not in others and len(others) == 3


# --- a repair pass's diffs index the peers' own objects (issue #19: RSS per peer) -------------------


def _reference_diff(wanted, routes, neighs, fdbs):
    """The diffs as they were written before they indexed the peers' own objects: every wanted entry
    copied into a dict per table.  The new ones must answer the same."""
    from flannelpy.backends.vxlan.plan import route_is_ours, route_matches

    want_routes = {plan.route.dst: (s, plan.route) for s, plan in wanted}
    found, suspects = set(), []
    for have in routes:
        w = want_routes.get(have.dst)
        if w is not None and route_matches(w[1], have, DEV, 0):
            found.add(have.dst)
        elif route_is_ours(have, DEV, UL, NET):
            suspects.append(have)
    add_routes = [(s, r) for dst, (s, r) in want_routes.items() if dst not in found]
    replaced = {r.dst for _s, r in add_routes}
    remove_routes = [h for h in suspects if not (h.dst in replaced and h.priority == 0 and h.tos == 0)]

    want_neighs = {plan.neigh.ip: (s, plan.neigh) for s, plan in wanted if plan.neigh is not None}
    present, suspects = set(), []
    for n in neighs:
        if not n.permanent:
            continue
        w = want_neighs.get(n.ip)
        if w is not None and (n.mac or "") == w[1].mac.lower():
            present.add(w[1].ip)
        else:
            suspects.append(n)
    add_neighs = [(s, w) for ip, (s, w) in want_neighs.items() if ip not in present]
    replaced = {w.ip for _s, w in add_neighs}
    remove_neighs = [n for n in suspects if n.ip not in replaced]

    want_fdbs = {(plan.fdb.mac.lower(), plan.fdb.dst): (s, plan.fdb) for s, plan in wanted if plan.fdb is not None}
    present, suspects = set(), []
    for f in fdbs:
        if not f.permanent:
            continue
        w = want_fdbs.get((f.mac, f.dst))
        if w is not None:
            present.add(w[1])
        else:
            suspects.append(f)
    add_fdbs = [(s, w) for s, w in want_fdbs.values() if w not in present]
    replaced_macs = {w.mac.lower() for _s, w in add_fdbs}
    per_mac = {}
    for mac in [w.mac.lower() for w in present] + [f.mac for f in suspects]:
        if mac in replaced_macs:
            per_mac[mac] = per_mac.get(mac, 0) + 1
    remove_fdbs = [f for f in suspects if not (f.mac in replaced_macs and per_mac[f.mac] == 1)]
    return add_routes, remove_routes, add_neighs, remove_neighs, add_fdbs, remove_fdbs


@pytest.mark.parametrize("seed", range(300))
def test_vxlan_diffs_answer_as_the_copying_ones_did(seed):
    """Random peers (shared MACs, upper-case MACs, shared PublicIPs, direct routes) and random
    kernel tables (each peer's entries present, missing, wrong, moved; extras of ours and not)."""
    rng = random.Random(seed)
    macs = [f"0a:00:00:00:00:{i:02x}" for i in range(1, 6)] + ["0A:00:00:00:00:0B"]
    wanted = []
    for n in rng.sample(range(2, 60), rng.randint(0, 12)):
        lease = vx_lease(f"10.5.{n}.0/24", f"192.168.1.{rng.choice([n, 7, 8])}", rng.choice(macs + [None] * 0))
        wanted.append((lease.subnet, peer_plan(lease, rng.random() < 0.15)))
    routes, neighs, fdbs = [], [], []
    for subnet, plan in wanted:
        if rng.random() < 0.7:
            r = plan.route
            routes.append(KernelRoute(r.dst, r.gateway, DEV if r.on_vxlan else UL, FLANNEL_RTPROT, onlink=r.on_vxlan)
                          if rng.random() < 0.8 else KernelRoute(r.dst, A("192.168.1.99"), DEV, 3, onlink=True))
        if plan.neigh is not None and rng.random() < 0.7:
            neighs.append(KernelNeigh(plan.neigh.ip, plan.neigh.mac.lower() if rng.random() < 0.8 else "0a:00:00:00:00:99",
                                      rng.random() < 0.9))
        if plan.fdb is not None and rng.random() < 0.7:
            fdbs.append(KernelFdb(plan.fdb.mac.lower(), plan.fdb.dst if rng.random() < 0.8 else A("192.168.1.98"),
                                  rng.random() < 0.9))
    for _ in range(rng.randint(0, 3)):  # entries no peer explains
        n = rng.randint(60, 90)
        routes.append(KernelRoute(IPv4Network(f"10.5.{n}.0/24"), A(f"10.5.{n}.0"), DEV, FLANNEL_RTPROT, onlink=True))
        neighs.append(KernelNeigh(A(f"10.5.{n}.0"), rng.choice(macs).lower(), True))
        fdbs.append(KernelFdb(rng.choice(macs).lower(), A(f"192.168.1.{n}"), True))
    for seq in (routes, neighs, fdbs):
        rng.shuffle(seq)
    got = diff(wanted, routes, neighs, fdbs)
    want = _reference_diff(wanted, routes, neighs, fdbs)
    as_set = lambda pairs: sorted(map(repr, pairs))  # noqa: E731  # order among shared MACs may differ
    assert as_set(got.add_routes) == as_set(want[0]) and got.remove_routes == want[1]
    assert as_set(got.add_neighs) == as_set(want[2]) and got.remove_neighs == want[3]
    assert as_set(got.add_fdbs) == as_set(want[4]) and got.remove_fdbs == want[5]


def test_a_pass_keeps_no_object_per_peer():
    """The diffs over a lazy view of the peers (plans worked out when asked, as a repair pass hands
    them in) hold only index tables while they read the kernel's entries, not a plan, a tuple or a
    string per peer: the pass's high-water mark, reached again at every pass, was most of what an
    extra peer cost in RSS.  Bytes are counted by tracemalloc, the same on every machine."""
    import tracemalloc

    from flannelpy.backends.vxlan.plan import MappedView

    def peak(n: int) -> int:
        leases = {}
        for i in range(n):
            lease = vx_lease(str(IPv4Network((0x0A000000 + (i << 8), 24))), str(A(0xC0A80000 + i)),
                             f"0a:00:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}")
            leases[lease.subnet] = lease
        plans = MappedView(leases, lambda lease: peer_plan(lease, False))
        routes = [KernelRoute(s, s.network_address, DEV, FLANNEL_RTPROT, onlink=True) for s in leases]
        neighs = [KernelNeigh(s.network_address, leases[s].attrs.vtep_mac, True) for s in leases]
        fdbs = [KernelFdb(leases[s].attrs.vtep_mac, leases[s].attrs.public_ip, True) for s in leases]
        big_net = IPv4Network("10.0.0.0/8")
        tracemalloc.start()
        try:
            d = entry_diff(plans, iter(routes), iter(neighs), iter(fdbs), device_index=DEV, underlay_index=UL,
                           network=big_net, remove_unexplained=True)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            assert d.empty

    per_peer = (peak(3000) - peak(1000)) / 2000
    # Index tables (a dict and a set, ~70-100 B a peer at their fullest); copying each peer's
    # entries, as the diffs did, was ~300 B.
    assert per_peer < 150, f"{per_peer:.0f} B per peer"
