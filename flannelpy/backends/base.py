"""The interface every backend implements; the agent knows backends only through it.

A backend is one folder in flannelpy/backends/ whose package defines `BACKEND = <class>`; the
registry finds it by its `name`, so adding a backend is adding one folder.  ExternalInterface (the
underlay, from hostnet) and LeaseData (what goes in our lease, from subnet) are part of the interface
and re-exported here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Mapping, Sequence

import trio

from flannelpy.config.network import NetworkConfig
from flannelpy.hostnet.interface import ExternalInterface
from flannelpy.hostnet.netlink import NetlinkThread
from flannelpy.subnet.lease import Lease, LeaseData, LeaseEvent


class Backend(ABC):
    name: ClassVar[str]

    def __init__(self, ext: ExternalInterface, config: NetworkConfig, netlink: NetlinkThread) -> None:
        self.ext = ext
        self.config = config
        self.netlink = netlink

    @abstractmethod
    def mtu(self) -> int:
        """FLANNEL_MTU for subnet.env."""

    @abstractmethod
    async def prepare(self) -> LeaseData:
        """Work needed before the lease (vxlan creates its device to learn the VTEP MAC)."""

    @abstractmethod
    async def start(self, lease: Lease) -> None:
        """Configure the local side for our own lease (addresses, devices, routes)."""

    @abstractmethod
    async def apply(self, events: Sequence[LeaseEvent]) -> None:
        """Program or remove peers; events never include our own lease."""

    def use_agent_flags(self, *, udp_forwarder: str = "auto") -> None:
        """The agent's flags that concern a backend, given before prepare(); each backend reads
        the ones that are its own (udp: -udp-forwarder) and ignores the rest."""

    def accepts(self, lease: Lease) -> bool:
        """Whether a peer lease is for this backend (vxlan/host-gw ignore other types)."""
        return lease.attrs.backend_type == self.name

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Long-running work (udp forwarder, vxlan/host-gw kernel reconciliation); default: none."""
        task_status.started()
        await trio.sleep_forever()

    def peers_synced(self) -> None:
        """The agent has applied the whole peer set (the initial list).  From now on kernel
        entries that no accepted lease explains are stale and may be removed; before it, a
        restarted agent would remove the entries of peers it simply has not been told about yet."""

    def programmed_count(self) -> int | None:
        """Accepted peers whose programming succeeded; None: every accepted peer counts."""
        return None

    def data_plane_problems(self) -> list[str]:
        """Why the data plane is broken right now, one line each (empty: it is fine).
        /readyz answers 503 with these lines while there are any."""
        return []

    def repair_counters(self) -> Mapping[str, int]:
        """Kernel entries repaired so far, by kind ("route_restored", "device", ...)."""
        return {}

    async def abandon(self) -> None:
        """Start-up failed before the agent was running: undo what prepare()/start() created
        in this run (an existing device reused from a previous run is left alone)."""

    async def close(self) -> None:
        """Called on shutdown.  Backends keep their kernel state unless flanneld drops it."""


__all__ = ["Backend", "ExternalInterface", "LeaseData"]
