"""Which subnet to lease: flanneld's tryAcquireLease order, as a pure decision.

1. a lease whose PublicIP is ours: reuse it if it still fits the config, else delete it;
2. the subnet from the previous subnet.env, if nobody holds it and it fits;
3. a random pick among the first 100 free subnets from SubnetMin upward.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Iterable

from flannelpy.config.network import NetworkConfig
from flannelpy.errors import OutOfSubnets

from .lease import Lease

FREE_CANDIDATES = 100  # flanneld picks at random among this many free subnets


@dataclass(frozen=True)
class AcquirePlan:
    """reuse: renew this lease of ours.  create: try to create this subnet.
    delete: our leases that no longer fit the config, to remove first."""

    reuse: Lease | None = None
    create: IPv4Network | None = None
    delete: tuple[Lease, ...] = field(default=())


def free_subnets(config: NetworkConfig, taken: Iterable[IPv4Network], limit: int = FREE_CANDIDATES) -> list[IPv4Network]:
    """Up to `limit` subnets from SubnetMin upward that overlap nothing in `taken`."""
    taken_sorted = sorted(taken, key=lambda n: int(n.network_address))
    size = config.subnet_size
    out: list[IPv4Network] = []
    addr = int(config.subnet_min)
    last = int(config.subnet_max)
    i = 0
    while addr <= last and len(out) < limit:
        start, end = addr, addr + size - 1
        # Skip taken ranges that end before this candidate.
        while i < len(taken_sorted) and int(taken_sorted[i].broadcast_address) < start:
            i += 1
        if i < len(taken_sorted) and int(taken_sorted[i].network_address) <= end:
            # Overlap: jump past the taken range, staying aligned.
            blocker_end = int(taken_sorted[i].broadcast_address)
            addr = ((blocker_end + 1 + size - 1) // size) * size if blocker_end >= addr else addr + size
            continue
        out.append(IPv4Network((start, config.subnet_len)))
        addr += size
    return out


def plan_acquisition(
    config: NetworkConfig,
    leases: Iterable[Lease],
    public_ip: IPv4Address,
    previous_subnet: IPv4Network | None,
    rng: random.Random | None = None,
    exclude: Iterable[IPv4Network] = (),
) -> AcquirePlan:
    """Decide how to get a lease.  `exclude` holds subnets we just lost a race for."""
    rng = rng or random.Random()
    leases = list(leases)
    mine = [lease for lease in leases if lease.attrs.public_ip == public_ip]
    incompatible: list[Lease] = []
    for lease in mine:
        if config.contains_subnet(lease.subnet):
            return AcquirePlan(reuse=lease)
        incompatible.append(lease)
    # Subnets of leases about to be deleted become free again.
    held = [lease.subnet for lease in leases if lease not in incompatible]
    held.extend(exclude)
    if (
        previous_subnet is not None
        and config.contains_subnet(previous_subnet)
        and not any(previous_subnet.overlaps(net) for net in held)
    ):
        return AcquirePlan(create=previous_subnet, delete=tuple(incompatible))
    candidates = free_subnets(config, held)
    if not candidates:
        raise OutOfSubnets(
            f"out of subnets: every /{config.subnet_len} between SubnetMin {config.subnet_min} "
            f"and SubnetMax {config.subnet_max} of {config.network} is leased"
        )
    return AcquirePlan(create=rng.choice(candidates), delete=tuple(incompatible))
