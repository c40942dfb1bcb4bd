"""Tests import the etcd process helper from here; it lives in the package for the lab."""

from flannelpy.lab.etcd_server import EtcdServer, free_port

__all__ = ["EtcdServer", "free_port"]
