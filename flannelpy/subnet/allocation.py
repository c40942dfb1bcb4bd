"""Which subnet to lease: flanneld's tryAcquireLease order, as a pure decision.

1. a lease whose PublicIP is ours: reuse it if it still fits the config, else delete it;
2. the subnet from the previous subnet.env, if nobody holds it and it fits;
3. a random pick among the first 100 free subnets from SubnetMin upward.

Dual stack (EnableIPv6) as flanneld's LocalManager: a lease is "ours and compatible" only when its
IPv4 subnet and its IPv6 subnet both fit (so when EnableIPv6 is switched on or off, our old lease is
deleted and a new pair taken, the IPv4 subnet included); the previous subnet.env's pair
(FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET) is reused only as a pair; otherwise the IPv6 subnet is picked
the same way as the IPv4 one, independently: at random among the first 100 free from IPv6SubnetMin.
"""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from typing import Iterable, NamedTuple

from flannelpy.config.network import NetworkConfig
from flannelpy.errors import OutOfSubnets

from .lease import Lease
from .prefixes import last_address, overlaps

FREE_CANDIDATES = 100  # flanneld picks at random among this many free subnets


class AcquirePlan(NamedTuple):
    """reuse: renew this lease of ours.  create: try to create this subnet.
    delete: our leases that no longer fit the config, to remove first."""

    reuse: Lease | None = None
    create: IPv4Network | None = None
    delete: tuple[Lease, ...] = ()
    create_ipv6: IPv6Network | None = None  # with EnableIPv6: the IPv6 half of the key to create


def free_subnets(config: NetworkConfig, taken: Iterable[IPv4Network], limit: int = FREE_CANDIDATES) -> list[IPv4Network]:
    """Up to `limit` subnets from SubnetMin upward that overlap nothing in `taken` (by integers:
    the peers' subnets are kept for as long as the peers, see subnet/prefixes.py)."""
    taken_sorted = sorted(taken, key=lambda n: int(n.network_address))
    size = config.subnet_size
    out: list[IPv4Network] = []
    addr = int(config.subnet_min)
    last = int(config.subnet_max)
    i = 0
    while addr <= last and len(out) < limit:
        start, end = addr, addr + size - 1
        # Skip taken ranges that end before this candidate.
        while i < len(taken_sorted) and last_address(taken_sorted[i]) < start:
            i += 1
        if i < len(taken_sorted) and int(taken_sorted[i].network_address) <= end:
            # Overlap: jump past the taken range, staying aligned.
            blocker_end = last_address(taken_sorted[i])
            addr = ((blocker_end + 1 + size - 1) // size) * size if blocker_end >= addr else addr + size
            continue
        out.append(IPv4Network((start, config.subnet_len)))
        addr += size
    return out


def free_ipv6_subnets(config: NetworkConfig, taken: Iterable[IPv6Network],
                      limit: int = FREE_CANDIDATES) -> list[IPv6Network]:
    """Up to `limit` IPv6 subnets from IPv6SubnetMin upward that overlap nothing in `taken`
    (flanneld's OuterLoopv6).  A /48 holds 65,535 /64s, so taken ranges are jumped over, not walked."""
    if not config.enable_ipv6 or config.ipv6_subnet_min is None or config.ipv6_subnet_max is None:
        return []
    size = config.ipv6_subnet_size
    taken_sorted = sorted(taken, key=lambda n: int(n.network_address))
    out: list[IPv6Network] = []
    addr, last, i = int(config.ipv6_subnet_min), int(config.ipv6_subnet_max), 0
    while addr <= last and len(out) < limit:
        end = addr + size - 1
        while i < len(taken_sorted) and last_address(taken_sorted[i]) < addr:
            i += 1
        if i < len(taken_sorted) and int(taken_sorted[i].network_address) <= end:
            blocker_end = last_address(taken_sorted[i])
            addr = max(addr + size, (blocker_end + size) // size * size)
            continue
        out.append(IPv6Network((addr, config.ipv6_subnet_len)))
        addr += size
    return out


def lease_fits(config: NetworkConfig, lease: Lease) -> bool:
    """flanneld's isSubnetConfigCompat && isIPv6SubnetConfigCompat."""
    return config.contains_subnet(lease.subnet) and config.contains_ipv6_subnet(lease.ipv6_subnet)


def plan_acquisition(
    config: NetworkConfig,
    leases: Iterable[Lease],
    public_ip: IPv4Address,
    previous_subnet: IPv4Network | None,
    rng: random.Random | None = None,
    exclude: Iterable[IPv4Network] = (),
    previous_ipv6_subnet: IPv6Network | None = None,
    exclude_ipv6: Iterable[IPv6Network] = (),
) -> AcquirePlan:
    """Decide how to get a lease.  `exclude` / `exclude_ipv6` hold subnets we just lost a race for.

    One difference from flanneld, on the safe side: the previous subnet.env's IPv6 subnet is not
    reused when another lease holds it (flanneld checks only the IPv4 half and would create a second
    lease with the same IPv6 subnet).  Leases without an IPv6 subnet (v4-only peers) block no IPv6
    subnet; flanneld v0.20.2's allocation compares against their empty IPv6 subnet [inferred: a nil
    big.Int, which panics], so a dual-stack flanneld may not cope with them where flannelpy does.
    """
    rng = rng or random.Random()
    leases = list(leases)
    mine = [lease for lease in leases if lease.attrs.public_ip == public_ip]
    incompatible: list[Lease] = []
    for lease in mine:
        if lease_fits(config, lease):
            return AcquirePlan(reuse=lease)
        incompatible.append(lease)
    # Subnets of leases about to be deleted become free again.
    kept = [lease for lease in leases if lease not in incompatible]
    held = [lease.subnet for lease in kept]
    held.extend(exclude)
    held_v6 = [lease.ipv6_subnet for lease in kept if lease.ipv6_subnet is not None]
    held_v6.extend(exclude_ipv6)
    if (
        previous_subnet is not None
        and config.contains_subnet(previous_subnet)
        and config.contains_ipv6_subnet(previous_ipv6_subnet)
        and not any(overlaps(previous_subnet, net) for net in held)
        and (previous_ipv6_subnet is None or not any(overlaps(previous_ipv6_subnet, net) for net in held_v6))
    ):
        return AcquirePlan(create=previous_subnet, delete=tuple(incompatible), create_ipv6=previous_ipv6_subnet)
    candidates = free_subnets(config, held)
    if not candidates:
        raise OutOfSubnets(
            f"out of subnets: every /{config.subnet_len} between SubnetMin {config.subnet_min} "
            f"and SubnetMax {config.subnet_max} of {config.network} is leased"
        )
    create = rng.choice(candidates)
    if not config.enable_ipv6:
        return AcquirePlan(create=create, delete=tuple(incompatible))
    candidates_v6 = free_ipv6_subnets(config, held_v6)
    if not candidates_v6:
        raise OutOfSubnets(
            f"out of subnets: every /{config.ipv6_subnet_len} between IPv6SubnetMin {config.ipv6_subnet_min} "
            f"and IPv6SubnetMax {config.ipv6_subnet_max} of {config.ipv6_network} is leased"
        )
    return AcquirePlan(create=create, delete=tuple(incompatible), create_ipv6=rng.choice(candidates_v6))
