"""What flannel0 should look like, and what to do when the kernel says otherwise (pure).

flanneld sets the TUN up once (address `<lease base>/32`, MTU, up, a route `<Network> dev
flannel0`) and never looks again: delete the device, its address or the route and the host
is off the overlay until flanneld restarts.  The udp backend compares the device as the
kernel reports it (TunFacts) with what it should be (TunSpec) on every pass of the repair
loop and after every kernel notification about it; tun_repair decides, the backend acts.
"""

from __future__ import annotations

import socket
from ipaddress import IPv4Address, IPv4Network
from typing import NamedTuple

from flannelpy.hostnet.monitor import KernelChange
from flannelpy.hostnet.netlink import MAIN_TABLE


class TunSpec(NamedTuple):
    """flannel0 as the backend made it."""

    name: str
    index: int
    address: IPv4Address  # the lease's base address, as a /32
    mtu: int
    network: IPv4Network  # routed via the device


class TunFacts(NamedTuple):
    """The device at the spec's index as the kernel reports it; present False: no such link
    (deleted), or a link that is not a TUN (the index was reused)."""

    present: bool
    up: bool = False
    mtu: int = 0
    addresses: frozenset[tuple[IPv4Address, int]] = frozenset()
    # Output devices of the main table's routes to exactly Network (any metric).
    network_route_oifs: tuple[int | None, ...] = ()


class TunRepair(NamedTuple):
    """What to do to make the device match its spec; all False: nothing."""

    reopen: bool = False  # the device is gone: open a new TUN and configure it from scratch
    set_up: bool = False
    set_mtu: bool = False
    add_address: bool = False
    add_route: bool = False
    # Network is routed via other devices and not via ours: adding ours would fail (EEXIST),
    # and those routes are not ours to remove, so this is reported, never "fixed".
    routed_elsewhere: tuple[int | None, ...] = ()

    @property
    def needed(self) -> bool:
        return self.reopen or self.set_up or self.set_mtu or self.add_address or self.add_route

    def problems(self, spec: TunSpec) -> list[str]:
        """One line per thing that is wrong, as /readyz shows them."""
        if self.reopen:
            return [f"{spec.name} is missing"]
        out = []
        if self.set_up:
            out.append(f"{spec.name} is down")
        if self.set_mtu:
            out.append(f"{spec.name} MTU is not {spec.mtu}")
        if self.add_address:
            out.append(f"{spec.name} has no address {spec.address}/32")
        if self.add_route:
            out.append(f"no route {spec.network} dev {spec.name}")
        if self.routed_elsewhere:
            devices = ", ".join(f"ifindex {i}" if i is not None else "no device" for i in self.routed_elsewhere)
            out.append(f"{spec.network} is routed via {devices}, not {spec.name}")
        return out

    def done(self, spec: TunSpec) -> str:
        """What a successful repair changed, for the log."""
        if self.reopen:
            return f"re-created {spec.name}"
        parts = [what for flag, what in ((self.set_up, "link up"), (self.set_mtu, f"MTU {spec.mtu}"),
                                         (self.add_address, f"address {spec.address}/32"),
                                         (self.add_route, f"route {spec.network}")) if flag]
        return f"{spec.name}: restored " + ", ".join(parts)


def tun_repair(spec: TunSpec, facts: TunFacts, *, fd_broken: bool = False) -> TunRepair:
    """What the device needs.  `fd_broken`: our TUN fd reads an error (the device it belonged
    to was deleted), whatever the link dump says."""
    if fd_broken or not facts.present:
        return TunRepair(reopen=True)
    ours = spec.index in facts.network_route_oifs
    elsewhere = () if ours else tuple(oif for oif in facts.network_route_oifs if oif != spec.index)
    return TunRepair(
        set_up=not facts.up,
        set_mtu=facts.mtu != spec.mtu,
        add_address=(spec.address, 32) not in facts.addresses,
        # A link going down drops its routes, so after set_up the route is added back as well.
        add_route=not ours and not elsewhere,
        routed_elsewhere=elsewhere,
    )


def change_matters(change: KernelChange, *, index: int | None, network: IPv4Network) -> bool:
    """Whether a kernel notification (not caused by us) may have touched flannel0: anything
    about the device itself, or a route to exactly Network.  Routes to subnets inside
    Network belong to other parts of the host (docker0's), not to us."""
    if change.kind == "overflow":
        return True
    if change.kind in ("link", "addr"):
        return index is not None and change.ifindex == index
    if change.kind == "route":
        return (change.family == socket.AF_INET and change.table == MAIN_TABLE
                and (change.dst == network or (index is not None and change.ifindex == index)))
    return False
