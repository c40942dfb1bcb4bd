"""The vxlan backend with EnableIPv6 (issue #14): the second device flannel-v6.<VNI> and its per-peer
entries, decided by the same plan as IPv4 (pure tests first) and programmed on real kernel devices in
two namespaces with an IPv6 underlay (then IPv4 and IPv6 pings between their containers)."""

from __future__ import annotations

import json
import socket
from contextlib import asynccontextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from netns_helpers import add_addr, add_veth, bridge_json, ifindex, ip_json, namespaces, ping, sh, unique_name

from flannelpy.backends.base import ExternalInterface
from flannelpy.backends.vxlan.backend import VxlanBackend
from flannelpy.backends.vxlan.plan import (
    IPV6_DEFAULT_METRIC,
    PeerPlan,
    Route,
    addresses_to_remove,
    change_matters,
    device_name,
    entry_diff,
    peer_plan,
)
from flannelpy.config.network import parse_config
from flannelpy.errors import ConfigError
from flannelpy.hostnet.monitor import KernelChange
from flannelpy.hostnet.netlink import FLANNEL_RTPROT, KernelRoute, NetlinkThread
from flannelpy.subnet.lease import EventKind, Lease, LeaseAttrs, LeaseEvent

A, A6, N, N6 = IPv4Address, IPv6Address, IPv4Network, IPv6Network
NETWORK, NETWORK6 = "10.55.0.0/16", "fd55::/48"
UNDERLAY = {"a": "192.168.100.1", "b": "192.168.100.2"}
UNDERLAY6 = {"a": "fd98::1", "b": "fd98::2"}
SUBNET = {"a": N("10.55.1.0/24"), "b": N("10.55.2.0/24")}
SUBNET6 = {"a": N6("fd55:0:0:1::/64"), "b": N6("fd55:0:0:2::/64")}


def config(**backend):
    return parse_config(json.dumps({"Network": NETWORK, "EnableIPv6": True, "IPv6Network": NETWORK6,
                                    "Backend": {"Type": "vxlan", **backend}}))


def lease_of(side: str, mac: str, mac6: str | None, public6: str | None = None) -> Lease:
    return Lease(SUBNET[side], LeaseAttrs(A(UNDERLAY[side]), "vxlan", {"VNI": 1, "VtepMAC": mac},
                                          A6(public6 or UNDERLAY6[side]) if mac6 else None,
                                          {"VNI": 1, "VtepMAC": mac6} if mac6 else None),
                 ipv6_subnet=SUBNET6[side] if mac6 else None)


def added(lease: Lease) -> list[LeaseEvent]:
    return [LeaseEvent(EventKind.ADDED, lease)]


def removed(lease: Lease) -> list[LeaseEvent]:
    return [LeaseEvent(EventKind.REMOVED, lease)]


# --- pure ------------------------------------------------------------------------------------


def test_v6_device_name_and_lease_view():
    assert device_name(1) == "flannel.1" and device_name(7, ipv6=True) == "flannel-v6.7"
    ext = ExternalInterface("eth0", 2, A("192.168.100.1"), A("192.168.100.1"), 1500, A6("fd98::1"), A6("fd98::1"))
    be = VxlanBackend(ext, config(), NetlinkThread())
    v6 = be.v6
    assert v6 is not None and v6.spec.name == "flannel-v6.1" and v6.spec.mtu == 1430 and be.spec.mtu == 1450
    assert v6.spec.local == A6("fd98::1") and v6.network == N6(NETWORK6)
    peer = lease_of("b", "02:00:00:00:00:02", "02:00:00:00:06:02")
    view = v6.lease_view(peer)
    assert view is not None and view.subnet == SUBNET6["b"] and view.attrs.public_ip == A6("fd98::2")
    assert view.attrs.vtep_mac == "02:00:00:00:06:02" and be.lease_view(peer) is peer
    assert v6.lease_view(lease_of("b", "02:00:00:00:00:02", None)) is None  # an IPv4-only peer
    plan = peer_plan(view, direct=False)
    assert plan.route == Route(SUBNET6["b"], A6("fd55:0:0:2::"), on_vxlan=True)
    assert (plan.neigh.ip, plan.neigh.mac) == (A6("fd55:0:0:2::"), "02:00:00:00:06:02")
    assert (plan.fdb.mac, plan.fdb.dst) == ("02:00:00:00:06:02", A6("fd98::2"))
    # No IPv6 device without EnableIPv6; and none without an IPv6 address to send from.
    plain = parse_config(json.dumps({"Network": NETWORK, "Backend": {"Type": "vxlan"}}))
    assert VxlanBackend(ext, plain, NetlinkThread()).v6 is None
    no6 = ExternalInterface("eth0", 2, A("192.168.100.1"), A("192.168.100.1"), 1500)
    with pytest.raises(ConfigError, match="EnableIPv6: the vxlan backend needs"):
        VxlanBackend(no6, config(), NetlinkThread())
    with pytest.raises(ConfigError, match="leaves 1250 for flannel-v6.1; need at least 1350"):
        VxlanBackend(ext, config(MTU=1320), NetlinkThread())


def test_v6_addresses_to_remove_keeps_base_128_and_link_local():
    have = [(A6("fd55:0:0:1::"), 128), (A6("fe80::1"), 64), (A6("fd55:0:0:7::"), 128), (A6("fd55:0:0:1::"), 64)]
    assert addresses_to_remove(have, A6("fd55:0:0:1::"), N6(NETWORK6)) == [
        (A6("fd55:0:0:7::"), 128), (A6("fd55:0:0:1::"), 64)]


def test_v6_routes_carry_the_kernel_default_metric_and_are_not_churned():
    view_plan = PeerPlan(Route(SUBNET6["b"], A6("fd55:0:0:2::"), on_vxlan=True))
    ours = KernelRoute(SUBNET6["b"], A6("fd55:0:0:2::"), 9, FLANNEL_RTPROT, priority=IPV6_DEFAULT_METRIC, onlink=True)
    stale = KernelRoute(N6("fd55:0:0:3::/64"), A6("fd55:0:0:3::"), 9, FLANNEL_RTPROT, priority=1024, onlink=True)
    kernel_ll = KernelRoute(N6("fe80::/64"), None, 9, 2, priority=256)
    diff = entry_diff([(SUBNET6["b"], view_plan)], [ours, stale, kernel_ll], [], [], device_index=9,
                      underlay_index=2, network=N6(NETWORK6), remove_unexplained=True,
                      route_priority=IPV6_DEFAULT_METRIC)
    assert diff.add_routes == [] and diff.remove_routes == [stale]
    # With IPv4's metric 0 the same route would be re-added on every pass.
    assert entry_diff([(SUBNET6["b"], view_plan)], [ours], [], [], device_index=9, underlay_index=2,
                      network=N6(NETWORK6), remove_unexplained=False).add_routes


def test_v6_change_matters_by_family():
    route6 = KernelChange("route", False, 1, socket.AF_INET6, 9, None, 254, None, 3)
    route4 = KernelChange("route", False, 1, socket.AF_INET, 9, None, 254, N("10.55.2.0/24"), 3)
    kw = dict(device_index=9, device="flannel-v6.1", underlay_index=2, network=N6(NETWORK6))
    assert change_matters(route6, family=socket.AF_INET6, **kw)
    assert not change_matters(route4, family=socket.AF_INET6, **kw)


# --- on real devices -------------------------------------------------------------------------


@dataclass
class Host:
    ns: str
    nl: NetlinkThread
    ext: ExternalInterface


@asynccontextmanager
async def two_hosts():
    """Namespaces <p>-a, <p>-b joined by veth ua<->ub with IPv4 and IPv6 underlay addresses, each with
    a container namespace behind a veth holding .1/::1 (host) and .2/::2 (container) of its subnets."""
    p = unique_name("fpv6")
    names = [f"{p}-a", f"{p}-b", f"{p}-ca", f"{p}-cb"]
    with namespaces(*names):
        a, b = names[0], names[1]
        add_veth(a, "ua", b, "ub")
        for side, ns, dev in (("a", a, "ua"), ("b", b, "ub")):
            add_addr(ns, dev, f"{UNDERLAY[side]}/24")
            sh("ip", "-n", ns, "addr", "add", f"{UNDERLAY6[side]}/64", "dev", dev, "nodad")
        for side, host, cont in (("a", a, names[2]), ("b", b, names[3])):
            net, net6 = SUBNET[side], SUBNET6[side]
            add_veth(host, "hv", cont, "eth0")
            add_addr(host, "hv", f"{net.network_address + 1}/24")
            add_addr(cont, "eth0", f"{net.network_address + 2}/24")
            sh("ip", "-n", host, "addr", "add", f"{net6.network_address + 1}/64", "dev", "hv", "nodad")
            sh("ip", "-n", cont, "addr", "add", f"{net6.network_address + 2}/64", "dev", "eth0", "nodad")
            sh("ip", "-n", cont, "route", "add", "default", "via", str(net.network_address + 1))
            sh("ip", "-n", cont, "-6", "route", "add", "default", "via", str(net6.network_address + 1))
            sh("ip", "netns", "exec", host, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            sh("ip", "netns", "exec", host, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        hosts = {}
        try:
            for side, ns, dev in (("a", a, "ua"), ("b", b, "ub")):
                ip = A(UNDERLAY[side])
                hosts[side] = Host(ns, NetlinkThread(netns=ns), ExternalInterface(
                    dev, ifindex(ns, dev), ip, ip, 1500, A6(UNDERLAY6[side]), A6(UNDERLAY6[side])))
            yield hosts, names
        finally:
            for h in hosts.values():
                h.nl.stop()


async def up(host: Host, side: str) -> tuple[VxlanBackend, str, str]:
    be = VxlanBackend(host.ext, config(), host.nl, quiet_interval=None)
    data = await be.prepare()
    assert data.backend_data is not None and data.backend_v6_data is not None
    own = Lease(SUBNET[side], LeaseAttrs(host.ext.public_ip, "vxlan", data.backend_data, host.ext.public_ipv6,
                                         data.backend_v6_data), ipv6_subnet=SUBNET6[side])
    await be.start(own)
    return be, data.backend_data["VtepMAC"], data.backend_v6_data["VtepMAC"]


def v6_neighs(ns: str) -> list[tuple[str, str, list[str]]]:
    return [(n["dst"], n.get("lladdr"), n["state"]) for n in ip_json(ns, "-6", "neigh", "show", "dev", "flannel-v6.1")]


def v6_fdbs(ns: str) -> list[tuple[str, str, list[str], str]]:
    return [(f["mac"], f["dst"], f.get("flags", []), f.get("state", ""))
            for f in bridge_json(ns, "fdb", "show", "dev", "flannel-v6.1") if f.get("dst")]


def route6(ns: str, dst: str) -> str:
    return sh("ip", "-n", ns, "-6", "route", "show", dst).strip()


@pytest.mark.root
async def test_dual_stack_devices_entries_and_pings_both_families(root):
    async with two_hosts() as (hosts, names):
        a, b = hosts["a"], hosts["b"]
        be_a, mac_a, mac6_a = await up(a, "a")
        be_b, mac_b, mac6_b = await up(b, "b")
        assert mac6_a != mac_a
        await be_a.apply(added(lease_of("b", mac_b, mac6_b)))
        await be_b.apply(added(lease_of("a", mac_a, mac6_a)))

        dev = ip_json(a.ns, "-d", "link", "show", "dev", "flannel-v6.1")[0]
        info = dev["linkinfo"]["info_data"]
        assert dev["address"] == mac6_a and dev["mtu"] == 1430 and "UP" in dev["flags"]
        assert info["id"] == 1 and info["port"] == 8472 and info.get("local6", info.get("local")) == "fd98::1"
        assert info["link"] == "ua"
        assert info["learning"] is False
        addrs = [(x["local"], x["prefixlen"]) for x in ip_json(a.ns, "-6", "addr", "show", "dev", "flannel-v6.1")[0]
                 ["addr_info"] if x["scope"] == "global"]
        assert addrs == [("fd55:0:0:1::", 128)]
        assert v6_neighs(a.ns) == [("fd55:0:0:2::", mac6_b, ["PERMANENT"])]
        assert v6_fdbs(a.ns) == [(mac6_b, "fd98::2", ["self"], "permanent")]
        assert route6(a.ns, "fd55:0:0:2::/64") == "fd55:0:0:2::/64 via fd55:0:0:2:: dev flannel-v6.1 proto 70 metric 1024 onlink pref medium"
        # The IPv4 side is exactly what it is without EnableIPv6.
        assert sh("ip", "-n", a.ns, "route", "show", "10.55.2.0/24").strip() == \
            "10.55.2.0/24 via 10.55.2.0 dev flannel.1 proto 70 onlink"
        assert be_a.programmed_count() == 1

        assert ping(names[2], "10.55.2.2") and ping(names[3], "10.55.1.2")
        assert ping(names[2], "fd55:0:0:2::2") and ping(names[3], "fd55:0:0:1::2")

        # Repair: a route and a neighbour deleted by hand come back with one pass of the IPv6 device;
        # an entry of ours that no lease explains goes.
        assert be_a.v6 is not None
        be_a.peers_synced()
        sh("ip", "-n", a.ns, "-6", "route", "del", "fd55:0:0:2::/64")
        sh("ip", "-n", a.ns, "-6", "neigh", "del", "fd55:0:0:2::", "dev", "flannel-v6.1")
        sh("ip", "-n", a.ns, "-6", "neigh", "replace", "fd55:0:0:9::", "lladdr", "02:00:00:00:09:09",
           "dev", "flannel-v6.1", "nud", "permanent")
        report = await be_a.v6.reconcile_once()
        assert sorted(report.added) == ["neigh fd55:0:0:2::", "route fd55:0:0:2::/64"], report
        assert report.removed == ["neigh fd55:0:0:9::"], report
        assert v6_neighs(a.ns) == [("fd55:0:0:2::", mac6_b, ["PERMANENT"])]
        assert (await be_a.v6.reconcile_once()).changed is False  # nothing churns on the next pass
        assert ping(names[2], "fd55:0:0:2::2")

        # The peer turns IPv4-only (a new lease value): its IPv6 entries go, IPv4 stays.
        await be_a.apply(removed(lease_of("b", mac_b, mac6_b)) + added(lease_of("b", mac_b, None)))
        assert v6_neighs(a.ns) == [] and v6_fdbs(a.ns) == [] and route6(a.ns, "fd55:0:0:2::/64") == ""
        assert ping(names[2], "10.55.2.2")
        await be_a.apply(removed(lease_of("b", mac_b, None)))
        assert sh("ip", "-n", a.ns, "route", "show", "10.55.2.0/24").strip() == ""


@pytest.mark.root
async def test_v6_device_survives_restart_with_its_mac_and_is_recreated_when_deleted(root):
    async with two_hosts() as (hosts, _names):
        a = hosts["a"]
        be, _mac, mac6 = await up(a, "a")
        again, _mac2, mac6_again = await up(a, "a")  # a restart reuses the compatible device
        assert mac6_again == mac6 and again.v6 is not None
        sh("ip", "-n", a.ns, "link", "del", "flannel-v6.1")
        report = await again.v6.reconcile_once()
        assert report.device and "re-created flannel-v6.1" in report.device, report
        dev = ip_json(a.ns, "-d", "link", "show", "dev", "flannel-v6.1")[0]
        assert dev["address"] == mac6 and dev["mtu"] == 1430
