"""Subnet leases: key/value codecs, which subnet to take, the lease manager, the peer tracker, subnet.env."""
