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

from .peertable import Allowed, PeerTable, source_allowed

IPPROTO_ICMP = 1
_U32 = struct.Struct("!I").unpack_from
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


def receive_verdict(pkt: bytes | bytearray | memoryview, length: int, allowed: Allowed) -> str:
    """What the receive path does with one inner packet from a lease holder: "deliver", or
    the drop reason "malformed" (not IPv4), "spoofed_source" (its inner source is not in the
    sender's subnet) or "expired" (TTL would reach 0).  The reference for the inlined checks
    in coalesce() and Forwarder._udp_to_tun, in that order."""
    if not is_ipv4(pkt, length):
        return "malformed"
    if not source_allowed(_U32(pkt, 12)[0], allowed):
        return "spoofed_source"
    if pkt[8] <= 1:
        return "expired"
    return "deliver"


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


# --- Offloads: UDP GSO/GRO on the socket, virtio_net_hdr on the TUN -------------------------
#
# Linux lets one sendmsg carry many datagrams (UDP_SEGMENT: the buffer is cut every
# `gso_size` bytes, the last piece may be shorter) and one recvmsg return many datagrams of
# one size from one sender (UDP_GRO, the size comes back in a cmsg).  On the wire nothing
# changes: each datagram is still one bare inner IPv4 packet, so flanneld peers interoperate.
# A TUN opened with IFF_VNET_HDR takes a virtio_net_hdr before each written packet; with
# gso_type TCPV4 one write carries a whole run of TCP segments (like GRO would build), which
# the kernel forwards and delivers as one skb.  That cuts the per-packet kernel cost of the
# TUN write (forwarding, veth, the receiver's TCP, its ACKs) by the run length.

SOL_UDP = 17
UDP_SEGMENT = 103  # socket.UDP_SEGMENT is missing before Python 3.12
UDP_GRO = 104
UDP_MAX_PAYLOAD = 65507
GSO_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS in older kernels (128 from 6.x)
VNET_HDR_LEN = 10
VNET_PLAIN = bytes(VNET_HDR_LEN)  # flags 0, gso_type NONE: one complete packet
VNET_F_NEEDS_CSUM = 1
VNET_GSO_NONE = 0
VNET_GSO_TCPV4 = 1
IPPROTO_TCP = 6
MAX_IP_LEN = 65535
_VNET = struct.Struct("=BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
_IPH = struct.Struct("!10H").unpack_from
_ADDRS = struct.Struct("!4H").unpack_from
_INT = struct.Struct("=i").unpack_from


def _fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def complete_checksum(pkt: bytearray | memoryview, start: int, offset: int) -> None:
    """Finish a CHECKSUM_PARTIAL packet (virtio NEEDS_CSUM) in place: the field at
    start+offset holds the pseudo-header sum; store the checksum of pkt[start:] there."""
    c = checksum(pkt[start:])
    pkt[start + offset] = c >> 8
    pkt[start + offset + 1] = c & 0xFF


def _merged(buf: bytearray, mv: memoryview, t: int, run: int, seg: int, hl: int, mss: int, rlen: int, psh: int) -> list:
    """iovecs for one TSO write of `run` TCP segments laid out every `seg` bytes from t."""
    hdr = bytearray(mv[t : t + hl])
    total = hl + rlen
    hdr[2] = total >> 8
    hdr[3] = total & 0xFF
    hdr[8] -= 1  # TTL (> 1, checked per segment)
    hdr[10] = hdr[11] = 0
    ipc = ~_fold(sum(_IPH(hdr))) & 0xFFFF
    hdr[10] = ipc >> 8
    hdr[11] = ipc & 0xFF
    hdr[33] |= psh
    a, b, c, d = _ADDRS(hdr, 12)
    s = _fold(a + b + c + d + IPPROTO_TCP + total - 20)  # pseudo header, not inverted
    hdr[36] = s >> 8
    hdr[37] = s & 0xFF
    iov = [_VNET.pack(VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, hl, mss, 20, 16), hdr]
    o = t + hl
    iov += [mv[p : p + mss] for p in range(o, o + (run - 1) * seg, seg)]
    o += (run - 1) * seg
    iov.append(mv[o : o + rlen - (run - 1) * mss])
    return iov


def _invariant_columns(hl: int) -> tuple[int, ...]:
    """Header byte offsets that every segment of one TSO run shares (all but total length,
    IP id and checksum, TCP seq, flags and checksum)."""
    return (0, 1, 6, 7, 8, 9, *range(12, 24), *range(28, 33), 34, 35, *range(38, hl))


_COLUMNS = {hl: _invariant_columns(hl) for hl in range(40, 81, 4)}


_FLAGS_OK = bytes(0 if i in (0x10, 0x18) else 1 for i in range(256))  # ACK, ACK|PSH -> 0


def _first_diff(a: bytes, b: bytes) -> int:
    """Index of the first byte where equally long `a` and `b` differ (len(a) if none)."""
    x = int.from_bytes(a, "big") ^ int.from_bytes(b, "big")
    return len(a) - (x.bit_length() + 7) // 8


def run_length(buf: bytearray, off: int, n: int, seg: int) -> int:
    """How many segments from `off` (laid out every `seg` bytes up to n) form one in-order
    run of one TCP flow that can be written as a single TSO packet; 0 when the segment at
    `off` itself cannot start one.  The check is column by column over strided slices (one
    C-level operation per header byte for all segments at once), not a loop per segment:
    every header byte equal to the first segment's except total length (full `seg` but for
    the buffer's last packet), IP id and checksum, TCP checksum, PSH; seq contiguous."""
    if buf[off] != 0x45 or buf[off + 9] != IPPROTO_TCP or buf[off + 8] <= 1 or buf[off + 6] & 0x3F or buf[off + 7]:
        return 0
    ln = seg if off + seg <= n else n - off
    hl = 20 + (buf[off + 32] >> 4) * 4
    cols = _COLUMNS.get(hl)
    if cols is None or ln <= hl or (buf[off + 2] << 8 | buf[off + 3]) != ln or _FLAGS_OK[buf[off + 33]]:
        return 0
    k = (n - off + seg - 1) // seg
    if k < 2:
        return 1
    lastoff = off + (k - 1) * seg  # the buffer's last (maybe shorter) packet
    # Total length: seg for all but the buffer's last packet, which has its own length.
    full = bytes((seg >> 8,)) * (k - 1)
    m = min(_first_diff(buf[off + 2 : lastoff : seg], full), _first_diff(buf[off + 3 : lastoff : seg], bytes((seg & 0xFF,)) * (k - 1)))
    if m < k - 1:
        k = m + 1  # segment m has a wrong length and must not be included
        if m == 0:
            return 1
    elif n - lastoff <= hl or (buf[lastoff + 2] << 8 | buf[lastoff + 3]) != n - lastoff:
        k -= 1
    end = off + (k - 1) * seg + hl
    for p in cols:
        c = buf[off + p : end : seg]
        m = len(c) - len(c.lstrip(c[:1]))
        if m < k:
            k = m
            end = off + (k - 1) * seg + hl
    if k > 1:
        c = buf[off + 33 : end : seg].translate(_FLAGS_OK)
        m = len(c) - len(c.lstrip(b"\0"))
        if m < k:
            k = m
            end = off + (k - 1) * seg + hl
    if k > 1:
        s0 = _U32(buf, off + 24)[0]
        mss = seg - hl
        seqs = struct.pack(f"!{k}I", *[(s0 + i * mss) & 0xFFFFFFFF for i in range(k)])
        for j in range(4):
            m = _first_diff(buf[off + 24 + j : end : seg], seqs[j::4])
            if m < k:
                k = m
                end = off + (k - 1) * seg + hl
    return k


def coalesce(buf: bytearray, mv: memoryview, n: int, seg: int, out: list, allowed: Allowed) -> tuple[int, int, int, int, int]:
    """Cut buf[:n] into inner packets every `seg` bytes (UDP GRO layout; the last may be
    shorter), decrement their TTLs and append (packets, iovecs) per TUN write to `out`.

    Runs of one TCP flow (run_length) become one vnet_hdr TSO write (PSH if any segment had
    it); everything else is written alone behind a plain vnet header.  Only packets whose
    inner source is in `allowed` (the sender's subnets) are kept; the segments of a run share
    their source (run_length compares it), so a run is checked once.
    Returns (packets, bytes, expired, malformed, spoofed): what is written, and the drops.
    """
    if n <= 0:
        return 0, 0, 0, 1, 0  # an empty datagram
    pkts = nbytes = expired = malformed = spoofed = 0
    net, mask, more = allowed
    # Runs are tested once each.  For packets written alone, when the rest of the buffer
    # all have one allowed source (usually one container talks to us), one column-wise test
    # replaces a test per packet; None: not looked at yet.
    check = None
    off = 0
    while off < n:
        k = run_length(buf, off, n, seg) if n - off > seg else 0
        if k > 1:
            end = off + k * seg
            if end > n:
                end = n
            src = _U32(buf, off + 12)[0]
            if src & mask != net and not (more and source_allowed(src, allowed)):
                spoofed += k
                off = end
                continue
            hl = 20 + (buf[off + 32] >> 4) * 4
            psh = 0x08 if b"\x18" in buf[off + 33 : end : seg] else 0
            out.append((k, _merged(buf, mv, off, k, seg, hl, seg - hl, end - off - k * hl, psh)))
            pkts += k
            nbytes += end - off
            off = end
            continue
        end = off + seg
        if end > n:
            end = n
        ln = end - off
        b0 = buf[off]
        if check is None:
            check = not (n - off >= 4 * seg and _one_source(buf, off, n, seg)
                         and source_allowed(_U32(buf, off + 12)[0], allowed))
        if ln < 20 or b0 >> 4 != 4 or (b0 & 0x0F) * 4 > ln:
            malformed += 1
        elif check and (src := _U32(buf, off + 12)[0]) & mask != net and not (more and source_allowed(src, allowed)):
            spoofed += 1
        elif buf[off + 8] <= 1:
            expired += 1
        else:
            pkts += 1
            nbytes += ln
            out.append((1, _single(buf, mv, off, ln)))
        off = end
    return pkts, nbytes, expired, malformed, spoofed


def _one_source(buf: bytearray, off: int, n: int, seg: int) -> bool:
    """Whether every packet laid out every `seg` bytes in buf[off:n] has the first one's IPv4
    source (bytes 12-15; a last packet too short to hold them is malformed anyway)."""
    for p in range(off + 12, off + 16):
        c = buf[p:n:seg]
        if c.lstrip(c[:1]):
            return False
    return True


def _single(buf: bytearray, mv: memoryview, off: int, ln: int) -> list:
    """iovecs for one packet (TTL > 1 already checked): decrement its TTL in place."""
    buf[off + 8] -= 1
    s = ((buf[off + 10] << 8) | buf[off + 11]) + 0x0100
    if s >= 0xFFFF:
        s = (s + 1) & 0xFFFF
    buf[off + 10] = s >> 8
    buf[off + 11] = s & 0xFF
    return [VNET_PLAIN, mv[off : off + ln]]


@dataclass
class Counters:
    """What the forwarder did; flanneld has no metrics, these are for operators and tests."""

    tx_packets: int = 0  # TUN -> UDP
    tx_bytes: int = 0
    tx_no_route: int = 0
    tx_dropped: int = 0  # TTL expired, malformed, socket buffer full
    rx_packets: int = 0  # UDP -> TUN (inner packets, also when UDP GRO delivered several at once)
    rx_bytes: int = 0
    rx_dropped_unknown_source: int = 0  # outer source holds no lease
    rx_dropped_spoofed_source: int = 0  # inner source outside the sender's subnet
    rx_dropped_malformed: int = 0  # not IPv4, shorter than its header, truncated datagram
    rx_dropped: int = 0  # TTL expired, TUN write failed
    tx_wakeups: int = 0  # packets per wakeup = batching achieved
    rx_wakeups: int = 0
    tx_sends: int = 0  # sendto/sendmsg calls: tx_packets / tx_sends = UDP GSO batching
    rx_writes: int = 0  # TUN writes: rx_packets / rx_writes = TCP coalescing

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


TX_BUF = 9 * 65536  # BATCH full-size packets fit: the budget, not the buffer, ends a wakeup
_V4_FIRST_BYTES = bytes(range(0x45, 0x50))  # version 4, IHL 5..15
_DEC = bytes([0, *range(255)])  # b -> b - 1 (only used when no byte is 0 or 1)
_INC = bytes([*range(1, 256), 0])  # b -> b + 1 (only used when no byte is 0xFE or 0xFF)
MAX_READ = 65536
RX_BUF = 65536 + 4096
# Datagrams (each up to 64 KiB of UDP GRO) per wakeup before letting the other task run.
RX_BATCH = 16


class Forwarder:
    """Moves packets between a non-blocking TUN fd and a non-blocking UDP socket.

    `vnet_hdr`: the TUN was opened with IFF_VNET_HDR (open_tun(vnet_hdr=True)); then
    received TCP runs are written as one TSO packet.  UDP GSO on send and UDP GRO on receive
    are used when the kernel allows (they fall back to one datagram per call).
    `counters`: shared with an earlier forwarder of the same backend (a re-opened TUN), so
    the figures in /metrics keep counting up.
    """

    def __init__(self, tun_fd: int, sock: socket.socket, peers: PeerTable, tun_address: IPv4Address,
                 *, vnet_hdr: bool = False, gso: bool = True, gro: bool = True,
                 counters: Counters | None = None) -> None:
        self.tun_fd = tun_fd
        self.sock = sock
        self.peers = peers
        self.tun_address = tun_address
        self.vnet_hdr = vnet_hdr
        self.gso = gso
        self.counters = counters if counters is not None else Counters()
        # Why the TUN stopped working (its fd read an error), once run() has returned.
        self.tun_error: OSError | None = None
        self._seg_cmsg: dict[int, list] = {}
        if gro:
            try:
                sock.setsockopt(SOL_UDP, UDP_GRO, 1)
            except OSError:
                pass

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Forward until cancelled, or until the TUN device is gone: a deleted TUN detaches
        its fd, which then polls as an error and reads EBADFD.  Then both directions stop,
        `tun_error` says why, and run() returns so that the backend can open a new TUN."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._tun_to_udp, nursery.cancel_scope)
            nursery.start_soon(self._udp_to_tun)
            task_status.started()

    def _send(self, view: memoryview, count: int, size: int, peer: tuple[str, int]) -> int:
        """Send `count` packets laid out every `size` bytes in `view`; return how many went."""
        c = self.counters
        if count > 1 and self.gso:
            cmsg = self._seg_cmsg.get(size)
            if cmsg is None:
                cmsg = self._seg_cmsg[size] = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))]
            try:
                self.sock.sendmsg([view], cmsg, 0, peer)
                c.tx_sends += 1
                return count
            except BlockingIOError:
                return 0  # full socket buffer: drop like a NIC would
            except OSError as exc:
                # EIO: the route's device cannot offload the UDP checksum, so no GSO at all;
                # others (EMSGSIZE, EINVAL: segment larger than the path MTU) per batch.
                if exc.errno == errno.EIO:
                    self.gso = False
        sent = 0
        sendto = self.sock.sendto
        end = len(view)
        for o in range(0, end, size):
            try:
                sendto(view[o : o + size], peer)
                sent += 1
            except OSError:
                pass
        c.tx_sends += count
        return sent

    def _flush(self, buf: bytearray, mv: memoryview, gs: int, end: int, count: int, size: int,
               peer: tuple[str, int]) -> int:
        """Decrement TTLs of the `count` packets laid out every `size` bytes in buf[gs:end]
        and send them; return how many were sent.  The first packet was validated on read,
        the others only matched its size and destination, so their version and TTL are
        checked here, column-wise with strided slices (one C call for all packets)."""
        if count > 1:
            ttl = buf[gs + 8 : end : size]
            hi = buf[gs + 10 : end : size]
            if (size >= 60 and not buf[gs:end:size].translate(None, _V4_FIRST_BYTES) and b"\0" not in ttl
                    and b"\1" not in ttl and b"\xfe" not in hi and b"\xff" not in hi):
                # TTL - 1 and checksum high byte + 1 (RFC 1624; no carry when it is < 0xFE).
                buf[gs + 8 : end : size] = ttl.translate(_DEC)
                buf[gs + 10 : end : size] = hi.translate(_INC)
                return self._send(mv[gs:end], count, size, peer)
            sent = 0
            for o in range(gs, end, size):
                e = o + size if o + size < end else end
                if buf[o] >> 4 == 4 and (buf[o] & 0x0F) * 4 <= e - o and decrement_ttl(mv[o:e]):
                    sent += self._send(mv[o:e], 1, size, peer)
            return sent
        buf[gs + 8] -= 1  # checked > 1 on read
        s = ((buf[gs + 10] << 8) | buf[gs + 11]) + 0x0100
        if s >= 0xFFFF:
            s = (s + 1) & 0xFFFF
        buf[gs + 10] = s >> 8
        buf[gs + 11] = s & 0xFF
        return self._send(mv[gs:end], 1, size, peer)

    async def _tun_to_udp(self, stop: trio.CancelScope) -> None:
        fd = self.tun_fd
        vnet = self.vnet_hdr
        buf = bytearray(TX_BUF)
        mv = memoryview(buf)
        hdr = bytearray(VNET_HDR_LEN)
        hmv = memoryview(hdr)
        readv = os.readv
        lookup = self.peers.lookup
        flush = self._flush
        c = self.counters
        wait_readable = trio.lowlevel.wait_readable
        limit = TX_BUF - MAX_READ
        while True:
            await wait_readable(fd)
            c.tx_wakeups += 1
            pkts = nbytes = no_route = dropped = 0
            # The group being built: `gcount` packets of `gsize` bytes from buf[gs:off] to
            # `gpeer` (inner destination `gdst`), sent with one UDP GSO sendmsg.
            gs = off = gcount = gsize = budget = 0
            gpeer = None
            gdst = b""
            while True:
                if budget >= BATCH or off > limit:
                    if gcount:
                        sent = flush(buf, mv, gs, off, gcount, gsize, gpeer)
                        pkts += sent
                        dropped += gcount - sent
                        nbytes += off - gs if sent == gcount else 0
                        gcount = gsize = 0
                    gs = off = 0
                    if budget >= BATCH:
                        # More may be waiting: let the other direction run, then go on.
                        budget = 0
                        c.tx_packets += pkts
                        c.tx_bytes += nbytes
                        pkts = nbytes = 0
                        await trio.lowlevel.checkpoint()
                budget += 1
                try:
                    if vnet:
                        n = readv(fd, [hmv, mv[off : off + MAX_READ]]) - VNET_HDR_LEN
                    else:
                        n = readv(fd, [mv[off : off + MAX_READ]])
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno == errno.EINTR:
                        continue
                    self.tun_error = exc  # EBADFD: the device was deleted under us
                    break
                # Fast path: same size and inner destination as the group (checked at flush).
                # (vnet flags: NEEDS_CSUM and a GSO type need work; DATA_VALID alone does not.)
                if n == gsize and gcount < GSO_MAX_SEGMENTS and buf[off + 16 : off + 20] == gdst \
                        and not (vnet and (hdr[0] & VNET_F_NEEDS_CSUM or hdr[1])) and off + n - gs <= UDP_MAX_PAYLOAD:
                    gcount += 1
                    off += n
                    continue
                if vnet and (hdr[0] or hdr[1]):
                    if hdr[1] != VNET_GSO_NONE or not self._finish_partial(hdr, mv[off : off + n]):
                        dropped += 1
                        continue
                if n < 20 or buf[off] >> 4 != 4 or (buf[off] & 0x0F) * 4 > n:
                    dropped += 1  # IPv6 or junk: flannel's udp overlay is IPv4 only
                    continue
                peer = lookup(_U32(buf, off + 16)[0])
                if peer is None:
                    no_route += 1
                    self._unreachable(mv[off : off + n])
                    continue
                if buf[off + 8] <= 1:
                    dropped += 1
                    continue
                if gcount and peer is gpeer and n <= gsize and gcount < GSO_MAX_SEGMENTS \
                        and off + n - gs <= UDP_MAX_PAYLOAD:
                    gcount += 1
                    off += n
                    if n == gsize:
                        continue
                    # A shorter packet ends the GSO batch.
                    sent = flush(buf, mv, gs, off, gcount, gsize, gpeer)
                    pkts += sent
                    dropped += gcount - sent
                    nbytes += off - gs if sent == gcount else 0
                    gs, gcount, gsize = off, 0, 0
                    continue
                if gcount:
                    sent = flush(buf, mv, gs, off, gcount, gsize, gpeer)
                    pkts += sent
                    dropped += gcount - sent
                    nbytes += off - gs if sent == gcount else 0
                gs, gcount, gsize, gpeer = off, 1, n, peer
                gdst = buf[off + 16 : off + 20]
                off += n
            if gcount:
                sent = flush(buf, mv, gs, off, gcount, gsize, gpeer)
                pkts += sent
                dropped += gcount - sent
                nbytes += off - gs if sent == gcount else 0
            c.tx_packets += pkts
            c.tx_bytes += nbytes
            c.tx_no_route += no_route
            c.tx_dropped += dropped
            if self.tun_error is not None:
                stop.cancel()
                return

    @staticmethod
    def _finish_partial(hdr: bytearray, pkt: memoryview) -> bool:
        """A read packet with NEEDS_CSUM (offloads are off, so rare): complete its checksum."""
        flags, _, _, _, start, offset = _VNET.unpack(hdr)
        if flags & VNET_F_NEEDS_CSUM:
            if start + offset + 2 > len(pkt):
                return False
            complete_checksum(pkt, start, offset)
        return True

    def _unreachable(self, pkt: memoryview) -> None:
        reply = net_unreachable(pkt, self.tun_address)
        if reply is not None:
            try:
                if self.vnet_hdr:
                    os.writev(self.tun_fd, [VNET_PLAIN, reply])
                else:
                    os.write(self.tun_fd, reply)
            except OSError:
                pass

    async def _udp_to_tun(self) -> None:
        fd = self.tun_fd
        vnet = self.vnet_hdr
        buf = bytearray(RX_BUF)
        mv = memoryview(buf)
        bufs = [mv]
        sock = self.sock
        recvmsg_into = sock.recvmsg_into
        ancsize = socket.CMSG_SPACE(4)
        write = os.write
        writev = os.writev
        sources = self.peers.sources
        c = self.counters
        wait_readable = trio.lowlevel.wait_readable
        out: list = []
        while True:
            await wait_readable(sock)
            c.rx_wakeups += 1
            pkts = nbytes = unknown = spoofed = malformed = dropped = writes = 0
            while True:
                for _ in range(RX_BATCH):
                    try:
                        n, anc, mflags, addr = recvmsg_into(bufs, ancsize)
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        # ICMP port-unreachable from a peer shows up as ECONNREFUSED; ignore.
                        if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                            continue
                        raise
                    seg = n
                    for level, kind, data in anc:
                        if level == SOL_UDP and kind == UDP_GRO and len(data) >= 4:
                            seg = _INT(data)[0]
                    if seg <= 0:
                        seg = n if n > 0 else 1
                    allowed = sources.get(addr[0])
                    if allowed is None:
                        unknown += (n + seg - 1) // seg if n else 1
                        continue
                    if mflags & socket.MSG_TRUNC:
                        malformed += 1
                        continue
                    if vnet:
                        p, b, d, m, f = coalesce(buf, mv, n, seg, out, allowed)
                        pkts += p
                        nbytes += b
                        dropped += d
                        malformed += m
                        spoofed += f
                        for count, iov in out:
                            try:
                                writev(fd, iov)
                            except OSError:
                                pkts -= count
                                dropped += count
                                nbytes -= sum(len(v) for v in iov[1:])
                        writes += len(out)
                        out.clear()
                        continue
                    net, mask, more = allowed
                    for o in range(0, n, seg) if n else (0,):
                        e = o + seg if o + seg < n else n
                        ln = e - o
                        if ln < 20 or buf[o] >> 4 != 4 or (buf[o] & 0x0F) * 4 > ln:
                            malformed += 1
                            continue
                        src = _U32(buf, o + 12)[0]
                        if src & mask != net and not (more and source_allowed(src, allowed)):
                            spoofed += 1
                            continue
                        ttl = buf[o + 8]
                        if ttl <= 1:
                            dropped += 1
                            continue
                        buf[o + 8] = ttl - 1
                        s = ((buf[o + 10] << 8) | buf[o + 11]) + 0x0100
                        if s >= 0xFFFF:
                            s = (s + 1) & 0xFFFF
                        buf[o + 10] = s >> 8
                        buf[o + 11] = s & 0xFF
                        try:
                            write(fd, mv[o:e])
                        except OSError:
                            dropped += 1
                            continue
                        writes += 1
                        pkts += 1
                        nbytes += ln
                else:
                    c.rx_packets += pkts
                    c.rx_bytes += nbytes
                    c.rx_writes += writes
                    pkts = nbytes = writes = 0
                    await trio.lowlevel.checkpoint()
                    continue
                break
            c.rx_packets += pkts
            c.rx_bytes += nbytes
            c.rx_writes += writes
            c.rx_dropped_unknown_source += unknown
            c.rx_dropped_spoofed_source += spoofed
            c.rx_dropped_malformed += malformed
            c.rx_dropped += dropped
