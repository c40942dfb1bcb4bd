"""What the host's own network looks like, read once at start: the ranges a peer lease must never claim.

Lease admission (subnet/admission.py) refuses a peer subnet that overlaps a network this host is
connected to, or that contains one of its addresses or the gateway of one of its routes: routing
such a subnet into the overlay would cut the host off its own underlay (the issue-12 hijack, where
a lease at the underlay's subnet replaced the connected route and etcd became unreachable).
Flannel's own devices (`flannel.<VNI>`, `flannel0`, ...) are not underlay and are left out.
"""

from __future__ import annotations

import socket
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, NamedTuple

from .netlink import KernelDumps, NetlinkThread

FLANNEL_DEVICE_PREFIX = "flannel"  # flannel.<VNI>, flannel0, flannel-wg, flannel.ipip
_MAIN_TABLE = 254
_SCOPE_LINK = 253
_RTN_UNICAST = 1  # not local/broadcast/multicast/unreachable routes


class Underlay(NamedTuple):
    """The host's networks outside flannel's devices (plain values, so admission stays pure); the *6 fields
    are the IPv6 side, which dual-stack admission protects the same way."""

    connected: tuple[tuple[IPv4Network, str], ...] = ()  # on-link networks and their device
    addresses: tuple[tuple[IPv4Address, str], ...] = ()  # the host's addresses and their device
    gateways: tuple[tuple[IPv4Address, IPv4Network], ...] = ()  # next hops and the route they serve
    connected6: tuple[tuple[IPv6Network, str], ...] = ()
    addresses6: tuple[tuple[IPv6Address, str], ...] = ()
    gateways6: tuple[tuple[IPv6Address, IPv6Network], ...] = ()


def _is_flannel(name: str | None) -> bool:
    return bool(name) and name.startswith(FLANNEL_DEVICE_PREFIX)  # type: ignore[union-attr]


def _read_family(dumps: KernelDumps, names: dict[int, str], family: int) -> tuple[tuple, tuple, tuple]:
    """(connected, addresses, gateways) of one address family."""
    v6 = family == socket.AF_INET6
    address, network = (IPv6Address, IPv6Network) if v6 else (IPv4Address, IPv4Network)
    host_len = 128 if v6 else 32
    connected: dict = {}
    addresses: list = []
    for a in dumps.addresses(family):
        name = names.get(a.index, "?")
        if _is_flannel(name):
            continue
        local = a.local or a.address
        if not local:
            continue
        addresses.append((address(local), name))
        net = network((address(local), a.prefixlen), strict=False)
        if net.prefixlen < host_len:
            connected.setdefault(net, name)
    gateways: list = []
    for r in dumps.all_routes(family):
        if r.table != _MAIN_TABLE:
            continue
        name = names.get(r.oif or 0, "")
        dst = network((address(r.dst) if r.dst else address(0), r.dst_len))
        hops = [(r.gateway, name), *((gw, names.get(oif, "")) for gw, oif in r.multipath)]
        for gateway, dev in hops:
            if _is_flannel(dev):
                continue
            if gateway:
                gateways.append((address(gateway), dst))
            elif dst.prefixlen > 0 and (r.type == _RTN_UNICAST if v6 else r.scope == _SCOPE_LINK):
                # IPv6 on-link routes have scope universe (the kernel never gives them scope link);
                # the main table's ff00::/8 is type multicast
                connected.setdefault(dst, dev or "?")
    return tuple(connected.items()), tuple(addresses), tuple(gateways)


def read_underlay(dumps: KernelDumps | Any) -> Underlay:
    """Dump devices, addresses and main-table routes of both families (runs on the netlink
    thread).  Given pyroute2's IPRoute instead (tools, tests), reads its namespace the same way."""
    if not isinstance(dumps, KernelDumps):
        own = KernelDumps(dumps.status.get("netns"))
        try:
            return read_underlay(own)
        finally:
            own.close()
    names = {link.index: link.name for link in dumps.links()}
    connected, addresses, gateways = _read_family(dumps, names, socket.AF_INET)
    connected6, addresses6, gateways6 = _read_family(dumps, names, socket.AF_INET6)
    return Underlay(connected=connected, addresses=addresses, gateways=gateways,
                    connected6=connected6, addresses6=addresses6, gateways6=gateways6)


async def read_host_underlay(netlink: NetlinkThread) -> Underlay:
    """`read_underlay` through the agent's netlink thread."""
    return await netlink.rtnl_call(read_underlay)
