"""The udp backend's data plane: bare IPv4 packets between the TUN device and a UDP socket.

Wire format (flanneld's proxy_amd64.c): the UDP payload is the inner IPv4 packet, nothing
else.  Pure packet helpers come first (unit-tested); the Forwarder below does the I/O.

Speed: every packet crosses Python, so the loops read until EAGAIN per wakeup, reuse one
preallocated buffer per direction, keep counters in locals and inline the TTL/checksum
patch instead of calling the helpers.  The helpers are the reference the tests check the
inlined code against (through real traffic).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass, fields
from ipaddress import IPv4Address

import trio

from .peertable import PeerTable

IPPROTO_ICMP = 1
ICMP_DEST_UNREACH = 3
ICMP_NET_UNREACH = 0
UNREACHABLE_TTL = 8  # flanneld's value
# After this many packets without EAGAIN, yield once so the other direction runs too.
BATCH = 256
BUF_SIZE = 65536


def checksum(data: bytes | bytearray | memoryview) -> int:
    """Internet checksum (RFC 1071) of `data`."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def decrement_ttl(pkt: bytearray | memoryview) -> bool:
    """Decrement the IPv4 TTL in place, patching the checksum incrementally (RFC 1624).

    False (packet untouched) when the TTL would reach 0 and the packet must be dropped.
    The TTL is the high byte of header word 4, so the word drops by 0x0100 and the
    checksum rises by 0x0100 in one's complement; this is Linux's ip_decrease_ttl, which
    never yields 0xFFFF (-0) so it matches a full recomputation.
    """
    ttl = pkt[8]
    if ttl <= 1:
        return False
    pkt[8] = ttl - 1
    c = ((pkt[10] << 8) | pkt[11]) + 0x0100
    if c >= 0xFFFF:
        c = (c + 1) & 0xFFFF
    pkt[10] = c >> 8
    pkt[11] = c & 0xFF
    return True


def is_ipv4(pkt: bytes | bytearray | memoryview, length: int) -> bool:
    """A packet long enough to hold its IPv4 header."""
    return length >= 20 and pkt[0] >> 4 == 4 and (pkt[0] & 0x0F) * 4 <= length


def wants_unreachable(pkt: bytes | bytearray | memoryview) -> bool:
    """flanneld answers a no-route packet unless it is ICMP or a non-first fragment."""
    if pkt[9] == IPPROTO_ICMP:
        return False
    frag_offset = ((pkt[6] << 8) | pkt[7]) & 0x1FFF
    return frag_offset == 0


def net_unreachable(pkt: bytes | bytearray | memoryview, source: IPv4Address) -> bytes | None:
    """The ICMP net-unreachable (type 3 code 0) flanneld writes back into the TUN, or None.

    From `source` (the TUN address) to the offender's source, TTL 8, quoting the
    offender's IP header and the first 8 bytes of its payload (RFC 792).
    """
    if len(pkt) < 20 or not wants_unreachable(pkt):
        return None
    ihl = (pkt[0] & 0x0F) * 4
    quoted = bytes(pkt[: ihl + 8])
    icmp = bytearray(struct.pack("!BBHI", ICMP_DEST_UNREACH, ICMP_NET_UNREACH, 0, 0) + quoted)
    struct.pack_into("!H", icmp, 2, checksum(icmp))
    total = 20 + len(icmp)
    header = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, UNREACHABLE_TTL, IPPROTO_ICMP, 0, source.packed, bytes(pkt[12:16]))
    )
    struct.pack_into("!H", header, 10, checksum(header))
    return bytes(header + icmp)


@dataclass
class Counters:
    """What the forwarder did; flanneld has no metrics, these are for operators and tests."""

    tx_packets: int = 0  # TUN -> UDP
    tx_bytes: int = 0
    tx_no_route: int = 0
    tx_dropped: int = 0  # TTL expired, malformed, socket buffer full
    rx_packets: int = 0  # UDP -> TUN
    rx_bytes: int = 0
    rx_dropped_unknown_source: int = 0
    rx_dropped: int = 0  # TTL expired, malformed, TUN write failed
    tx_wakeups: int = 0  # packets per wakeup = batching achieved
    rx_wakeups: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Forwarder:
    """Moves packets between a non-blocking TUN fd and a non-blocking UDP socket."""

    def __init__(self, tun_fd: int, sock: socket.socket, peers: PeerTable, tun_address: IPv4Address) -> None:
        self.tun_fd = tun_fd
        self.sock = sock
        self.peers = peers
        self.tun_address = tun_address
        self.counters = Counters()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._tun_to_udp)
            nursery.start_soon(self._udp_to_tun)
            task_status.started()

    async def _tun_to_udp(self) -> None:
        fd = self.tun_fd
        buf = bytearray(BUF_SIZE)
        mv = memoryview(buf)
        bufs = [buf]
        readv = os.readv
        sendto = self.sock.sendto
        lookup = self.peers.lookup
        c = self.counters
        wait_readable = trio.lowlevel.wait_readable
        while True:
            await wait_readable(fd)
            c.tx_wakeups += 1
            pkts = nbytes = no_route = dropped = 0
            while True:
                for _ in range(BATCH):
                    try:
                        n = readv(fd, bufs)
                    except BlockingIOError:
                        break
                    if n < 20 or buf[0] >> 4 != 4:
                        dropped += 1  # IPv6 or junk: flannel's udp overlay is IPv4 only
                        continue
                    peer = lookup((buf[16] << 24) | (buf[17] << 16) | (buf[18] << 8) | buf[19])
                    if peer is None:
                        no_route += 1
                        self._unreachable(mv[:n])
                        continue
                    ttl = buf[8]
                    if ttl <= 1:
                        dropped += 1
                        continue
                    buf[8] = ttl - 1
                    s = ((buf[10] << 8) | buf[11]) + 0x0100
                    if s >= 0xFFFF:
                        s = (s + 1) & 0xFFFF
                    buf[10] = s >> 8
                    buf[11] = s & 0xFF
                    try:
                        sendto(mv[:n], peer)
                    except (BlockingIOError, OSError):
                        # Full socket buffer or unreachable underlay: drop like a NIC would.
                        dropped += 1
                        continue
                    pkts += 1
                    nbytes += n
                else:
                    # A full batch: more may be waiting.  Let the other direction run, then go on.
                    c.tx_packets += pkts
                    c.tx_bytes += nbytes
                    pkts = nbytes = 0
                    await trio.lowlevel.checkpoint()
                    continue
                break
            c.tx_packets += pkts
            c.tx_bytes += nbytes
            c.tx_no_route += no_route
            c.tx_dropped += dropped

    def _unreachable(self, pkt: memoryview) -> None:
        reply = net_unreachable(pkt, self.tun_address)
        if reply is not None:
            try:
                os.write(self.tun_fd, reply)
            except OSError:
                pass

    async def _udp_to_tun(self) -> None:
        fd = self.tun_fd
        buf = bytearray(BUF_SIZE)
        mv = memoryview(buf)
        recvfrom_into = self.sock.recvfrom_into
        write = os.write
        sources = self.peers.sources
        c = self.counters
        wait_readable = trio.lowlevel.wait_readable
        sock = self.sock
        while True:
            await wait_readable(sock)
            c.rx_wakeups += 1
            pkts = nbytes = unknown = dropped = 0
            while True:
                for _ in range(BATCH):
                    try:
                        n, addr = recvfrom_into(buf)
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        # ICMP port-unreachable from a peer shows up as ECONNREFUSED; ignore.
                        if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                            continue
                        raise
                    if addr[0] not in sources:
                        unknown += 1
                        continue
                    if n < 20 or buf[0] >> 4 != 4:
                        dropped += 1
                        continue
                    ttl = buf[8]
                    if ttl <= 1:
                        dropped += 1
                        continue
                    buf[8] = ttl - 1
                    s = ((buf[10] << 8) | buf[11]) + 0x0100
                    if s >= 0xFFFF:
                        s = (s + 1) & 0xFFFF
                    buf[10] = s >> 8
                    buf[11] = s & 0xFF
                    try:
                        write(fd, mv[:n])
                    except OSError:
                        dropped += 1
                        continue
                    pkts += 1
                    nbytes += n
                else:
                    c.rx_packets += pkts
                    c.rx_bytes += nbytes
                    pkts = nbytes = 0
                    await trio.lowlevel.checkpoint()
                    continue
                break
            c.rx_packets += pkts
            c.rx_bytes += nbytes
            c.rx_dropped_unknown_source += unknown
            c.rx_dropped += dropped
