"""alloc backend: only leases a subnet, programs nothing (flanneld's pkg/backend/alloc)."""

from __future__ import annotations

from typing import Sequence

from flannelpy.backends.base import Backend, LeaseData
from flannelpy.subnet.lease import Lease, LeaseEvent


class AllocBackend(Backend):
    name = "alloc"

    def mtu(self) -> int:
        return self.ext.mtu

    async def prepare(self) -> LeaseData:
        return LeaseData("alloc", None)

    async def start(self, lease: Lease) -> None:
        pass

    async def apply(self, events: Sequence[LeaseEvent]) -> None:
        pass


BACKEND = AllocBackend
