"""allocation.py: flanneld's acquisition order and the free-subnet walk (pure)."""

import random
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from flannelpy.config.network import parse_config
from flannelpy.errors import ConfigError, OutOfSubnets
from flannelpy.subnet.allocation import FREE_CANDIDATES, free_subnets, plan_acquisition
from flannelpy.subnet.lease import Lease, LeaseAttrs

CFG = parse_config('{"Network":"10.5.0.0/16"}')
ME = IPv4Address("192.168.0.1")


def lease(net: str, ip: str = "10.0.0.1", exp: float | None = 1.0) -> Lease:
    return Lease(IPv4Network(net), LeaseAttrs(IPv4Address(ip)), exp)


def test_free_walk_starts_at_subnet_min_and_skips_taken():
    got = free_subnets(CFG, [IPv4Network("10.5.1.0/24"), IPv4Network("10.5.3.0/24")], limit=3)
    assert [str(n) for n in got] == ["10.5.2.0/24", "10.5.4.0/24", "10.5.5.0/24"]


def test_free_walk_limit_is_100_and_stops_at_subnet_max():
    assert len(free_subnets(CFG, [])) == FREE_CANDIDATES
    cfg = parse_config('{"Network":"10.5.0.0/16","SubnetMin":"10.5.250.0","SubnetMax":"10.5.252.0"}')
    assert [str(n) for n in free_subnets(cfg, [])] == ["10.5.250.0/24", "10.5.251.0/24", "10.5.252.0/24"]


def test_free_walk_larger_and_smaller_taken_ranges():
    taken = [IPv4Network("10.5.0.0/22"), IPv4Network("10.5.5.128/25")]  # /22 covers .0-.3, /25 inside .5
    assert [str(n) for n in free_subnets(CFG, taken, limit=2)] == ["10.5.4.0/24", "10.5.6.0/24"]


def test_reuse_own_compatible_lease():
    mine = lease("10.5.7.0/24", str(ME))
    plan = plan_acquisition(CFG, [lease("10.5.1.0/24"), mine], ME, IPv4Network("10.5.9.0/24"))
    assert plan.reuse == mine and plan.create is None and plan.delete == ()


def test_incompatible_own_lease_deleted_and_its_subnet_freed():
    cfg = parse_config('{"Network":"10.5.0.0/16","SubnetLen":25}')
    old = lease("10.5.7.0/24", str(ME))
    plan = plan_acquisition(cfg, [old], ME, None, rng=random.Random(0))
    assert plan.delete == (old,) and plan.reuse is None and plan.create.prefixlen == 25


def test_previous_subnet_used_only_when_free_and_compatible():
    prev = IPv4Network("10.5.9.0/24")
    assert plan_acquisition(CFG, [], ME, prev).create == prev
    assert plan_acquisition(CFG, [lease("10.5.9.0/24")], ME, prev).create != prev
    assert plan_acquisition(CFG, [], ME, IPv4Network("10.6.9.0/24"), rng=random.Random(1)).create != IPv4Network("10.6.9.0/24")
    assert plan_acquisition(CFG, [], ME, prev, exclude=[prev]).create != prev


def test_random_pick_among_first_100():
    picks = {plan_acquisition(CFG, [], ME, None, rng=random.Random(i)).create for i in range(200)}
    first100 = set(free_subnets(CFG, []))
    assert picks <= first100 and len(picks) > 50


def test_out_of_subnets_names_the_range():
    cfg = parse_config('{"Network":"10.9.0.0/24","SubnetLen":26}')
    taken = [lease(f"10.9.0.{i}/26") for i in (64, 128, 192)]
    with pytest.raises(OutOfSubnets, match="SubnetMin 10.9.0.64"):
        plan_acquisition(cfg, taken, ME, None)


@st.composite
def scenario(draw):
    prefix = draw(st.integers(8, 26))
    # Unicast space only (1.0.0.0 - 223.255.255.255): the agent refuses "this network", multicast and
    # reserved Networks; loopback and link-local, rare here, are filtered out below.
    net = IPv4Network((draw(st.integers(1 << 24, (224 << 24) - 1)) >> (32 - prefix) << (32 - prefix), prefix))
    sublen = draw(st.integers(prefix + 2, min(prefix + 10, 30)))
    size = 1 << (32 - sublen)
    count = (1 << (sublen - prefix))
    lo = draw(st.integers(1, count - 2))
    hi = draw(st.integers(lo, count - 1))
    base = int(net.network_address)
    try:
        cfg = parse_config(
            f'{{"Network":"{net}","SubnetLen":{sublen},'
            f'"SubnetMin":"{IPv4Address(base + lo * size)}","SubnetMax":"{IPv4Address(base + hi * size)}"}}')
    except ConfigError:
        assume(False)  # a Network the agent refuses (loopback, multicast, ...): nothing to allocate from
    # Taken ranges of any size anywhere in (and around) the network.
    taken = []
    for _ in range(draw(st.integers(0, 30))):
        plen = draw(st.integers(max(prefix - 2, 0), 32))
        addr = base + draw(st.integers(0, (1 << (32 - prefix)) - 1))
        taken.append(IPv4Network((addr >> (32 - plen) << (32 - plen), plen)))
    return cfg, taken


@settings(max_examples=300, deadline=None)
@given(scenario(), st.integers(1, 150))
def test_free_subnets_never_overlap_and_stay_in_range(case, limit):
    cfg, taken = case
    got = free_subnets(cfg, taken, limit=limit)
    assert len(got) <= limit
    for n in got:
        assert n.prefixlen == cfg.subnet_len
        assert cfg.subnet_min <= n.network_address <= cfg.subnet_max
        assert not any(n.overlaps(t) for t in taken)
    assert got == sorted(got, key=lambda n: int(n.network_address)) and len(set(got)) == len(got)
    # And it is the FIRST `limit` free ones: a brute-force walk agrees.
    expect = []
    size = cfg.subnet_size
    addr = int(cfg.subnet_min)
    while addr <= int(cfg.subnet_max) and len(expect) < limit:
        cand = IPv4Network((addr, cfg.subnet_len))
        if not any(cand.overlaps(t) for t in taken):
            expect.append(cand)
        addr += size
    assert got == expect


@settings(max_examples=200, deadline=None)
@given(scenario(), st.integers(0, 2**32 - 1))
def test_plan_never_overlaps_a_held_lease(case, seed):
    cfg, taken = case
    leases = [lease(str(t)) for t in taken]
    try:
        plan = plan_acquisition(cfg, leases, ME, None, rng=random.Random(seed))
    except OutOfSubnets:
        assert free_subnets(cfg, taken) == []
        return
    assert cfg.contains_subnet(plan.create)
    assert not any(plan.create.overlaps(t) for t in taken)
