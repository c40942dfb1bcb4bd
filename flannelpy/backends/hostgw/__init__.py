"""host-gw: one kernel route per peer subnet via the peer's underlay address."""

from .backend import BACKEND

__all__ = ["BACKEND"]
