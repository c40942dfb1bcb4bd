"""The host's own networking: the netlink thread, underlay interface selection, iptables rules."""
