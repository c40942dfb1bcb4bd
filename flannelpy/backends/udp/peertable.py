"""Which peer owns an overlay destination: the udp forwarder's per-packet lookup.

flanneld's C proxy scans a linear route list; every lease of one network shares the
network's SubnetLen, so a dict keyed by the masked destination finds the peer in O(1).
Leases with other prefix lengths (a changed config) still work: one dict per length,
longest first, so the lookup stays O(number of distinct lengths), normally one.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network


class PeerTable:
    """subnet -> (peer PublicIP, port); also the set of PublicIPs allowed to send to us."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._subnets: dict[IPv4Network, str] = {}
        # [(mask, {masked network int: sendto address})], longest prefix first.
        self._by_len: list[tuple[int, dict[int, tuple[str, int]]]] = []
        # PublicIP (as recvfrom reports it) -> number of subnets it holds.
        self._sources: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._subnets)

    def set(self, subnet: IPv4Network, public_ip: IPv4Address | str) -> None:
        """Route `subnet` to `public_ip` (replacing an older owner of the same subnet)."""
        ip = str(public_ip)
        self.remove(subnet)
        self._subnets[subnet] = ip
        self._sources[ip] = self._sources.get(ip, 0) + 1
        mask = int(subnet.netmask)
        for m, table in self._by_len:
            if m == mask:
                break
        else:
            table = {}
            self._by_len.append((mask, table))
            self._by_len.sort(key=lambda item: item[0], reverse=True)
        table[int(subnet.network_address)] = (ip, self.port)

    def remove(self, subnet: IPv4Network) -> bool:
        """Forget `subnet`; False when it was not known."""
        ip = self._subnets.pop(subnet, None)
        if ip is None:
            return False
        left = self._sources[ip] - 1
        if left:
            self._sources[ip] = left
        else:
            del self._sources[ip]
        mask = int(subnet.netmask)
        for i, (m, table) in enumerate(self._by_len):
            if m == mask:
                table.pop(int(subnet.network_address), None)
                if not table:
                    del self._by_len[i]
                break
        return True

    def lookup(self, dst: int) -> tuple[str, int] | None:
        """The sendto address for destination `dst` (host-order int), or None."""
        for mask, table in self._by_len:
            peer = table.get(dst & mask)
            if peer is not None:
                return peer
        return None

    def is_peer(self, source_ip: str) -> bool:
        """Whether `source_ip` is the PublicIP of a current lease holder."""
        return source_ip in self._sources

    @property
    def sources(self) -> dict[str, int]:
        """Live view for the forwarder's hot loop (membership tests only)."""
        return self._sources

    def entries(self) -> dict[IPv4Network, str]:
        return dict(self._subnets)
