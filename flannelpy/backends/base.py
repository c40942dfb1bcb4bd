"""The interface every backend implements; the agent knows backends only through it.

A backend is one module in flannelpy/backends/ that defines `BACKEND = <class>`; the
registry finds it by its `name`, so adding a backend is adding one file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any, ClassVar, Sequence

import trio

from ..config import NetworkConfig
from ..lease import Lease, LeaseEvent
from ..netlink import NetlinkThread


@dataclass(frozen=True)
class ExternalInterface:
    """The underlay interface flannel sends over (flanneld's ExtIface)."""

    name: str
    index: int
    ip: IPv4Address  # the interface's own address (flanneld: IfaceAddr)
    public_ip: IPv4Address  # advertised to peers; -public-ip or the interface address
    mtu: int


@dataclass(frozen=True)
class LeaseData:
    """What the backend puts in our lease value."""

    backend_type: str  # "" for udp, which never writes BackendType
    backend_data: dict[str, Any] | None


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

    def accepts(self, lease: Lease) -> bool:
        """Whether a peer lease is for this backend (vxlan/host-gw ignore other types)."""
        return lease.attrs.backend_type == self.name

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Long-running work (udp forwarder, host-gw route check); default: none."""
        task_status.started()
        await trio.sleep_forever()

    async def abandon(self) -> None:
        """Start-up failed before the agent was running: undo what prepare()/start() created
        in this run (an existing device reused from a previous run is left alone)."""

    async def close(self) -> None:
        """Called on shutdown.  Backends keep their kernel state unless flanneld drops it."""
