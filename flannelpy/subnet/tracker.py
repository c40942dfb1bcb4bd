"""The last-known peer leases, and what to apply when etcd says something changed (pure).

flanneld's LeaseWatcher: it remembers every peer's attrs so that a removal (etcd only says
which key went away) can tear down ARP/FDB/routes with the VtepMAC and PublicIP it had, and
it never reports our own subnet.  A snapshot (after compaction) is diffed against it.

One improvement over flanneld: when a subnet's attrs change (a peer re-created its device
with a new MAC, or another host took the subnet), we emit REMOVED(old) before ADDED(new) so
the backend drops the stale FDB/route instead of leaking it.
"""

from __future__ import annotations

from ipaddress import IPv4Network
from typing import Iterable

from flannelpy.etcd.store import WatchBatch

from .lease import EventKind, Lease, LeaseEvent


class LeaseTracker:
    def __init__(self, own_subnet: IPv4Network | None = None) -> None:
        self.own_subnet = own_subnet
        self._known: dict[IPv4Network, Lease] = {}

    @property
    def peers(self) -> list[Lease]:
        return sorted(self._known.values(), key=lambda lease: int(lease.subnet.network_address))

    def get(self, subnet: IPv4Network) -> Lease | None:
        return self._known.get(subnet)

    def _is_own(self, subnet: IPv4Network) -> bool:
        return self.own_subnet is not None and subnet == self.own_subnet

    def _add(self, lease: Lease, out: list[LeaseEvent], *, always: bool) -> None:
        old = self._known.get(lease.subnet)
        if old is not None and old.attrs != lease.attrs:
            out.append(LeaseEvent(EventKind.REMOVED, old))
        elif old is not None and not always:
            self._known[lease.subnet] = lease  # same peer; keep the fresher expiry quietly
            return
        self._known[lease.subnet] = lease
        out.append(LeaseEvent(EventKind.ADDED, lease))

    def _remove(self, subnet: IPv4Network, out: list[LeaseEvent]) -> None:
        old = self._known.pop(subnet, None)
        # An unknown subnet was never programmed (or its value was undecodable): nothing to undo.
        if old is not None:
            out.append(LeaseEvent(EventKind.REMOVED, old))

    def reset(self, leases: Iterable[Lease]) -> list[LeaseEvent]:
        """Diff a full listing against what we know: ADDED new/changed, REMOVED gone."""
        out: list[LeaseEvent] = []
        seen: set[IPv4Network] = set()
        for lease in leases:
            if self._is_own(lease.subnet):
                continue
            seen.add(lease.subnet)
            self._add(lease, out, always=False)
        for subnet in [s for s in self._known if s not in seen]:
            self._remove(subnet, out)
        return out

    def update(self, batch: WatchBatch) -> list[LeaseEvent]:
        """The events to apply for one watch batch (events or a snapshot)."""
        return self.update_many([batch])

    def update_many(self, batches: Iterable[WatchBatch]) -> list[LeaseEvent]:
        """The events to apply for a backlog of watch batches, by their net effect: per subnet
        only its last state counts, so a lease put and deleted within the backlog yields
        nothing and one put many times yields one ADDED.  A snapshot diffs what came before."""
        out: list[LeaseEvent] = []
        final: dict[IPv4Network, Lease | None] = {}  # subnet -> its last lease (None: deleted)
        for batch in batches:
            if batch.snapshot is not None:
                self._fold(final, out)
                final = {}
                out.extend(self.reset(batch.snapshot))
                continue
            for event in batch.events:
                subnet = event.lease.subnet
                if self._is_own(subnet):
                    continue
                final.pop(subnet, None)  # keep the order of the last change
                final[subnet] = event.lease if event.kind is EventKind.ADDED else None
        self._fold(final, out)
        return out

    def _fold(self, final: dict[IPv4Network, Lease | None], out: list[LeaseEvent]) -> None:
        for subnet, lease in final.items():
            if lease is None:
                self._remove(subnet, out)
            else:
                # Every PUT is re-applied, as flanneld does (backends program idempotently),
                # so a peer's renewal also repairs a route someone deleted by hand.
                self._add(lease, out, always=True)
