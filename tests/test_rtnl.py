"""hostnet/rtnl.py and KernelDumps: requests take their family from their addresses, and the
reads (IPv6 routes and neighbours, devices, addresses, `ip route get`) agree with iproute2 on a
real kernel, in a namespace of this test."""

from __future__ import annotations

import errno
import json
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


def _ip(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True, text=True).stdout


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


@root
def test_link_and_address_requests_do_what_ip_link_and_ip_addr_do(ns):
    """A vxlan device made, changed and removed with the request builders, checked with iproute2:
    the kind's attributes (IPv6 local, port in network order, learning off, the GBP flag), the MAC
    and MTU set at creation, up/MTU/MAC changes, addresses of both families, and the kernel's
    refusals as errnos (a name taken, an address twice, a missing device)."""
    from flannelpy.backends.vxlan.backend import _vxlan_info_data
    from flannelpy.backends.vxlan.plan import VxlanDeviceSpec

    _ip(ns, "link", "add", "u0", "type", "veth", "peer", "name", "u1")
    _ip(ns, "addr", "add", "fd77::1/64", "dev", "u0", "nodad")
    dumps = KernelDumps(ns)
    try:
        u0 = dumps.link("u0").index
        spec = VxlanDeviceSpec(name="fpv.9", vni=9, vtep_index=u0, local=IPv6Address("fd77::1"), port=4790,
                               gbp=True, learning=False, mtu=1380)
        create = rtnl.link_create_request("fpv.9", "vxlan", _vxlan_info_data(spec), mac="0e:11:22:33:44:55", mtu=1380)
        assert dumps.transact([create, create]) == [0, errno.EEXIST]
        link = json.loads(_ip(ns, "-j", "-d", "link", "show", "fpv.9"))[0]
        info = link["linkinfo"]["info_data"]
        assert (link["address"], link["mtu"], link["linkinfo"]["info_kind"]) == ("0e:11:22:33:44:55", 1380, "vxlan")
        assert (info["id"], info["local6"], info["port"], info["learning"], info.get("gbp")) == \
            (9, "fd77::1", 4790, False, True)
        assert info["link"] == "u0"
        index = dumps.link("fpv.9").index
        assert "UP" not in link["flags"]

        assert dumps.transact([rtnl.link_set_request(index, up=True, mtu=1300, mac="0e:11:22:33:44:66")]) == [0]
        link = json.loads(_ip(ns, "-j", "link", "show", "fpv.9"))[0]
        assert ("UP" in link["flags"], link["mtu"], link["address"]) == (True, 1300, "0e:11:22:33:44:66")
        assert dumps.transact([rtnl.link_set_request(index, up=False)]) == [0]
        link = json.loads(_ip(ns, "-j", "link", "show", "fpv.9"))[0]
        assert ("UP" in link["flags"], link["mtu"]) == (False, 1300)  # only what was named changed

        v4 = rtnl.addr_request(True, index, IPv4Address("10.5.7.0").packed, 32)
        v6 = rtnl.addr_request(True, index, IPv6Address("fd42:0:0:7::").packed, 128)
        assert dumps.transact([v4, v6, v4]) == [0, 0, errno.EEXIST]
        have = {(a["family"], a["local"], a["prefixlen"])
                for a in json.loads(_ip(ns, "-j", "addr", "show", "fpv.9"))[0]["addr_info"] if a["scope"] != "link"}
        assert have == {("inet", "10.5.7.0", 32), ("inet6", "fd42:0:0:7::", 128)}
        assert dumps.transact([rtnl.addr_request(False, index, IPv4Address("10.5.7.0").packed, 32)]) == [0]
        assert dumps.transact([rtnl.addr_request(False, index, IPv4Address("10.5.7.0").packed, 32)]) == \
            [errno.EADDRNOTAVAIL]

        assert dumps.transact([rtnl.link_delete_request(index), rtnl.link_delete_request(index)]) == \
            [0, errno.ENODEV]
        assert dumps.link("fpv.9") is None
    finally:
        dumps.close()


@root
def test_delete_route_request_removes_exactly_that_route(ns):
    """Two routes to one subnet differing only in metric (as a DirectRouting route and someone
    else's can): the request made from one KernelRoute deletes that one and leaves the other."""
    from flannelpy.hostnet.netlink import delete_route_request

    _ip(ns, "link", "add", "u0", "type", "veth", "peer", "name", "u1")
    _ip(ns, "addr", "add", "10.77.0.1/24", "dev", "u0")
    _ip(ns, "link", "set", "u0", "up")
    _ip(ns, "link", "set", "u1", "up")
    _ip(ns, "route", "add", "10.5.9.0/24", "via", "10.77.0.9", "proto", str(FLANNEL_RTPROT), "metric", "5")
    _ip(ns, "route", "add", "10.5.9.0/24", "via", "10.77.0.8", "proto", "static", "metric", "7")
    dumps = KernelDumps(ns)
    try:
        ours = [r for r in dumps.routes() if str(r.dst) == "10.5.9.0/24" and r.proto == FLANNEL_RTPROT]
        assert len(ours) == 1 and ours[0].priority == 5
        assert dumps.transact([delete_route_request(ours[0])]) == [0]
        left = [(str(r.gateway), r.priority) for r in dumps.routes() if str(r.dst) == "10.5.9.0/24"]
        assert left == [("10.77.0.8", 7)]
        assert dumps.transact([delete_route_request(ours[0])]) == [errno.ESRCH]
    finally:
        dumps.close()


def test_a_failed_socket_is_every_requests_errno_not_an_exception():
    """KernelDumps.transact never raises for a socket that failed: each request gets its errno,
    which the backends record as failed and retry at their next pass."""
    dumps = KernelDumps(None)
    try:
        dumps._socket().close()  # as if it had broken: every send now fails with EBADF
        add = rtnl.route_request(True, IPv4Address("10.5.9.0").packed, 24, IPv4Address("10.77.0.9").packed,
                                 oif=None, table=254, protocol=FLANNEL_RTPROT)
        assert dumps.transact([add, add, add]) == [errno.EBADF] * 3
    finally:
        dumps.close()


class _ScriptedSocket:
    """Stands for the kernel: each dump request is answered with the next script's datagrams (the
    sequence number is the request's own)."""

    def __init__(self, scripts: list[list[list[tuple[int, int, bytes]]]]) -> None:
        self.scripts = scripts  # per request: datagrams, each a list of (type, flags, payload)
        self.pending: list[bytes] = []

    def send(self, data: bytes) -> int:
        _len, _type, _flags, seq, _port = rtnl.NLMSG.unpack_from(data)
        for datagram in self.scripts.pop(0):
            self.pending.append(b"".join(rtnl.NLMSG.pack(rtnl.NLMSG.size + len(p), t, f, seq, 0) + p
                                         for t, f, p in datagram))
        return len(data)

    def recv(self, _size: int) -> bytes:
        return self.pending.pop(0)

    def close(self) -> None:
        pass


def test_a_dump_interrupted_midway_is_read_again_and_only_the_new_answer_kept():
    """Dumps are read message by message (only what each becomes is kept); when the kernel flags
    the dump as interrupted (its table changed meanwhile), what was kept of it is dropped and the
    dump is read again, whole."""
    def link(index: int, name: str, flags: int = rtnl.NLM_F_MULTI) -> tuple[int, int, bytes]:
        return (16, flags, rtnl.IFINFOMSG.pack(0, 0, 0, index, 0, 0) + rtnl._attr(3, name.encode() + b"\0"))

    done = (rtnl.NLMSG_DONE, rtnl.NLM_F_MULTI, b"\0\0\0\0")
    interrupted = [[link(1, "lo"), link(2, "old0", rtnl.NLM_F_MULTI | rtnl.NLM_F_DUMP_INTR)], [done]]
    clean = [[link(1, "lo")], [link(3, "new0"), done]]
    dumps = KernelDumps(None)
    dumps._sock = _ScriptedSocket([interrupted, clean])  # type: ignore[assignment]
    assert [(link.index, link.name) for link in dumps.links()] == [(1, "lo"), (3, "new0")]
    assert dumps._sock.scripts == [] and dumps._sock.pending == []  # type: ignore[union-attr]
