"""subnet/prefixes.py: ipaddress' answers by integers, without caching anything on the networks (pure)."""

from ipaddress import IPv4Address, IPv4Network, IPv6Network

from hypothesis import given
from hypothesis import strategies as st

from flannelpy.subnet.allocation import free_subnets, plan_acquisition
from flannelpy.config.network import parse_config
from flannelpy.subnet.lease import Lease, LeaseAttrs
from flannelpy.subnet.prefixes import last_address, overlaps, within


def networks(version: int):
    bits = 32 if version == 4 else 128
    cls = IPv4Network if version == 4 else IPv6Network
    return st.builds(lambda addr, plen: cls((addr >> (bits - plen) << (bits - plen), plen)),
                     st.integers(0, 2 ** bits - 1), st.integers(0, bits))


def near_networks(version: int):
    """Pairs that often share a prefix (random pairs almost never overlap)."""
    bits = 32 if version == 4 else 128
    cls = IPv4Network if version == 4 else IPv6Network

    def pair(base: int, p1: int, p2: int):
        return (cls((base >> (bits - p1) << (bits - p1), p1)), cls((base >> (bits - p2) << (bits - p2), p2)))
    return st.builds(pair, st.integers(0, 2 ** bits - 1), st.integers(0, bits), st.integers(0, bits))


@given(st.one_of(near_networks(4), near_networks(6), st.tuples(networks(4), networks(4))))
def test_the_same_answers_as_ipaddress(pair):
    a, b = pair
    fresh_a, fresh_b = type(a)(a), type(b)(b)  # ipaddress caches on these, not on a and b
    assert within(a, b) == fresh_a.subnet_of(fresh_b)
    assert overlaps(a, b) == fresh_a.overlaps(fresh_b)
    assert last_address(a) == int(fresh_a.broadcast_address)
    assert "broadcast_address" not in vars(a) and "broadcast_address" not in vars(b)


def test_acquiring_leaves_nothing_cached_on_the_peers_subnets():
    """A new host's start walks every peer's subnet (previous subnet taken, then the free walk):
    ipaddress would have cached a broadcast address and a __dict__ on each, for as long as the peer
    lives (300-400 bytes a peer)."""
    config = parse_config('{"Network":"10.5.0.0/16"}')
    peers = [Lease(IPv4Network((0x0A050000 + (i << 8), 24)), LeaseAttrs(IPv4Address(f"10.0.{i // 250}.{i % 250 + 1}")), 1.0)
             for i in range(1, 200)]
    plan = plan_acquisition(config, peers, IPv4Address("192.168.0.1"), previous_subnet=IPv4Network("10.5.7.0/24"))
    assert plan.create is not None and plan.create not in {p.subnet for p in peers}
    assert free_subnets(config, [p.subnet for p in peers], limit=3)[0] == IPv4Network("10.5.200.0/24")
    assert [p.subnet for p in peers if "broadcast_address" in vars(p.subnet)] == []
