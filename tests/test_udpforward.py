"""Pure packet logic of the udp forwarder: TTL/checksum, ICMP unreachable, peer table."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv4Network

from hypothesis import given, strategies as st
from scapy.layers.inet import ICMP, IP, UDP, TCP

from flannelpy.peertable import PeerTable
from flannelpy.udpforward import checksum, decrement_ttl, is_ipv4, net_unreachable, wants_unreachable


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
