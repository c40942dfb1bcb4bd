"""What the running agent knows about itself, for /status, /readyz and the metrics.

The agent is the only writer (from the trio thread); the health server only reads, so no
locking.  "Leases seen" counts every peer lease admission accepted, the ones the backend ignores
too (a vxlan node does not program host-gw peers, flanneld logs "ignoring non-vxlan ..."), and
the refused ones: exactly the gaps operators need to see.  The accepted leases are counted where
admission holds them; only the ignored and refused ones are kept here.
"""

from __future__ import annotations

import json
import time
from ipaddress import IPv4Network
from typing import Any, Callable, Iterable, Protocol

from flannelpy.subnet.lease import EventKind, Lease, LeaseEvent


class _Accepts(Protocol):
    def accepts(self, lease: Lease) -> bool: ...


_SHOW_REFUSED = 20


def _no_peers_yet() -> int:
    return 0


class AgentState:
    """What /status and /readyz report, kept up to date by the agent.  A plain class, not a
    dataclass: it is defined at every start, and a dataclass costs ~1.5 ms to define."""

    def __init__(self) -> None:
        self.started_at = time.time()
        self.network: str | None = None
        self.subnet: str | None = None
        self.backend_type: str | None = None
        self.interface: str | None = None
        self.public_ip: str | None = None
        self.mtu: int | None = None
        # dual stack (EnableIPv6): IPv6Network, our IPv6 subnet and PublicIPv6; None in an IPv4-only network
        self.ipv6_network: str | None = None
        self.ipv6_subnet: str | None = None
        self.public_ipv6: str | None = None
        self.lease_expiration: float | None = None  # unix time; None = no TTL (a reservation) or no lease yet
        # Ready = subnet.env written and the data plane (device, iptables, backend loop) programmed,
        # the same moment flanneld sends READY=1 (and, since v0.28.9, /readyz turns 200).
        self.ready = False
        self.last_event: str | None = None
        self.last_event_at: float | None = None
        # How many peer leases admission accepts now: the lease manager holds them and counts
        # them (LeaseManager.accepted_count), not a second dict here, a slot per peer.  Of those,
        # the ones the backend ignores (another backend type: few, usually none) are kept here.
        self.accepted_count: Callable[[], int] = _no_peers_yet
        self._ignored: dict[IPv4Network, None] = {}
        # The running backend: asked (at read time, so never stale) how many peers it really
        # programmed and whether its data plane is broken (backends.base.Backend).
        self.backend: Any = None
        # Peer leases admission refuses now (subnet -> reason), and refusals made so far per reason code.
        self.refused: dict[IPv4Network, str] = {}
        self.refusals_total: dict[str, int] = {}

    @property
    def leases_seen(self) -> int:
        """Peer leases currently in etcd (our own excluded), whatever their backend, refused ones too."""
        return self.accepted_count() + len(self.refused)

    def record_admission(self, step: Any) -> None:
        """An admission step (subnet/admission.AdmissionStep): refused leases come and go."""
        for subnet in step.cleared:
            self.refused.pop(subnet, None)
        for refusal in step.refused:
            self.refused[refusal.subnet] = refusal.reason
            self.refusals_total[refusal.code] = self.refusals_total.get(refusal.code, 0) + 1
            self.note(f"refused lease {refusal.subnet}: {refusal.reason}")

    @property
    def peers_programmed(self) -> int:
        """Peer leases the backend accepted and has programmed (failed ones do not count)."""
        counted = self.backend.programmed_count() if self.backend is not None else None
        if counted is not None:
            return counted
        return max(0, self.accepted_count() - len(self._ignored))

    def data_plane_problems(self) -> list[str]:
        """Why the backend's data plane is broken right now (empty: it is not)."""
        return list(self.backend.data_plane_problems()) if self.backend is not None else []

    def note(self, text: str, when: float | None = None) -> None:
        """Remember the last noteworthy thing that happened (shown by `flannelctl status`)."""
        self.last_event = text
        self.last_event_at = time.time() if when is None else when

    def set_lease(self, config: Any, ext: Any, lease: Lease, mtu: int, backend_type: str) -> None:
        """Record our own lease once acquired (config: NetworkConfig, ext: ExternalInterface)."""
        self.network = str(config.network)
        self.subnet = str(lease.subnet)
        self.backend_type = backend_type
        self.interface = ext.name
        self.public_ip = str(ext.public_ip)
        self.mtu = mtu
        if config.enable_ipv6:
            self.ipv6_network = str(config.ipv6_network)
            self.ipv6_subnet = str(lease.ipv6_subnet) if lease.ipv6_subnet is not None else None
            self.public_ipv6 = str(ext.public_ipv6) if ext.public_ipv6 is not None else None
        self.lease_expiration = lease.expiration
        self.note(f"acquired lease {lease.subnet}" + (f" {lease.ipv6_subnet}" if lease.ipv6_subnet else ""))

    def lease_renewed(self, lease: Lease) -> None:
        self.lease_expiration = lease.expiration
        self.note(f"renewed lease {lease.subnet}")

    def record_events(self, events: Iterable[LeaseEvent], backend: _Accepts) -> None:
        """Call after backend.apply(events) succeeded: the accepted peers are now programmed."""
        if self.backend is None and hasattr(backend, "programmed_count"):
            self.backend = backend
        last = None
        for ev in events:
            subnet = ev.lease.subnet
            if ev.kind is EventKind.ADDED and backend.accepts(ev.lease):
                self._ignored.pop(subnet, None)
                verb = "added"
            elif ev.kind is EventKind.ADDED:
                self._ignored[subnet] = None
                verb = "ignored (backend type %r)" % ev.lease.attrs.backend_type
            else:
                self._ignored.pop(subnet, None)
                verb = "removed"
            last = f"peer {subnet} ({ev.lease.attrs.public_ip}) {verb}"
        if last is not None:
            self.note(last)

    def to_dict(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        return {
            "ready": self.ready,
            "network": self.network,
            "subnet": self.subnet,
            "backend": self.backend_type,
            "interface": self.interface,
            "public_ip": self.public_ip,
            "mtu": self.mtu,
            "ipv6_network": self.ipv6_network,
            "ipv6_subnet": self.ipv6_subnet,
            "public_ipv6": self.public_ipv6,
            "lease_expiration": self.lease_expiration,
            "lease_expires_in": None if self.lease_expiration is None else round(self.lease_expiration - now, 1),
            "leases_seen": self.leases_seen,
            "peers_programmed": self.peers_programmed,
            "leases_refused": len(self.refused),
            # The first few, so that /status stays small whatever is written to etcd.
            "refused": {str(subnet): reason for subnet, reason in list(self.refused.items())[:_SHOW_REFUSED]},
            "data_plane_problems": self.data_plane_problems(),
            "last_event": self.last_event,
            "last_event_at": self.last_event_at,
            "started_at": self.started_at,
            "uptime": round(now - self.started_at, 1),
        }

    def to_json(self, now: float | None = None) -> str:
        return json.dumps(self.to_dict(now), sort_keys=True)
