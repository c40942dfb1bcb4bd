"""Tests import the etcd process helper from here; it lives in the package for the lab."""

from flannelpy.etcdproc import EtcdServer, free_port

__all__ = ["EtcdServer", "free_port"]
