"""vxlan: the flannel.<VNI> device (backend.py) and which neighbour/FDB/route entries to program (plan.py)."""

from .backend import BACKEND

__all__ = ["BACKEND"]
