"""flannelpy: a drop-in Python reimplementation of flanneld (etcd mode)."""

__version__ = "0.1.0"
