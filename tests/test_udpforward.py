"""Pure packet logic of the udp forwarder: TTL/checksum, ICMP unreachable, peer table."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv4Network

from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP

from flannelpy.backends.udp.forwarder import checksum, decrement_ttl, is_ipv4, net_unreachable, wants_unreachable
from flannelpy.backends.udp.peertable import PeerTable


def _header(ttl: int, rest: bytes) -> bytearray:
    """A 20-byte IPv4 header with a correct checksum; `rest` fills the other fields."""
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, rest[0], 20 + rest[1], *struct.unpack("!HH", rest[2:6]),
                                ttl, rest[6], 0, rest[7:11], rest[11:15]))
    struct.pack_into("!H", hdr, 10, checksum(hdr))
    return hdr


@given(ttl=st.integers(2, 255), rest=st.binary(min_size=15, max_size=15))
def test_decrement_ttl_matches_full_recompute(ttl: int, rest: bytes) -> None:
    hdr = _header(ttl, rest)
    assert decrement_ttl(hdr)
    assert hdr[8] == ttl - 1
    recomputed = bytearray(hdr)
    recomputed[10:12] = b"\0\0"
    assert struct.unpack("!H", hdr[10:12])[0] == checksum(recomputed)
    assert checksum(hdr) == 0  # a receiver's check passes


def test_decrement_ttl_checksum_wraps_at_top_of_range() -> None:
    # Headers whose checksum lies at 0xFEFF.. exercise the end-around carry path.
    hits = 0
    for ident in range(65536):
        hdr = _header(64, b"\0\0" + struct.pack("!H", ident) + b"\0\0\x11" + bytes([10, 0, 0, 1, 10, 0, 0, 2]))
        if struct.unpack("!H", hdr[10:12])[0] >= 0xFEFF:
            hits += 1
            assert decrement_ttl(hdr)
            assert checksum(hdr) == 0
            fresh = IP(bytes(hdr))
            del fresh.chksum
            assert IP(bytes(fresh)).chksum == struct.unpack("!H", hdr[10:12])[0]
    assert hits > 0


def test_decrement_ttl_drops_at_zero() -> None:
    for ttl in (0, 1):
        hdr = bytearray(bytes(IP(src="10.0.0.1", dst="10.0.0.2", ttl=ttl)))
        before = bytes(hdr)
        assert not decrement_ttl(hdr)
        assert bytes(hdr) == before


def test_is_ipv4() -> None:
    pkt = bytes(IP(dst="10.0.0.2") / UDP())
    assert is_ipv4(pkt, len(pkt))
    assert not is_ipv4(pkt, 19)
    assert not is_ipv4(b"\x60" + bytes(39), 40)  # IPv6
    assert not is_ipv4(b"\x4f" + bytes(39), 40)  # IHL says 60 bytes, only 40 there


def test_net_unreachable_layout() -> None:
    offender = bytes(IP(src="10.5.1.2", dst="10.5.99.1", ttl=63, id=7) / UDP(sport=1234, dport=53) / b"payload!!")
    reply = net_unreachable(offender, IPv4Address("10.5.1.0"))
    assert reply is not None
    ip = IP(reply)
    assert (ip.src, ip.dst, ip.ttl, ip.proto) == ("10.5.1.0", "10.5.1.2", 8, 1)
    assert ip.len == len(reply) == 20 + 8 + 20 + 8
    assert checksum(reply[:20]) == 0
    icmp = ip[ICMP]
    assert (icmp.type, icmp.code) == (3, 0)
    assert checksum(reply[20:]) == 0
    assert reply[28:] == offender[:28]  # quoted header + first 8 payload bytes


def test_net_unreachable_quotes_ip_options() -> None:
    from scapy.layers.inet import IPOption_NOP

    offender = bytes(IP(src="10.5.1.2", dst="10.5.99.1", options=[IPOption_NOP()] * 4) / TCP())
    assert offender[0] & 0x0F == 6
    reply = net_unreachable(offender, IPv4Address("10.5.1.0"))
    assert reply is not None and reply[28:] == offender[:24 + 8]


def test_no_unreachable_for_icmp_or_later_fragments() -> None:
    src = IPv4Address("10.5.1.0")
    assert net_unreachable(bytes(IP(src="10.5.1.2", dst="10.5.99.1") / ICMP()), src) is None
    later = bytes(IP(src="10.5.1.2", dst="10.5.99.1", frag=185) / (b"x" * 8))
    assert not wants_unreachable(later)
    assert net_unreachable(later, src) is None
    first = bytes(IP(src="10.5.1.2", dst="10.5.99.1", flags="MF", frag=0) / UDP() / (b"x" * 8))
    assert net_unreachable(first, src) is not None


def _dst(addr: str) -> int:
    return int(IPv4Address(addr))


def test_peer_table_lookup_and_sources() -> None:
    t = PeerTable(8285)
    t.set(IPv4Network("10.5.3.0/24"), IPv4Address("192.168.0.3"))
    t.set(IPv4Network("10.5.4.0/24"), "192.168.0.4")
    assert t.lookup(_dst("10.5.3.77")) == ("192.168.0.3", 8285)
    assert t.lookup(_dst("10.5.4.255")) == ("192.168.0.4", 8285)
    assert t.lookup(_dst("10.5.5.1")) is None
    assert t.is_peer("192.168.0.3") and not t.is_peer("192.168.0.9")
    # A subnet that changes owner stops accepting the old owner's packets.
    t.set(IPv4Network("10.5.3.0/24"), "192.168.0.9")
    assert t.lookup(_dst("10.5.3.1")) == ("192.168.0.9", 8285)
    assert not t.is_peer("192.168.0.3") and t.is_peer("192.168.0.9")
    assert t.remove(IPv4Network("10.5.3.0/24"))
    assert not t.remove(IPv4Network("10.5.3.0/24"))
    assert t.lookup(_dst("10.5.3.1")) is None and not t.is_peer("192.168.0.9")
    assert len(t) == 1


def test_peer_table_shared_public_ip_and_mixed_lengths() -> None:
    t = PeerTable(9000)
    t.set(IPv4Network("10.5.0.0/16"), "192.168.0.1")
    t.set(IPv4Network("10.5.7.0/24"), "192.168.0.1")
    t.set(IPv4Network("10.5.7.128/25"), "192.168.0.2")
    assert t.lookup(_dst("10.5.7.200")) == ("192.168.0.2", 9000)  # longest first
    assert t.lookup(_dst("10.5.7.1")) == ("192.168.0.1", 9000)
    assert t.lookup(_dst("10.5.200.1")) == ("192.168.0.1", 9000)
    t.remove(IPv4Network("10.5.0.0/16"))
    assert t.is_peer("192.168.0.1")  # still holds 10.5.7.0/24
    t.remove(IPv4Network("10.5.7.0/24"))
    assert not t.is_peer("192.168.0.1")


@given(st.lists(st.tuples(st.integers(0, 255), st.integers(1, 254)), max_size=40), st.integers(0, 2**32 - 1))
def test_peer_table_agrees_with_linear_scan(leases: list[tuple[int, int]], dst: int) -> None:
    t = PeerTable(8285)
    ref: dict[IPv4Network, str] = {}
    for third, host in leases:
        net = IPv4Network(f"10.5.{third}.0/24")
        t.set(net, f"192.168.1.{host}")
        ref[net] = f"192.168.1.{host}"
    want = next((ip for net, ip in ref.items() if IPv4Address(dst) in net), None)
    got = t.lookup(dst)
    assert (got[0] if got else None) == want
    assert t.entries() == ref


def test_peer_table_allowed_sources_follow_the_leases() -> None:
    t = PeerTable(8285)
    t.set(IPv4Network("10.5.3.0/24"), "192.168.0.3")
    t.set(IPv4Network("10.5.4.0/24"), "192.168.0.4")
    # The subnet first (the one compare of the fast path), then the sender's own PublicIP.
    assert t.allowed("192.168.0.3") == (_dst("10.5.3.0"), 0xFFFFFF00, ((_dst("192.168.0.3"), 0xFFFFFFFF),))
    assert t.allowed("192.168.0.9") is None
    own = t.allowed("192.168.0.3")
    assert source_allowed(_dst("10.5.3.0"), own)  # the holder's flannel0 address (its subnet base)
    assert source_allowed(_dst("10.5.3.255"), own)
    assert source_allowed(_dst("192.168.0.3"), own)  # a host service bound to the holder's PublicIP
    assert not source_allowed(_dst("192.168.0.4"), own)  # ...but not another peer's PublicIP
    assert not source_allowed(_dst("10.5.4.2"), own)  # another peer's subnet
    assert not source_allowed(_dst("8.8.8.8"), own)
    # A second subnet of the same PublicIP is allowed too; removing either keeps the other.
    t.set(IPv4Network("10.5.9.0/24"), "192.168.0.3")
    both = t.allowed("192.168.0.3")
    assert source_allowed(_dst("10.5.9.7"), both) and source_allowed(_dst("10.5.3.7"), both)
    t.remove(IPv4Network("10.5.3.0/24"))
    assert t.allowed("192.168.0.3")[:2] == (_dst("10.5.9.0"), 0xFFFFFF00)
    assert not source_allowed(_dst("10.5.3.7"), t.allowed("192.168.0.3"))
    # A subnet that changes owner moves its sources with it.
    t.set(IPv4Network("10.5.4.0/24"), "192.168.0.3")
    assert t.allowed("192.168.0.4") is None
    assert source_allowed(_dst("10.5.4.2"), t.allowed("192.168.0.3"))
    # The forwarder's live view is the same dict object throughout.
    assert t.sources is t.sources and t.sources["192.168.0.3"] == t.allowed("192.168.0.3")


def test_receive_verdict_drops_spoofed_inner_sources() -> None:
    sender = PeerTable(8285)
    sender.set(IPv4Network("10.50.2.0/24"), "192.168.77.2")
    sender = sender.allowed("192.168.77.2")
    def verdict(**kw) -> str:
        pkt = bytes(IP(dst="10.50.1.2", **kw) / ICMP())
        return receive_verdict(pkt, len(pkt), sender)
    assert verdict(src="10.50.2.2") == "deliver"  # a container behind the sender
    assert verdict(src="10.50.2.0") == "deliver"  # the sender host's own flannel0 address
    assert verdict(src="192.168.77.2") == "deliver"  # the sender host itself (a service bound to it)
    assert verdict(src="192.168.77.3") == "spoofed_source"
    assert verdict(src="8.8.8.8") == "spoofed_source"
    assert verdict(src="10.50.3.2") == "spoofed_source"  # another peer's subnet
    assert verdict(src="10.50.1.2") == "spoofed_source"  # our own subnet, reflected back at us
    assert verdict(src="10.50.2.2", ttl=1) == "expired"
    assert verdict(src="8.8.8.8", ttl=1) == "spoofed_source"
    assert receive_verdict(b"\x60" + bytes(39), 40, sender) == "malformed"
    assert receive_verdict(bytes(IP(src="10.50.2.2")), 19, sender) == "malformed"


@given(st.integers(0, 2**32 - 1), st.integers(8, 30), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_source_allowed_is_subnet_membership(net: int, prefix: int, src: int, public: int) -> None:
    subnet = IPv4Network((net, prefix), strict=False)
    t = PeerTable(8285)
    t.set(subnet, IPv4Address(public))
    assert source_allowed(src, t.allowed(str(IPv4Address(public)))) == (IPv4Address(src) in subnet or src == public)


# --- Offload helpers: TSO coalescing of received runs, column-wise TTL patch on send ----------

import random
import socket

from flannelpy.backends.udp.forwarder import (
    _VNET,
    VNET_HDR_LEN,
    Forwarder,
    _first_diff,
    coalesce,
    complete_checksum,
    receive_verdict,
    run_length,
)
from flannelpy.backends.udp.peertable import source_allowed

# The sender of the packets _seg() builds holds 10.50.1.0/24 (PublicIP 192.168.77.1).
_senders = PeerTable(8285)
_senders.set(IPv4Network("10.50.1.0/24"), "192.168.77.1")
SENDER = _senders.allowed("192.168.77.1")


def _seg(seq: int, payload: bytes, *, ts: int = 1, flags: str = "A", sport: int = 5201, ttl: int = 63, ident: int = 0) -> bytes:
    return bytes(IP(src="10.50.1.2", dst="10.50.2.2", ttl=ttl, id=ident, flags="DF")
                 / TCP(sport=sport, dport=40000, seq=seq, ack=77, flags=flags, window=501,
                       options=[("NOP", None), ("NOP", None), ("Timestamp", (ts, 9))]) / payload)


def _gro(packets: list[bytes], seg: int) -> tuple[bytearray, memoryview, int]:
    """Lay packets out like a UDP GRO receive: every `seg` bytes, all full but the last."""
    raw = b"".join(packets)
    assert all(len(p) == seg for p in packets[:-1]) and len(packets[-1]) <= seg
    buf = bytearray(len(raw) + 100)
    buf[: len(raw)] = raw
    return buf, memoryview(buf), len(raw)


def _written(iov: list) -> tuple[tuple, bytes]:
    data = b"".join(bytes(v) for v in iov)
    return _VNET.unpack(data[:VNET_HDR_LEN]), data[VNET_HDR_LEN:]


def _as_kernel_would(vnet: tuple, pkt: bytes) -> bytes:
    """Complete a NEEDS_CSUM packet the way the kernel does for CHECKSUM_PARTIAL."""
    flags, _, _, _, start, offset = vnet
    out = bytearray(pkt)
    if flags & 1:
        complete_checksum(out, start, offset)
    return bytes(out)


def test_coalesce_merges_one_run_into_a_tso_write() -> None:
    mss = 1400
    data = bytes(random.Random(1).randrange(256) for _ in range(mss * 9 + 333))
    pkts = [_seg(1000 + i * mss, data[i * mss:(i + 1) * mss], ident=i) for i in range(9)]
    pkts.append(_seg(1000 + 9 * mss, data[9 * mss:], flags="PA", ident=9))
    buf, mv, n = _gro(pkts, len(pkts[0]))
    assert run_length(buf, 0, n, len(pkts[0])) == 10
    out: list = []
    assert coalesce(buf, mv, n, len(pkts[0]), out, SENDER) == (10, n, 0, 0, 0)
    assert [count for count, _ in out] == [10]
    vnet, pkt = _written(out[0][1])
    flags, gso_type, hdr_len, gso_size, start, offset = vnet
    assert (flags, gso_type, hdr_len, gso_size, start, offset) == (1, 1, 52, mss, 20, 16)
    ip = IP(_as_kernel_would(vnet, pkt))
    assert ip.len == len(pkt) == 52 + len(data) and ip.ttl == 62 and ip.id == 0
    assert checksum(pkt[:20]) == 0
    assert ip[TCP].seq == 1000 and ip[TCP].flags == "PA" and bytes(ip[TCP].payload) == data
    fresh = IP(bytes(ip))
    del fresh[TCP].chksum
    assert IP(bytes(fresh))[TCP].chksum == ip[TCP].chksum  # what the kernel completes is right


def test_coalesce_splits_where_linux_gro_would() -> None:
    mss = 1000
    p = lambda i, **kw: _seg(i * mss, bytes([i]) * mss, **kw)
    pkts = [p(0), p(1), p(2, ts=2), p(3, ts=2), p(4, ts=2, sport=1), p(6, ts=2), p(7, ts=2), p(8, ts=2, flags="FA")]
    seg = len(pkts[0])
    buf, mv, n = _gro(pkts, seg)
    out: list = []
    assert coalesce(buf, mv, n, seg, out, SENDER) == (8, n, 0, 0, 0)
    # ts change | other flow | seq gap | FIN never merges
    assert [count for count, _ in out] == [2, 2, 1, 2, 1]
    for count, iov in out:
        vnet, pkt = _written(iov)
        ip = IP(_as_kernel_would(vnet, pkt))
        assert ip.ttl == 62 and checksum(pkt[:20]) == 0
        assert len(ip[TCP].payload) == count * mss
        if count == 1:
            assert vnet == (0, 0, 0, 0, 0, 0)


def test_coalesce_drops_expired_and_junk_and_passes_the_rest_alone() -> None:
    udp = bytes(IP(src="10.50.1.2", dst="10.50.2.2", ttl=9) / UDP(sport=1, dport=2) / (b"u" * 60))
    pkts = [udp, bytes(IP(src="10.50.1.2", dst="10.50.2.2", ttl=1) / UDP() / (b"t" * 60)), b"\x60" + bytes(87), udp]
    buf, mv, n = _gro(pkts, len(udp))
    out: list = []
    assert coalesce(buf, mv, n, len(udp), out, SENDER) == (2, 2 * len(udp), 1, 1, 0)
    for count, iov in out:
        vnet, pkt = _written(iov)
        assert count == 1 and vnet == (0, 0, 0, 0, 0, 0)
        assert IP(pkt).ttl == 8 and checksum(pkt[:20]) == 0


def test_coalesce_random_mix_keeps_every_byte_in_order() -> None:
    rng = random.Random(7)
    for _ in range(30):
        mss = rng.choice([100, 537, 1400])
        count = rng.randrange(1, 40)
        seqs = {1: 0, 2: 0}
        pkts, sent = [], {1: b"", 2: b""}
        for i in range(count):
            flow = 1 if rng.random() < 0.8 else 2
            size = mss if i < count - 1 else rng.randrange(1, mss + 1)
            payload = bytes([rng.randrange(256)]) * size
            pkts.append(_seg(seqs[flow], payload, sport=flow, ts=rng.choice([1, 1, 1, 2]), flags=rng.choice(["A"] * 5 + ["PA"])))
            seqs[flow] += size
            sent[flow] += payload
        buf, mv, n = _gro(pkts, len(pkts[0]))
        out: list = []
        assert coalesce(buf, mv, n, len(pkts[0]), out, SENDER) == (count, n, 0, 0, 0)
        got = {1: b"", 2: b""}
        for c, iov in out:
            vnet, pkt = _written(iov)
            ip = IP(_as_kernel_would(vnet, pkt))
            assert checksum(pkt[:20]) == 0 and ip.ttl == 62
            fresh = IP(bytes(ip))
            del fresh[TCP].chksum
            assert IP(bytes(fresh))[TCP].chksum == ip[TCP].chksum
            got[ip[TCP].sport] += bytes(ip[TCP].payload)
        assert got == sent
        assert sum(c for c, _ in out) == count


def test_first_diff_and_complete_checksum() -> None:
    assert _first_diff(b"abcd", b"abcd") == 4
    assert _first_diff(b"abcd", b"abXd") == 2
    assert _first_diff(b"\0\0\0\1", b"\0\0\0\0") == 3
    pkt = bytearray(bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=7, dport=9) / b"hello world"))
    want = pkt[26:28]
    a, b = struct.unpack("!II", pkt[12:20])
    pseudo = (a >> 16) + (a & 0xFFFF) + (b >> 16) + (b & 0xFFFF) + 17 + len(pkt) - 20
    while pseudo >> 16:
        pseudo = (pseudo & 0xFFFF) + (pseudo >> 16)
    pkt[26:28] = pseudo.to_bytes(2, "big")
    complete_checksum(pkt, 20, 6)
    assert pkt[26:28] == want


def test_flush_patches_ttl_column_wise_and_falls_back_per_packet() -> None:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(5)
    try:
        fwd = Forwarder(-1, tx, PeerTable(rx.getsockname()[1]), IPv4Address("10.50.1.0"), gro=False)
        peer = rx.getsockname()
        for ttls in ([64, 30, 2, 9], [64, 1, 0, 9]):
            pkts = [bytes(IP(src="10.50.1.2", dst="10.50.2.2", ttl=t, id=i) / UDP() / (b"p" * 80)) for i, t in enumerate(ttls)]
            pkts.append(bytes(IP(src="10.50.1.2", dst="10.50.2.2", ttl=5) / UDP() / b"short"))
            buf = bytearray(b"".join(pkts))
            size = len(pkts[0])
            alive = [p for p in pkts if p[8] > 1]
            assert fwd._flush(buf, memoryview(buf), 0, len(buf), len(pkts), size, peer) == len(alive)
            for p in alive:
                got = rx.recv(2000)
                assert got[8] == p[8] - 1 and checksum(got[:20]) == 0 and got[12:] == p[12:]
        # A checksum high byte of 0xFE/0xFF needs the end-around carry: per packet.
        for ident in range(4000):
            p = bytes(IP(src="10.50.1.2", dst="10.50.2.2", ttl=64, id=ident) / UDP() / b"x")
            if p[10] >= 0xFE:
                break
        buf = bytearray(p * 3)
        assert fwd._flush(buf, memoryview(buf), 0, len(buf), 3, len(p), peer) == 3
        for _ in range(3):
            got = rx.recv(2000)
            assert got[8] == 63 and checksum(got[:20]) == 0
        assert fwd.counters.tx_sends >= 1
    finally:
        rx.close()
        tx.close()


def test_coalesce_drops_spoofed_runs_and_packets_and_keeps_the_rest() -> None:
    mss = 1000
    legit = [_seg(i * mss, bytes([i]) * mss) for i in range(3)]
    # The same flow's next segments, but from 8.8.8.8 and from another peer's subnet: a GRO
    # batch may mix them; none may reach the TUN, and they must not merge with legit ones.
    forged = [bytes(IP(src=src, dst="10.50.2.2", ttl=63, flags="DF") / IP(p)[TCP]) for src, p in
              (("8.8.8.8", _seg(3 * mss, b"x" * mss)), ("8.8.8.8", _seg(4 * mss, b"x" * mss)),
               ("10.50.3.2", _seg(5 * mss, b"y" * mss)))]
    tail = [_seg(3 * mss, bytes([3]) * mss)]
    pkts = legit + forged + tail
    seg = len(pkts[0])
    assert all(len(p) == seg for p in pkts)
    buf, mv, n = _gro(pkts, seg)
    out: list = []
    assert coalesce(buf, mv, n, seg, out, SENDER) == (4, 4 * seg, 0, 0, 3)
    written = [IP(_as_kernel_would(*_written(iov))) for _, iov in out]
    assert {ip.src for ip in written} == {"10.50.1.2"}
    assert b"".join(bytes(ip[TCP].payload) for ip in written) == b"".join(bytes([i]) * mss for i in range(4))
    # A whole run from a forged source goes in one piece.
    buf, mv, n = _gro(forged[:2], seg)
    out.clear()
    assert coalesce(buf, mv, n, seg, out, SENDER) == (0, 0, 0, 0, 2) and out == []
    assert coalesce(bytearray(10), memoryview(bytearray(10)), 0, 1, out, SENDER) == (0, 0, 0, 1, 0)


@given(st.lists(st.sampled_from(["10.50.1.2", "10.50.1.0", "192.168.77.1", "8.8.8.8", "10.50.3.9", "junk", "ttl1"]),
                min_size=1, max_size=12), st.booleans())
def test_coalesce_agrees_with_receive_verdict(kinds: list[str], tcp: bool) -> None:
    """Whatever the mix, coalesce drops exactly what receive_verdict drops, by reason."""
    pkts = []
    for i, kind in enumerate(kinds):
        if kind == "junk":
            pkt = b"\x60" + bytes(99 if tcp else 59)  # as long as the others
        else:
            src, ttl = ("10.50.1.2", 1) if kind == "ttl1" else (kind, 63)
            layer = TCP(sport=5201, dport=40000, seq=i * 48, flags="A", options=[("NOP", None)] * 12) if tcp else UDP()
            pkt = bytes(IP(src=src, dst="10.50.2.2", ttl=ttl, flags="DF") / layer / (b"z" * (48 if tcp else 32)))
        pkts.append(pkt)
    seg = len(pkts[0])
    assert all(len(p) == seg for p in pkts)
    want = {"deliver": 0, "expired": 0, "malformed": 0, "spoofed_source": 0}
    for p in pkts:
        want[receive_verdict(p, len(p), SENDER)] += 1
    buf, mv, n = _gro(pkts, seg)
    out: list = []
    got = coalesce(buf, mv, n, seg, out, SENDER)
    assert got == (want["deliver"], want["deliver"] * seg, want["expired"], want["malformed"], want["spoofed_source"])
    assert sum(count for count, _ in out) == want["deliver"]


def test_drop_counters_reach_metrics_by_reason() -> None:
    from flannelpy.backends.udp.forwarder import Counters
    from flannelpy.ops.metrics import Metrics

    counters = Counters(rx_dropped_unknown_source=1, rx_dropped_spoofed_source=2, rx_dropped_malformed=3, rx_dropped=4)
    metrics = Metrics()
    metrics.register_counters("udp", counters.as_dict)
    text = metrics.render().decode()
    for reason, value in (("unknown_source", 1), ("spoofed_source", 2), ("malformed", 3), ("other", 4)):
        assert f'flannel_backend_drops_total{{backend="udp",direction="rx",reason="{reason}"}} {value}.0' in text
