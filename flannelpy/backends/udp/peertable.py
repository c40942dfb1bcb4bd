"""Which peer owns an overlay destination, and which inner sources a sender may use: the
udp forwarder's per-packet lookups.

flanneld's C proxy scans a linear route list; every lease of one network shares the
network's SubnetLen, so a dict keyed by the masked destination finds the peer in O(1).
Leases with other prefix lengths (a changed config) still work: one dict per length,
longest first, so the lookup stays O(number of distinct lengths), normally one.

On receive, the sender's PublicIP maps to the subnet it holds as (network int, mask int),
so "is this inner source the sender's" is one AND and one compare per packet.  A host's
locally originated packets carry its flannel0 address, the base of its subnet, so they pass
the same check; a host service bound to the host's own address sends with the sender's
PublicIP as inner source, which is the sender itself and allowed too (checked only when the
subnet test fails).  flanneld checks neither (it writes whatever arrives into the TUN).
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

# What a sender may use as inner source: (network, mask, further (network, mask) pairs).  The
# further pairs are the sender's PublicIP as a /32, then any other subnet the same PublicIP
# holds (a rare, changed config).
Allowed = tuple[int, int, tuple[tuple[int, int], ...]]
HOST_MASK = 0xFFFFFFFF


def source_allowed(src: int, allowed: Allowed) -> bool:
    """Whether inner source `src` (host-order int) lies in one of the sender's subnets."""
    net, mask, more = allowed
    if src & mask == net:
        return True
    for n, m in more:
        if src & m == n:
            return True
    return False


class PeerTable:
    """subnet -> (peer PublicIP, port); also which PublicIPs may send to us, with what sources."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._subnets: dict[IPv4Network, str] = {}
        # [(mask, {masked network int: sendto address})], longest prefix first.
        self._by_len: list[tuple[int, dict[int, tuple[str, int]]]] = []
        # PublicIP (as recvfrom reports it) -> the subnets it holds, in the order they came.
        self._held: dict[str, list[IPv4Network]] = {}
        # PublicIP -> Allowed; the forwarder keeps a reference, so it is updated in place.
        self._sources: dict[str, Allowed] = {}

    def __len__(self) -> int:
        return len(self._subnets)

    def set(self, subnet: IPv4Network, public_ip: IPv4Address | str) -> None:
        """Route `subnet` to `public_ip` (replacing an older owner of the same subnet)."""
        ip = str(public_ip)
        self.remove(subnet)
        self._subnets[subnet] = ip
        self._held.setdefault(ip, []).append(subnet)
        self._update_sources(ip)
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
        self._held[ip].remove(subnet)
        self._update_sources(ip)
        mask = int(subnet.netmask)
        for i, (m, table) in enumerate(self._by_len):
            if m == mask:
                table.pop(int(subnet.network_address), None)
                if not table:
                    del self._by_len[i]
                break
        return True

    def _update_sources(self, ip: str) -> None:
        held = self._held.get(ip)
        if not held:
            self._held.pop(ip, None)
            self._sources.pop(ip, None)
            return
        pairs = [(int(s.network_address), int(s.netmask)) for s in held]
        self._sources[ip] = (pairs[0][0], pairs[0][1], ((int(IPv4Address(ip)), HOST_MASK), *pairs[1:]))

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

    def allowed(self, source_ip: str) -> Allowed | None:
        """The inner sources `source_ip` may send from, or None when it holds no lease."""
        return self._sources.get(source_ip)

    @property
    def sources(self) -> dict[str, Allowed]:
        """Live view for the forwarder's hot loop: PublicIP -> Allowed."""
        return self._sources

    def entries(self) -> dict[IPv4Network, str]:
        return dict(self._subnets)
