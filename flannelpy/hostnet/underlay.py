"""What the host's own network looks like, read once at start: the ranges a peer lease must never claim.

Lease admission (subnet/admission.py) refuses a peer subnet that overlaps a network this host is
connected to, or that contains one of its addresses or the gateway of one of its routes: routing
such a subnet into the overlay would cut the host off its own underlay (the issue-12 hijack, where
a lease at the underlay's subnet replaced the connected route and etcd became unreachable).
Flannel's own devices (`flannel.<VNI>`, `flannel0`, ...) are not underlay and are left out.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from .netlink import NetlinkThread

FLANNEL_DEVICE_PREFIX = "flannel"  # flannel.<VNI>, flannel0, flannel-wg, flannel.ipip
_MAIN_TABLE = 254
_SCOPE_LINK = 253


@dataclass(frozen=True)
class Underlay:
    """The host's IPv4 networks outside flannel's devices (plain values, so admission stays pure)."""

    connected: tuple[tuple[IPv4Network, str], ...] = ()  # on-link networks and their device
    addresses: tuple[tuple[IPv4Address, str], ...] = ()  # the host's addresses and their device
    gateways: tuple[tuple[IPv4Address, IPv4Network], ...] = ()  # next hops and the route they serve


def _is_flannel(name: str | None) -> bool:
    return bool(name) and name.startswith(FLANNEL_DEVICE_PREFIX)  # type: ignore[union-attr]


def read_underlay(ipr: Any) -> Underlay:
    """Dump addresses and main-table routes (runs on the netlink thread)."""
    names = {msg["index"]: msg.get_attr("IFLA_IFNAME") for msg in ipr.get_links()}
    connected: dict[IPv4Network, str] = {}
    addresses: list[tuple[IPv4Address, str]] = []
    for msg in ipr.get_addr(family=socket.AF_INET):
        name = names.get(msg["index"], "?")
        if _is_flannel(name):
            continue
        local = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        if not local:
            continue
        addresses.append((IPv4Address(local), name))
        net = IPv4Network(f"{local}/{msg['prefixlen']}", strict=False)
        if net.prefixlen < 32:
            connected.setdefault(net, name)
    gateways: list[tuple[IPv4Address, IPv4Network]] = []
    for msg in ipr.get_routes(family=socket.AF_INET, table=_MAIN_TABLE):
        if (msg.get_attr("RTA_TABLE") or msg["table"]) != _MAIN_TABLE:
            continue
        name = names.get(msg.get_attr("RTA_OIF"), "")
        dst = IPv4Network(f"{msg.get_attr('RTA_DST') or '0.0.0.0'}/{msg['dst_len']}")
        hops = [(msg.get_attr("RTA_GATEWAY"), name)]
        for nh in msg.get_attr("RTA_MULTIPATH") or ():
            hops.append((nh.get_attr("RTA_GATEWAY"), names.get(nh["oif"], "")))
        for gateway, dev in hops:
            if _is_flannel(dev):
                continue
            if gateway:
                gateways.append((IPv4Address(gateway), dst))
            elif msg["scope"] == _SCOPE_LINK and dst.prefixlen > 0:
                connected.setdefault(dst, dev or "?")
    return Underlay(connected=tuple(connected.items()), addresses=tuple(addresses), gateways=tuple(gateways))


async def read_host_underlay(netlink: NetlinkThread) -> Underlay:
    """`read_underlay` through the agent's netlink thread."""
    return await netlink.call(read_underlay)
