"""The comparison of wanted routes with the kernel's that both route-programming backends make
(vxlan, host-gw), each with its own idea of a route that matches and of a route that is its own.

Pure.  The kernel's routes are taken in one pass, keeping only what decides (a repair pass feeds
them straight from the dump, so it never holds the whole table).
"""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Protocol, TypeVar

if TYPE_CHECKING:
    from flannelpy.hostnet.netlink import KernelRoute

IPNetwork = IPv4Network | IPv6Network


class _Routed(Protocol):
    @property
    def dst(self) -> IPNetwork: ...


W = TypeVar("W", bound=_Routed)


def as_mapping(wanted: Mapping[IPNetwork, W] | Iterable[tuple[IPNetwork, W]]) -> Mapping[IPNetwork, W]:
    """`wanted` as a mapping of each peer's subnet to its entry (pairs, as tests write them, are
    made into one)."""
    return wanted if isinstance(wanted, Mapping) else dict(wanted)


def diff_routes(wanted: Mapping[IPNetwork, W], present: Iterable[KernelRoute], *,
                matches: Callable[[W, KernelRoute], bool], ours: Callable[[KernelRoute], bool] | None,
                priority: int) -> tuple[list[tuple[IPNetwork, W]], list[KernelRoute]]:
    """(the wanted routes the kernel lacks or holds differently, with their peer subnet; our
    routes that no wanted one explains).  `wanted`: each peer's subnet and its route, whose dst is
    that subnet; it is looked up, never copied, so a pass over a lazy mapping (the vxlan backend's
    plans, worked out when asked) keeps no object per peer: the small objects a pass kept for every
    peer stayed in pymalloc's pools for good, ~0.6 KiB of RSS a peer.  `ours` None: nothing is
    removed.  A route about to be overwritten by the "replace" of an addition (same dst, our metric
    `priority`, no TOS) is not also deleted."""
    found: set[IPNetwork] = set()  # the wanted subnets whose route the kernel holds exactly
    suspects: list[KernelRoute] = []  # ours, and not exactly a wanted route
    for have in present:
        want = wanted.get(have.dst)
        if want is not None and matches(want, have):
            found.add(want.dst)  # the peer's own subnet object, not the dump's
        elif ours is not None and ours(have):
            suspects.append(have)
    add = [(subnet, wanted[subnet]) for subnet in wanted if subnet not in found]
    replaced = {route.dst for _s, route in add}
    remove = [have for have in suspects
              if not (have.dst in replaced and have.priority == priority and have.tos == 0)]
    return add, remove
