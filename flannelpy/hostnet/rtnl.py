"""Plain rtnetlink sockets and message decoding, for the two jobs pyroute2 is too slow for.

Reconciling 1000 peers means reading 3000 kernel entries every pass, and pyroute2 decodes each
message into a full object (about a third of a millisecond each); the kernel's change
notifications arrive at the same rate as our own programming.  Both need only a few fixed
header fields and attributes, so this module reads them with `struct` directly: a dump of the
main table's routes, a device's neighbours or its FDB costs a few milliseconds.  Requests that
change the kernel still go through pyroute2 (hostnet/netlink.py).
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import threading
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Message:
    """One netlink message: its header, the raw family header, and its attributes by type."""

    type: int
    flags: int
    seq: int
    sender: int
    body: bytes  # the family header (rtmsg, ndmsg, ...)
    attrs: dict[int, bytes]


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


def dump(sock: socket.socket, mtype: int, header: bytes, seq: int) -> list[Message]:
    """Send one dump request on a blocking socket and collect every reply message."""
    sock.send(NLMSG.pack(NLMSG.size + len(header), mtype, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + header)
    out: list[Message] = []
    interrupted = False
    while True:
        data = sock.recv(1 << 20)
        for msg in messages(data):
            if msg.seq != seq:
                continue  # a late reply to an earlier, abandoned request
            if msg.type == NLMSG_DONE:
                if interrupted:
                    raise DumpInterrupted()
                return out
            if msg.type == NLMSG_ERROR:
                code = -struct.unpack("=i", msg.body[:4])[0]
                if code:
                    raise OSError(code, os.strerror(code))
                continue
            interrupted = interrupted or bool(msg.flags & NLM_F_DUMP_INTR)
            out.append(msg)
