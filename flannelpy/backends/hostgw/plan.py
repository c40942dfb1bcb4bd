"""What the kernel should hold for the host-gw backend: pure decisions, no netlink.

One route per accepted peer, `<subnet> via <PublicIP> dev <underlay> proto 70`.  Ours are the
main-table routes with our protocol (FLANNEL_RTPROT) inside Network via the underlay; any
other route, including one to a peer's subnet that someone else made, is not ours to remove
(a wanted route to the same destination replaces it, as flanneld does).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Iterable

from flannelpy.hostnet.monitor import KernelChange
from flannelpy.hostnet.netlink import FLANNEL_RTPROT, MAIN_TABLE, KernelRoute


@dataclass(frozen=True)
class Route:
    """A wanted route: `dst via gw dev <oif>`."""

    dst: IPv4Network
    gw: IPv4Address | None
    oif: int | None


def missing_routes(desired: Iterable[Route], present: Iterable[Route]) -> list[Route]:
    """Desired routes the kernel does not hold exactly (same dst, gateway and device)."""
    have = set(present)
    return [r for r in desired if r not in have]


def route_is_ours(route: KernelRoute, underlay_index: int, network: IPv4Network) -> bool:
    return route.proto == FLANNEL_RTPROT and route.oif == underlay_index and route.dst.subnet_of(network)


def route_matches(want: Route, have: KernelRoute) -> bool:
    return (have.dst, have.gateway, have.oif, have.proto, have.priority, have.tos) == \
        (want.dst, want.gw, want.oif, FLANNEL_RTPROT, 0, 0)


@dataclass
class RouteDiff:
    add: list[tuple[IPv4Network, Route]] = field(default_factory=list)  # (peer subnet, route), by "replace"
    remove: list[KernelRoute] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.add or self.remove)


def route_diff(wanted: Iterable[tuple[IPv4Network, Route]], present: Iterable[KernelRoute], *,
               underlay_index: int, network: IPv4Network, remove_unexplained: bool) -> RouteDiff:
    """Wanted routes the kernel lacks (or holds differently), and (remove_unexplained) our
    routes that no wanted one explains.  A route about to be overwritten by the "replace" of
    a wanted one (same dst, metric 0) is not also deleted."""
    present = list(present)
    want = {route.dst: (subnet, route) for subnet, route in wanted}
    at: dict[IPv4Network, list[KernelRoute]] = {}
    for have in present:
        at.setdefault(have.dst, []).append(have)
    diff = RouteDiff()
    for dst, (subnet, route) in want.items():
        if not any(route_matches(route, have) for have in at.get(dst, ())):
            diff.add.append((subnet, route))
    if remove_unexplained:
        replaced = {route.dst for _s, route in diff.add}
        for have in present:
            if not route_is_ours(have, underlay_index, network):
                continue
            wanted_here = want.get(have.dst)
            if wanted_here is not None and route_matches(wanted_here[1], have):
                continue
            if have.dst in replaced and have.priority == 0 and have.tos == 0:
                continue
            diff.remove.append(have)
    return diff


def change_matters(change: KernelChange, *, underlay_index: int, network: IPv4Network) -> bool:
    """Whether a kernel notification (not caused by us) may have touched our routes: a route
    inside Network changed, or the underlay went down or up (which drops routes silently)."""
    if change.kind == "overflow":
        return True
    if change.kind == "link":
        return change.ifindex == underlay_index
    if change.kind == "route":
        return (change.family == socket.AF_INET and change.table == MAIN_TABLE
                and change.dst is not None and change.dst.subnet_of(network))
    return False
