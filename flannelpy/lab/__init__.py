"""The single-machine lab: network namespaces as hosts, a real etcd, real agents, optionally real dockerd."""
