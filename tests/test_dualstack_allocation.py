"""allocation.py with EnableIPv6 (issue #14): the IPv6 subnet chosen beside the IPv4 one as flanneld's
LocalManager does, reuse only as a pair, and what switching EnableIPv6 does to our lease (pure)."""

import random
from ipaddress import IPv4Address, IPv4Network, IPv6Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flannelpy.config.network import parse_config
from flannelpy.errors import OutOfSubnets
from flannelpy.subnet.allocation import FREE_CANDIDATES, free_ipv6_subnets, lease_fits, plan_acquisition
from flannelpy.subnet.lease import Lease, LeaseAttrs

DUAL = parse_config('{"Network":"10.42.0.0/16","Backend":{"Type":"vxlan"},"EnableIPv6":true,"IPv6Network":"fd42::/48"}')
V4 = parse_config('{"Network":"10.42.0.0/16"}')
ME = IPv4Address("10.199.0.11")


def lease(v4: str, v6: str | None = None, ip: str = "10.199.0.99") -> Lease:
    return Lease(IPv4Network(v4), LeaseAttrs(IPv4Address(ip)), 1.0,
                 ipv6_subnet=IPv6Network(v6) if v6 else None)


def test_ipv6_walk_starts_at_ipv6_subnet_min_and_skips_taken():
    taken = [IPv6Network("fd42:0:0:1::/64"), IPv6Network("fd42:0:0:3::/64")]
    assert [str(n) for n in free_ipv6_subnets(DUAL, taken, limit=3)] == \
        ["fd42:0:0:2::/64", "fd42:0:0:4::/64", "fd42:0:0:5::/64"]
    assert len(free_ipv6_subnets(DUAL, [])) == FREE_CANDIDATES
    assert free_ipv6_subnets(V4, []) == []


def test_ipv6_walk_jumps_over_large_taken_ranges_and_stops_at_max():
    # A taken /50 holds 16,384 /64s: jumped over in one step.
    got = free_ipv6_subnets(DUAL, [IPv6Network("fd42::/50"), IPv6Network("fd42:0:0:4001::/80")], limit=2)
    assert [str(n) for n in got] == ["fd42:0:0:4000::/64", "fd42:0:0:4002::/64"]
    cfg = parse_config('{"Network":"10.42.0.0/16","Backend":{"Type":"vxlan"},"EnableIPv6":true,"IPv6Network":"fd42::/48",'
                       '"IPv6SubnetMin":"fd42:0:0:fffe::"}')
    assert [str(n) for n in free_ipv6_subnets(cfg, [])] == ["fd42:0:0:fffe::/64", "fd42:0:0:ffff::/64"]


def test_new_pair_is_picked_at_random_among_the_first_100_free_of_each():
    leases = [lease("10.42.1.0/24", "fd42:0:0:1::/64"), lease("10.42.2.0/24")]  # a v4-only peer blocks no v6
    seen_v4, seen_v6 = set(), set()
    for seed in range(200):
        plan = plan_acquisition(DUAL, leases, ME, None, rng=random.Random(seed))
        assert plan.reuse is None and plan.delete == ()
        assert DUAL.contains_subnet(plan.create) and DUAL.contains_ipv6_subnet(plan.create_ipv6)
        seen_v4.add(plan.create)
        seen_v6.add(plan.create_ipv6)
    assert IPv4Network("10.42.1.0/24") not in seen_v4 and IPv4Network("10.42.2.0/24") not in seen_v4
    assert IPv6Network("fd42:0:0:1::/64") not in seen_v6 and IPv6Network("fd42:0:0:2::/64") in seen_v6
    assert max(int(n.network_address) for n in seen_v6) <= int(free_ipv6_subnets(DUAL, [IPv6Network("fd42:0:0:1::/64")])[-1].network_address)
    assert len(seen_v4) > 50 and len(seen_v6) > 50  # independent random picks, not a fixed pairing


def test_own_dual_lease_is_reused_as_a_pair():
    mine = lease("10.42.63.0/24", "fd42:0:0:1f::/64", ip=str(ME))
    assert plan_acquisition(DUAL, [mine], ME, None).reuse == mine
    assert lease_fits(DUAL, mine) and not lease_fits(V4, mine)


def test_switching_ipv6_on_replaces_our_v4_only_lease_v4_subnet_included():
    # flanneld: a v4-only lease is not compatible with a dual-stack config: deleted, a new pair taken.
    old = lease("10.42.63.0/24", ip=str(ME))
    plan = plan_acquisition(DUAL, [old], ME, None, rng=random.Random(1))
    assert plan.reuse is None and plan.delete == (old,)
    assert plan.create_ipv6 is not None
    # the freed IPv4 subnet is a candidate again, like any other
    assert any(plan_acquisition(DUAL, [old], ME, None, rng=random.Random(s)).create == old.subnet for s in range(2000))


def test_switching_ipv6_off_replaces_our_dual_lease():
    old = lease("10.42.63.0/24", "fd42:0:0:1f::/64", ip=str(ME))
    plan = plan_acquisition(V4, [old], ME, IPv4Network("10.42.63.0/24"))
    # the previous subnet.env's IPv4 subnet is free once the dual lease goes: reused, without IPv6
    assert plan.delete == (old,) and plan.create == IPv4Network("10.42.63.0/24") and plan.create_ipv6 is None


def test_previous_subnet_env_pair_is_reused_only_as_a_pair():
    prev4, prev6 = IPv4Network("10.42.63.0/24"), IPv6Network("fd42:0:0:1f::/64")
    plan = plan_acquisition(DUAL, [], ME, prev4, previous_ipv6_subnet=prev6)
    assert (plan.create, plan.create_ipv6) == (prev4, prev6)
    # no FLANNEL_IPV6_SUBNET in the old file: the pair does not fit a dual-stack config, a new pair is taken
    plan = plan_acquisition(DUAL, [], ME, prev4, rng=random.Random(3))
    assert plan.create_ipv6 is not None and (plan.create, plan.create_ipv6) != (prev4, None)
    # an IPv6 subnet from the old file that the config no longer allows: ignored, as in flanneld
    plan = plan_acquisition(DUAL, [], ME, prev4, previous_ipv6_subnet=IPv6Network("fd43::/64"), rng=random.Random(3))
    assert plan.create_ipv6 != IPv6Network("fd43::/64")
    # a v4-only config with an old IPv6 subnet: the pair does not fit either
    plan = plan_acquisition(V4, [], ME, prev4, previous_ipv6_subnet=prev6, rng=random.Random(3))
    assert plan.create_ipv6 is None and plan.create in V4.network.subnets(new_prefix=24)


def test_previous_ipv6_subnet_held_by_another_lease_is_not_reused():
    prev4, prev6 = IPv4Network("10.42.63.0/24"), IPv6Network("fd42:0:0:1f::/64")
    other = lease("10.42.9.0/24", "fd42:0:0:1f::/64")
    for seed in range(50):
        plan = plan_acquisition(DUAL, [other], ME, prev4, previous_ipv6_subnet=prev6, rng=random.Random(seed))
        assert plan.create_ipv6 != prev6


def test_lost_races_are_excluded_on_both_halves():
    cfg = parse_config('{"Network":"10.42.0.0/16","SubnetMin":"10.42.1.0","SubnetMax":"10.42.2.0","Backend":{"Type":"vxlan"},"EnableIPv6":true,'
                       '"IPv6Network":"fd42::/48","IPv6SubnetMax":"fd42:0:0:2::"}')
    plan = plan_acquisition(cfg, [], ME, None, exclude=[IPv4Network("10.42.1.0/24")],
                            exclude_ipv6=[IPv6Network("fd42:0:0:1::/64")])
    assert (str(plan.create), str(plan.create_ipv6)) == ("10.42.2.0/24", "fd42:0:0:2::/64")


def test_out_of_ipv6_subnets_is_named():
    cfg = parse_config('{"Network":"10.42.0.0/16","Backend":{"Type":"vxlan"},"EnableIPv6":true,"IPv6Network":"fd42::/48",'
                       '"IPv6SubnetMax":"fd42:0:0:2::"}')
    taken = [lease("10.42.1.0/24", "fd42:0:0:1::/64"), lease("10.42.2.0/24", "fd42:0:0:2::/64")]
    with pytest.raises(OutOfSubnets, match=r"every /64 between IPv6SubnetMin fd42:0:0:1:: and IPv6SubnetMax "
                                           r"fd42:0:0:2:: of fd42::/48 is leased"):
        plan_acquisition(cfg, taken, ME, None)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(0, 40), st.sampled_from([62, 64, 70])), max_size=25))
def test_ipv6_walk_never_returns_a_taken_or_misaligned_subnet(specs):
    cfg = parse_config('{"Network":"10.42.0.0/16","Backend":{"Type":"vxlan"},"EnableIPv6":true,"IPv6Network":"fd42::/48",'
                       '"IPv6SubnetMax":"fd42:0:0:40::"}')
    taken = [IPv6Network(((0xFD42 << 112) | (a << 64) | (b << 58), plen), strict=False) for a, b, plen in specs]
    free = free_ipv6_subnets(cfg, taken)
    expected = [n for n in (IPv6Network(((0xFD42 << 112) | (i << 64), 64)) for i in range(1, 0x41))
                if not any(n.overlaps(t) for t in taken)][:FREE_CANDIDATES]
    assert free == expected
