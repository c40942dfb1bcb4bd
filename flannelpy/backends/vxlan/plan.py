"""What the kernel should hold for the vxlan backend: pure decisions, no netlink.

vxlan.py asks these functions what to program and only then acts, so the rules that make
us interoperate with flanneld (entry shapes, device compatibility, MAC format) are
testable without root.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Iterable

from flannelpy.subnet.lease import Lease

VXLAN_OVERHEAD = 50  # outer Ethernet 14 + IP 20 + UDP 8 + VXLAN 8
VXLAN_DEFAULT_PORT = 8472  # the Linux kernel's (pre-IANA) VXLAN port, which flanneld relies on


def device_name(vni: int) -> str:
    return f"flannel.{vni}"


def random_vtep_mac(rng: random.Random | None = None) -> str:
    """A random locally administered unicast MAC, as flanneld generates before creating
    the device (so systemd's MACAddressPolicy=persistent cannot replace it)."""
    rng = rng or random.SystemRandom()
    octets = [rng.randrange(256) for _ in range(6)]
    octets[0] = (octets[0] & 0xFE) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


@dataclass(frozen=True)
class VxlanDeviceSpec:
    """The device we want (flanneld's netlink.Vxlan)."""

    name: str
    vni: int
    vtep_index: int
    local: IPv4Address
    port: int
    gbp: bool
    learning: bool
    mtu: int


@dataclass(frozen=True)
class VxlanDeviceFacts:
    """What an existing link of that name is, as read from the kernel."""

    kind: str  # "vxlan" or something else that took the name
    vni: int | None
    vtep_index: int | None
    local: IPv4Address | None
    port: int | None
    gbp: bool
    learning: bool
    mac: str | None


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


@dataclass(frozen=True)
class Neigh:
    """A permanent ARP entry on the vxlan device: peer's base IP -> its VTEP MAC."""

    ip: IPv4Address
    mac: str


@dataclass(frozen=True)
class Fdb:
    """A permanent bridge FDB entry (NTF_SELF) on the vxlan device: VTEP MAC -> underlay IP."""

    mac: str
    dst: IPv4Address


@dataclass(frozen=True)
class Route:
    """`dst via gateway [dev <vxlan> onlink]`; on_vxlan=False is a plain underlay route."""

    dst: IPv4Network
    gateway: IPv4Address
    on_vxlan: bool


@dataclass(frozen=True)
class PeerPlan:
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


def is_on_link(route_gateways: list[IPv4Address | None]) -> bool:
    """flanneld's DirectRouting test: `ip route get <PublicIP>` gave exactly one route and
    it has no gateway."""
    return len(route_gateways) == 1 and route_gateways[0] is None


def addresses_to_remove(
    have: Iterable[tuple[IPv4Address, int]], keep: IPv4Address, network: IPv4Network
) -> list[tuple[IPv4Address, int]]:
    """Addresses on the vxlan device inside Network other than our `<base>/32` (left over
    from an earlier lease or the v0.7 `/Network-prefix` scheme)."""
    return [
        (ip, plen)
        for ip, plen in have
        if ip in network and not (ip == keep and plen == 32)
    ]
