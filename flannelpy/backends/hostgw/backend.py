"""host-gw backend: a kernel route per peer subnet via the peer's PublicIP (pkg/backend/hostgw).

Needs every host on one L2 segment and no NAT.  A checker re-adds routes someone deleted
(flanneld: every 10 s).  Deciding (what is missing, add or replace) is pure; the netlink
calls are thin.
"""

from __future__ import annotations

import errno
import logging
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Iterable, Sequence

import trio
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from flannelpy.backends.base import Backend, LeaseData
from flannelpy.errors import FlannelError
from flannelpy.subnet.lease import EventKind, Lease, LeaseEvent

log = logging.getLogger(__name__)

CHECK_INTERVAL = 10.0  # flanneld's route checker period, seconds
MAIN_TABLE = 254


@dataclass(frozen=True)
class Route:
    dst: IPv4Network
    gw: IPv4Address | None
    oif: int | None


def missing_routes(desired: Iterable[Route], present: Iterable[Route]) -> list[Route]:
    """Desired routes the kernel does not hold exactly (same dst, gateway and device)."""
    have = set(present)
    return [r for r in desired if r not in have]


def route_action(want: Route, present: Iterable[Route]) -> str | None:
    """'add', 'replace' (a different route to the same dst exists) or None (already there)."""
    same_dst = [r for r in present if r.dst == want.dst]
    if want in same_dst:
        return None
    return "replace" if same_dst else "add"


def _read_routes(ipr: IPRoute) -> list[Route]:
    routes = []
    for msg in ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE):
        if msg.get_attr("RTA_TABLE", msg["table"]) != MAIN_TABLE:
            continue
        dst = msg.get_attr("RTA_DST") or "0.0.0.0"
        gw = msg.get_attr("RTA_GATEWAY")
        routes.append(
            Route(IPv4Network(f"{dst}/{msg['dst_len']}", strict=False), IPv4Address(gw) if gw else None, msg.get_attr("RTA_OIF"))
        )
    return routes


def _program(ipr: IPRoute, want: Route) -> str | None:
    action = route_action(want, [r for r in _read_routes(ipr) if r.dst == want.dst])
    if action is not None:
        # "replace" swaps a conflicting route atomically (flanneld deletes, then adds).
        ipr.route(action, dst=str(want.dst), gateway=str(want.gw), oif=want.oif, table=MAIN_TABLE)
    return action


def _delete(ipr: IPRoute, route: Route) -> None:
    try:
        ipr.route("del", dst=str(route.dst), gateway=str(route.gw), oif=route.oif, table=MAIN_TABLE)
    except NetlinkError as exc:
        if exc.code != errno.ESRCH:  # already gone is what we wanted
            raise


def _add_missing(ipr: IPRoute, desired: list[Route]) -> list[Route]:
    missing = missing_routes(desired, _read_routes(ipr))
    for route in missing:
        _program(ipr, route)
    return missing


class HostGwBackend(Backend):
    name = "host-gw"

    def __init__(self, *args: Any, check_interval: float = CHECK_INTERVAL, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.check_interval = check_interval
        self.routes: dict[IPv4Network, Route] = {}

    def mtu(self) -> int:
        return self.ext.mtu

    async def prepare(self) -> LeaseData:
        return LeaseData("host-gw", None)

    async def start(self, lease: Lease) -> None:
        if self.ext.public_ip != self.ext.ip:
            raise FlannelError(
                f"host-gw backend: public IP {self.ext.public_ip} differs from interface {self.ext.name} "
                f"address {self.ext.ip}; host-gw cannot work through NAT (peers route to the public IP directly)"
            )

    async def apply(self, events: Sequence[LeaseEvent]) -> None:
        for event in events:
            lease = event.lease
            if not self.accepts(lease):
                log.info("ignoring non-host-gw subnet %s: type %r", lease.subnet, lease.attrs.backend_type)
                continue
            route = Route(lease.subnet, lease.attrs.public_ip, self.ext.index)
            if event.kind is EventKind.ADDED:
                self.routes[lease.subnet] = route
                await self.netlink.call(_program, route)
            else:
                self.routes.pop(lease.subnet, None)
                await self.netlink.call(_delete, route)

    async def check_once(self) -> list[Route]:
        """Re-add desired routes that vanished; returns what was re-added."""
        missing = await self.netlink.call(_add_missing, list(self.routes.values()))
        for route in missing:
            log.info("route to %s via %s was missing; re-added", route.dst, route.gw)
        return missing

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.check_interval)
            try:
                await self.check_once()
            except NetlinkError as exc:
                log.warning("route check failed: %s", exc)


BACKEND = HostGwBackend
