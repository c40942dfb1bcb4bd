"""The comparison of wanted routes with the kernel's that both route-programming backends make
(vxlan, host-gw), each with its own idea of a route that matches and of a route that is its own.

Pure.  The kernel's routes are taken in one pass, keeping only what decides (a repair pass feeds
them straight from the dump, so it never holds the whole table).
"""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network
from typing import TYPE_CHECKING, Callable, Iterable, Protocol, TypeVar

if TYPE_CHECKING:
    from flannelpy.hostnet.netlink import KernelRoute

IPNetwork = IPv4Network | IPv6Network


class _Routed(Protocol):
    @property
    def dst(self) -> IPNetwork: ...


W = TypeVar("W", bound=_Routed)


def diff_routes(wanted: Iterable[tuple[IPNetwork, W]], present: Iterable[KernelRoute], *,
                matches: Callable[[W, KernelRoute], bool], ours: Callable[[KernelRoute], bool] | None,
                priority: int) -> tuple[list[tuple[IPNetwork, W]], list[KernelRoute]]:
    """(the wanted routes the kernel lacks or holds differently, with their peer subnet; our
    routes that no wanted one explains).  `ours` None: nothing is removed.  A route about to be
    overwritten by the "replace" of an addition (same dst, our metric `priority`, no TOS) is not
    also deleted."""
    want = {route.dst: (subnet, route) for subnet, route in wanted}
    found: set[IPNetwork] = set()  # the wanted routes the kernel holds exactly (their dsts)
    suspects: list[KernelRoute] = []  # ours, and not exactly a wanted route
    for have in present:
        wanted_here = want.get(have.dst)
        if wanted_here is not None and matches(wanted_here[1], have):
            found.add(have.dst)
        elif ours is not None and ours(have):
            suspects.append(have)
    add = [(subnet, route) for dst, (subnet, route) in want.items() if dst not in found]
    replaced = {route.dst for _s, route in add}
    remove = [have for have in suspects
              if not (have.dst in replaced and have.priority == priority and have.tos == 0)]
    return add, remove
