"""The kernel's own reports of changes: an rtnetlink socket bound to the link, IPv4 address,
IPv4 route and neighbour multicast groups, read under trio with wait_readable.

The backends use it to notice within a fraction of a second that someone deleted
`flannel.1`, a route or an FDB entry, instead of waiting for the next periodic check.  Only
the few header fields a backend needs to decide "is this about my entries?" are decoded
(parse_changes is pure; the socket part is thin).  A change carries the netlink port id of
the socket that caused it, so a backend can skip the echoes of its own programming.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import threading
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

import trio

# multicast groups (rtnetlink.h RTMGRP_*)
RTMGRP_LINK = 0x1
RTMGRP_NEIGH = 0x4
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40

_KINDS = {16: ("link", False), 17: ("link", True), 20: ("addr", False), 21: ("addr", True),
          24: ("route", False), 25: ("route", True), 28: ("neigh", False), 29: ("neigh", True)}
_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, port id
_RTA = struct.Struct("=HH")
IFLA_IFNAME = 3
RTA_DST, RTA_OIF, RTA_TABLE = 1, 4, 15
CLONE_NEWNET = 0x40000000
RCVBUF = 8 << 20  # a burst of our own 3-entries-per-peer programming must not overflow it


@dataclass(frozen=True)
class KernelChange:
    """One notification.  kind "overflow" means notifications were lost (assume anything)."""

    kind: str  # "link", "addr", "route", "neigh" or "overflow"
    deleted: bool = False
    sender: int = 0  # netlink port id of the socket that made the change; 0 = the kernel
    family: int = 0
    ifindex: int | None = None  # link/addr/neigh: the device; route: RTA_OIF
    ifname: str | None = None  # link only
    table: int | None = None  # route only
    dst: IPv4Network | None = None  # route only (IPv4)
    proto: int | None = None  # route only
    state: int | None = None  # neigh only (NUD_* bits)


OVERFLOW = KernelChange("overflow")


def _attrs(data: bytes, start: int, end: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while start + 4 <= end:
        length, kind = _RTA.unpack_from(data, start)
        if length < 4:
            break
        out.setdefault(kind & 0x3FFF, data[start + 4:start + length])
        start += (length + 3) & ~3
    return out


def _u32(raw: bytes | None) -> int | None:
    return struct.unpack("=I", raw[:4])[0] if raw is not None and len(raw) >= 4 else None


def parse_changes(data: bytes) -> list[KernelChange]:
    """Decode one datagram of rtnetlink notifications; what is not understood is skipped."""
    out: list[KernelChange] = []
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length, mtype, _flags, _seq, sender = _NLMSG.unpack_from(data, offset)
        if length < _NLMSG.size or offset + length > len(data):
            break
        body, end = offset + _NLMSG.size, offset + length
        offset += (length + 3) & ~3
        kind = _KINDS.get(mtype)
        if kind is None:
            continue
        name, deleted = kind
        try:
            out.append(_decode(name, deleted, sender, data, body, end))
        except (struct.error, ValueError, UnicodeDecodeError):
            continue
    return out


def _decode(name: str, deleted: bool, sender: int, data: bytes, body: int, end: int) -> KernelChange:
    if name == "link":  # ifinfomsg: family, pad, type, index, flags, change
        family, _pad, _type, index, _fl, _ch = struct.unpack_from("=BBHiII", data, body)
        attrs = _attrs(data, body + 16, end)
        raw = attrs.get(IFLA_IFNAME)
        ifname = raw.split(b"\0", 1)[0].decode() if raw is not None else None
        return KernelChange(name, deleted, sender, family, index, ifname)
    if name == "addr":  # ifaddrmsg: family, prefixlen, flags, scope, index
        family, _plen, _fl, _scope, index = struct.unpack_from("=BBBBI", data, body)
        return KernelChange(name, deleted, sender, family, index)
    if name == "route":  # rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
        family, dst_len, _src, _tos, table, proto, _scope, _type, _fl = struct.unpack_from("=BBBBBBBBI", data, body)
        attrs = _attrs(data, body + 12, end)
        table = _u32(attrs.get(RTA_TABLE)) or table
        dst = None
        if family == socket.AF_INET:
            raw = attrs.get(RTA_DST)
            base = IPv4Address(raw[:4]) if raw is not None and len(raw) >= 4 else IPv4Address(0)
            dst = IPv4Network((base, dst_len), strict=False)
        return KernelChange(name, deleted, sender, family, _u32(attrs.get(RTA_OIF)), None, table, dst, proto)
    # neigh: ndmsg: family, pad, pad, ifindex, state, flags, type
    family, _p1, _p2, index, state, _fl, _type = struct.unpack_from("=BBHiHBB", data, body)
    return KernelChange(name, deleted, sender, family, index, state=state)


def _socket_in(netns: str | None, groups: int) -> socket.socket:
    """A non-blocking rtnetlink socket subscribed to `groups`, in the named namespace.

    A socket belongs to the namespace it was created in, so for another namespace it is
    created on a short-lived thread that first joins it (setns changes only that thread)."""
    def make() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, 33, RCVBUF)  # SO_RCVBUFFORCE (root)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            sock.bind((0, groups))
            sock.setblocking(False)
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

    thread = threading.Thread(target=in_netns, name="netlink-monitor-setns")
    thread.start()
    thread.join()
    result = box[0]
    if isinstance(result, BaseException):
        raise result
    return result


class KernelMonitor:
    """Notifications of link, IPv4 address, IPv4 route and neighbour changes."""

    GROUPS = RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE

    def __init__(self, netns: str | None = None, groups: int = GROUPS) -> None:
        self._sock = _socket_in(netns, groups)

    async def changes(self) -> list[KernelChange]:
        """Wait for notifications; return every one pending now (OVERFLOW if some were lost)."""
        await trio.lowlevel.wait_readable(self._sock)
        out: list[KernelChange] = []
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                return out
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # the kernel dropped some: the caller must re-read all
                    out.append(OVERFLOW)
                    continue
                raise
            out.extend(parse_changes(data))

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "KernelMonitor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
