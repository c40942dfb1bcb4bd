"""host-gw with EnableIPv6 (issue #14): per peer also `<IPv6 subnet> via <PublicIPv6>`, protocol 70,
by the same backend run for the IPv6 family; on real devices in two namespaces (the underlay and
containers of test_dualstack_vxlan), with IPv4 and IPv6 pings, repair and removal."""

from __future__ import annotations

import json
import socket
from ipaddress import IPv4Address, IPv6Address, IPv6Network

import pytest
from netns_helpers import ping, sh
from test_dualstack_vxlan import SUBNET, SUBNET6, UNDERLAY, UNDERLAY6, two_hosts

from flannelpy.backends.hostgw.backend import HostGwBackend
from flannelpy.backends.hostgw.plan import IPV6_DEFAULT_METRIC, Route, change_matters, route_diff
from flannelpy.config.network import parse_config
from flannelpy.hostnet.monitor import KernelChange
from flannelpy.hostnet.netlink import FLANNEL_RTPROT, KernelRoute
from flannelpy.subnet.lease import EventKind, Lease, LeaseAttrs, LeaseEvent

A, A6, N6 = IPv4Address, IPv6Address, IPv6Network
CONFIG = parse_config(json.dumps({"Network": "10.55.0.0/16", "EnableIPv6": True, "IPv6Network": "fd55::/48",
                                  "Backend": {"Type": "host-gw"}}))


def lease_of(side: str, v6: bool = True) -> Lease:
    return Lease(SUBNET[side], LeaseAttrs(A(UNDERLAY[side]), "host-gw", None, A6(UNDERLAY6[side]) if v6 else None),
                 ipv6_subnet=SUBNET6[side] if v6 else None)


def route6(ns: str, dst: str) -> str:
    return sh("ip", "-n", ns, "-6", "route", "show", dst).strip()


def test_v6_route_diff_with_the_kernel_metric():
    want = Route(SUBNET6["b"], A6("fd98::2"), 2)
    have = KernelRoute(SUBNET6["b"], A6("fd98::2"), 2, FLANNEL_RTPROT, priority=IPV6_DEFAULT_METRIC)
    stale = KernelRoute(N6("fd55:0:0:7::/64"), A6("fd98::7"), 2, FLANNEL_RTPROT, priority=IPV6_DEFAULT_METRIC)
    diff = route_diff([(SUBNET6["b"], want)], [have, stale], underlay_index=2, network=N6("fd55::/48"),
                      remove_unexplained=True, priority=IPV6_DEFAULT_METRIC)
    assert diff.add == [] and diff.remove == [stale]
    change = KernelChange("route", True, 0, socket.AF_INET6, 2, None, 254, N6("fd55:0:0:7::/64"), FLANNEL_RTPROT)
    assert change_matters(change, underlay_index=2, network=N6("fd55::/48"), family=socket.AF_INET6)
    assert not change_matters(change, underlay_index=2, network=N6("fd55::/48"))  # not the IPv4 side's
    # a route outside IPv6Network (an RA's default route, say) wakes no repair pass
    ra = KernelChange("route", False, 0, socket.AF_INET6, 2, None, 254, N6("::/0"), 9)
    assert not change_matters(ra, underlay_index=2, network=N6("fd55::/48"), family=socket.AF_INET6)


@pytest.mark.root
async def test_host_gw_dual_stack_routes_pings_repair_and_removal(root):
    async with two_hosts() as (hosts, names):
        backends = {}
        for side, other in (("a", "b"), ("b", "a")):
            h = hosts[side]
            be = HostGwBackend(h.ext, CONFIG, h.nl, check_interval=3600)
            assert be.v6 is not None and (await be.prepare()).backend_v6_data is None  # flanneld's shape
            await be.start(lease_of(side))
            await be.apply([LeaseEvent(EventKind.ADDED, lease_of(other))])
            backends[side] = be
        a = hosts["a"]
        assert route6(a.ns, "fd55:0:0:2::/64") == "fd55:0:0:2::/64 via fd98::2 dev ua proto 70 metric 1024 pref medium"
        assert sh("ip", "-n", a.ns, "route", "show", "10.55.2.0/24").strip() == \
            "10.55.2.0/24 via 192.168.100.2 dev ua proto 70"
        assert ping(names[2], "10.55.2.2") and ping(names[2], "fd55:0:0:2::2") and ping(names[3], "fd55:0:0:1::2")

        be = backends["a"]
        be.peers_synced()
        sh("ip", "-n", a.ns, "-6", "route", "del", "fd55:0:0:2::/64")
        sh("ip", "-n", a.ns, "-6", "route", "add", "fd55:0:0:9::/64", "via", "fd98::9", "dev", "ua", "proto", "70")
        report = await be.v6.reconcile_once()
        assert report.added == ["route fd55:0:0:2::/64 via fd98::2"] and report.removed == [
            "route fd55:0:0:9::/64 via fd98::9"], report
        assert (await be.v6.reconcile_once()).changed is False
        assert be.programmed_count() == 1 and be.data_plane_problems() == []

        await be.apply([LeaseEvent(EventKind.REMOVED, lease_of("b"))])
        assert route6(a.ns, "fd55:0:0:2::/64") == ""
        assert sh("ip", "-n", a.ns, "route", "show", "10.55.2.0/24").strip() == ""
        # An IPv4-only peer in a dual-stack network gets its IPv4 route only.
        await be.apply([LeaseEvent(EventKind.ADDED, lease_of("b", v6=False))])
        assert route6(a.ns, "fd55:0:0:2::/64") == "" and ping(names[2], "10.55.2.2")
