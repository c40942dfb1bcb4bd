"""The kernel's own reports of changes: an rtnetlink socket bound to the link, IPv4 address,
IPv4 route and neighbour multicast groups, read under trio with wait_readable.

The backends use it to notice within a fraction of a second that someone deleted
`flannel.1`, a route or an FDB entry, instead of waiting for the next periodic check.  Only
the few header fields a backend needs to decide "is this about my entries?" are decoded
(parse_changes is pure; the socket part is thin).  A change carries the netlink port id of
the socket that caused it, so a backend can skip the echoes of its own programming.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Container
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import NamedTuple

import trio

from .rtnl import (
    IFADDRMSG,
    IFINFOMSG,
    NDMSG,
    NLMSG,
    RTMSG,
    Message,
    messages,
    open_socket,
    u32,
)

# multicast groups (rtnetlink.h RTMGRP_*)
RTMGRP_LINK = 0x1
RTMGRP_NEIGH = 0x4
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400

_KINDS = {16: ("link", False), 17: ("link", True), 20: ("addr", False), 21: ("addr", True),
          24: ("route", False), 25: ("route", True), 28: ("neigh", False), 29: ("neigh", True)}
IFLA_IFNAME = 3
RTA_DST, RTA_OIF, RTA_TABLE = 1, 4, 15
NDA_LLADDR = 2


class KernelChange(NamedTuple):
    """One notification.  kind "overflow" means notifications were lost (assume anything)."""

    kind: str  # "link", "addr", "route", "neigh" or "overflow"
    deleted: bool = False
    sender: int = 0  # netlink port id of the socket that made the change; 0 = the kernel
    family: int = 0
    ifindex: int | None = None  # link/addr/neigh: the device; route: RTA_OIF
    ifname: str | None = None  # link only
    table: int | None = None  # route only
    dst: IPv4Network | IPv6Network | None = None  # route only
    proto: int | None = None  # route only
    state: int | None = None  # neigh only (NUD_* bits)
    lladdr: str | None = None  # neigh only: the MAC (an FDB entry's key)


OVERFLOW = KernelChange("overflow")


def parse_changes(data: bytes, skip_senders: Container[int] = ()) -> list[KernelChange]:
    """Decode one datagram of rtnetlink notifications; what is not understood is skipped, and so
    is what a socket in `skip_senders` made (our own changes: not decoded at all)."""
    out: list[KernelChange] = []
    if len(data) >= NLMSG.size:
        # The kernel sends each notification in its own datagram: when that one is ours, or of a
        # kind not read here, it is dropped on its header alone (a bulk start echoes thousands).
        length, mtype, _flags, _seq, sender = NLMSG.unpack_from(data)
        if (length + 3) & ~3 >= len(data) and (mtype not in _KINDS or sender in skip_senders):
            return out
    for msg in messages(data):
        kind = _KINDS.get(msg.type)
        if kind is None or msg.sender in skip_senders:
            continue
        try:
            out.append(_decode(kind[0], kind[1], msg))
        except (ValueError, UnicodeDecodeError):
            continue
    return out


def _decode(name: str, deleted: bool, msg: Message) -> KernelChange:
    attrs = msg.attrs
    if name == "link":
        family, _pad, _type, index, _fl, _ch = IFINFOMSG.unpack(msg.body)
        raw = attrs.get(IFLA_IFNAME)
        ifname = raw.split(b"\0", 1)[0].decode() if raw is not None else None
        return KernelChange(name, deleted, msg.sender, family, index, ifname)
    if name == "addr":
        family, _plen, _fl, _scope, index = IFADDRMSG.unpack(msg.body)
        return KernelChange(name, deleted, msg.sender, family, index)
    if name == "route":
        family, dst_len, _src, _tos, table, proto, _scope, _type, _fl = RTMSG.unpack(msg.body)
        dst = None
        if family == socket.AF_INET:
            raw = attrs.get(RTA_DST)
            base = IPv4Address(raw[:4]) if raw is not None and len(raw) >= 4 else IPv4Address(0)
            dst = IPv4Network((base, dst_len), strict=False)
        elif family == socket.AF_INET6:
            raw = attrs.get(RTA_DST)
            base6 = IPv6Address(raw[:16]) if raw is not None and len(raw) >= 16 else IPv6Address(0)
            dst = IPv6Network((base6, dst_len), strict=False)
        return KernelChange(name, deleted, msg.sender, family, u32(attrs.get(RTA_OIF)), None,
                            u32(attrs.get(RTA_TABLE)) or table, dst, proto)
    family, _p1, _p2, index, state, _fl, _type = NDMSG.unpack(msg.body)
    mac = attrs.get(NDA_LLADDR)
    return KernelChange(name, deleted, msg.sender, family, index, state=state,
                        lladdr=mac.hex(":") if mac is not None and len(mac) == 6 else None)


class KernelMonitor:
    """Notifications of link, address, route and neighbour changes (IPv4's, or IPv6's with GROUPS_V6)."""

    GROUPS = RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE
    # the IPv6 side of a dual-stack backend: an IPv4-only agent is not woken by the host's IPv6 churn (RAs)
    GROUPS_V6 = RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE

    def __init__(self, netns: str | None = None, groups: int = GROUPS) -> None:
        self._sock = open_socket(netns, groups, blocking=False)

    async def changes(self, skip_senders: Container[int] = ()) -> list[KernelChange]:
        """Wait for notifications; return every one pending now (OVERFLOW if some were lost),
        except those made by a socket in `skip_senders`."""
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
            out.extend(parse_changes(data, skip_senders))

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "KernelMonitor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
