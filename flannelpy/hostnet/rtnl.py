"""Plain rtnetlink sockets and message decoding, for the jobs pyroute2 is too slow or too big for.

Reconciling 1000 peers means reading 3000 kernel entries every pass, and pyroute2 decodes each
message into a full object (about a third of a millisecond each); the kernel's change
notifications arrive at the same rate as our own programming.  Both need only a few fixed
header fields and attributes, so this module reads them with `struct` directly: a dump of the
main table's routes, a device's neighbours or its FDB costs a few milliseconds.  The start's
reads (devices, addresses, routes, `ip route get`) use it too, and so do its changes: peer
entries in batches, and the vxlan device and its address, so that the vxlan and host-gw agents
never import pyroute2's IPRoute (~75 ms of start, ~6.9 MiB of RSS for the agent's lifetime).
Only the udp backend's TUN set-up still goes through pyroute2 (hostnet/netlink.py).
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import threading
from typing import Iterator, NamedTuple

NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_DUMP_INTR, NLM_F_DUMP = 0x1, 0x2, 0x10, 0x300
RTM_GETROUTE, RTM_GETNEIGH = 26, 30
CLONE_NEWNET = 0x40000000
SO_RCVBUFFORCE = 33

NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, port id
_RTA = struct.Struct("=HH")
RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
NDMSG = struct.Struct("=BBHiHBB")  # family, pad, pad, ifindex, state, flags, type
IFINFOMSG = struct.Struct("=BBHiII")  # family, pad, type, index, flags, change
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index


class Message(NamedTuple):
    """One netlink message: its header, the raw family header, and its attributes by type."""

    type: int
    flags: int
    seq: int
    sender: int
    body: bytes  # the family header (rtmsg, ndmsg, ...)
    attrs: dict[int, bytes]


# One netlink datagram per recv: the kernel caps a dump's skb at 32 KiB and sends each ACK as its
# own small one, so 64 KiB always holds it whole.  (A 1 MiB buffer made every recv -- one per ACK
# -- a 1 MiB allocation, which set the start's RSS high-water mark.)
_RECV_BYTES = 1 << 16


def attributes(data: bytes, start: int, end: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while start + 4 <= end:
        length, kind = _RTA.unpack_from(data, start)
        if length < 4:
            break
        out.setdefault(kind & 0x3FFF, data[start + 4:start + length])
        start += (length + 3) & ~3
    return out


_HEADER_SIZE = {16: IFINFOMSG.size, 17: IFINFOMSG.size, 20: IFADDRMSG.size, 21: IFADDRMSG.size,
                24: RTMSG.size, 25: RTMSG.size, 28: NDMSG.size, 29: NDMSG.size}


def messages(data: bytes) -> list[Message]:
    """Split a datagram into messages; a truncated or unknown tail is dropped, never raised."""
    out: list[Message] = []
    offset = 0
    while offset + NLMSG.size <= len(data):
        length, mtype, flags, seq, sender = NLMSG.unpack_from(data, offset)
        if length < NLMSG.size or offset + length > len(data):
            break
        start, end = offset + NLMSG.size, offset + length
        offset += (length + 3) & ~3
        size = _HEADER_SIZE.get(mtype, 0)
        if mtype == NLMSG_ERROR:
            size = 4
        if end - start < size:
            continue
        body = data[start:start + size]
        out.append(Message(mtype, flags, seq, sender, body, attributes(data, start + size, end) if size else {}))
    return out


def u32(raw: bytes | None) -> int | None:
    return struct.unpack("=I", raw[:4])[0] if raw is not None and len(raw) >= 4 else None


def open_socket(netns: str | None, groups: int = 0, *, blocking: bool = True, rcvbuf: int = 8 << 20) -> socket.socket:
    """An rtnetlink socket subscribed to `groups`, in the named namespace (None: ours).

    A socket belongs to the namespace it was created in, so for another namespace it is
    created on a short-lived thread that first joins it (setns changes only that thread)."""
    def make() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)  # root may exceed rmem_max
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.bind((0, groups))
            sock.setblocking(blocking)
        except BaseException:
            sock.close()
            raise
        return sock

    if netns is None:
        return make()
    box: list[socket.socket | BaseException] = []

    def in_netns() -> None:
        try:
            fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            box.append(make())
        except BaseException as exc:  # handed to the caller
            box.append(exc)

    thread = threading.Thread(target=in_netns, name="rtnl-setns")
    thread.start()
    thread.join()
    result = box[0]
    if isinstance(result, BaseException):
        raise result
    return result


class DumpInterrupted(Exception):
    """The kernel's tables changed during the dump (NLM_F_DUMP_INTR): read again."""


def dump_each(sock: socket.socket, mtype: int, header: bytes, seq: int) -> Iterator[Message]:
    """Send one dump request on a blocking socket and yield its reply messages as the datagrams
    arrive, so that a caller keeping only what it makes of each never holds thousands of raw
    messages at once.  Consume it to the end: DumpInterrupted (the table changed meanwhile:
    read it again) comes last."""
    sock.send(NLMSG.pack(NLMSG.size + len(header), mtype, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + header)
    interrupted = False
    while True:
        data = sock.recv(_RECV_BYTES)
        for msg in messages(data):
            if msg.seq != seq:
                continue  # a late reply to an earlier, abandoned request
            if msg.type == NLMSG_DONE:
                if interrupted:
                    raise DumpInterrupted()
                return
            if msg.type == NLMSG_ERROR:
                code = -struct.unpack("=i", msg.body[:4])[0]
                if code:
                    raise OSError(code, os.strerror(code))
                continue
            interrupted = interrupted or bool(msg.flags & NLM_F_DUMP_INTR)
            yield msg


def ask(sock: socket.socket, mtype: int, payload: bytes, seq: int) -> list[Message]:
    """Send one request that is not a dump (RTM_GETROUTE for one destination, RTM_GETLINK for
    one device) on a blocking socket; its replies, or OSError with the kernel's errno."""
    sock.send(NLMSG.pack(NLMSG.size + len(payload), mtype, NLM_F_REQUEST, seq, 0) + payload)
    while True:
        out = [m for m in messages(sock.recv(_RECV_BYTES)) if m.seq == seq]
        for msg in out:
            if msg.type == NLMSG_ERROR:
                code = -struct.unpack("=i", msg.body[:4])[0]
                if code:
                    raise OSError(code, os.strerror(code))
        if out:
            return [m for m in out if m.type != NLMSG_ERROR]


# --- decoding: routes, links, addresses as plain values --------------------------------------

RTM_GETLINK, RTM_GETADDR = 18, 22
RTA_PRIORITY, RTA_MULTIPATH = 6, 9
RTNEXTHOP = struct.Struct("=HBBi")  # len, flags, hops, ifindex
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO = 1, 3, 4, 18
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
IFA_ADDRESS, IFA_LOCAL = 1, 2


class RouteInfo(NamedTuple):
    """A route message's fields as the kernel sent them (addresses packed, 4 or 16 bytes)."""

    family: int
    dst: bytes | None
    dst_len: int
    tos: int
    table: int  # RTA_TABLE when present (tables above 255), else rtm_table
    proto: int
    scope: int
    type: int
    flags: int
    gateway: bytes | None
    oif: int | None
    priority: int
    multipath: tuple[tuple[bytes | None, int], ...] = ()  # (gateway, oif) of each next hop


def route_info(msg: Message) -> RouteInfo:
    family, dst_len, _src, tos, table, proto, scope, rtype, flags = RTMSG.unpack(msg.body)
    a = msg.attrs
    hops: list[tuple[bytes | None, int]] = []
    raw = a.get(RTA_MULTIPATH)
    at = 0
    while raw is not None and at + RTNEXTHOP.size <= len(raw):
        length, _fl, _hops, ifindex = RTNEXTHOP.unpack_from(raw, at)
        if length < RTNEXTHOP.size:
            break
        hops.append((attributes(raw, at + RTNEXTHOP.size, at + length).get(RTA_GATEWAY), ifindex))
        at += (length + 3) & ~3
    return RouteInfo(family, a.get(RTA_DST), dst_len, tos, u32(a.get(RTA_TABLE)) or table, proto, scope, rtype,
                     flags, a.get(RTA_GATEWAY), u32(a.get(RTA_OIF)), u32(a.get(RTA_PRIORITY)) or 0, tuple(hops))


class LinkInfo(NamedTuple):
    """A device as RTM_NEWLINK describes it; `kind` and `data` (IFLA_INFO_DATA's attributes)
    say what type of device it is (vxlan...)."""

    index: int
    name: str
    flags: int
    mtu: int
    mac: str | None
    kind: str | None
    data: dict[int, bytes] | None


def link_info(msg: Message) -> LinkInfo:
    _family, _pad, _type, index, flags, _change = IFINFOMSG.unpack(msg.body)
    a = msg.attrs
    kind = data = None
    info = a.get(IFLA_LINKINFO)
    if info is not None:
        nested = attributes(info, 0, len(info))
        raw_kind = nested.get(IFLA_INFO_KIND)
        kind = raw_kind.rstrip(b"\0").decode() if raw_kind is not None else None
        raw_data = nested.get(IFLA_INFO_DATA)
        data = attributes(raw_data, 0, len(raw_data)) if raw_data is not None else None
    name = a.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(errors="replace")
    mac = a.get(IFLA_ADDRESS)
    return LinkInfo(index, name, flags, u32(a.get(IFLA_MTU)) or 0, mac.hex(":") if mac and len(mac) == 6 else None,
                    kind, data)


class AddrInfo(NamedTuple):
    """An address: IFA_LOCAL (the interface's own) and IFA_ADDRESS (the peer on point-to-point
    links, else the same), packed."""

    family: int
    index: int
    prefixlen: int
    local: bytes | None
    address: bytes | None


def addr_info(msg: Message) -> AddrInfo:
    family, prefixlen, _flags, _scope, index = IFADDRMSG.unpack(msg.body)
    return AddrInfo(family, index, prefixlen, msg.attrs.get(IFA_LOCAL), msg.attrs.get(IFA_ADDRESS))


# --- requests that change the kernel, many per send ---------------------------------------
#
# pyroute2 builds, sends and waits for the ACK of one request at a time (~0.3 ms of Python
# each); programming 1000 peers is 3000 requests.  Here each request is a few struct.pack
# calls, a whole batch goes out in as few sendmsg calls as the buffer allows, and the kernel
# (which handles the messages of one datagram in order) ACKs each one.

RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWNEIGH, RTM_DELNEIGH = 24, 25, 28, 29
RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR = 16, 17, 20, 21
NLM_F_ACK, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_CREATE = 0x4, 0x200, 0x100, 0x400
IFF_UP = 0x1
NETLINK_CAP_ACK = 10  # error ACKs without the request copied back
SOL_NETLINK = 270
NDA_DST, NDA_LLADDR = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
RT_SCOPE_UNIVERSE, RT_SCOPE_NOWHERE, RTN_UNICAST = 0, 255, 1
_SEND_CHUNK = 48 * 1024  # bytes per sendmsg: well under the socket's send buffer


class Request(NamedTuple):
    """One rtnetlink request without its header's length and sequence number."""

    type: int
    flags: int
    payload: bytes  # family header + attributes


def _attr(kind: int, value: bytes) -> bytes:
    length = 4 + len(value)
    return _RTA.pack(length, kind) + value + b"\0" * ((4 - length % 4) % 4)


def _mac_bytes(mac: str) -> bytes:
    raw = bytes.fromhex(mac.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return raw


def _family_of(*addresses: bytes) -> int:
    """AF_INET or AF_INET6 from packed addresses, which must all be of one family."""
    sizes = {len(a) for a in addresses}
    if sizes == {4}:
        return socket.AF_INET
    if sizes == {16}:
        return socket.AF_INET6
    raise ValueError(f"not one address family: {' '.join(a.hex() for a in addresses)}")


def neigh_request(add: bool, family: int, ifindex: int, ip: bytes, mac: str | None, *, state: int,
                  ntf_flags: int = 0) -> Request:
    """Replace (add=True) or delete a neighbour (AF_INET: ARP) or bridge FDB (AF_BRIDGE) entry."""
    payload = NDMSG.pack(family, 0, 0, ifindex, state, ntf_flags, 0)
    if family == socket.AF_BRIDGE:  # FDB: the MAC is the key, NDA_DST the remote VTEP
        assert mac is not None
        payload += _attr(NDA_LLADDR, _mac_bytes(mac)) + _attr(NDA_DST, ip)
    else:
        payload += _attr(NDA_DST, ip) + (_attr(NDA_LLADDR, _mac_bytes(mac)) if mac else b"")
    if add:
        return Request(RTM_NEWNEIGH, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, payload)
    return Request(RTM_DELNEIGH, NLM_F_REQUEST | NLM_F_ACK, payload)


def route_request(add: bool, dst: bytes, dst_len: int, gateway: bytes | None, *, oif: int | None, table: int,
                  protocol: int, flags: int = 0, tos: int = 0, priority: int = 0) -> Request:
    """Replace (add=True) or delete a unicast route; its family is its addresses' (4 bytes:
    IPv4, 16: IPv6, both the same).  A delete with protocol 0 matches any protocol (as `ip
    route del` does); a non-zero one only routes of that protocol.  tos and priority (the
    metric) are sent when not 0, which a delete of exactly one route needs."""
    family = _family_of(dst, *([gateway] if gateway is not None else []))
    if add:
        head = RTMSG.pack(family, dst_len, 0, tos, table if table < 256 else 0, protocol,
                          RT_SCOPE_UNIVERSE, RTN_UNICAST, flags)
    else:
        head = RTMSG.pack(family, dst_len, 0, tos, table if table < 256 else 0, protocol,
                          RT_SCOPE_NOWHERE, 0, flags)
    attrs = _attr(RTA_TABLE, struct.pack("=I", table)) + _attr(RTA_DST, dst)
    if gateway is not None:
        attrs += _attr(RTA_GATEWAY, gateway)
    if oif is not None:
        attrs += _attr(RTA_OIF, struct.pack("=I", oif))
    if priority:
        attrs += _attr(RTA_PRIORITY, struct.pack("=I", priority))
    if add:
        return Request(RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, head + attrs)
    return Request(RTM_DELROUTE, NLM_F_REQUEST | NLM_F_ACK, head + attrs)


def link_create_request(name: str, kind: str, info_data: bytes, *, mac: str | None = None,
                        mtu: int | None = None) -> Request:
    """Create a device (`ip link add NAME [address MAC] [mtu MTU] type KIND ...`); fails with
    EEXIST when the name is taken.  info_data: the kind's own attributes (link_attr())."""
    attrs = _attr(IFLA_IFNAME, name.encode() + b"\0")
    if mac is not None:
        attrs += _attr(IFLA_ADDRESS, _mac_bytes(mac))
    if mtu is not None:
        attrs += _attr(IFLA_MTU, struct.pack("=I", mtu))
    attrs += _attr(IFLA_LINKINFO, _attr(IFLA_INFO_KIND, kind.encode()) + _attr(IFLA_INFO_DATA, info_data))
    return Request(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
                   IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0, 0) + attrs)


def link_attr(kind: int, value: bytes) -> bytes:
    """One attribute of a device kind's IFLA_INFO_DATA (pad included)."""
    return _attr(kind, value)


def link_set_request(index: int, *, up: bool | None = None, mtu: int | None = None,
                     mac: str | None = None) -> Request:
    """Change device `index` (`ip link set`): up or down, its MTU, its MAC; what is None stays."""
    flags = change = 0
    if up is not None:
        flags, change = (IFF_UP if up else 0), IFF_UP
    attrs = b""
    if mtu is not None:
        attrs += _attr(IFLA_MTU, struct.pack("=I", mtu))
    if mac is not None:
        attrs += _attr(IFLA_ADDRESS, _mac_bytes(mac))
    return Request(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK,
                   IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, index, flags, change) + attrs)


def link_delete_request(index: int) -> Request:
    return Request(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, index, 0, 0))


def addr_request(add: bool, index: int, ip: bytes, prefixlen: int) -> Request:
    """Add (failing with EEXIST when present) or delete address ip/prefixlen on device `index`,
    as `ip addr add|del`: IFA_LOCAL and IFA_ADDRESS both the address."""
    family = _family_of(ip)
    payload = IFADDRMSG.pack(family, prefixlen, 0, 0, index) + _attr(IFA_LOCAL, ip) + _attr(IFA_ADDRESS, ip)
    if add:
        return Request(RTM_NEWADDR, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, payload)
    return Request(RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK, payload)


def transact(sock: socket.socket, requests: list[Request], first_seq: int) -> list[int]:
    """Send every request (in order, many per sendmsg) on a blocking socket; returns each
    one's errno (0: done), in the same order.  Never raises for a refused request."""
    if not requests:
        return []
    try:
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
    except OSError:
        pass  # older kernels: error ACKs carry the request back, which is only bigger
    results: list[int | None] = [None] * len(requests)
    i = 0
    while i < len(requests):
        chunk: list[bytes] = []
        size = 0
        start = i
        while i < len(requests) and (not chunk or size < _SEND_CHUNK):
            r = requests[i]
            length = NLMSG.size + len(r.payload)
            chunk.append(NLMSG.pack(length, r.type, r.flags, first_seq + i, 0) + r.payload)
            size += (length + 3) & ~3
            i += 1
        sock.send(b"".join(chunk))  # each message is 4-byte aligned already (attributes are padded)
        pending = i - start
        while pending:
            data = sock.recv(_RECV_BYTES)
            for msg in messages(data):
                index = msg.seq - first_seq
                if msg.type != NLMSG_ERROR or not start <= index < i or results[index] is not None:
                    continue  # a late reply to an abandoned request, or a notification
                results[index] = -struct.unpack("=i", msg.body[:4])[0]
                pending -= 1
    return [r or 0 for r in results]
