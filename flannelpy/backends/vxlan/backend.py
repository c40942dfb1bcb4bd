"""The vxlan backend: a `flannel.<VNI>` VXLAN device plus, per peer, a permanent ARP entry,
a permanent FDB entry and an onlink route, exactly as flanneld programs them (so mixed
clusters of flanneld and flannelpy nodes interoperate).

What to program is decided in flannelpy.backends.vxlan.plan; this module only performs it, on the
netlink thread.  Kernel state is kept on shutdown so a restart does not cut traffic.
"""

from __future__ import annotations

import errno
import logging
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Callable, Sequence

from pyroute2.netlink.exceptions import NetlinkError

from flannelpy.backends.base import Backend, ExternalInterface, LeaseData
from flannelpy.config.network import NetworkConfig
from flannelpy.errors import ConfigError, FlannelError
from flannelpy.hostnet.interface import route_get_hops
from flannelpy.hostnet.netlink import NetlinkThread
from flannelpy.subnet.lease import EventKind, Lease, LeaseEvent

from .plan import (
    VXLAN_DEFAULT_PORT,
    VXLAN_OVERHEAD,
    Fdb,
    Neigh,
    PeerPlan,
    Route,
    VxlanDeviceFacts,
    VxlanDeviceSpec,
    addresses_to_remove,
    device_name,
    incompatibilities,
    is_on_link,
    peer_plan,
    random_vtep_mac,
    stale_entries,
)

log = logging.getLogger(__name__)

NUD_PERMANENT = 0x80
NTF_SELF = 0x02
RTNH_F_ONLINK = 0x04
# vishvananda/netlink's default route protocol; `ip route` hides "proto boot", so our
# routes print exactly like flanneld's.
RTPROT_BOOT = 3
MIN_DEVICE_MTU = 68


# --- netlink-thread functions: fn(ipr, ...) ------------------------------------------------


def _ignore(codes: tuple[int, ...], fn: Callable[[], Any]) -> None:
    try:
        fn()
    except NetlinkError as exc:
        if exc.code not in codes:
            raise


def _read_device(ipr: Any, name: str) -> tuple[int, VxlanDeviceFacts] | None:
    found = ipr.link_lookup(ifname=name)
    if not found:
        return None
    msg = ipr.get_links(found[0])[0]
    info = msg.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
    mac = msg.get_attr("IFLA_ADDRESS")
    if kind != "vxlan" or data is None:
        return found[0], VxlanDeviceFacts(kind or "", None, None, None, None, False, False, mac)
    local = data.get_attr("IFLA_VXLAN_LOCAL")
    return found[0], VxlanDeviceFacts(
        kind="vxlan",
        vni=data.get_attr("IFLA_VXLAN_ID"),
        vtep_index=data.get_attr("IFLA_VXLAN_LINK"),
        local=IPv4Address(local) if local else None,
        port=data.get_attr("IFLA_VXLAN_PORT"),
        gbp=bool(data.get_attr("IFLA_VXLAN_GBP")),
        learning=bool(data.get_attr("IFLA_VXLAN_LEARNING")),
        mac=mac.lower() if mac else None,
    )


def _link_mac(ipr: Any, index: int) -> str:
    return ipr.get_links(index)[0].get_attr("IFLA_ADDRESS").lower()


def _ensure_device(ipr: Any, spec: VxlanDeviceSpec, new_mac: str) -> tuple[int, str, bool]:
    """Reuse a compatible device (keeping its MAC) or (re)create it with new_mac; bring it
    up and check its MAC.  Returns (ifindex, mac, created)."""
    existing = _read_device(ipr, spec.name)
    if existing is not None:
        index, facts = existing
        reasons = incompatibilities(spec, facts)
        if not reasons:
            ipr.link("set", index=index, mtu=spec.mtu)
            ipr.link("set", index=index, state="up")
            return index, _link_mac(ipr, index), False
        log.warning("%s exists but is incompatible (%s); recreating it", spec.name, "; ".join(reasons))
        ipr.link("del", index=index)
    kwargs: dict[str, Any] = dict(
        ifname=spec.name,
        kind="vxlan",
        vxlan_id=spec.vni,
        vxlan_link=spec.vtep_index,
        vxlan_local=str(spec.local),
        vxlan_port=spec.port,
        vxlan_learning=1 if spec.learning else 0,
        address=new_mac,  # set at creation so udev/systemd cannot pick another
        mtu=spec.mtu,
    )
    if spec.gbp:
        kwargs["vxlan_gbp"] = True
    try:
        ipr.link("add", **kwargs)
    except NetlinkError as exc:
        raise FlannelError(f"creating vxlan device {spec.name} (vni {spec.vni}, port {spec.port}, "
                           f"local {spec.local}): {exc}") from None
    index = ipr.link_lookup(ifname=spec.name)[0]
    try:
        ipr.link("set", index=index, state="up")
        mac = _link_mac(ipr, index)
        if mac != new_mac:
            # Something (udev MACAddressPolicy) changed it after creation: put ours back,
            # since the MAC we advertise must be the one the device answers to.
            log.warning("%s came up with MAC %s instead of %s; setting it back", spec.name, mac, new_mac)
            ipr.link("set", index=index, address=new_mac)
            mac = _link_mac(ipr, index)
            if mac != new_mac:
                raise FlannelError(f"{spec.name}: MAC is {mac} after bring-up, expected {new_mac}")
    except Exception:
        # Never leave a half-configured device behind.
        _ignore((errno.ENODEV,), lambda: ipr.link("del", index=index))
        raise
    return index, mac, True


def _configure_address(ipr: Any, index: int, base: IPv4Address, network: IPv4Network) -> None:
    have = [
        (IPv4Address(m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")), m["prefixlen"])
        for m in ipr.get_addr(index=index, family=2)
    ]
    for ip, plen in addresses_to_remove(have, base, network):
        log.info("removing stale address %s/%d from vxlan device", ip, plen)
        _ignore((errno.EADDRNOTAVAIL,), lambda: ipr.addr("del", index=index, address=str(ip), prefixlen=plen))
    if (base, 32) not in have:
        _ignore((errno.EEXIST,), lambda: ipr.addr("add", index=index, address=str(base), prefixlen=32))
    ipr.link("set", index=index, state="up")


def _neigh(ipr: Any, cmd: str, index: int, n: Neigh) -> None:
    ipr.neigh(cmd, dst=str(n.ip), lladdr=n.mac, ifindex=index, state=NUD_PERMANENT)


def _fdb(ipr: Any, cmd: str, index: int, f: Fdb) -> None:
    ipr.fdb(cmd, ifindex=index, lladdr=f.mac, dst=str(f.dst), state=NUD_PERMANENT, flags=NTF_SELF)


def _route(ipr: Any, cmd: str, index: int, r: Route) -> None:
    if r.on_vxlan:
        ipr.route(cmd, dst=str(r.dst), gateway=str(r.gateway), oif=index,
                  flags=RTNH_F_ONLINK, proto=RTPROT_BOOT)
    else:
        ipr.route(cmd, dst=str(r.dst), gateway=str(r.gateway), proto=RTPROT_BOOT)


_GONE = (errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL, errno.ENODEV)


def _program(ipr: Any, index: int, plan: PeerPlan) -> None:
    """neigh, FDB, route in flanneld's order; on failure undo what was done and re-raise."""
    steps: list[tuple[Callable[[], None], Callable[[], None]]] = []
    if plan.neigh is not None:
        n = plan.neigh
        steps.append((lambda: _neigh(ipr, "replace", index, n), lambda: _neigh(ipr, "del", index, n)))
    if plan.fdb is not None:
        f = plan.fdb
        steps.append((lambda: _fdb(ipr, "replace", index, f), lambda: _fdb(ipr, "del", index, f)))
    steps.append((lambda: _route(ipr, "replace", index, plan.route),
                  lambda: _route(ipr, "del", index, plan.route)))
    done: list[Callable[[], None]] = []
    for do, undo in steps:
        try:
            do()
        except Exception:
            for u in reversed(done):
                try:
                    u()
                except NetlinkError as exc:
                    log.warning("rollback step failed: %s", exc)
            raise
        done.append(undo)


def _unprogram(ipr: Any, index: int, plan: PeerPlan, with_route: bool = True) -> list[str]:
    """Delete the plan's entries, carrying on past failures; returns the failures."""
    errors = []
    actions: list[tuple[str, Callable[[], None]]] = []
    if plan.neigh is not None:
        n = plan.neigh
        actions.append((f"neigh {n.ip}", lambda: _neigh(ipr, "del", index, n)))
    if plan.fdb is not None:
        f = plan.fdb
        actions.append((f"fdb {f.mac} dst {f.dst}", lambda: _fdb(ipr, "del", index, f)))
    if with_route:
        actions.append((f"route {plan.route.dst}", lambda: _route(ipr, "del", index, plan.route)))
    for what, action in actions:
        try:
            action()
        except NetlinkError as exc:
            if exc.code not in _GONE:
                errors.append(f"{what}: {exc}")
    return errors


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

    def __init__(self, ext: ExternalInterface, config: NetworkConfig, netlink: NetlinkThread) -> None:
        super().__init__(ext, config, netlink)
        vni = config.backend_option("VNI", int, 1)
        if not 0 <= vni < (1 << 24):
            raise ConfigError(f"Backend.VNI: {vni} is not a VXLAN id (0..16777215)")
        port = config.backend_option("Port", int, 0)
        if not 0 <= port <= 65535:
            raise ConfigError(f"Backend.Port: {port} is not a UDP port (0..65535)")
        underlay_mtu = config.backend_option("MTU", int, 0) or ext.mtu
        device_mtu = underlay_mtu - VXLAN_OVERHEAD
        if device_mtu < MIN_DEVICE_MTU:
            raise ConfigError(f"Backend.MTU: {underlay_mtu} leaves {device_mtu} for {device_name(vni)}; "
                              f"need at least {MIN_DEVICE_MTU + VXLAN_OVERHEAD}")
        self.direct_routing: bool = config.backend_option("DirectRouting", bool, False)
        self.spec = VxlanDeviceSpec(
            name=device_name(vni),
            vni=vni,
            vtep_index=ext.index,
            local=ext.ip,
            port=port or VXLAN_DEFAULT_PORT,
            gbp=config.backend_option("GBP", bool, False),
            learning=config.backend_option("Learning", bool, False),
            mtu=device_mtu,
        )
        self.index: int | None = None
        self.mac: str | None = None
        self._programmed: dict[IPv4Network, PeerPlan] = {}

    @property
    def programmed_peers(self) -> int:
        return len(self._programmed)

    def mtu(self) -> int:
        return self.spec.mtu

    async def prepare(self) -> LeaseData:
        index, mac, created = await self.netlink.call(_ensure_device, self.spec, random_vtep_mac())
        self.index, self.mac = index, mac
        self._created_now = created
        if getattr(self.netlink, "_netns", None) is None:
            _set_accept_ra_off(self.spec.name)
        log.info("%s device %s (vni %d, port %d, mtu %d, mac %s)",
                 "created" if created else "reusing", self.spec.name, self.spec.vni,
                 self.spec.port, self.spec.mtu, mac)
        return LeaseData("vxlan", {"VNI": self.spec.vni, "VtepMAC": mac})

    async def abandon(self) -> None:
        # Start-up failed: a device we made in this run, never advertised, must not linger.
        if getattr(self, "_created_now", False) and self.index is not None:
            index = self.index
            await self.netlink.call(lambda ipr: _ignore(_GONE, lambda: ipr.link("del", index=index)))
            log.info("removed %s: start-up did not complete", self.spec.name)
            self.index = None

    def _need_device(self) -> int:
        if self.index is None:
            raise RuntimeError("VxlanBackend.prepare() must run before start()/apply()")
        return self.index

    async def start(self, lease: Lease) -> None:
        await self.netlink.call(_configure_address, self._need_device(),
                                lease.subnet.network_address, self.config.network)

    async def _is_direct(self, lease: Lease) -> bool:
        if not self.direct_routing:
            return False
        hops = await self.netlink.call(route_get_hops, lease.attrs.public_ip)
        return is_on_link([gw for _oif, gw in hops])

    async def apply(self, events: Sequence[LeaseEvent]) -> None:
        index = self._need_device()
        for event in events:
            lease = event.lease
            if not self.accepts(lease):
                log.info("ignoring lease %s: backend type %r is not vxlan",
                         lease.subnet, lease.attrs.backend_type)
                continue
            if event.kind is EventKind.ADDED:
                await self._add(index, lease)
            else:
                await self._remove(index, lease)

    async def _add(self, index: int, lease: Lease) -> None:
        try:
            plan = peer_plan(lease, await self._is_direct(lease))
        except (ValueError, FlannelError, NetlinkError) as exc:
            log.error("ignoring lease %s: %s", lease.subnet, exc)
            return
        old = self._programmed.get(lease.subnet)
        try:
            await self.netlink.call(_program, index, plan)
        except NetlinkError as exc:
            log.error("programming peer %s (%s) failed, rolled back: %s",
                      lease.subnet, lease.attrs.public_ip, exc)
            # Rollback deleted entries this lease shared with the old plan; forget it so a
            # later REMOVED does not chase them.
            self._programmed.pop(lease.subnet, None)
            return
        self._programmed[lease.subnet] = plan
        if old is not None:
            stale = stale_entries(old, plan)
            if stale is not None:
                errors = await self.netlink.call(_unprogram, index, stale, False)
                for err in errors:
                    log.warning("removing stale entry for %s: %s", lease.subnet, err)
        log.info("peer %s: %s", lease.subnet, _describe(plan))

    async def _remove(self, index: int, lease: Lease) -> None:
        plan = self._programmed.pop(lease.subnet, None)
        if plan is None:
            # Not programmed by this process (e.g. learned before a restart): remove what
            # flanneld would have installed for it.
            try:
                plan = peer_plan(lease, await self._is_direct(lease))
            except (ValueError, FlannelError, NetlinkError) as exc:
                log.error("cannot work out entries of removed lease %s: %s", lease.subnet, exc)
                return
        errors = await self.netlink.call(_unprogram, index, plan, True)
        for err in errors:
            log.warning("removing peer %s: %s", lease.subnet, err)
        log.info("peer %s removed", lease.subnet)


def _describe(plan: PeerPlan) -> str:
    if plan.direct:
        return f"direct route via {plan.route.gateway}"
    assert plan.neigh is not None and plan.fdb is not None
    return f"vtep {plan.fdb.mac} at {plan.fdb.dst}, route via {plan.route.gateway} onlink"


BACKEND = VxlanBackend
