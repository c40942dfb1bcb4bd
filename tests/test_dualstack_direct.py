"""DirectRouting on a dual-stack vxlan network (issue #14), as flanneld does it: a peer whose PublicIPv6 is on our
link gets `<its IPv6 subnet> via <PublicIPv6> dev <underlay>` (proto 70) instead of flannel-v6.<VNI>; both families
ping across, and a deleted direct IPv6 route comes back (kernel repair)."""

from __future__ import annotations

import json
import secrets
import subprocess
import tempfile
import time
from ipaddress import IPv6Interface

import pytest

from flannelpy.lab.netns_lab import Lab

pytestmark = [pytest.mark.root, pytest.mark.etcd]

CONFIG = json.dumps({"Network": "10.5.0.0/16", "EnableIPv6": True, "IPv6Network": "fd42::/48",
                     "Backend": {"Type": "vxlan", "DirectRouting": True}})


@pytest.fixture
def lab(root):
    prefix = "fp6" + secrets.token_hex(2)
    lab = Lab(prefix=prefix, workdir=tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp"), ipv6=True, backend="vxlan",
              config=CONFIG)
    try:
        lab.up(wait=30)
        yield lab
    finally:
        lab.down()


def v6_route(lab: Lab, host: int, peer: int) -> dict | None:
    net = str(IPv6Interface(lab.host(peer).subnet6).network)
    routes = [r for r in lab.ip_json(host, "-6", "route", "show", "proto", "70") if r["dst"] == net]
    return routes[0] if routes else None


def test_ipv6_peers_on_our_link_get_direct_routes_that_are_repaired(lab: Lab):
    for i, peer in ((1, 2), (2, 1)):
        route = v6_route(lab, i, peer)
        assert route is not None and route["gateway"] == lab.host(peer).ip6 and route["dev"] == "eth0", route
        # nothing for the peer on flannel-v6.1: no neighbour, no FDB entry
        assert lab.ip_json(i, "-6", "neigh", "show", "dev", "flannel-v6.1", "nud", "permanent") == []
    for ipv6 in (False, True):
        assert lab.wait_all_pings(30, ipv6=ipv6) == {(1, 2): True, (2, 1): True}
    net = str(IPv6Interface(lab.host(2).subnet6).network)
    subprocess.run(["ip", "-n", lab.host(1).netns, "-6", "route", "del", net], check=True)
    deadline = time.monotonic() + 15
    while v6_route(lab, 1, 2) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    route = v6_route(lab, 1, 2)
    assert route is not None and route["gateway"] == lab.host(2).ip6, lab.tail_log(1, 20)
    assert lab.wait_all_pings(30, ipv6=True) == {(1, 2): True, (2, 1): True}


def test_the_monitor_decodes_ipv6_route_destinations():
    """The IPv6 side's repair is woken by IPv6 route notifications, which carry their destination."""
    import socket
    import struct

    from flannelpy.hostnet.monitor import RTMGRP_IPV6_ROUTE, KernelMonitor, parse_changes
    from ipaddress import IPv6Address, IPv6Network

    assert KernelMonitor.GROUPS_V6 & RTMGRP_IPV6_ROUTE and not KernelMonitor.GROUPS & RTMGRP_IPV6_ROUTE
    dst = IPv6Address("fd42:0:0:1f::").packed
    rta_dst = struct.pack("=HH", 4 + 16, 1) + dst
    rta_oif = struct.pack("=HHI", 8, 4, 7)
    body = struct.pack("=BBBBBBBBI", socket.AF_INET6, 64, 0, 0, 254, 70, 0, 1, 0) + rta_dst + rta_oif
    header = struct.pack("=IHHII", 16 + len(body), 25, 0, 0, 0)  # RTM_DELROUTE
    (change,) = parse_changes(header + body)
    assert (change.kind, change.deleted, change.family, change.dst, change.ifindex, change.proto) == (
        "route", True, socket.AF_INET6, IPv6Network("fd42:0:0:1f::/64"), 7, 70)


def test_status_shows_the_ipv6_side(lab: Lab):
    from flannelpy.cli.flannelctl.status import format_status

    doc = lab.agent_status(1)
    assert (doc["ipv6_network"], doc["ipv6_subnet"], doc["public_ipv6"]) == (
        "fd42::/48", str(IPv6Interface(lab.host(1).subnet6).network), lab.host(1).ip6)
    text = format_status(doc, time.time())
    assert f"ipv6:       {doc['ipv6_subnet']} (network fd42::/48), public IPv6 {lab.host(1).ip6}" in text
