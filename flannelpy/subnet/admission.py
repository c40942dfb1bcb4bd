"""Lease admission: which peer leases the backend may program, and why the others are refused (pure).

Anyone who can write to etcd writes leases, and every agent programs what it reads into its
kernel.  flanneld trusts all of it: a lease at the underlay's subnet replaces the host's connected
route, `0.0.0.0-0` its default route, a copied VtepMAC re-points a real peer's FDB entry.  Here
each peer lease is judged before the backend sees it.  Refused, whatever the backend:

- subnet: outside Network, or shorter than any SubnetLen flanneld allows for it (Network + 2);
  overlapping our own subnet or an accepted lease; overlapping a network this host is connected
  to, or containing one of its addresses or route gateways (the underlay);
- PublicIP: unspecified (0.0.0.0/8), loopback, link-local, multicast, reserved or a broadcast
  address (255.255.255.255, or that of a connected network); an address of this host; inside
  its own subnet, our subnet or an accepted lease (the tunnel would loop); a subnet containing
  an accepted peer's PublicIP is refused for the same reason;
- VtepMAC (when present; a vxlan lease must have one): zero, multicast or broadcast, our own, or
  already owned by another accepted lease (the first holder keeps it);
- host-gw only: a host-gw peer whose PublicIP is on no connected network (no route can reach it).
- dual stack (EnableIPv6; a lease with an IPv6 subnet): the IPv6 subnet outside IPv6Network or shorter
  than IPv6Network + 2, overlapping our own IPv6 subnet or an accepted lease's; PublicIPv6 missing,
  unspecified, loopback, link-local, multicast or in ::/8, our own, inside its own, our or an
  accepted IPv6 subnet; BackendV6Data's VtepMAC as VtepMAC above (a vxlan lease must have one).
  IPv4-only leases pass with their IPv4 side; in an IPv4-only network the stores give no IPv6 side.

A lease refused because of another accepted lease (overlap, MAC, PublicIP) is judged again when
that lease goes away or changes; the others stay refused until their value changes.  A refused
lease never reaches the backend, so removing it removes nothing.  Every check is a few look-ups
(binary searches) per prefix length in use, never a walk over the peers.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Generic, Hashable, Iterable, MutableSequence, NamedTuple, Sequence, TypeVar

from flannelpy.hostnet.underlay import Underlay

from .lease import EventKind, Lease, LeaseEvent, held_vtep_mac
from .prefixes import overlaps, within

# Refusal codes: the `reason` label of flannel_leases_refused_total (few values on purpose).
OUTSIDE_NETWORK = "outside_network"
PREFIX_LENGTH = "prefix_length"
OWN_SUBNET = "own_subnet"
UNDERLAY = "underlay"
OVERLAP = "overlap"
PUBLIC_IP = "public_ip"
OWN_ADDRESS = "own_address"
UNREACHABLE = "unreachable"
VTEP_MAC = "vtep_mac"
DUPLICATE_VTEP_MAC = "duplicate_vtep_mac"

_SPECIAL_PUBLIC_IPS = (
    (IPv4Network("0.0.0.0/8"), "unspecified (0.0.0.0/8)"),
    (IPv4Network("127.0.0.0/8"), "loopback"),
    (IPv4Network("169.254.0.0/16"), "link-local"),
    (IPv4Network("224.0.0.0/4"), "multicast"),
    (IPv4Network("255.255.255.255/32"), "the broadcast address"),
    (IPv4Network("240.0.0.0/4"), "reserved (240.0.0.0/4)"),
)
# The same as integer ranges, in the same order: every peer of a start is checked, and an
# IPv4Network's `in` is a microsecond each.
_SPECIAL_PUBLIC_IP_RANGES = tuple((int(net.network_address), int(net.broadcast_address), what)
                                  for net, what in _SPECIAL_PUBLIC_IPS)


_SPECIAL_PUBLIC_IPV6S = (
    (IPv6Network("::/128"), "unspecified (::)"),
    (IPv6Network("::1/128"), "loopback"),
    (IPv6Network("::/8"), "reserved (::/8)"),
    (IPv6Network("fe80::/10"), "link-local"),
    (IPv6Network("ff00::/8"), "multicast"),
)


class Refusal(NamedTuple):
    """Why one lease is refused."""

    lease: Lease
    code: str  # one of the constants above
    reason: str  # one line for the log, /status and `flannelctl leases`
    # The accepted lease this one conflicts with: it is judged again when that one goes.
    blocker: IPv4Network | None = None

    @property
    def subnet(self) -> IPv4Network:
        return self.lease.subnet


class AdmissionRules(NamedTuple):  # a record: defined at every start
    """What a lease is judged against; without own_* (flannelctl) those checks are skipped."""

    network: IPv4Network
    own_subnet: IPv4Network | None = None
    own_public_ip: IPv4Address | None = None
    own_vtep_mac: str | None = None
    underlay: Underlay = Underlay()
    # Peers of this backend type must be on a connected network ("host-gw": routes via PublicIP).
    onlink_backend: str | None = None
    # Dual stack (EnableIPv6): IPv6Network and our own IPv6 side; None in an IPv4-only network.
    ipv6_network: IPv6Network | None = None
    own_ipv6_subnet: IPv6Network | None = None
    own_public_ipv6: IPv6Address | None = None
    own_vtep_mac_v6: str | None = None

    @property
    def min_prefixlen(self) -> int:
        return min(self.network.prefixlen + 2, 32)

    @property
    def min_ipv6_prefixlen(self) -> int:
        assert self.ipv6_network is not None
        return min(self.ipv6_network.prefixlen + 2, 128)


class AdmissionStep:
    """What one batch of tracker events turned into.  (A plain class: a dataclass costs ~0.5 ms
    of every start.)"""

    __slots__ = ("events", "refused", "readmitted", "cleared")

    def __init__(self) -> None:
        self.events: list[LeaseEvent] = []  # for the backend, in order
        self.refused: list[Refusal] = []  # new refusals (or a new reason): log these
        self.readmitted: list[Lease] = []  # refused before, accepted now
        self.cleared: list[IPv4Network] = []  # no longer refused (gone or accepted)


# --- prefix index ---------------------------------------------------------------------------

O = TypeVar("O", bound=Hashable)
_Key = tuple[int, int]  # (prefix length, network address as an int)


def _key(net: IPv4Network | IPv6Network | _Key) -> _Key:
    return net if isinstance(net, tuple) else (net.prefixlen, int(net.network_address))


def _host_key(ip: IPv4Address | IPv6Address) -> _Key:
    return ip.max_prefixlen, int(ip)


def _masks(bits: int) -> tuple[int, ...]:
    full = (1 << bits) - 1
    return tuple((full << (bits - length)) & full for length in range(bits + 1))


_MASKS = _masks(32)
_MASKS6 = _masks(128)


class _Owners(dict):
    """The owners of one prefix when there are several (one owner is held bare: most prefixes
    have exactly one, and a dict per prefix would cost ~200 bytes a peer)."""


class PrefixIndex(Generic[O]):
    """Prefixes, each with the owners that put it there, answering "which entry overlaps this
    prefix": an entry containing it is one binary search per prefix length in use; an entry
    inside it is one more, because whatever lies inside a prefix sorts right after it.

    The entries are two aligned sequences sorted by (address, length): their codes and their
    owners.  For IPv4 the codes are a packed array of 64-bit integers, 16 bytes an entry with
    the owner's slot; a dict from code to owner beside a sorted list took ~77 (the dict's slot,
    the list's and an int object a code), the largest part of a peer's memory in admission."""

    def __init__(self, bits: int = 32) -> None:
        # bits: 32 for IPv4 prefixes, 128 for IPv6 (one index never mixes the two).
        self._bits = bits
        self._masks = _MASKS if bits == 32 else _MASKS6
        # An entry's code is address << 8 | length: its sort key (an IPv6 code needs 136 bits).
        self._codes: MutableSequence[int] = array("Q") if bits == 32 else []
        self._owners: list[O | _Owners] = []
        # How many entries of each prefix length: `containing` looks only at lengths in use
        # (peers mostly share one SubnetLen, so that is one search instead of up to 33).
        self._lengths: dict[int, int] = {}
        self._lengths_longest_first: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self._codes)

    def _find(self, code: int) -> tuple[int, bool]:
        """Where `code` is or would go in the sorted codes, and whether it is there."""
        codes = self._codes
        i = bisect_left(codes, code)
        return i, i < len(codes) and codes[i] == code

    # Prefixes are IPv4Networks or (length, address) keys.
    def add(self, net: IPv4Network | _Key, owner: O) -> None:
        length, addr = _key(net)
        code = addr << 8 | length
        i, found = self._find(code)
        if not found:
            self._codes.insert(i, code)
            self._owners.insert(i, owner)
            self._count_length(length, +1)
            return
        held = self._owners[i]
        if type(held) is _Owners:
            held[owner] = None
        elif held != owner:
            self._owners[i] = _Owners({held: None, owner: None})

    def remove(self, net: IPv4Network | _Key, owner: O) -> None:
        length, addr = _key(net)
        code = addr << 8 | length
        i, found = self._find(code)
        if not found:
            return
        held = self._owners[i]
        if type(held) is _Owners:
            held.pop(owner, None)
            if len(held) == 1:
                self._owners[i] = next(iter(held))
            return
        if held != owner:
            return
        del self._codes[i]
        del self._owners[i]
        self._count_length(length, -1)

    def _count_length(self, length: int, delta: int) -> None:
        count = self._lengths.get(length, 0) + delta
        if count:
            self._lengths[length] = count
        else:
            del self._lengths[length]
        if (count == 0) != (count - delta == 0):  # a length came into use or went out of it
            self._lengths_longest_first = tuple(sorted(self._lengths, reverse=True))

    @staticmethod
    def _first(held: O | _Owners) -> O:
        return next(iter(held)) if type(held) is _Owners else held  # type: ignore[return-value]

    def containing(self, net: IPv4Network | _Key) -> O | None:
        """An owner of an entry equal to `net` or containing it."""
        length, addr = _key(net)
        masks = self._masks
        for shorter in self._lengths_longest_first:
            if shorter > length:
                continue
            i, found = self._find((addr & masks[shorter]) << 8 | shorter)
            if found:
                return self._first(self._owners[i])
        return None

    def inside(self, net: IPv4Network | _Key) -> O | None:
        """An owner of an entry strictly inside `net`."""
        length, addr = _key(net)
        if length >= self._bits:
            return None
        # Entries at `addr` sort by length, so the first one after (addr, length) that still lies
        # below the next prefix of this size is inside `net` (aligned prefixes cannot straddle it).
        codes = self._codes
        i = bisect_left(codes, addr << 8 | (length + 1))
        if i < len(codes) and codes[i] < (addr + (1 << (self._bits - length))) << 8:
            return self._first(self._owners[i])
        return None

    def overlapping(self, net: IPv4Network | _Key) -> O | None:
        owner = self.containing(net)
        return owner if owner is not None else self.inside(net)


# --- the host's own ranges --------------------------------------------------------------------


def protected_ranges(network: IPv4Network | IPv6Network, underlay: Underlay) -> list[tuple[IPv4Network | IPv6Network, str]]:
    """The parts of the host's underlay inside `network`, each described, that no lease may overlap
    (the underlay's IPv6 side for an IPv6Network).

    A connected network that contains the whole Network is left out: the operator carved the
    Network out of it on purpose (e.g. Network 10.244.0.0/16 on a flat 10.0.0.0/8), and the
    host's own addresses and gateways in it are still protected one by one."""
    v6 = network.version == 6
    connected, addresses, gateways = ((underlay.connected6, underlay.addresses6, underlay.gateways6) if v6
                                      else (underlay.connected, underlay.addresses, underlay.gateways))
    host = IPv6Network if v6 else IPv4Network
    ranges: list[tuple[IPv4Network | IPv6Network, str]] = []
    for net, dev in connected:
        if net.overlaps(network) and not network.subnet_of(net):
            ranges.append((net, f"the network {net} connected on {dev}"))
    for ip, dev in addresses:
        if ip in network:
            ranges.append((host(ip), f"this host's address {ip} on {dev}"))
    for gateway, dst in gateways:
        if gateway in network:
            what = "the default route" if dst.prefixlen == 0 else f"the route to {dst}"
            ranges.append((host(gateway), f"the gateway {gateway} of {what}"))
    return ranges


def underlay_warnings(network: IPv4Network, underlay: Underlay, interface: str | None = None,
                      public_ip: IPv4Address | None = None) -> list[str]:
    """Warnings (not errors) when the Network contains this host's underlay: its address on the
    external `interface`, its `public_ip`, a network connected on that interface, or a route's
    gateway.  Leases there will be refused, and the config is probably not what was meant.

    A network inside the Network on another device is not warned about: that is a container
    bridge (docker0, cbr0) holding a flannel subnet, the normal case."""
    found: list[str] = []
    for net, dev in underlay.connected:
        if dev == interface and net.subnet_of(network):
            found.append(f"the network {net} connected on {dev}")
    for ip, dev in underlay.addresses:
        if dev == interface and ip in network:
            found.append(f"this host's address {ip} on {dev}")
    if public_ip is not None and public_ip in network and not any(public_ip == ip for ip, _ in underlay.addresses):
        found.append(f"this host's public IP {public_ip}")
    for gateway, dst in underlay.gateways:
        if gateway in network:
            what = "the default route" if dst.prefixlen == 0 else f"the route to {dst}"
            found.append(f"the gateway {gateway} of {what}")
    return [f"Network {network} contains {what}; leases overlapping it will be refused" for what in found]


# --- admission --------------------------------------------------------------------------------


class Admission:
    """The accepted and refused peer leases; turns the tracker's events into the backend's."""

    def __init__(self, rules: AdmissionRules) -> None:
        self.rules = rules
        self.accepted: dict[IPv4Network, Lease] = {}
        self.refused: dict[IPv4Network, Refusal] = {}
        self._subnets: PrefixIndex[IPv4Network] = PrefixIndex()  # accepted subnets
        self._public_ips: PrefixIndex[IPv4Network] = PrefixIndex()  # accepted PublicIPs -> their subnets
        self._macs: dict[str, IPv4Network] = {}  # VtepMAC -> the accepted lease holding it
        # Dual stack: accepted IPv6 subnets and PublicIPv6s (owners: their lease's IPv4 key), v6 VtepMACs.
        self._subnets6: PrefixIndex[IPv4Network] = PrefixIndex(128)
        self._public_ips6: PrefixIndex[IPv4Network] = PrefixIndex(128)
        self._macs6: dict[str, IPv4Network] = {}
        self._waiting: dict[IPv4Network, dict[IPv4Network, None]] = {}  # blocker -> refused leases
        self._protected: PrefixIndex[str] = PrefixIndex()
        for net, what in protected_ranges(rules.network, rules.underlay):
            self._protected.add(net, what)
        self._connected: PrefixIndex[tuple[IPv4Network, str]] = PrefixIndex()
        for net, dev in rules.underlay.connected:
            self._connected.add(net, (net, dev))
        self._own_addresses = {ip for ip, _dev in rules.underlay.addresses}
        if rules.own_public_ip is not None:
            self._own_addresses.add(rules.own_public_ip)
        # Dual stack: the same protection for the underlay's IPv6 side
        self._protected6: PrefixIndex[str] = PrefixIndex(128)
        self._connected6: PrefixIndex[tuple[IPv6Network, str]] = PrefixIndex(128)
        self._own_addresses6: set[IPv6Address] = set()
        if rules.ipv6_network is not None:
            for net6, what in protected_ranges(rules.ipv6_network, rules.underlay):
                self._protected6.add(net6, what)
            for net6, dev in rules.underlay.connected6:
                self._connected6.add(net6, (net6, dev))
            self._own_addresses6 = {ip6 for ip6, _dev in rules.underlay.addresses6}
            if rules.own_public_ipv6 is not None:
                self._own_addresses6.add(rules.own_public_ipv6)

    # --- judging ----------------------------------------------------------------------------

    def judge(self, lease: Lease) -> Refusal | None:
        """Why `lease` would be refused now (None: accepted); changes nothing."""
        return self._judge_static(lease) or self._judge_against_peers(lease)

    def _judge_static(self, lease: Lease) -> Refusal | None:
        """What depends on the lease and this host only, never on other peers."""
        rules, net, attrs = self.rules, lease.subnet, lease.attrs
        ip = attrs.public_ip

        def refuse(code: str, reason: str) -> Refusal:
            return Refusal(lease, code, reason)

        if not within(net, rules.network):
            return refuse(OUTSIDE_NETWORK, f"subnet {net} is outside Network {rules.network}")
        if net.prefixlen < rules.min_prefixlen:
            return refuse(PREFIX_LENGTH, f"subnet {net} is larger than any SubnetLen Network {rules.network} "
                                         f"allows (/{rules.min_prefixlen} or longer)")
        if rules.own_subnet is not None and overlaps(net, rules.own_subnet):
            return refuse(OWN_SUBNET, f"subnet {net} overlaps our own subnet {rules.own_subnet}")
        protected = self._protected.overlapping(net)
        if protected is not None:
            return refuse(UNDERLAY, f"subnet {net} overlaps {protected}")
        ip_int = int(ip)
        for first, last, what in _SPECIAL_PUBLIC_IP_RANGES:
            if first <= ip_int <= last:
                return refuse(PUBLIC_IP, f"PublicIP {ip} is {what}")
        if ip in self._own_addresses:
            return refuse(OWN_ADDRESS, f"PublicIP {ip} is an address of this host")
        on_link = self._connected.containing(_host_key(ip))
        if on_link is not None:
            link, dev = on_link
            if link.prefixlen <= 30 and ip in (link.network_address, link.broadcast_address):
                return refuse(PUBLIC_IP, f"PublicIP {ip} is the network or broadcast address of {link} on {dev}")
        if ip in net:
            return refuse(PUBLIC_IP, f"PublicIP {ip} is inside the lease's own subnet {net}")
        if rules.own_subnet is not None and ip in rules.own_subnet:
            return refuse(PUBLIC_IP, f"PublicIP {ip} is inside our own subnet {rules.own_subnet}")
        if rules.onlink_backend and attrs.backend_type == rules.onlink_backend and on_link is None:
            return refuse(UNREACHABLE, f"PublicIP {ip} is on no network this host is connected to; "
                                       f"{rules.onlink_backend} needs its peers on the same link")
        mac = _vtep_mac(lease)
        if mac is None and attrs.backend_type == "vxlan":
            return refuse(VTEP_MAC, "vxlan lease without a VtepMAC")
        if mac is not None:
            first = int(mac[:2], 16)
            if mac == "00:00:00:00:00:00":
                return refuse(VTEP_MAC, f"VtepMAC {mac} is the zero address")
            if first & 1:
                return refuse(VTEP_MAC, f"VtepMAC {mac} is a multicast or broadcast address")
            if rules.own_vtep_mac is not None and mac == rules.own_vtep_mac.lower():
                return refuse(VTEP_MAC, f"VtepMAC {mac} is our own device's")
        if rules.ipv6_network is not None and lease.ipv6_subnet is not None:
            return self._judge_static_v6(lease)
        return None

    def _judge_static_v6(self, lease: Lease) -> Refusal | None:
        """The IPv6 side of a dual-stack lease, judged as the IPv4 side is."""
        rules, net, attrs = self.rules, lease.ipv6_subnet, lease.attrs
        assert net is not None and rules.ipv6_network is not None
        ip = attrs.public_ipv6

        def refuse(code: str, reason: str) -> Refusal:
            return Refusal(lease, code, reason)

        if not within(net, rules.ipv6_network):
            return refuse(OUTSIDE_NETWORK, f"IPv6 subnet {net} is outside IPv6Network {rules.ipv6_network}")
        if net.prefixlen < rules.min_ipv6_prefixlen:
            return refuse(PREFIX_LENGTH, f"IPv6 subnet {net} is larger than any IPv6SubnetLen IPv6Network "
                                         f"{rules.ipv6_network} allows (/{rules.min_ipv6_prefixlen} or longer)")
        if rules.own_ipv6_subnet is not None and overlaps(net, rules.own_ipv6_subnet):
            return refuse(OWN_SUBNET, f"IPv6 subnet {net} overlaps our own IPv6 subnet {rules.own_ipv6_subnet}")
        protected = self._protected6.overlapping(net)
        if protected is not None:
            return refuse(UNDERLAY, f"IPv6 subnet {net} overlaps {protected}")
        if ip is None:
            return refuse(PUBLIC_IP, f"dual-stack lease (IPv6 subnet {net}) without a PublicIPv6")
        for special, what in _SPECIAL_PUBLIC_IPV6S:
            if ip in special:
                return refuse(PUBLIC_IP, f"PublicIPv6 {ip} is {what}")
        if ip in self._own_addresses6:
            return refuse(OWN_ADDRESS, f"PublicIPv6 {ip} is an address of this host")
        if ip in net:
            return refuse(PUBLIC_IP, f"PublicIPv6 {ip} is inside the lease's own IPv6 subnet {net}")
        if rules.own_ipv6_subnet is not None and ip in rules.own_ipv6_subnet:
            return refuse(PUBLIC_IP, f"PublicIPv6 {ip} is inside our own IPv6 subnet {rules.own_ipv6_subnet}")
        if (rules.onlink_backend and attrs.backend_type == rules.onlink_backend
                and self._connected6.containing(_host_key(ip)) is None):
            return refuse(UNREACHABLE, f"PublicIPv6 {ip} is on no IPv6 network this host is connected to; "
                                       f"{rules.onlink_backend} needs its peers on the same link")
        mac = _vtep_mac_v6(lease)
        if mac is None and attrs.backend_type == "vxlan":
            return refuse(VTEP_MAC, "dual-stack vxlan lease without a VtepMAC in BackendV6Data")
        if mac is not None:
            if mac == "00:00:00:00:00:00":
                return refuse(VTEP_MAC, f"BackendV6Data VtepMAC {mac} is the zero address")
            if int(mac[:2], 16) & 1:
                return refuse(VTEP_MAC, f"BackendV6Data VtepMAC {mac} is a multicast or broadcast address")
            if rules.own_vtep_mac_v6 is not None and mac == rules.own_vtep_mac_v6.lower():
                return refuse(VTEP_MAC, f"BackendV6Data VtepMAC {mac} is our own device's")
        return None

    def _v6_side(self, lease: Lease) -> bool:
        return self.rules.ipv6_network is not None and lease.ipv6_subnet is not None

    def _judge_against_peers(self, lease: Lease) -> Refusal | None:
        net, ip = lease.subnet, lease.attrs.public_ip
        key = _key(net)
        found = self._subnets.overlapping(key)
        if found is not None:
            other = found
            return Refusal(lease, OVERLAP, f"subnet {net} overlaps the accepted lease {other} "
                                           f"(PublicIP {self.accepted[other].attrs.public_ip})", other)
        found = self._subnets.containing(_host_key(ip))
        if found is not None:
            other = found
            return Refusal(lease, PUBLIC_IP, f"PublicIP {ip} is inside the accepted lease {other}", other)
        found = self._public_ips.inside(key)
        if found is None:
            found = self._public_ips.containing(key)  # a /32 lease at an accepted PublicIP
        if found is not None:
            other = found
            return Refusal(lease, OVERLAP, f"subnet {net} contains PublicIP {self.accepted[other].attrs.public_ip} "
                                           f"of the accepted lease {other}", other)
        mac = _vtep_mac(lease)
        if mac is not None:
            other = self._macs.get(mac)
            if other is not None and other != net:
                return Refusal(lease, DUPLICATE_VTEP_MAC, f"VtepMAC {mac} belongs to the accepted lease {other} "
                                                          f"(PublicIP {self.accepted[other].attrs.public_ip})", other)
        if self._v6_side(lease):
            return self._judge_against_peers_v6(lease)
        return None

    def _judge_against_peers_v6(self, lease: Lease) -> Refusal | None:
        net6, ip6 = lease.ipv6_subnet, lease.attrs.public_ipv6
        assert net6 is not None and ip6 is not None
        found = self._subnets6.overlapping(net6)
        if found is not None:
            other = found
            return Refusal(lease, OVERLAP, f"IPv6 subnet {net6} overlaps that of the accepted lease {other} "
                                           f"({self.accepted[other].ipv6_subnet})", other)
        found = self._subnets6.containing(_host_key(ip6))
        if found is not None:
            other = found
            return Refusal(lease, PUBLIC_IP, f"PublicIPv6 {ip6} is inside the IPv6 subnet of the accepted lease "
                                             f"{other} ({self.accepted[other].ipv6_subnet})", other)
        found = self._public_ips6.inside(net6)
        if found is None:
            found = self._public_ips6.containing(net6)
        if found is not None:
            other = found
            return Refusal(lease, OVERLAP, f"IPv6 subnet {net6} contains PublicIPv6 "
                                           f"{self.accepted[other].attrs.public_ipv6} of the accepted lease {other}",
                           other)
        mac = _vtep_mac_v6(lease)
        if mac is not None:
            other = self._macs6.get(mac)
            if other is not None and other != lease.subnet:
                return Refusal(lease, DUPLICATE_VTEP_MAC, f"BackendV6Data VtepMAC {mac} belongs to the accepted "
                                                          f"lease {other}", other)
        return None

    # --- state ------------------------------------------------------------------------------

    def apply(self, events: Iterable[LeaseEvent]) -> AdmissionStep:
        """The tracker's events (REMOVED carry the last-known lease) -> what the backend applies."""
        step = AdmissionStep()
        pending = list(events)
        i = 0
        while i < len(pending):
            event = pending[i]
            subnet = event.lease.subnet
            if event.kind is EventKind.REMOVED:
                following = pending[i + 1] if i + 1 < len(pending) else None
                if (following is not None and following.kind is EventKind.ADDED
                        and following.lease.subnet == subnet and subnet in self.accepted):
                    # The tracker's "changed value": replace in one step, so no other lease can
                    # slip into the subnet or its MAC in between.
                    self._replace(self.accepted[subnet], following.lease, step)
                    i += 2
                    continue
                self._remove(subnet, step)
            else:
                self._add(event.lease, step)
            i += 1
        return step

    def _add(self, lease: Lease, step: AdmissionStep) -> None:
        current = self.accepted.get(lease.subnet)
        if current is not None:
            if current.attrs == lease.attrs and current.ipv6_subnet == lease.ipv6_subnet:
                self.accepted[lease.subnet] = lease  # a renewal: re-applied, as flanneld does
                step.events.append(LeaseEvent(EventKind.ADDED, lease))
            else:
                self._replace(current, lease, step)
            return
        before = self.refused.pop(lease.subnet, None)
        if before is not None:
            self._unwait(before)
        refusal = self.judge(lease)
        if refusal is None:
            self._accept(lease, step)
            if before is not None:
                step.readmitted.append(lease)
                step.cleared.append(lease.subnet)
        else:
            self._refuse(refusal, before, step)

    def _remove(self, subnet: IPv4Network, step: AdmissionStep) -> None:
        lease = self.accepted.pop(subnet, None)
        if lease is not None:
            self._unindex(lease)
            step.events.append(LeaseEvent(EventKind.REMOVED, lease))
            self._rejudge_waiting(subnet, step)
            return
        refusal = self.refused.pop(subnet, None)
        if refusal is not None:  # never programmed: nothing for the backend to undo
            self._unwait(refusal)
            step.cleared.append(subnet)

    def _replace(self, old: Lease, new: Lease, step: AdmissionStep) -> None:
        del self.accepted[old.subnet]
        self._unindex(old)
        step.events.append(LeaseEvent(EventKind.REMOVED, old))
        refusal = self.judge(new)
        if refusal is None:
            self._accept(new, step)
        else:
            self._refuse(refusal, None, step)
        self._rejudge_waiting(old.subnet, step)

    def _accept(self, lease: Lease, step: AdmissionStep) -> None:
        self.accepted[lease.subnet] = lease
        key = lease.subnet  # the owner in every index: held by the lease anyway
        self._subnets.add(key, key)
        self._public_ips.add(_host_key(lease.attrs.public_ip), key)
        mac = _vtep_mac(lease)
        if mac is not None:
            self._macs.setdefault(mac, lease.subnet)
        if self._v6_side(lease):
            assert lease.ipv6_subnet is not None and lease.attrs.public_ipv6 is not None
            self._subnets6.add(lease.ipv6_subnet, key)
            self._public_ips6.add(_host_key(lease.attrs.public_ipv6), key)
            mac6 = _vtep_mac_v6(lease)
            if mac6 is not None:
                self._macs6.setdefault(mac6, lease.subnet)
        step.events.append(LeaseEvent(EventKind.ADDED, lease))

    def _unindex(self, lease: Lease) -> None:
        key = lease.subnet
        self._subnets.remove(key, key)
        self._public_ips.remove(_host_key(lease.attrs.public_ip), key)
        mac = _vtep_mac(lease)
        if mac is not None and self._macs.get(mac) == lease.subnet:
            del self._macs[mac]
        if self._v6_side(lease):
            assert lease.ipv6_subnet is not None and lease.attrs.public_ipv6 is not None
            self._subnets6.remove(lease.ipv6_subnet, key)
            self._public_ips6.remove(_host_key(lease.attrs.public_ipv6), key)
            mac6 = _vtep_mac_v6(lease)
            if mac6 is not None and self._macs6.get(mac6) == lease.subnet:
                del self._macs6[mac6]

    def _refuse(self, refusal: Refusal, before: Refusal | None, step: AdmissionStep) -> None:
        self.refused[refusal.subnet] = refusal
        if refusal.blocker is not None:
            self._waiting.setdefault(refusal.blocker, {})[refusal.subnet] = None
        # Logged once per lease value and reason: a re-put of the same refused value is quiet.
        if before is None or before.lease.attrs != refusal.lease.attrs or before.reason != refusal.reason:
            step.refused.append(refusal)

    def _unwait(self, refusal: Refusal) -> None:
        if refusal.blocker is not None:
            waiting = self._waiting.get(refusal.blocker)
            if waiting is not None:
                waiting.pop(refusal.subnet, None)
                if not waiting:
                    del self._waiting[refusal.blocker]

    def _rejudge_waiting(self, blocker: IPv4Network, step: AdmissionStep) -> None:
        """Leases refused because of `blocker`, which just went or changed: judge them again."""
        for subnet in list(self._waiting.pop(blocker, {})):
            before = self.refused.pop(subnet)
            refusal = self.judge(before.lease)
            if refusal is None:
                self._accept(before.lease, step)
                step.readmitted.append(before.lease)
                step.cleared.append(subnet)
            else:
                self._refuse(refusal, before, step)


def _vtep_mac(lease: Lease) -> str | None:
    return held_vtep_mac(lease.attrs)  # the codec has normalised it (lower case, colons)


def _vtep_mac_v6(lease: Lease) -> str | None:
    return held_vtep_mac(lease.attrs, v6=True)


def judge_listing(rules: AdmissionRules, leases: Sequence[Lease]) -> dict[IPv4Network, Refusal]:
    """The refusals an agent would make reading `leases` in this order (flannelctl leases)."""
    admission = Admission(rules)
    admission.apply([LeaseEvent(EventKind.ADDED, lease) for lease in leases
                     if lease.subnet != rules.own_subnet])
    return dict(admission.refused)
