"""The vxlan backend: a `flannel.<VNI>` VXLAN device plus, per peer, a permanent ARP entry,
a permanent FDB entry and an onlink route, exactly as flanneld programs them (so mixed
clusters of flanneld and flannelpy nodes interoperate).

What to program is decided in flannelpy.backends.vxlan.plan; this module only performs it, on the
netlink thread.  Kernel state is kept on shutdown so a restart does not cut traffic.

The per-event path (apply) touches only the event's own entries, all of one batch in one
round of rtnetlink requests.  run() reconciles within a fraction of a second of the kernel
reporting a change to our device or entries, and periodically: every 300 s while those
notifications are read and every peer is programmed, else every 10 s; one dump of routes, neighbours and FDB is compared with the accepted leases; a
missing device is re-created with the same MAC, missing entries restored, and entries of ours
that no lease explains removed.  Ours means: on flannel.<VNI> (the device is ours), or a
route with protocol FLANNEL_RTPROT (DirectRouting).  A peer whose programming fails is logged
once, counted as not programmed, shown by /readyz, and retried by the next pass.

Dual stack (EnableIPv6), as flanneld: a second device `flannel-v6.<VNI>` (local: the underlay's
IPv6 address, MTU: underlay - 70, address `<our IPv6 subnet base>/128`) with, per peer, a permanent
neighbour entry `<peer IPv6 base> -> BackendV6Data.VtepMAC`, an FDB entry `VtepMAC -> PublicIPv6`
and an onlink route `<peer IPv6 subnet> via <peer IPv6 base>`.  It is the same class run a second
time with family AF_INET6 (`self.v6`, owned by the IPv4 backend), which sees each peer lease through
its IPv6 side (`lease_view`); the entries, their batching and the reconciliation are the same code.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import AbstractSet, Any, Callable, Mapping, NamedTuple, Sequence

import trio

from flannelpy.backends.base import Backend, ExternalInterface, LeaseData
from flannelpy.backends.repair import (
    QUIET_INTERVAL,
    RESYNC_INTERVAL,
    EchoFilter,
    RepairLoop,
    RepairReport,
    describe_failures,
)
from flannelpy.config.network import NetworkConfig
from flannelpy.errors import ConfigError, FlannelError
from flannelpy.hostnet import rtnl
from flannelpy.hostnet.interface import route_get_hops
from flannelpy.hostnet.monitor import KernelChange, KernelMonitor
from flannelpy.hostnet.netlink import (
    FLANNEL_RTPROT,
    MAIN_TABLE,
    NUD_PERMANENT,
    RTNH_F_ONLINK,
    KernelDumps,
    NetlinkError,
    NetlinkThread,
    PendingCall,
    delete_route_request,
)
from flannelpy.subnet.lease import EventKind, Lease, LeaseAttrs, LeaseEvent

from .plan import (
    IPV6_DEFAULT_METRIC,
    VXLAN_DEFAULT_PORT,
    VXLAN_OVERHEAD,
    VXLAN_OVERHEAD_V6,
    Fdb,
    IPNetwork,
    MappedView,
    Neigh,
    PeerPlan,
    Route,
    VxlanDeviceFacts,
    VxlanDeviceSpec,
    addresses_to_remove,
    change_matters,
    device_name,
    device_repair,
    fdb_diff,
    incompatibilities,
    is_on_link,
    neigh_diff,
    peer_plan,
    random_vtep_mac,
    route_diff,
    stable_vtep_mac,
    stale_entries,
)

MACHINE_ID_FILE = "/etc/machine-id"

log = logging.getLogger(__name__)

NTF_SELF = 0x02
MIN_DEVICE_MTU = 68
# Peer events per netlink round of apply().  Two rounds are alive at once (one in the kernel, one
# being planned or recorded): 2 x 128 keeps a start's high-water mark where one round of 256 had it
# (256 raised RSS per peer from ~2.1 to ~2.7 KiB at 1000 peers).
APPLY_CHUNK = 128
PEER_LINES_MAX = 32  # an apply of more lease events logs a summary, not a line per peer


# --- netlink-thread functions: fn(dumps, ...), through hostnet.rtnl ------------------------


def _ignore(codes: tuple[int, ...], fn: Callable[[], Any]) -> None:
    try:
        fn()
    except NetlinkError as exc:
        if exc.code not in codes:
            raise


# IFLA_VXLAN_* attributes of a vxlan device's IFLA_INFO_DATA
_VXLAN_ID, _VXLAN_LINK, _VXLAN_LOCAL, _VXLAN_LEARNING, _VXLAN_PORT, _VXLAN_LOCAL6, _VXLAN_GBP = 1, 3, 4, 7, 15, 17, 23


def _read_device(dumps: KernelDumps, name: str) -> tuple[int, VxlanDeviceFacts] | None:
    """The device called `name` and what it is."""
    link = dumps.link(name)
    if link is None:
        return None
    up = bool(link.flags & rtnl.IFF_UP)
    data = link.data
    if link.kind != "vxlan" or data is None:
        return link.index, VxlanDeviceFacts(link.kind or "", None, None, None, None, False, False, link.mac,
                                            link.mtu, up)
    local = data.get(_VXLAN_LOCAL) or data.get(_VXLAN_LOCAL6)  # flannel-v6.<VNI>: LOCAL6
    port = data.get(_VXLAN_PORT)
    learning = data.get(_VXLAN_LEARNING)
    return link.index, VxlanDeviceFacts(
        kind="vxlan",
        vni=rtnl.u32(data.get(_VXLAN_ID)),
        vtep_index=rtnl.u32(data.get(_VXLAN_LINK)),
        local=ip_address(local) if local else None,
        port=struct.unpack("!H", port[:2])[0] if port and len(port) >= 2 else None,  # network order
        gbp=_VXLAN_GBP in data,  # a flag: present or not
        learning=bool(learning and learning[0]),
        mac=link.mac,
        mtu=link.mtu,
        up=up,
    )


def _link_mac(dumps: KernelDumps, name: str) -> str | None:
    link = dumps.link(name)
    return link.mac if link is not None else None


def _vxlan_info_data(spec: VxlanDeviceSpec) -> bytes:
    """IFLA_INFO_DATA of `ip link add ... type vxlan id VNI dev UNDERLAY local IP dstport PORT
    [nolearning] [gbp]`, the device flanneld makes."""
    local = (rtnl.link_attr(_VXLAN_LOCAL6, spec.local.packed) if spec.local.version == 6
             else rtnl.link_attr(_VXLAN_LOCAL, spec.local.packed))
    data = (rtnl.link_attr(_VXLAN_ID, struct.pack("=I", spec.vni))
            + rtnl.link_attr(_VXLAN_LINK, struct.pack("=I", spec.vtep_index))
            + local
            + rtnl.link_attr(_VXLAN_PORT, struct.pack("!H", spec.port))  # network order
            + rtnl.link_attr(_VXLAN_LEARNING, bytes([1 if spec.learning else 0])))
    if spec.gbp:
        data += rtnl.link_attr(_VXLAN_GBP, b"")  # a flag: present or not
    return data


def _ensure_device(dumps: KernelDumps, spec: VxlanDeviceSpec, new_mac: str) -> tuple[int, str, bool]:
    """Reuse a compatible device (keeping its MAC) or (re)create it with new_mac; bring it
    up and check its MAC.  Returns (ifindex, mac, created)."""
    existing = _read_device(dumps, spec.name)
    if existing is not None:
        index, facts = existing
        reasons = incompatibilities(spec, facts)
        if not reasons:
            if facts.mtu == spec.mtu and facts.up and facts.mac:
                return index, facts.mac, False
            dumps.change(rtnl.link_set_request(index, mtu=spec.mtu, up=True), f"{spec.name}: mtu {spec.mtu} up")
            return index, _link_mac(dumps, spec.name) or "", False
        log.warning("%s exists but is incompatible (%s); recreating it", spec.name, "; ".join(reasons))
        dumps.change(rtnl.link_delete_request(index), f"deleting {spec.name}")
    return _create_device(dumps, spec, new_mac), new_mac, True


def _create_device(dumps: KernelDumps, spec: VxlanDeviceSpec, new_mac: str) -> int:
    """Create the device with exactly `new_mac`, up; never leaves a half-made one behind."""
    try:
        # The MAC is set at creation so udev/systemd cannot pick another.
        dumps.change(rtnl.link_create_request(spec.name, "vxlan", _vxlan_info_data(spec), mac=new_mac, mtu=spec.mtu),
                     f"{spec.name}: creating")
    except NetlinkError as exc:
        raise FlannelError(f"creating vxlan device {spec.name} (vni {spec.vni}, port {spec.port}, "
                           f"local {spec.local}): {_reason(exc)}") from None
    link = dumps.link(spec.name)
    if link is None:  # deleted by someone else between the two requests
        raise FlannelError(f"{spec.name} vanished right after it was created")
    index = link.index
    try:
        dumps.change(rtnl.link_set_request(index, up=True), f"{spec.name}: up")
        mac = _link_mac(dumps, spec.name)
        if mac != new_mac:
            # Something (udev MACAddressPolicy) changed it after creation: put ours back,
            # since the MAC we advertise must be the one the device answers to.
            log.warning("%s came up with MAC %s instead of %s; setting it back", spec.name, mac, new_mac)
            dumps.change(rtnl.link_set_request(index, mac=new_mac), f"{spec.name}: address {new_mac}")
            mac = _link_mac(dumps, spec.name)
            if mac != new_mac:
                raise FlannelError(f"{spec.name}: MAC is {mac} after bring-up, expected {new_mac}")
    except Exception:
        # Never leave a half-configured device behind.
        _ignore((errno.ENODEV,), lambda: dumps.change(rtnl.link_delete_request(index), f"deleting {spec.name}"))
        raise
    return index


def _configure_address(dumps: KernelDumps, index: int, base: IPv4Address | IPv6Address,
                       network: IPv4Network | IPv6Network) -> list[str]:
    """Exactly `<base>/32` inside Network on the device (IPv6: `<base>/128` inside IPv6Network),
    and the device up; returns what was changed."""
    plen_own = base.max_prefixlen
    family = socket.AF_INET if base.version == 4 else socket.AF_INET6
    have = [(ip_address(a.local or a.address), a.prefixlen) for a in dumps.addresses(family, index)
            if a.local or a.address]
    changes = []
    for ip, plen in addresses_to_remove(have, base, network):
        log.info("removing stale address %s/%d from vxlan device", ip, plen)
        _ignore((errno.EADDRNOTAVAIL,),
                lambda: dumps.change(rtnl.addr_request(False, index, ip.packed, plen), f"address {ip}/{plen}"))
        changes.append(f"address {ip}/{plen} removed")
    if (base, plen_own) not in have:
        add = rtnl.addr_request(True, index, base.packed, plen_own)
        _ignore((errno.EEXIST,), lambda: dumps.change(add, f"address {base}/{plen_own}"))
        changes.append(f"address {base}/{plen_own} restored")
    link = next((link for link in dumps.links() if link.index == index), None)
    if changes or link is None or not link.flags & rtnl.IFF_UP:
        dumps.change(rtnl.link_set_request(index, up=True), f"device {index}: up")
    return changes


_GONE = (errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL, errno.ENODEV)
# What a kernel request can raise: never allowed past one peer's programming.
_KERNEL_ERRORS = (NetlinkError, OSError, ValueError)


# What a request is for, as the apply path names it: ("neigh", ip), ("fdb", mac, dst) or ("route",
# subnet).  Made into text (_step_text) only for a log line: a bulk start names thousands of steps
# and prints none of them.
_Step = tuple[Any, ...]


def _step_text(step: _Step) -> str:
    if step[0] == "fdb":
        return f"fdb {step[1]} dst {step[2]}"
    return f"{step[0]} {step[1]}"


class _Group(NamedTuple):
    """One peer's part of an apply batch: what it is for, and its requests in kernel order."""

    role: str  # "add", "remove", or "stale" (old entries a changed lease no longer needs)
    subnet: IPNetwork
    plan: PeerPlan
    steps: list[tuple[_Step, rtnl.Request]]


def _neigh_request(add: bool, index: int, n: Neigh) -> rtnl.Request:
    family = socket.AF_INET if n.ip.version == 4 else socket.AF_INET6
    return rtnl.neigh_request(add, family, index, n.ip.packed, n.mac, state=NUD_PERMANENT)


def _fdb_request(add: bool, index: int, f: Fdb) -> rtnl.Request:
    return rtnl.neigh_request(add, socket.AF_BRIDGE, index, f.dst.packed, f.mac, state=NUD_PERMANENT,
                              ntf_flags=NTF_SELF)


def _route_request(add: bool, index: int, r: Route) -> rtnl.Request:
    # Our protocol marks the route as ours (see FLANNEL_RTPROT).  A delete names it too, so
    # that a DirectRouting route someone else made to the same subnet is never taken away...
    if r.on_vxlan:
        # ...except on our own device, where every route is ours whoever marked it: a delete
        # matches any protocol (0).
        return rtnl.route_request(add, r.dst.network_address.packed, r.dst.prefixlen, r.gateway.packed,
                                  oif=index, table=MAIN_TABLE, protocol=FLANNEL_RTPROT if add else 0,
                                  flags=RTNH_F_ONLINK)
    return rtnl.route_request(add, r.dst.network_address.packed, r.dst.prefixlen, r.gateway.packed,
                              oif=None, table=MAIN_TABLE, protocol=FLANNEL_RTPROT)


def _plan_requests(index: int, plan: PeerPlan, add: bool, with_route: bool) -> list[tuple[_Step, rtnl.Request]]:
    """The plan's entries as rtnetlink requests, in flanneld's order (neighbour, FDB, route)."""
    out: list[tuple[_Step, rtnl.Request]] = []
    if plan.neigh is not None:
        out.append((("neigh", plan.neigh.ip), _neigh_request(add, index, plan.neigh)))
    if plan.fdb is not None:
        out.append((("fdb", plan.fdb.mac, plan.fdb.dst), _fdb_request(add, index, plan.fdb)))
    if with_route:
        out.append((("route", plan.route.dst), _route_request(add, index, plan.route)))
    return out


def _reconcile(dumps: KernelDumps, spec: VxlanDeviceSpec, mac: str, base: IPv4Address | IPv6Address,
               network: IPv4Network | IPv6Network, wanted: Mapping[IPNetwork, Lease],
               direct: AbstractSet[IPNetwork], remove_unexplained: bool) -> tuple[int | None, RepairReport]:
    """One pass: the device first (re-created with our MAC if gone), then one dump each of
    routes, neighbours and FDB, the pure diff, and one batch of requests that closes it (the
    removals, then the additions).  `wanted`: each accepted peer's lease (`direct`: those routed
    directly).  Every request's failure is recorded, never raised, so one bad entry cannot stop
    the others."""
    report = RepairReport()
    found = _read_device(dumps, spec.name)
    index, facts = found if found is not None else (None, None)
    repair = device_repair(spec, mac, facts)
    if repair.needed:
        try:
            if repair.recreate:
                if index is not None:
                    dumps.change(rtnl.link_delete_request(index), f"deleting {spec.name}")
                index = _create_device(dumps, spec, mac)
            else:
                assert index is not None
                dumps.change(rtnl.link_set_request(index, mac=mac if repair.set_mac else None,
                                                   mtu=spec.mtu if repair.set_mtu else None,
                                                   up=True if repair.set_up else None), f"{spec.name}: settings")
        except (NetlinkError, FlannelError) as exc:
            report.device_error = f"{spec.name} broken ({repair.recreate or 'settings'}), repair failed: {_reason(exc)}"
            report.checked = False
            return (index if not repair.recreate else None), report
        report.device = repair.describe(spec, facts, mac)
    assert index is not None
    try:
        address_changes = _configure_address(dumps, index, base, network)
    except NetlinkError as exc:
        report.device_error = f"{spec.name}: cannot set address {base}/{base.max_prefixlen}: {_reason(exc)}"
        report.checked = False
        return index, report
    if address_changes and not repair.recreate:  # a new device's address goes without saying
        report.device = "; ".join(filter(None, [report.device, f"{spec.name}: " + ", ".join(address_changes)]))

    ipv6 = base.version == 6
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    # The main table's routes, the device's neighbours, its FDB entries to remote VTEPs: one dump
    # each, compared as the kernel sends them (a dump the kernel says changed meanwhile is read
    # again, its comparison started over).  Each peer's wanted entries are worked out when a diff
    # asks for them and kept by nobody (the diffs index the leases' own objects), so a pass holds
    # neither a whole table nor an object per peer: the small objects a pass kept for every peer,
    # ~0.6 KiB of RSS a peer, stayed in pymalloc's pools after it.
    plans = MappedView(wanted, lambda lease: peer_plan(lease, lease.subnet in direct))
    diff = dumps.retried(lambda: route_diff(
        plans, dumps.each_route(family), device_index=index, underlay_index=spec.vtep_index, network=network,
        remove_unexplained=remove_unexplained, route_priority=IPV6_DEFAULT_METRIC if ipv6 else 0))
    diff.extend(dumps.retried(lambda: neigh_diff(plans, dumps.each_neighbour(index, family),
                                                 remove_unexplained=remove_unexplained)))
    diff.extend(dumps.retried(lambda: fdb_diff(plans, dumps.each_fdb(index, family),
                                               remove_unexplained=remove_unexplained)))
    if diff.empty:
        return index, report

    # Removals: (what the report says, its request); already gone is what a removal wanted.
    removals: list[tuple[str, rtnl.Request]] = []
    removals += [(f"route {r.dst}", delete_route_request(r)) for r in diff.remove_routes]
    removals += [(f"neigh {n.ip}", rtnl.neigh_request(False, family, index, n.ip.packed, None, state=0))
                 for n in diff.remove_neighs]
    removals += [(f"fdb {f.mac}", _fdb_request(False, index, Fdb(f.mac, f.dst))) for f in diff.remove_fdbs]
    # Additions in flanneld's order: neighbours, FDB, routes (an onlink route wants the rest first).
    additions: list[tuple[IPNetwork, str, rtnl.Request]] = []
    additions += [(subnet, f"neigh {n.ip}", _neigh_request(True, index, n)) for subnet, n in diff.add_neighs]
    additions += [(subnet, f"fdb {f.mac}", _fdb_request(True, index, f)) for subnet, f in diff.add_fdbs]
    additions += [(subnet, f"route {r.dst}", _route_request(True, index, r)) for subnet, r in diff.add_routes]
    codes = dumps.transact([req for _what, req in removals] + [req for _s, _what, req in additions])
    for (what, _req), code in zip(removals, codes):
        if code and code not in _GONE:
            report.errors.append(f"{what}: {os.strerror(code)}")
        elif not code:
            report.removed.append(what)
    for (subnet, what, _req), code in zip(additions, codes[len(removals):]):
        _record_add(report, subnet, what, os.strerror(code) if code else None)
    return index, report


def _record_add(report: RepairReport, subnet: IPNetwork, what: str, err: str | None) -> None:
    if err is None:
        report.added.append(what)
    else:
        report.failures.setdefault(subnet, f"{what}: {err}")


def _reason(exc: BaseException) -> str:
    """A netlink error as the operator reads it: "Network is unreachable", not "(101, ...)"."""
    if isinstance(exc, NetlinkError):
        return os.strerror(exc.code) if exc.code else str(exc)
    return str(exc)


def _set_accept_ra_off(name: str) -> None:
    # flanneld sets accept_ra=0 so the overlay device never configures itself from RAs.
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/accept_ra", "w") as fh:
            fh.write("0")
    except OSError:
        pass  # IPv6 disabled: nothing to turn off


# --- the backend ------------------------------------------------------------------------


class VxlanBackend(Backend):
    name = "vxlan"

    def __init__(self, ext: ExternalInterface, config: NetworkConfig, netlink: NetlinkThread,
                 *, resync_interval: float = RESYNC_INTERVAL, quiet_interval: float | None = QUIET_INTERVAL,
                 family: int = socket.AF_INET) -> None:
        super().__init__(ext, config, netlink)
        # AF_INET6: this instance is the IPv6 device of a dual-stack network (self.v6 of the IPv4 one).
        self.family = family
        ipv6 = family == socket.AF_INET6
        if ipv6 and (ext.ip6 is None or ext.public_ipv6 is None or config.ipv6_network is None):
            raise ConfigError("EnableIPv6: the vxlan backend needs IPv6Network and an IPv6 address on the interface")
        vni = config.backend_option("VNI", int, 1)
        if not 0 <= vni < (1 << 24):
            raise ConfigError(f"Backend.VNI: {vni} is not a VXLAN id (0..16777215)")
        port = config.backend_option("Port", int, 0)
        if not 0 <= port <= 65535:
            raise ConfigError(f"Backend.Port: {port} is not a UDP port (0..65535)")
        underlay_mtu = config.backend_option("MTU", int, 0) or ext.mtu
        overhead = VXLAN_OVERHEAD_V6 if ipv6 else VXLAN_OVERHEAD
        device_mtu = underlay_mtu - overhead
        min_mtu = 1280 if ipv6 else MIN_DEVICE_MTU  # IPv6's minimum link MTU
        if device_mtu < min_mtu:
            raise ConfigError(f"Backend.MTU: {underlay_mtu} leaves {device_mtu} for {device_name(vni, ipv6)}; "
                              f"need at least {min_mtu + overhead}")
        # IPv6 too, as flanneld: a peer whose PublicIPv6 is on our link gets `<v6 subnet> via <PublicIPv6>`
        self.direct_routing: bool = config.backend_option("DirectRouting", bool, False)
        self.network: IPv4Network | IPv6Network = config.ipv6_network if ipv6 else config.network  # type: ignore[assignment]
        self.spec = VxlanDeviceSpec(
            name=device_name(vni, ipv6),
            vni=vni,
            vtep_index=ext.index,
            local=ext.ip6 if ipv6 else ext.ip,  # type: ignore[arg-type]
            port=port or VXLAN_DEFAULT_PORT,
            gbp=config.backend_option("GBP", bool, False),
            learning=config.backend_option("Learning", bool, False),
            mtu=device_mtu,
        )
        self.index: int | None = None
        self.mac: str | None = None
        self._own_base: IPv4Address | None = None
        # Accepted peers (whether or not programming worked) by their lease, the ones routed
        # directly (DirectRouting), the ones whose programming failed (-> why), and how many
        # wanted peers hold each VTEP MAC, so removing a lease never deletes an FDB entry another
        # accepted lease still needs (a count, not a set of subnets: a set per MAC is ~240 bytes
        # a peer).  A peer's entries are worked out from its lease when needed (peer_plan), not
        # kept: the lease is the one the tracker holds anyway, the entries were ~210 bytes a peer.
        self._wanted: dict[IPv4Network, Lease] = {}
        self._direct: set[IPv4Network] = set()
        self._failed: dict[IPv4Network, str] = {}
        self._mac_holders: dict[str, int] = {}
        self._synced = False  # the agent applied the whole peer set: unexplained entries may go
        self._checked_synced = False  # a pass has checked the kernel since then
        self._device_problem: str | None = None
        self._lock = trio.Lock()  # a pass's snapshot, dump and fixes never interleave with apply
        self.repairs: dict[str, int] = {}
        self._echoes = EchoFilter()  # our FDB changes, which the kernel announces as nobody's
        self.loop = RepairLoop(f"vxlan {self.spec.name}", netlink, self.reconcile_once, self._notice,
                               interval=resync_interval, quiet_interval=quiet_interval,
                               urgent=lambda: bool(self._failed) or self._device_problem is not None,
                               monitor_groups=KernelMonitor.GROUPS_V6 if ipv6 else KernelMonitor.GROUPS)
        # Dual stack: the IPv6 device, run by the same code (see the module docstring).
        self.v6: VxlanBackend | None = None
        if config.enable_ipv6 and not ipv6:
            self.v6 = VxlanBackend(ext, config, netlink, resync_interval=resync_interval,
                                   quiet_interval=quiet_interval, family=socket.AF_INET6)

    def lease_view(self, lease: Lease) -> Lease | None:
        """A peer lease as this device sees it: itself for IPv4; for IPv6 its IPv6 side (the IPv6
        subnet, PublicIPv6 and BackendV6Data in the places of the IPv4 ones), None without one."""
        if self.family == socket.AF_INET:
            return lease
        attrs = lease.attrs
        if lease.ipv6_subnet is None or attrs.public_ipv6 is None:
            return None
        return Lease(lease.ipv6_subnet,  # type: ignore[arg-type]
                     LeaseAttrs(attrs.public_ipv6, attrs.backend_type, attrs.backend_v6_data),  # type: ignore[arg-type]
                     lease.expiration, lease.store_ref)

    def _view_events(self, events: Sequence[LeaseEvent]) -> list[LeaseEvent]:
        out = []
        for event in events:
            view = self.lease_view(event.lease)
            if view is not None:
                out.append(LeaseEvent(event.kind, view))
        return out

    # --- counts and health ---------------------------------------------------------------

    @property
    def programmed_peers(self) -> int:
        return len(self._wanted) - len(self._failed)

    def programmed_count(self) -> int | None:
        # Dual stack: a peer whose IPv6 side failed is not programmed either.
        return max(0, self.programmed_peers - (len(self.v6._failed) if self.v6 is not None else 0))

    def data_plane_problems(self) -> list[str]:
        problems = [self._device_problem] if self._device_problem else []
        failed = describe_failures({s: f"via {self._public_of(s)}: {why}" for s, why in self._failed.items()})
        if failed:
            problems.append(failed)
        if self.v6 is not None:
            problems.extend(self.v6.data_plane_problems())
        return problems

    def repair_counters(self) -> Mapping[str, int]:
        counters = dict(self.repairs)
        if self.v6 is not None:
            for key, n in self.v6.repairs.items():
                counters[key] = counters.get(key, 0) + n
        return counters

    def _public_of(self, subnet: IPv4Network) -> str:
        lease = self._wanted.get(subnet)
        return "?" if lease is None else str(lease.attrs.public_ip)  # the FDB's or the direct route's next hop

    def _plan_of(self, subnet: IPv4Network) -> PeerPlan | None:
        """The entries a wanted peer needs (the plan its add computed: same lease, same route kind)."""
        lease = self._wanted.get(subnet)
        return None if lease is None else peer_plan(lease, subnet in self._direct)

    def mtu(self) -> int:
        return self.spec.mtu

    def _new_device_mac(self) -> str:
        """Stable across reboots where the host has a machine-id, else random as flanneld."""
        try:
            with open(MACHINE_ID_FILE) as f:
                machine_id = f.read().strip()
        except OSError:
            machine_id = ""
        if not machine_id:
            return random_vtep_mac()
        public = self.ext.public_ipv6 if self.family == socket.AF_INET6 else self.ext.public_ip
        return stable_vtep_mac(machine_id, public, self.spec.vni)  # type: ignore[arg-type]

    async def prepare(self) -> LeaseData:
        index, mac, created = await self.netlink.rtnl_call(_ensure_device, self.spec, self._new_device_mac())
        self.index, self.mac = index, mac
        self._created_now = created
        if self.netlink.netns is None:
            _set_accept_ra_off(self.spec.name)
        log.info("%s device %s (vni %d, port %d, mtu %d, mac %s)",
                 "created" if created else "reusing", self.spec.name, self.spec.vni,
                 self.spec.port, self.spec.mtu, mac)
        v6_data = None
        if self.v6 is not None:
            v6_data = (await self.v6.prepare()).backend_data  # BackendV6Data: the same shape
        return LeaseData("vxlan", {"VNI": self.spec.vni, "VtepMAC": mac}, v6_data)

    async def abandon(self) -> None:
        if self.v6 is not None:
            await self.v6.abandon()
        # Start-up failed: a device we made in this run, never advertised, must not linger.
        if getattr(self, "_created_now", False) and self.index is not None:
            index = self.index
            await self.netlink.rtnl_call(lambda dumps: _ignore(
                _GONE, lambda: dumps.change(rtnl.link_delete_request(index), f"deleting {self.spec.name}")))
            log.info("removed %s: start-up did not complete", self.spec.name)
            self.index = None

    def _need_device(self) -> int:
        if self.index is None:
            raise RuntimeError("VxlanBackend.prepare() must run before start()/apply()")
        return self.index

    async def start(self, lease: Lease) -> None:
        if self.v6 is not None:
            own6 = self.v6.lease_view(lease)
            if own6 is None:
                raise FlannelError(f"EnableIPv6: our lease {lease.key} has no IPv6 subnet")
            await self.v6.start(own6)
        self._own_base = lease.subnet.network_address
        await self.netlink.rtnl_call(_configure_address, self._need_device(), lease.subnet.network_address,
                                     self.network)

    async def _is_direct(self, lease: Lease) -> bool:
        if not self.direct_routing:
            return False
        try:
            hops = await self.netlink.rtnl_call(route_get_hops, lease.attrs.public_ip)
        except OSError as exc:
            log.warning("peer %s: no route to %s (%s); using vxlan, not a direct route",
                        lease.subnet, lease.attrs.public_ip, _reason(exc))
            return False
        return is_on_link([gw for _oif, gw in hops])

    # --- per event: O(1) each, one kernel batch per apply ---------------------------------

    async def apply(self, events: Sequence[LeaseEvent]) -> None:
        """Program a batch of events with one round of netlink requests (hostnet.rtnl.transact:
        many per send) instead of three request/ACK round trips per peer."""
        index = self._need_device()
        if self.v6 is not None:
            await self.v6.apply(self.v6._view_events(events))
        async with self._lock:
            # A round per APPLY_CHUNK events: a 1000-peer start no longer holds all its ~3000
            # requests at once (their short-lived objects set the RSS high-water mark).  Rounds
            # overlap: while the kernel takes one (on the netlink thread), this thread plans the
            # next and records the one before; the kernel still sees them in order.
            # A start's thousands of peers are one line (each peer's at -v=1); a join or leave
            # keeps its own line.
            quiet = len(events) > PEER_LINES_MAX
            programmed = removed = 0
            in_kernel: tuple[list[_Group], PendingCall[list[int]]] | None = None
            try:
                # One round more than the events fill, empty: it records the last one.
                for first in range(0, len(events) + APPLY_CHUNK, APPLY_CHUNK):
                    groups = await self._queue_round(index, events[first:first + APPLY_CHUNK])
                    requests = [req for g in groups for _what, req in g.steps]
                    done, in_kernel = in_kernel, None
                    if requests:
                        in_kernel = (groups, self.netlink.rtnl_submit(KernelDumps.transact, requests))
                    if done is not None:
                        added, gone = await self._settle(index, done[0], await done[1].result(), groups, quiet)
                        programmed += added
                        removed += gone
            finally:
                if in_kernel is not None:  # interrupted: the round still reaches the kernel
                    await in_kernel[1].result()
            if quiet:
                log.info("%s: %d lease events applied: %d peers programmed, %d removed%s", self.spec.name,
                         len(events), programmed, removed,
                         f", {len(self._failed)} not programmed (retrying)" if self._failed else "")

    async def _queue_round(self, index: int, events: Sequence[LeaseEvent]) -> list[_Group]:
        """Record the events' leases as wanted and make their requests (sent by apply)."""
        groups: list[_Group] = []
        for event in events:
            lease = event.lease
            if not self.accepts(lease):
                log.info("ignoring lease %s: backend type %r is not vxlan", lease.subnet, lease.attrs.backend_type)
                continue
            if event.kind is EventKind.ADDED:
                await self._queue_add(index, lease, groups)
            else:
                await self._queue_remove(index, lease, groups)
        return groups

    def _hold(self, subnet: IPv4Network, lease: Lease | None, plan: PeerPlan | None) -> PeerPlan | None:
        """Record `lease` and its `plan` (None: forget) as the subnet's wanted peer; returns the
        old plan."""
        old = self._plan_of(subnet)
        self._wanted.pop(subnet, None)
        self._direct.discard(subnet)
        if old is not None and old.fdb is not None:
            holders = self._mac_holders.get(old.fdb.mac, 0) - 1
            if holders > 0:
                self._mac_holders[old.fdb.mac] = holders
            else:
                self._mac_holders.pop(old.fdb.mac, None)
        if lease is not None and plan is not None:
            self._wanted[subnet] = lease
            if plan.direct:
                self._direct.add(subnet)
            if plan.fdb is not None:
                self._mac_holders[plan.fdb.mac] = self._mac_holders.get(plan.fdb.mac, 0) + 1
        else:
            self._failed.pop(subnet, None)
        return old

    def _mark_failed(self, subnet: IPv4Network, reason: str) -> None:
        if self._failed.get(subnet) != reason:  # once per peer and reason, not once per pass
            log.error("peer %s (%s) not programmed: %s; retrying every %gs",
                      subnet, self._public_of(subnet), reason, self.loop.interval)
        self._failed[subnet] = reason

    def _mark_ok(self, subnet: IPv4Network) -> None:
        if self._failed.pop(subnet, None) is not None:
            log.info("peer %s (%s) programmed after earlier failure", subnet, self._public_of(subnet))

    async def _queue_add(self, index: int, lease: Lease, groups: list[_Group]) -> None:
        try:
            plan = peer_plan(lease, await self._is_direct(lease))
        except ValueError as exc:
            log.error("ignoring lease %s: %s", lease.subnet, exc)
            await self._queue_remove(index, lease, groups)
            return
        old = self._hold(lease.subnet, lease, plan)
        if plan.fdb is not None:
            self._echoes.expect((plan.fdb.mac.lower(), False))
        groups.append(_Group("add", lease.subnet, plan, _plan_requests(index, plan, True, True)))
        if old is not None:
            stale = stale_entries(old, plan)
            if stale is not None:
                stale = self._spare_shared_fdb(stale, own_holds=0)  # the old plan's hold is gone
            if stale is not None and (stale.fdb is not None or stale.neigh is not None):
                if stale.fdb is not None:
                    self._echoes.expect((stale.fdb.mac.lower(), True))
                groups.append(_Group("stale", lease.subnet, stale, _plan_requests(index, stale, False, False)))

    async def _queue_remove(self, index: int, lease: Lease, groups: list[_Group]) -> None:
        plan = self._hold(lease.subnet, None, None)
        if plan is None:
            # Not programmed by this process (e.g. learned before a restart): remove what
            # flanneld would have installed for it.
            try:
                plan = peer_plan(lease, await self._is_direct(lease))
            except ValueError as exc:
                log.error("cannot work out entries of removed lease %s: %s", lease.subnet, exc)
                return
        plan = self._spare_shared_fdb(plan, own_holds=0)  # its hold is gone
        if plan.fdb is not None:
            self._echoes.expect((plan.fdb.mac.lower(), True))
        groups.append(_Group("remove", lease.subnet, plan, _plan_requests(index, plan, False, True)))

    async def _settle(self, index: int, groups: list[_Group], codes: list[int], later: list[_Group],
                      quiet: bool) -> tuple[int, int]:
        """Record what each group's requests did; (peers programmed, peers removed).  A peer whose
        add failed in part has the parts that worked undone (as flanneld's order of steps would
        never have left them), unless the `later` round, already sent to the kernel, is about its
        subnet again: that round's entries are the ones that count.  `quiet` (a bulk apply): each
        peer's line is a debug line."""
        peer_level = logging.DEBUG if quiet else logging.INFO
        peer_lines = log.isEnabledFor(peer_level)
        programmed = removed = 0
        requeued: set[IPNetwork] | None = None  # the later round's subnets, made at a first failure
        at = 0
        undo: list[rtnl.Request] = []
        for g in groups:
            mine = codes[at:at + len(g.steps)]
            at += len(g.steps)
            if g.role == "add":
                failed = next((c for c in mine if c), 0)
                if not failed:
                    self._mark_ok(g.subnet)
                    programmed += 1
                    if peer_lines:
                        log.log(peer_level, "peer %s: %s", g.subnet, _describe(g.plan))
                    continue
                if requeued is None:
                    requeued = {later_group.subnet for later_group in later}
                if g.subnet not in requeued:
                    done = {what for (what, _r), c in zip(g.steps, mine) if not c}
                    # Its own hold on the MAC counts: more than one means another lease's.
                    plan = self._spare_shared_fdb(g.plan, own_holds=1)
                    undo.extend(req for what, req in reversed(_plan_requests(index, plan, False, True))
                                if what in done)
                if g.subnet in self._wanted:
                    self._mark_failed(g.subnet, os.strerror(failed))
                    # The loop may be waiting out its quiet interval: let it switch to retrying.
                    self.loop.wake()
                continue
            for (what, _r), c in zip(g.steps, mine):
                if c and c not in _GONE:
                    verb = "removing peer" if g.role == "remove" else "removing stale entry for"
                    log.warning("%s %s: %s: %s", verb, g.subnet, _step_text(what), os.strerror(c))
            if g.role == "remove":
                removed += 1
                if peer_lines:
                    log.log(peer_level, "peer %s removed", g.subnet)
        if undo:
            for c in await self.netlink.rtnl_call(KernelDumps.transact, undo):
                if c and c not in _GONE:
                    log.warning("rollback step failed: %s", os.strerror(c))
        return programmed, removed

    def _spare_shared_fdb(self, plan: PeerPlan, own_holds: int) -> PeerPlan:
        """`plan` without its FDB entry when another accepted lease uses that MAC (more holds on
        it than `own_holds`, those of the plan's own lease): removing the entry would cut that
        lease off."""
        if plan.fdb is not None and self._mac_holders.get(plan.fdb.mac, 0) > own_holds:
            return PeerPlan(plan.route, plan.neigh, None)
        return plan

    # --- reconciliation ------------------------------------------------------------------

    def peers_synced(self) -> None:
        self._synced = True
        self.loop.wake()
        if self.v6 is not None:
            self.v6.peers_synced()

    def _notice(self, change: KernelChange) -> bool:
        if (change.kind == "neigh" and change.family == socket.AF_BRIDGE and change.sender == 0
                and change.ifindex == self.index and change.lladdr is not None
                and self._echoes.consume((change.lladdr, change.deleted))):
            return False  # the announcement of our own FDB change
        matters = change_matters(change, device_index=self.index, device=self.spec.name,
                                 underlay_index=self.ext.index, network=self.network, family=self.family)
        if matters and change.kind == "link" and change.deleted and change.ifindex == self.index:
            self._device_problem = f"{self.spec.name} missing, re-creating"
        return matters

    async def reconcile_once(self) -> RepairReport:
        """Make the kernel match the accepted leases now (see the module docstring)."""
        if self.mac is None or self._own_base is None:
            return RepairReport(checked=False)  # before start(): nothing is ours yet
        async with self._lock:
            synced = self._synced
            # The accepted leases themselves, not a copy (a pair per peer): apply, their only
            # writer, waits for the lock, so they do not change while the netlink thread reads them.
            index, report = await self.netlink.rtnl_call(
                _reconcile, self.spec, self.mac, self._own_base, self.network, self._wanted,
                frozenset(self._direct), synced)
            if index is not None:
                self.index = index
            self._device_problem = report.device_error
            peers = len(self._wanted)
            if report.checked:
                for subnet in self._wanted:
                    if subnet in report.failures:
                        self._mark_failed(subnet, report.failures[subnet])
                    else:
                        self._mark_ok(subnet)
        self._count(report)
        if report.checked and synced and not self._checked_synced:
            # Once: from here on the kernel holds what the peer set wants (or the errors say why not).
            self._checked_synced = True
            log.info("%s: first kernel check with the whole peer set: %d peers, %s", self.spec.name, peers,
                     "repaired" if report.changed else "nothing to repair")
        if report.device_error:
            log.error("%s", report.device_error)
        if report.changed:
            log.warning("kernel repair on %s: %s", self.spec.name, report.summary())
        for err in report.errors:
            log.warning("kernel repair: could not remove %s", err)
        return report

    def _count(self, report: RepairReport) -> None:
        def bump(key: str, n: int) -> None:
            if n:
                self.repairs[key] = self.repairs.get(key, 0) + n
        bump("device", 1 if report.device else 0)
        for verb, items in (("restored", report.added), ("removed", report.removed)):
            for item in items:
                bump(f"{item.split(' ', 1)[0]}_{verb}", 1)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.v6 is None:
            await self.loop.run(task_status=task_status)
            return
        async with trio.open_nursery() as nursery:
            await nursery.start(self.v6.run)
            await self.loop.run(task_status=task_status)


def _describe(plan: PeerPlan) -> str:
    if plan.direct:
        return f"direct route via {plan.route.gateway}"
    assert plan.neigh is not None and plan.fdb is not None
    return f"vtep {plan.fdb.mac} at {plan.fdb.dst}, route via {plan.route.gateway} onlink"


BACKEND = VxlanBackend
