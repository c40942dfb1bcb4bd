"""hostnet/rtnl.py and KernelDumps: requests take their family from their addresses, and the
reads (IPv6 routes and neighbours, devices, addresses, `ip route get`) agree with iproute2 on a
real kernel, in a namespace of this test."""

from __future__ import annotations

import errno
import os
import secrets
import socket
import struct
import subprocess
from ipaddress import IPv4Address, IPv6Address, IPv6Network, ip_address

import pytest

from flannelpy.hostnet import rtnl
from flannelpy.hostnet.netlink import FLANNEL_RTPROT, KernelDumps, KernelNeigh

root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


def test_route_request_family_follows_the_addresses():
    v4 = rtnl.route_request(True, IPv4Address("10.1.2.0").packed, 24, IPv4Address("10.1.2.0").packed,
                            oif=3, table=254, protocol=FLANNEL_RTPROT)
    v6 = rtnl.route_request(False, IPv6Address("fd42::").packed, 64, IPv6Address("fd42::1").packed,
                            oif=None, table=254, protocol=0)
    assert v4.payload[0] == socket.AF_INET and v6.payload[0] == socket.AF_INET6
    assert v6.type == rtnl.RTM_DELROUTE
    with pytest.raises(ValueError, match="not one address family"):
        rtnl.route_request(True, IPv4Address("10.1.2.0").packed, 24, IPv6Address("fd42::1").packed,
                           oif=None, table=254, protocol=0)


def test_route_info_reads_multipath_next_hops():
    def hop(gw: bytes, ifindex: int) -> bytes:
        attr = rtnl._attr(rtnl.RTA_GATEWAY, gw)
        return rtnl.RTNEXTHOP.pack(rtnl.RTNEXTHOP.size + len(attr), 0, 0, ifindex) + attr

    body = rtnl.RTMSG.pack(socket.AF_INET, 0, 0, 0, 254, 4, 0, 1, 0)
    attrs = rtnl._attr(rtnl.RTA_MULTIPATH, hop(bytes([10, 0, 0, 1]), 2) + hop(bytes([10, 0, 1, 1]), 3))
    data = rtnl.NLMSG.pack(rtnl.NLMSG.size + len(body) + len(attrs), rtnl.RTM_NEWROUTE, 0, 1, 0) + body + attrs
    (msg,) = rtnl.messages(data)
    info = rtnl.route_info(msg)
    assert info.table == 254 and info.gateway is None and info.oif is None
    assert info.multipath == ((bytes([10, 0, 0, 1]), 2), (bytes([10, 0, 1, 1]), 3))


def _ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True)


@pytest.fixture
def ns():
    name = f"fprt{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


@root
def test_kernel_dumps_read_ipv6_routes_neighbours_links_and_addresses(ns):
    _ip(ns, "link", "add", "u0", "mtu", "1400", "type", "veth", "peer", "name", "u1")
    _ip(ns, "link", "set", "u0", "address", "0e:00:00:00:00:07")
    _ip(ns, "addr", "add", "fd77::1/64", "dev", "u0", "nodad")
    _ip(ns, "addr", "add", "10.77.0.1/24", "dev", "u0")
    for dev in ("u0", "u1"):
        _ip(ns, "link", "set", dev, "up")
    _ip(ns, "-6", "route", "add", "fd42:0:0:5::/64", "via", "fd77::5", "dev", "u0", "proto", "70")
    _ip(ns, "-6", "neigh", "replace", "fd77::5", "lladdr", "0e:00:00:00:00:05", "dev", "u0", "nud", "permanent")
    dumps = KernelDumps(ns)
    try:
        u0 = dumps.link("u0")
        assert u0 is not None and u0.mtu == 1400 and u0.mac == "0e:00:00:00:00:07" and u0.kind == "veth"
        assert dumps.link("nosuchdev") is None
        routes = {r.dst: r for r in dumps.routes(socket.AF_INET6)}
        ours = routes[IPv6Network("fd42:0:0:5::/64")]
        assert ours.gateway == IPv6Address("fd77::5") and ours.oif == u0.index and ours.proto == FLANNEL_RTPROT
        assert ours.priority == 1024  # the kernel's default IPv6 metric
        assert IPv6Network("fd77::/64") in routes
        assert all(r.dst.version == 6 for r in routes.values())
        assert KernelNeigh(IPv6Address("fd77::5"), "0e:00:00:00:00:05", True) in dumps.neighbours(u0.index,
                                                                                                  socket.AF_INET6)
        assert not [n for n in dumps.neighbours(u0.index) if n.ip.version == 6]
        v4 = [(ip_address(a.local), a.prefixlen) for a in dumps.addresses(socket.AF_INET, u0.index)]
        v6 = [(ip_address(a.address), a.prefixlen) for a in dumps.addresses(socket.AF_INET6, u0.index)]
        assert v4 == [(IPv4Address("10.77.0.1"), 24)] and (IPv6Address("fd77::1"), 64) in v6
        (hop,) = dumps.route_get(IPv6Address("fd42:0:0:5::9"))
        assert hop.oif == u0.index and hop.gateway == IPv6Address("fd77::5").packed
        with pytest.raises(OSError) as exc:
            dumps.route_get(IPv4Address("192.0.2.1"))  # no default route in this namespace
        assert exc.value.errno == errno.ENETUNREACH
    finally:
        dumps.close()


@root
def test_ipv6_route_requests_program_the_kernel(ns):
    _ip(ns, "link", "add", "u0", "type", "veth", "peer", "name", "u1")
    _ip(ns, "addr", "add", "fd77::1/64", "dev", "u0", "nodad")
    _ip(ns, "link", "set", "u0", "up")
    _ip(ns, "link", "set", "u1", "up")
    dumps = KernelDumps(ns)
    try:
        index = dumps.link("u0").index
        add = rtnl.route_request(True, IPv6Network("fd42:0:0:7::/64").network_address.packed, 64,
                                 IPv6Address("fd77::7").packed, oif=index, table=254, protocol=FLANNEL_RTPROT)
        assert dumps.transact([add]) == [0]
        have = [r for r in dumps.routes(socket.AF_INET6) if r.dst == IPv6Network("fd42:0:0:7::/64")]
        assert [(r.gateway, r.proto) for r in have] == [(IPv6Address("fd77::7"), FLANNEL_RTPROT)]
        delete = rtnl.route_request(False, IPv6Network("fd42:0:0:7::/64").network_address.packed, 64,
                                    IPv6Address("fd77::7").packed, oif=index, table=254, protocol=FLANNEL_RTPROT)
        assert dumps.transact([delete]) == [0]
        assert not [r for r in dumps.routes(socket.AF_INET6) if r.dst == IPv6Network("fd42:0:0:7::/64")]
    finally:
        dumps.close()


def test_ask_raises_the_kernels_error():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        err = struct.pack("=i", -errno.ENETUNREACH) + rtnl.NLMSG.pack(16, rtnl.RTM_GETROUTE, 1, 7, 0)
        b.send(rtnl.NLMSG.pack(rtnl.NLMSG.size + len(err), rtnl.NLMSG_ERROR, 0, 7, 0) + err)
        with pytest.raises(OSError) as exc:
            rtnl.ask(a, rtnl.RTM_GETROUTE, b"", 7)
        assert exc.value.errno == errno.ENETUNREACH
    finally:
        a.close()
        b.close()
