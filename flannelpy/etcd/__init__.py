"""etcd access: one Store interface, a v3 (JSON gateway) and a v2 (keys API) implementation."""
