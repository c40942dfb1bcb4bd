"""alloc: lease a subnet and program nothing (flanneld's alloc backend)."""

from .backend import BACKEND

__all__ = ["BACKEND"]
