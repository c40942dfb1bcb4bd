"""udp: flannel0 TUN (tun.py), the forwarder (forwarder.py), who holds which subnet (peertable.py)."""

from .backend import BACKEND

__all__ = ["BACKEND"]
