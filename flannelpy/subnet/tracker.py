"""The last-known peer leases, and what to apply when etcd says something changed (pure).

flanneld's LeaseWatcher: it remembers every peer's attrs so that a removal (etcd only says
which key went away) can tear down ARP/FDB/routes with the VtepMAC and PublicIP it had, and
it never reports our own subnet.  A snapshot (after compaction) is diffed against it.

One improvement over flanneld: when a subnet's attrs change (a peer re-created its device
with a new MAC, or another host took the subnet), we emit REMOVED(old) before ADDED(new) so
the backend drops the stale FDB/route instead of leaking it.

Dual stack: a peer is known by its IPv4 subnet, under the key it came with (`10.5.1.0-24` or
`10.5.1.0-24&fc00::-64`).  A second key for an IPv4 subnet already known under the other key is
held back until the first goes (the first holder keeps it; then the other takes its place), and
deleting a key removes only the lease known under that key, so two spellings of one subnet never take
turns replacing a peer's routes.
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
        # Dual stack: the lease under a subnet's other key, held back while `_known` has the subnet.
        self._shadowed: dict[IPv4Network, Lease] = {}

    @property
    def peers(self) -> list[Lease]:
        return sorted(self._known.values(), key=lambda lease: int(lease.subnet.network_address))

    def get(self, subnet: IPv4Network) -> Lease | None:
        return self._known.get(subnet)

    def _is_own(self, subnet: IPv4Network) -> bool:
        return self.own_subnet is not None and subnet == self.own_subnet

    def _add(self, lease: Lease, out: list[LeaseEvent], *, always: bool) -> None:
        old = self._known.get(lease.subnet)
        if old is not None and old.ipv6_subnet != lease.ipv6_subnet:
            self._shadowed[lease.subnet] = lease  # the subnet's other key: the first holder keeps it
            return
        if old is not None and old.attrs != lease.attrs:
            out.append(LeaseEvent(EventKind.REMOVED, old))
        elif old is not None and not always:
            self._known[lease.subnet] = lease  # same peer; keep the fresher expiry quietly
            return
        self._known[lease.subnet] = lease
        out.append(LeaseEvent(EventKind.ADDED, lease))

    def _remove(self, subnet: IPv4Network, out: list[LeaseEvent], key: str | None = None) -> None:
        old = self._known.get(subnet)
        shadowed = self._shadowed.get(subnet)
        if shadowed is not None and key is not None and shadowed.key == key:
            del self._shadowed[subnet]  # the held-back key went: nothing was programmed for it
            return
        # An unknown subnet was never programmed (or its value was undecodable): nothing to undo.
        # key: only the lease known under this key goes (another key of the subnet is not it).
        if old is not None and (key is None or old.key == key):
            del self._known[subnet]
            out.append(LeaseEvent(EventKind.REMOVED, old))
            if shadowed is not None:  # the subnet's other key takes its place
                del self._shadowed[subnet]
                self._add(shadowed, out, always=True)

    def reset(self, leases: Iterable[Lease]) -> list[LeaseEvent]:
        """Diff a full listing against what we know: ADDED new/changed, REMOVED gone."""
        out: list[LeaseEvent] = []
        leases = [lease for lease in leases if not self._is_own(lease.subnet)]
        seen = {lease.key for lease in leases}
        self._shadowed.clear()  # the listing says which other keys exist now
        for lease in leases:
            self._add(lease, out, always=False)
        # A subnet whose known key went while its other key stayed: _remove hands it to that one.
        for subnet in [s for s, known in self._known.items() if known.key not in seen]:
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
        # (subnet, key) -> its last lease (None: deleted)
        final: dict[tuple[IPv4Network, str], Lease | None] = {}
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
                at = (subnet, event.lease.key)
                final.pop(at, None)  # keep the order of the last change
                final[at] = event.lease if event.kind is EventKind.ADDED else None
        self._fold(final, out)
        return out

    def _fold(self, final: dict[tuple[IPv4Network, str], Lease | None], out: list[LeaseEvent]) -> None:
        for (subnet, key), lease in final.items():
            if lease is None:
                self._remove(subnet, out, key)
            else:
                # Every PUT is re-applied, as flanneld does (backends program idempotently),
                # so a peer's renewal also repairs a route someone deleted by hand.
                self._add(lease, out, always=True)
