"""host-gw backend: a kernel route per peer subnet via the peer's PublicIP (pkg/backend/hostgw).

Needs every host on one L2 segment and no NAT.  Each lease event is one `route replace` (or
delete); a route the kernel refuses (a PublicIP off our segment: "Network is unreachable") is
logged once, counted as not programmed, shown by /readyz and retried by the next pass, and
never stops the agent.  run() reconciles every 10 s (flanneld's route checker period) and
within a fraction of a second of the kernel reporting a route change inside Network: missing
routes are restored, and routes of ours (protocol FLANNEL_RTPROT, inside Network, via the
underlay) that no accepted lease explains are removed.  Deciding is in plan.py.

Dual stack (EnableIPv6), as flanneld: also `<peer IPv6 subnet> via <peer PublicIPv6>`, with the same
protocol mark.  It is the same class run with family AF_INET6 (`self.v6`, owned by the IPv4 one),
which sees each lease through its IPv6 side.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from ipaddress import IPv4Network
from typing import Any, Mapping, Sequence

import trio

from flannelpy.backends.base import Backend, LeaseData
from flannelpy.backends.repair import RESYNC_INTERVAL, RepairLoop, RepairReport, describe_failures
from flannelpy.errors import FlannelError
from flannelpy.hostnet import rtnl
from flannelpy.hostnet.monitor import KernelChange, KernelMonitor
from flannelpy.hostnet.netlink import FLANNEL_RTPROT, MAIN_TABLE, KernelDumps, delete_route_request
from flannelpy.subnet.lease import EventKind, Lease, LeaseAttrs, LeaseEvent

from .plan import IPV6_DEFAULT_METRIC, IPNetwork, Route, change_matters, missing_routes, route_diff

log = logging.getLogger(__name__)

CHECK_INTERVAL = RESYNC_INTERVAL  # flanneld's route checker period, seconds

__all__ = ["HostGwBackend", "Route", "missing_routes", "CHECK_INTERVAL"]


def _route_request(add: bool, route: Route) -> rtnl.Request:
    """Replace (add) or delete the route: "replace" swaps a conflicting route to the same dst
    atomically (flanneld deletes, then adds).  Protocol FLANNEL_RTPROT on both, so a delete
    never takes someone else's route to the same subnet."""
    return rtnl.route_request(add, route.dst.network_address.packed, route.dst.prefixlen, route.gw.packed,
                              oif=route.oif, table=MAIN_TABLE, protocol=FLANNEL_RTPROT)


def _reconcile(dumps: KernelDumps, wanted: Mapping[IPNetwork, Route], underlay_index: int,
               network: IPNetwork, remove_unexplained: bool) -> RepairReport:
    """One pass: one route dump and the pure diff of it, one batch of requests that closes it; each
    request's failure is recorded, never raised.  IPv6 (network is an IPv6Network): its routes
    and their kernel default metric."""
    report = RepairReport()
    ipv6 = network.version == 6
    # Compared as the kernel sends its routes (read again when it says they changed meanwhile):
    # a pass never holds the whole table.
    diff = dumps.retried(lambda: route_diff(
        wanted, dumps.each_route(socket.AF_INET6 if ipv6 else socket.AF_INET), underlay_index=underlay_index,
        network=network, remove_unexplained=remove_unexplained, priority=IPV6_DEFAULT_METRIC if ipv6 else 0))
    requests = [delete_route_request(have) for have in diff.remove] + [_route_request(True, r) for _s, r in diff.add]
    if not requests:
        return report
    codes = dumps.transact(requests)
    for have, code in zip(diff.remove, codes):
        if not code:
            report.removed.append(f"route {have.dst} via {have.gateway}")
        elif code != errno.ESRCH:
            report.errors.append(f"route {have.dst}: {os.strerror(code)}")
    for (subnet, route), code in zip(diff.add, codes[len(diff.remove):]):
        if code:
            report.failures[subnet] = os.strerror(code)
        else:
            report.added.append(f"route {route.dst} via {route.gw}")
    return report


class HostGwBackend(Backend):
    name = "host-gw"

    def __init__(self, *args: Any, check_interval: float = CHECK_INTERVAL, family: int = socket.AF_INET,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # AF_INET6: this instance is the IPv6 side of a dual-stack network (self.v6 of the IPv4 one).
        self.family = family
        ipv6 = family == socket.AF_INET6
        self.network: IPNetwork = self.config.ipv6_network if ipv6 else self.config.network  # type: ignore[assignment]
        if ipv6 and self.network is None:
            raise FlannelError("EnableIPv6: the host-gw backend needs IPv6Network")
        self.routes: dict[IPNetwork, Route] = {}  # accepted peers' routes, programmed or not
        self._failed: dict[IPv4Network, str] = {}  # peers whose route the kernel refused -> why
        self._synced = False
        self._lock = trio.Lock()
        self.repairs: dict[str, int] = {}
        self.loop = RepairLoop("host-gw IPv6" if ipv6 else "host-gw", self.netlink, self.reconcile_once,
                               self._notice, interval=check_interval,
                               monitor_groups=KernelMonitor.GROUPS_V6 if ipv6 else KernelMonitor.GROUPS)
        self.v6: HostGwBackend | None = None
        if self.config.enable_ipv6 and not ipv6:
            self.v6 = HostGwBackend(*args, check_interval=check_interval, family=socket.AF_INET6, **kwargs)

    def lease_view(self, lease: Lease) -> Lease | None:
        """A peer lease as this side sees it: itself for IPv4; for IPv6 its IPv6 subnet and
        PublicIPv6 in the places of the IPv4 ones, None without them."""
        if self.family == socket.AF_INET:
            return lease
        if lease.ipv6_subnet is None or lease.attrs.public_ipv6 is None:
            return None
        return Lease(lease.ipv6_subnet,  # type: ignore[arg-type]
                     LeaseAttrs(lease.attrs.public_ipv6, lease.attrs.backend_type),  # type: ignore[arg-type]
                     lease.expiration, lease.store_ref)

    @property
    def check_interval(self) -> float:
        return self.loop.interval

    def mtu(self) -> int:
        return self.ext.mtu

    async def prepare(self) -> LeaseData:
        return LeaseData("host-gw", None)

    async def start(self, lease: Lease) -> None:
        if self.v6 is not None:
            await self.v6.start(lease)
            if self.ext.public_ipv6 != self.ext.ip6:
                raise FlannelError(f"host-gw backend: public IPv6 {self.ext.public_ipv6} differs from interface "
                                   f"{self.ext.name} address {self.ext.ip6}; host-gw cannot work through NAT")
        if self.family == socket.AF_INET6:
            return
        if self.ext.public_ip != self.ext.ip:
            raise FlannelError(
                f"host-gw backend: public IP {self.ext.public_ip} differs from interface {self.ext.name} "
                f"address {self.ext.ip}; host-gw cannot work through NAT (peers route to the public IP directly)"
            )

    # --- counts and health ---------------------------------------------------------------

    def programmed_count(self) -> int | None:
        # Dual stack: a peer whose IPv6 route failed is not programmed either.
        return max(0, len(self.routes) - len(self._failed) - (len(self.v6._failed) if self.v6 is not None else 0))

    def data_plane_problems(self) -> list[str]:
        line = describe_failures({s: f"via {self.routes[s].gw}: {why}" for s, why in self._failed.items()
                                  if s in self.routes}, what="peer route")
        return ([line] if line else []) + (self.v6.data_plane_problems() if self.v6 is not None else [])

    def repair_counters(self) -> Mapping[str, int]:
        counters = dict(self.repairs)
        if self.v6 is not None:
            for key, n in self.v6.repairs.items():
                counters[key] = counters.get(key, 0) + n
        return counters

    def _mark_failed(self, subnet: IPv4Network, reason: str) -> None:
        if self._failed.get(subnet) != reason:  # once per peer and reason, not once per pass
            log.error("route to %s via %s not programmed: %s; retrying every %gs",
                      subnet, self.routes[subnet].gw, reason, self.check_interval)
        self._failed[subnet] = reason

    def _mark_ok(self, subnet: IPv4Network) -> None:
        if self._failed.pop(subnet, None) is not None:
            log.info("route to %s via %s programmed after earlier failure", subnet, self.routes[subnet].gw)

    # --- per event: one route request each, all of a batch in one round ------------------

    async def apply(self, events: Sequence[LeaseEvent]) -> None:
        """One rtnetlink request per event, the batch's requests sent together
        (hostnet.rtnl.transact) instead of one pyroute2 request/ACK round trip each."""
        if self.v6 is not None:
            views = ((e.kind, self.v6.lease_view(e.lease)) for e in events)
            await self.v6.apply([LeaseEvent(kind, view) for kind, view in views if view is not None])
        async with self._lock:
            steps: list[tuple[bool, Route]] = []  # (add, route) in event order
            for event in events:
                lease = event.lease
                if not self.accepts(lease):
                    log.info("ignoring non-host-gw subnet %s: type %r", lease.subnet, lease.attrs.backend_type)
                    continue
                route = Route(lease.subnet, lease.attrs.public_ip, self.ext.index)
                if event.kind is EventKind.ADDED:
                    self.routes[lease.subnet] = route
                else:
                    self.routes.pop(lease.subnet, None)
                    self._failed.pop(lease.subnet, None)
                steps.append((event.kind is EventKind.ADDED, route))
            if not steps:
                return
            requests = [_route_request(add, route) for add, route in steps]
            codes = await self.netlink.rtnl_call(KernelDumps.transact, requests)
            for (add, route), code in zip(steps, codes):
                if add:
                    if self.routes.get(route.dst) != route:
                        continue  # removed or replaced later in the same batch
                    if code:
                        self._mark_failed(route.dst, os.strerror(code))
                    else:
                        self._mark_ok(route.dst)
                elif code and code != errno.ESRCH:  # already gone is what we wanted
                    log.warning("removing route to %s via %s: %s", route.dst, route.gw, os.strerror(code))

    # --- reconciliation ------------------------------------------------------------------

    def peers_synced(self) -> None:
        self._synced = True
        self.loop.wake()
        if self.v6 is not None:
            self.v6.peers_synced()

    def _notice(self, change: KernelChange) -> bool:
        return change_matters(change, underlay_index=self.ext.index, network=self.network, family=self.family)

    async def reconcile_once(self) -> RepairReport:
        """Make the routes match the accepted leases now."""
        async with self._lock:
            # The routes themselves, not a copy (a pair per peer): apply, the only writer, waits
            # for the lock, so they do not change while the netlink thread reads them.
            report = await self.netlink.rtnl_call(_reconcile, self.routes, self.ext.index, self.network, self._synced)
            for subnet in self.routes:
                if subnet in report.failures:
                    self._mark_failed(subnet, report.failures[subnet])
                else:
                    self._mark_ok(subnet)
        for key, items in (("route_restored", report.added), ("route_removed", report.removed)):
            if items:
                self.repairs[key] = self.repairs.get(key, 0) + len(items)
        if report.changed:
            log.warning("kernel repair (host-gw): %s", report.summary())
        for err in report.errors:
            log.warning("kernel repair: could not remove %s", err)
        return report

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.v6 is None:
            await self.loop.run(task_status=task_status)
            return
        async with trio.open_nursery() as nursery:
            await nursery.start(self.v6.run)
            await self.loop.run(task_status=task_status)


BACKEND = HostGwBackend
