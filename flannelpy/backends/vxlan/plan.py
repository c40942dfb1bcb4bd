"""What the kernel should hold for the vxlan backend: pure decisions, no netlink.

vxlan.py asks these functions what to program and only then acts, so the rules that make
us interoperate with flanneld (entry shapes, device compatibility, MAC format) are
testable without root.

Dual stack (EnableIPv6): the same decisions for the second device, `flannel-v6.<VNI>`, whose peers'
leases are seen through their IPv6 side (the backend's lease view: IPv6 subnet, PublicIPv6,
BackendV6Data), so every function here takes IPv6 addresses and networks where it takes IPv4 ones.
"""

from __future__ import annotations

import hashlib
import random
import socket
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Callable, Iterable, Iterator, Mapping, NamedTuple, TypeVar, Union

from flannelpy.backends.route_diff import as_mapping, diff_routes
from flannelpy.hostnet.monitor import KernelChange
from flannelpy.hostnet.netlink import (
    FLANNEL_RTPROT,
    MAIN_TABLE,
    NUD_PERMANENT,
    RTPROT_KERNEL,
    KernelFdb,
    KernelNeigh,
    KernelRoute,
)
from flannelpy.subnet.lease import Lease

VXLAN_OVERHEAD = 50  # outer Ethernet 14 + IP 20 + UDP 8 + VXLAN 8
VXLAN_OVERHEAD_V6 = 70  # flannel-v6.<VNI> over an IPv6 underlay: outer IPv6 header 40 instead of 20
VXLAN_DEFAULT_PORT = 8472  # the Linux kernel's (pre-IANA) VXLAN port, which flanneld relies on
# The kernel's default metric of an IPv6 route added without one (IPv4: 0); a "replace" without a
# metric names this one.
IPV6_DEFAULT_METRIC = 1024

IPAddress = Union[IPv4Address, IPv6Address]
IPNetwork = Union[IPv4Network, IPv6Network]


def device_name(vni: int, ipv6: bool = False) -> str:
    """flannel.<VNI>, or flanneld's flannel-v6.<VNI> for the IPv6 device of a dual-stack network."""
    return f"flannel-v6.{vni}" if ipv6 else f"flannel.{vni}"


def random_vtep_mac(rng: random.Random | None = None) -> str:
    """A random locally administered unicast MAC, as flanneld generates before creating
    the device (so systemd's MACAddressPolicy=persistent cannot replace it)."""
    rng = rng or random.SystemRandom()
    octets = [rng.randrange(256) for _ in range(6)]
    octets[0] = (octets[0] & 0xFE) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


def stable_vtep_mac(machine_id: str, public_ip: IPAddress, vni: int) -> str:
    """The VTEP MAC this host uses for a new device: derived from /etc/machine-id, the PublicIP and
    the VNI, so a reboot (which loses flannel.<VNI>) brings back the same MAC and peers' FDB/ARP
    entries stay right (flanneld makes a new random one, flannel#1828).  The PublicIP is part of
    the seed because cloned VM images often share a machine-id; locally administered, unicast."""
    seed = f"flannelpy-vtep\0{machine_id.strip()}\0{public_ip}\0{vni}".encode()
    octets = bytearray(hashlib.sha256(seed).digest()[:6])
    octets[0] = (octets[0] & 0xFE) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


class VxlanDeviceSpec(NamedTuple):
    """The device we want (flanneld's netlink.Vxlan)."""

    name: str
    vni: int
    vtep_index: int
    local: IPAddress  # flannel-v6.<VNI>: the IPv6 underlay address
    port: int
    gbp: bool
    learning: bool
    mtu: int


class VxlanDeviceFacts(NamedTuple):
    """What an existing link of that name is, as read from the kernel."""

    kind: str  # "vxlan" or something else that took the name
    vni: int | None
    vtep_index: int | None
    local: IPAddress | None
    port: int | None
    gbp: bool
    learning: bool
    mac: str | None
    mtu: int | None = None
    up: bool = True


def incompatibilities(spec: VxlanDeviceSpec, have: VxlanDeviceFacts) -> list[str]:
    """Why an existing device cannot be reused (empty: reuse it and keep its MAC).

    Mirrors flanneld's vxlanLinksIncompat; MTU is not in it because it is simply set."""
    if have.kind != "vxlan":
        return [f"{spec.name} is a {have.kind or 'non-vxlan'} link, not vxlan"]
    out: list[str] = []

    def differ(what: str, want: object, got: object) -> None:
        if want != got:
            out.append(f"{what}: have {got}, want {want}")

    differ("vni", spec.vni, have.vni)
    differ("vtep device index", spec.vtep_index, have.vtep_index)
    differ("local address", spec.local, have.local)
    differ("port", spec.port, have.port)
    differ("gbp", spec.gbp, have.gbp)
    differ("learning", spec.learning, have.learning)
    return out


class Neigh(NamedTuple):
    """A permanent ARP (IPv6: neighbour) entry on the vxlan device: peer's base IP -> its VTEP MAC."""

    ip: IPAddress
    mac: str


class Fdb(NamedTuple):
    """A permanent bridge FDB entry (NTF_SELF) on the vxlan device: VTEP MAC -> underlay IP."""

    mac: str
    dst: IPAddress


class Route(NamedTuple):
    """`dst via gateway [dev <vxlan> onlink]`; on_vxlan=False is a plain underlay route."""

    dst: IPNetwork
    gateway: IPAddress
    on_vxlan: bool


class PeerPlan(NamedTuple):
    """Everything one peer lease needs in the kernel; neigh/fdb are None for direct routes."""

    route: Route
    neigh: Neigh | None = None
    fdb: Fdb | None = None

    @property
    def direct(self) -> bool:
        return not self.route.on_vxlan


def peer_plan(lease: Lease, direct: bool) -> PeerPlan:
    """The entries flanneld installs for a remote vxlan lease.

    direct: DirectRouting is on and the peer's PublicIP is on our L2 segment."""
    base = lease.subnet.network_address
    if direct:
        return PeerPlan(route=Route(lease.subnet, lease.attrs.public_ip, on_vxlan=False))
    mac = lease.attrs.vtep_mac
    if mac is None:
        raise ValueError(f"vxlan lease {lease.subnet} has no VtepMAC in its BackendData")
    return PeerPlan(
        route=Route(lease.subnet, base, on_vxlan=True),
        neigh=Neigh(base, mac),
        fdb=Fdb(mac, lease.attrs.public_ip),
    )


def stale_entries(old: PeerPlan, new: PeerPlan) -> PeerPlan | None:
    """Entries of `old` that `new` does not overwrite and that must be deleted.

    Replacing a neigh or a route for the same key overwrites it, but an FDB entry is keyed
    by MAC, so a peer that came back with a new MAC leaves the old one behind (flanneld
    keeps it; we remove it).  Switching between direct and vxlan routing leaves the other
    kind's neigh/FDB behind too."""
    fdb = None
    if old.fdb is not None and (new.fdb is None or new.fdb.mac != old.fdb.mac):
        fdb = old.fdb
    neigh = old.neigh if old.neigh is not None and new.neigh is None else None
    if fdb is None and neigh is None:
        return None
    # The route has the same destination in both and is replaced, never deleted.
    return PeerPlan(route=new.route, neigh=neigh, fdb=fdb)


def is_on_link(route_gateways: list[IPAddress | None]) -> bool:
    """flanneld's DirectRouting test: `ip route get <PublicIP>` gave exactly one route and
    it has no gateway."""
    return len(route_gateways) == 1 and route_gateways[0] is None


def addresses_to_remove(
    have: Iterable[tuple[IPAddress, int]], keep: IPAddress, network: IPNetwork
) -> list[tuple[IPAddress, int]]:
    """Addresses on the vxlan device inside Network other than our `<base>/32` (left over
    from an earlier lease or the v0.7 `/Network-prefix` scheme); IPv6: inside IPv6Network other
    than `<base>/128` (the device's link-local address is outside it, so it stays)."""
    return [
        (ip, plen)
        for ip, plen in have
        if ip in network and not (ip == keep and plen == keep.max_prefixlen)
    ]


# --- reconciliation: what the kernel should hold vs what it holds ---------------------------


class DeviceRepair(NamedTuple):
    """What to do to the device: recreate it (reason given), or fix some of its settings."""

    recreate: str | None = None
    set_mac: bool = False
    set_mtu: bool = False
    set_up: bool = False

    @property
    def needed(self) -> bool:
        return bool(self.recreate or self.set_mac or self.set_mtu or self.set_up)

    def describe(self, spec: VxlanDeviceSpec, have: VxlanDeviceFacts | None, mac: str) -> str:
        if self.recreate:
            return f"re-created {spec.name} with MAC {mac} ({self.recreate})"
        fixes = []
        if self.set_mac and have is not None:
            fixes.append(f"MAC {have.mac} -> {mac}")
        if self.set_mtu and have is not None:
            fixes.append(f"MTU {have.mtu} -> {spec.mtu}")
        if self.set_up:
            fixes.append("was down, set up")
        return f"{spec.name}: " + ", ".join(fixes)


def device_repair(spec: VxlanDeviceSpec, mac: str, have: VxlanDeviceFacts | None) -> DeviceRepair:
    """The device must exist, be compatible, carry the MAC our lease advertises (peers' FDB
    entries point at it), have our MTU and be up."""
    if have is None:
        return DeviceRepair(recreate="it was missing")
    reasons = incompatibilities(spec, have)
    if reasons:
        return DeviceRepair(recreate="; ".join(reasons))
    return DeviceRepair(
        set_mac=(have.mac or "").lower() != mac.lower(),
        set_mtu=have.mtu is not None and have.mtu != spec.mtu,
        set_up=not have.up,
    )


def route_is_ours(route: KernelRoute, device_index: int | None, underlay_index: int, network: IPNetwork) -> bool:
    """Everything on the vxlan device is ours (but the kernel's own address routes), and so
    is a route marked with our protocol inside Network via the underlay (DirectRouting)."""
    if device_index is not None and route.oif == device_index:
        return route.proto != RTPROT_KERNEL
    return route.proto == FLANNEL_RTPROT and route.oif == underlay_index and route.dst.subnet_of(network)


def route_matches(want: Route, have: KernelRoute, device_index: int | None, priority: int = 0) -> bool:
    """priority: the metric our routes get (IPv6: IPV6_DEFAULT_METRIC)."""
    if (have.dst, have.gateway, have.proto, have.priority, have.tos) != (want.dst, want.gateway, FLANNEL_RTPROT,
                                                                         priority, 0):
        return False
    if want.on_vxlan:
        return have.oif == device_index and have.onlink
    return have.oif != device_index or device_index is None


class EntryDiff:
    """Entries to add (with the peer that needs them) and entries to delete.  (A plain class:
    a dataclass costs ~0.7 ms of every start.)"""

    __slots__ = ("add_neighs", "add_fdbs", "add_routes", "remove_routes", "remove_neighs", "remove_fdbs")

    def __init__(self) -> None:
        self.add_neighs: list[tuple[IPNetwork, Neigh]] = []
        self.add_fdbs: list[tuple[IPNetwork, Fdb]] = []
        self.add_routes: list[tuple[IPNetwork, Route]] = []
        self.remove_routes: list[KernelRoute] = []
        self.remove_neighs: list[KernelNeigh] = []
        self.remove_fdbs: list[KernelFdb] = []

    def __repr__(self) -> str:
        return "EntryDiff(" + ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__) + ")"

    @property
    def empty(self) -> bool:
        return not (self.add_neighs or self.add_fdbs or self.add_routes
                    or self.remove_routes or self.remove_neighs or self.remove_fdbs)

    def extend(self, other: EntryDiff) -> None:
        """Take `other`'s entries too (the diffs of other tables)."""
        for name in self.__slots__:
            getattr(self, name).extend(getattr(other, name))


def entry_diff(
    wanted: Mapping[IPNetwork, PeerPlan] | Iterable[tuple[IPNetwork, PeerPlan]],
    routes: Iterable[KernelRoute],
    neighs: Iterable[KernelNeigh],
    fdbs: Iterable[KernelFdb],
    *,
    device_index: int | None,
    underlay_index: int,
    network: IPNetwork,
    remove_unexplained: bool,
    route_priority: int = 0,
) -> EntryDiff:
    """What to add so every wanted peer's entries are there exactly, and (remove_unexplained)
    which of our entries no wanted peer explains: route_diff, neigh_diff and fdb_diff together.
    Each takes its table's entries in one pass and keeps only what it needs (a repair pass feeds
    them straight from the kernel's dumps, so it never holds a whole table).

    Additions use "replace", which overwrites an entry with the same key (a route's dst and
    metric 0, a neighbour's IP, a unicast FDB entry's MAC), so an entry that is about to be
    overwritten is not also deleted.  Nobody else's entries are ever in the removals.

    `wanted`: each peer's subnet and its plan.  It is looked up, never copied: a repair pass hands
    in a MappedView of its leases, which works a plan out when asked and keeps none, so no object
    per peer outlives the peer's own turn (the objects a pass kept for every peer stayed in
    pymalloc's pools for good: ~0.6 KiB of RSS a peer, measured)."""
    wanted = as_mapping(wanted)
    diff = route_diff(wanted, routes, device_index=device_index, underlay_index=underlay_index, network=network,
                      remove_unexplained=remove_unexplained, route_priority=route_priority)
    diff.extend(neigh_diff(wanted, neighs, remove_unexplained=remove_unexplained))
    diff.extend(fdb_diff(wanted, fdbs, remove_unexplained=remove_unexplained))
    return diff


def route_diff(wanted: Mapping[IPNetwork, PeerPlan] | Iterable[tuple[IPNetwork, PeerPlan]],
               routes: Iterable[KernelRoute], *, device_index: int | None, underlay_index: int, network: IPNetwork,
               remove_unexplained: bool, route_priority: int = 0) -> EntryDiff:
    """entry_diff's routes (add_routes, remove_routes), the kernel's taken in one pass."""
    diff = EntryDiff()
    diff.add_routes, diff.remove_routes = diff_routes(
        MappedView(as_mapping(wanted), _route_of), routes,
        matches=lambda want, have: route_matches(want, have, device_index, route_priority),
        ours=(lambda have: route_is_ours(have, device_index, underlay_index, network)) if remove_unexplained else None,
        priority=route_priority)
    return diff


def neigh_diff(wanted: Mapping[IPNetwork, PeerPlan] | Iterable[tuple[IPNetwork, PeerPlan]],
               neighs: Iterable[KernelNeigh], *, remove_unexplained: bool) -> EntryDiff:
    """entry_diff's neighbours (add_neighs, remove_neighs), the kernel's taken in one pass.  The
    kernel's own ARP cache entries (not permanent) are not ours, and never satisfy a wanted one.
    Wanted entries are found by IP, through an index of the peers' own objects (IP -> subnet)."""
    wanted = as_mapping(wanted)
    by_ip: dict[IPAddress, IPNetwork] = {}
    for subnet, plan in wanted.items():
        if plan.neigh is not None:
            by_ip[plan.neigh.ip] = subnet  # the lease's own address object
    present: set[IPNetwork] = set()
    suspects: list[KernelNeigh] = []
    for n in neighs:
        if not n.permanent:
            continue
        subnet = by_ip.get(n.ip)
        want = wanted[subnet].neigh if subnet is not None else None
        if want is not None and (n.mac or "") == want.mac.lower():
            present.add(subnet)  # type: ignore[arg-type]
        elif remove_unexplained:
            suspects.append(n)
    diff = EntryDiff()
    diff.add_neighs = [(subnet, wanted[subnet].neigh) for subnet in by_ip.values()  # type: ignore[misc]
                       if subnet not in present]
    replaced = {want.ip for _s, want in diff.add_neighs}
    diff.remove_neighs = [n for n in suspects if n.ip not in replaced]
    return diff


def fdb_diff(wanted: Mapping[IPNetwork, PeerPlan] | Iterable[tuple[IPNetwork, PeerPlan]],
             fdbs: Iterable[KernelFdb], *, remove_unexplained: bool) -> EntryDiff:
    """entry_diff's FDB entries (add_fdbs, remove_fdbs), the kernel's taken in one pass.  A wanted
    entry is a (MAC, dst) pair; they are found by MAC through an index of the peers' own objects:
    MAC -> subnet, or, for a MAC several peers hold, MAC -> {dst: subnet} (the last peer with a
    pair stands for it)."""
    wanted = as_mapping(wanted)
    by_mac: dict[str, IPNetwork | dict[IPAddress, IPNetwork]] = {}
    for subnet, plan in wanted.items():
        if plan.fdb is None:
            continue
        mac = _lowered(plan.fdb.mac)
        held = by_mac.get(mac)
        if held is None:
            by_mac[mac] = subnet
        elif isinstance(held, dict):
            held[plan.fdb.dst] = subnet
        else:
            by_mac[mac] = {_fdb_of(wanted, held).dst: held, plan.fdb.dst: subnet}

    def holder(mac: str, dst: IPAddress) -> IPNetwork | None:
        held = by_mac.get(mac)
        if held is None:
            return None
        if isinstance(held, dict):
            return held.get(dst)
        return held if _fdb_of(wanted, held).dst == dst else None

    present: set[IPNetwork] = set()  # the peers whose entry was found (their own subnet objects)
    suspects: list[KernelFdb] = []
    for f in fdbs:
        if not f.permanent:
            continue
        subnet = holder(f.mac, f.dst)
        if subnet is not None:
            present.add(subnet)
        elif remove_unexplained:
            suspects.append(f)
    diff = EntryDiff()
    for held in by_mac.values():
        for subnet in held.values() if isinstance(held, dict) else (held,):
            if subnet not in present:
                diff.add_fdbs.append((subnet, _fdb_of(wanted, subnet)))
    if not diff.add_fdbs or not suspects:
        diff.remove_fdbs = suspects
        return diff
    replaced_macs = {_lowered(want.mac) for _s, want in diff.add_fdbs}
    # An addition's "replace" re-points the entry of its MAC when that is the only one the MAC has.
    per_mac: dict[str, int] = {}
    for mac in [_lowered(_fdb_of(wanted, s).mac) for s in present] + [f.mac for f in suspects]:
        if mac in replaced_macs:
            per_mac[mac] = per_mac.get(mac, 0) + 1
    diff.remove_fdbs = [f for f in suspects if not (f.mac in replaced_macs and per_mac[f.mac] == 1)]
    return diff


def _fdb_of(wanted: Mapping[IPNetwork, PeerPlan], subnet: IPNetwork) -> Fdb:
    fdb = wanted[subnet].fdb
    assert fdb is not None  # indexed only when it has one
    return fdb


def _lowered(mac: str) -> str:
    """`mac` in lower case; the very string when it already is (a lease's, as decoded), so an
    index of MACs holds the leases' own strings."""
    low = mac.lower()
    return mac if low == mac else low


def _route_of(plan: PeerPlan) -> Route:
    return plan.route


K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")


class MappedView(Mapping[K, T]):
    """`source` with `fn` applied to each value when it is asked for; nothing is kept."""

    __slots__ = ("_source", "_fn")

    def __init__(self, source: Mapping[K, V], fn: Callable[[V], T]) -> None:
        self._source, self._fn = source, fn

    def __getitem__(self, key: K) -> T:
        return self._fn(self._source[key])

    def __iter__(self) -> Iterator[K]:
        return iter(self._source)

    def __len__(self) -> int:
        return len(self._source)


def change_matters(change: KernelChange, *, device_index: int | None, device: str, underlay_index: int,
                   network: IPNetwork, family: int = socket.AF_INET) -> bool:
    """Whether a kernel notification (not caused by us) may have touched our entries (those of
    `family`'s device: AF_INET6 for flannel-v6.<VNI>)."""
    if change.kind == "overflow":
        return True
    if change.kind == "link":
        return change.ifindex in (device_index, underlay_index) or change.ifname == device
    if change.kind == "addr":
        return change.family == family and change.ifindex == device_index
    if change.kind == "route":
        if change.family != family or change.table != MAIN_TABLE:
            return False
        return change.ifindex == device_index or (change.dst is not None and change.dst.subnet_of(network))
    if change.kind == "neigh":
        # Someone else's change, or the kernel dropping a permanent entry; not the kernel's
        # own ARP/learning churn.
        return change.ifindex == device_index and (change.sender != 0 or bool((change.state or 0) & NUD_PERMANENT))
    return False
