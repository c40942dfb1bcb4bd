"""What the kernel should hold for the host-gw backend: pure decisions, no netlink.

One route per accepted peer, `<subnet> via <PublicIP> dev <underlay> proto 70`.  Ours are the
main-table routes with our protocol (FLANNEL_RTPROT) inside Network via the underlay; any
other route, including one to a peer's subnet that someone else made, is not ours to remove
(a wanted route to the same destination replaces it, as flanneld does).

Dual stack (EnableIPv6): the same for IPv6, `<peer IPv6 subnet> via <PublicIPv6>` inside
IPv6Network; IPv6 routes carry the kernel's default metric (1024), given as `priority`.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Iterable, Mapping, Union

from flannelpy.backends.route_diff import as_mapping, diff_routes
from flannelpy.hostnet.monitor import KernelChange
from flannelpy.hostnet.netlink import FLANNEL_RTPROT, MAIN_TABLE, KernelRoute


IPNetwork = Union[IPv4Network, IPv6Network]
IPV6_DEFAULT_METRIC = 1024  # the metric of an IPv6 route added without one


@dataclass(frozen=True, slots=True)  # one per peer: no __dict__
class Route:
    """A wanted route: `dst via gw dev <oif>`."""

    dst: IPNetwork
    gw: IPv4Address | IPv6Address | None
    oif: int | None


def missing_routes(desired: Iterable[Route], present: Iterable[Route]) -> list[Route]:
    """Desired routes the kernel does not hold exactly (same dst, gateway and device)."""
    have = set(present)
    return [r for r in desired if r not in have]


def route_is_ours(route: KernelRoute, underlay_index: int, network: IPNetwork) -> bool:
    return route.proto == FLANNEL_RTPROT and route.oif == underlay_index and route.dst.subnet_of(network)


def route_matches(want: Route, have: KernelRoute, priority: int = 0) -> bool:
    return (have.dst, have.gateway, have.oif, have.proto, have.priority, have.tos) == \
        (want.dst, want.gw, want.oif, FLANNEL_RTPROT, priority, 0)


@dataclass
class RouteDiff:
    add: list[tuple[IPNetwork, Route]] = field(default_factory=list)  # (peer subnet, route), by "replace"
    remove: list[KernelRoute] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.add or self.remove)


def route_diff(wanted: Mapping[IPNetwork, Route] | Iterable[tuple[IPNetwork, Route]],
               present: Iterable[KernelRoute], *, underlay_index: int, network: IPNetwork, remove_unexplained: bool,
               priority: int = 0) -> RouteDiff:
    """Wanted routes the kernel lacks (or holds differently), and (remove_unexplained) our
    routes that no wanted one explains.  A route about to be overwritten by the "replace" of
    a wanted one (same dst, our metric: `priority`, 0 for IPv4) is not also deleted.  The
    kernel's routes are taken in one pass, keeping only what decides (a repair pass feeds them
    straight from the dump, so it never holds the whole table)."""
    diff = RouteDiff()
    diff.add, diff.remove = diff_routes(
        as_mapping(wanted), present, matches=lambda want, have: route_matches(want, have, priority),
        ours=(lambda have: route_is_ours(have, underlay_index, network)) if remove_unexplained else None,
        priority=priority)
    return diff


def change_matters(change: KernelChange, *, underlay_index: int, network: IPNetwork,
                   family: int = socket.AF_INET) -> bool:
    """Whether a kernel notification (not caused by us) may have touched our routes: a route
    inside Network (IPv6Network for family AF_INET6) changed, or the underlay went down or up (which
    drops routes silently)."""
    if change.kind == "overflow":
        return True
    if change.kind == "link":
        return change.ifindex == underlay_index
    if change.kind == "route":
        if change.family != family or change.table != MAIN_TABLE:
            return False
        return change.dst is not None and change.dst.subnet_of(network)
    return False
