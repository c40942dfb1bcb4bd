"""flannel's nftables tables: their names, and which of them a listing shows.

Pure.  flanneld in iptables mode removes what nftables mode left, so every iptables start lists
the host's tables (tools.list_nft_tables) and asks this module whether one is ours; kept apart
from nftables_rules so that the usual start, which finds none, never loads the rule code.
"""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network

# flanneld >= 0.25's names (pkg/trafficmngr/nftables): one table per family.
FAMILY_V4 = "ip"
FAMILY_V6 = "ip6"
TABLE_V4 = "flannel-ipv4"
TABLE_V6 = "flannel-ipv6"


def listed_tables(listing: str) -> set[tuple[str, str]]:
    """(family, name) of each `table FAMILY NAME` line of `nft list tables`."""
    return {(words[1], words[2]) for words in (line.split() for line in listing.splitlines())
            if len(words) == 3 and words[0] == "table"}


def tables_to_switch_off(network: IPv4Network | IPv6Network) -> set[tuple[str, str]]:
    """The tables iptables mode removes for this network: Network's side takes both (an
    EnableIPv6 config turned off leaves flannel-ipv6 behind too), IPv6Network's only flannel-ipv6."""
    if network.version == 6:
        return {(FAMILY_V6, TABLE_V6)}
    return {(FAMILY_V4, TABLE_V4), (FAMILY_V6, TABLE_V6)}
