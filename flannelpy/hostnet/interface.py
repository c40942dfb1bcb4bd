"""Choosing the external (underlay) interface: -iface, -iface-regex, -iface-can-reach, -public-ip,
and with EnableIPv6 its IPv6 address (-public-ipv6 or the interface's first global one, as flanneld).

The kernel is read once, through the netlink thread, into a plain HostSnapshot; the
choice itself (choose_interface) is pure so every flag combination is unit-testable.
Order and matching follow flanneld: each -iface (a name or an IP) in turn, then each
-iface-regex (against addresses first, then names); only when neither flag is given,
-iface-can-reach, else the interface of the default route.
"""

from __future__ import annotations

import errno
import logging
import re
import socket
from ipaddress import IPv4Address, IPv4Network, IPv6Address, ip_address
from typing import Any, NamedTuple

from flannelpy.errors import FlannelError

from .netlink import MAIN_TABLE, KernelDumps, NetlinkThread

log = logging.getLogger(__name__)

# Every VirtualBox/Vagrant NAT interface has this address; nodes choosing it all
# advertise the same PublicIP and end up sharing one lease (flannel#51).
VAGRANT_NAT_IP = IPv4Address("10.0.2.15")
_LINK_LOCAL = IPv4Network("169.254.0.0/16")


class ExternalInterface(NamedTuple):
    """The underlay interface flannel sends over (flanneld's ExtIface)."""

    name: str
    index: int
    ip: IPv4Address  # the interface's own address (flanneld: IfaceAddr)
    public_ip: IPv4Address  # advertised to peers; -public-ip or the interface address
    mtu: int
    # EnableIPv6 only: the interface's IPv6 address (flanneld: IfaceV6Addr) and the one advertised
    # as PublicIPv6 (-public-ipv6 or that address).
    ip6: IPv6Address | None = None
    public_ipv6: IPv6Address | None = None


class LinkFacts(NamedTuple):
    name: str
    index: int
    mtu: int
    addrs: tuple[IPv4Address, ...]  # IPv4 addresses in kernel order
    addrs6: tuple[IPv6Address, ...] = ()  # IPv6 addresses in kernel order


class HostSnapshot(NamedTuple):
    links: tuple[LinkFacts, ...]
    default_index: int | None = None  # oif of the IPv4 default route in the main table
    # oifs that `ip route get <can_reach>` returned; None when not asked or unreachable
    reach_indexes: tuple[int, ...] | None = None


def _is_global_unicast(ip: IPv4Address) -> bool:
    # Go's net.IP.IsGlobalUnicast for IPv4 (private ranges count as global).
    return not (
        ip.is_loopback or ip.is_multicast or ip.is_unspecified or ip in _LINK_LOCAL
        or ip == IPv4Address("255.255.255.255")
    )


def usable_addresses(link: LinkFacts) -> list[IPv4Address]:
    """flanneld's GetInterfaceIP4Addrs: global unicast first, then link-local; loopback and
    other special addresses never qualify."""
    glob = [a for a in link.addrs if _is_global_unicast(a)]
    ll = [a for a in link.addrs if a in _LINK_LOCAL]
    return glob + ll


def usable_addresses6(link: LinkFacts) -> list[IPv6Address]:
    """flanneld's GetInterfaceIP6Addrs: global unicast first, then link-local."""
    glob = [a for a in link.addrs6 if not (a.is_loopback or a.is_multicast or a.is_unspecified
                                            or a.is_link_local or a.ipv4_mapped is not None)]
    ll = [a for a in link.addrs6 if a.is_link_local]
    return glob + ll


def describe_links(snap: HostSnapshot) -> str:
    """`lo, eth0 (10.0.0.1)` for error messages: what exists to choose from."""
    parts = []
    for link in snap.links:
        addrs = ", ".join(str(a) for a in link.addrs)
        parts.append(f"{link.name} ({addrs})" if addrs else link.name)
    return ", ".join(parts) or "no interfaces"


class InterfaceFlags(NamedTuple):
    """The validated interface flags."""

    ifaces: tuple[str, ...]
    iface_regexes: tuple[re.Pattern[str], ...]
    can_reach: IPv4Address | None
    public_ip: IPv4Address | None
    ipv6: bool = False  # EnableIPv6: the chosen interface needs an IPv6 address too
    public_ipv6: IPv6Address | None = None


def _parse_ipv4(flag: str, text: str) -> IPv4Address:
    try:
        return IPv4Address(text.strip())
    except ValueError:
        raise FlannelError(f"-{flag}={text}: not a valid IPv4 address") from None


def check_flags(
    ifaces: list[str], iface_regexes: list[str], can_reach: str, public_ip: str,
    public_ipv6: str = "", ipv6: bool = False,
) -> InterfaceFlags:
    """Validate the flags before touching the kernel; errors name the flag."""
    patterns = []
    for text in iface_regexes:
        try:
            patterns.append(re.compile(text))
        except re.error as exc:
            raise FlannelError(f"-iface-regex={text}: invalid regular expression: {exc}") from None
    for name in ifaces:
        if not name:
            raise FlannelError("-iface: empty value; give an interface name or IPv4 address")
    return InterfaceFlags(
        ifaces=tuple(ifaces),
        iface_regexes=tuple(patterns),
        can_reach=_parse_ipv4("iface-can-reach", can_reach) if can_reach else None,
        public_ip=_parse_ipv4("public-ip", public_ip) if public_ip else None,
        ipv6=ipv6,
        public_ipv6=_parse_public_ipv6(public_ipv6) if public_ipv6 else None,
    )


def _parse_public_ipv6(text: str) -> IPv6Address:
    try:
        ip = IPv6Address(text.strip())
    except ValueError:
        raise FlannelError(f"-public-ipv6={text}: not a valid IPv6 address") from None
    if ip.is_unspecified or ip.is_loopback or ip.is_multicast or ip.ipv4_mapped is not None:
        raise FlannelError(f"-public-ipv6={text}: not an address peers can reach (unspecified, loopback, "
                           "multicast or IPv4-mapped)")
    return ip


def _with_ip(link: LinkFacts, ip: IPv4Address | None, why: str) -> tuple[LinkFacts, IPv4Address]:
    if ip is None:
        addrs = usable_addresses(link)
        if not addrs:
            raise FlannelError(f"{why}: interface {link.name} has no usable IPv4 address")
        ip = addrs[0]
    if link.mtu <= 0:
        raise FlannelError(f"{why}: failed to determine MTU for interface {link.name}")
    return link, ip


def _match_iface(snap: HostSnapshot, name: str) -> tuple[LinkFacts, IPv4Address]:
    why = f"-iface={name}"
    try:
        ip: IPv4Address | None = IPv4Address(name)
    except ValueError:
        ip = None
    if ip is not None:
        for link in snap.links:
            if ip in usable_addresses(link):
                return _with_ip(link, ip, why)
        raise FlannelError(f"no interface has the address given by {why}")
    for link in snap.links:
        if link.name == name:
            return _with_ip(link, None, why)
    raise FlannelError(f"no interface named {name!r} ({why})")


def _match_regex(snap: HostSnapshot, pattern: re.Pattern[str]) -> tuple[LinkFacts, IPv4Address]:
    why = f"-iface-regex={pattern.pattern}"
    # Go's MatchString is an unanchored search; addresses are tried before names.
    for link in snap.links:
        for ip in usable_addresses(link):
            if pattern.search(str(ip)):
                return _with_ip(link, ip, why)
    for link in snap.links:
        if pattern.search(link.name):
            return _with_ip(link, None, why)
    raise FlannelError(f"{why} matches no interface address or name")


def _by_index(snap: HostSnapshot, index: int) -> LinkFacts | None:
    return next((link for link in snap.links if link.index == index), None)


def choose_interface(snap: HostSnapshot, flags: InterfaceFlags) -> ExternalInterface:
    """Pick the external interface from a snapshot; FlannelError says what was asked and
    what exists when nothing fits."""
    choice: tuple[LinkFacts, IPv4Address] | None = None
    if flags.ifaces or flags.iface_regexes:
        asked: list[str] = []
        for name in flags.ifaces:
            asked.append(f"-iface={name}")
            try:
                choice = _match_iface(snap, name)
                break
            except FlannelError as exc:
                log.warning("%s; trying the next candidate", exc)
        if choice is None:
            for pattern in flags.iface_regexes:
                asked.append(f"-iface-regex={pattern.pattern}")
                try:
                    choice = _match_regex(snap, pattern)
                    break
                except FlannelError as exc:
                    log.warning("%s; trying the next candidate", exc)
        if choice is None:
            raise FlannelError(
                f"no interface matches {', '.join(asked)}; have: {describe_links(snap)}"
            )
        if flags.can_reach is not None:
            log.info("-iface-can-reach=%s ignored because -iface/-iface-regex is given", flags.can_reach)
    elif flags.can_reach is not None:
        why = f"-iface-can-reach={flags.can_reach}"
        if not snap.reach_indexes:
            raise FlannelError(f"{why}: no route to {flags.can_reach}; have: {describe_links(snap)}")
        link = _by_index(snap, snap.reach_indexes[0])
        if link is None:
            raise FlannelError(f"{why}: route uses interface index {snap.reach_indexes[0]}, which is gone")
        choice = _with_ip(link, None, why)
    else:
        why = "default route interface"
        if snap.default_index is None:
            raise FlannelError(
                "no IPv4 default route to pick the interface from; use -iface, -iface-regex "
                f"or -iface-can-reach; have: {describe_links(snap)}"
            )
        link = _by_index(snap, snap.default_index)
        if link is None:
            raise FlannelError(f"default route uses interface index {snap.default_index}, which is gone")
        choice = _with_ip(link, None, why)

    link, ip = choice
    if ip == VAGRANT_NAT_IP:
        log.warning(
            "interface %s has %s, the NAT address every Vagrant/VirtualBox VM shares; nodes "
            "will advertise the same PublicIP and collide; choose another with -iface",
            link.name, ip,
        )
    ip6 = public_ipv6 = None
    if flags.ipv6:
        # flanneld (dual stack): the same interface's IPv6 address, which it needs even with -public-ipv6.
        addrs6 = usable_addresses6(link)
        if not addrs6:
            have6 = ", ".join(f"{x.name} ({', '.join(map(str, x.addrs6))})" for x in snap.links if x.addrs6)
            raise FlannelError(f"EnableIPv6: interface {link.name} has no IPv6 address; give it one, or choose "
                               f"another with -iface; IPv6 addresses: {have6 or 'none'}")
        ip6 = addrs6[0]
        public_ipv6 = flags.public_ipv6 or ip6
    elif flags.public_ipv6 is not None:
        log.info("-public-ipv6=%s ignored: the network config does not set EnableIPv6", flags.public_ipv6)
    return ExternalInterface(
        name=link.name, index=link.index, ip=ip,
        public_ip=flags.public_ip or ip, mtu=link.mtu, ip6=ip6, public_ipv6=public_ipv6,
    )


# --- reading the kernel (runs on the netlink thread) -------------------------------------


def route_get_hops(dumps: KernelDumps, dst: IPv4Address | IPv6Address) -> list[tuple[int | None, Any]]:
    """`ip route get <dst>` as (oif, gateway) pairs (either family); [] when there is no route."""
    try:
        found = dumps.route_get(dst)
    except OSError as exc:
        if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EINVAL):
            return []
        raise
    return [(r.oif, ip_address(r.gateway) if r.gateway else None) for r in found]


def read_snapshot(dumps: KernelDumps, can_reach: IPv4Address | None) -> HostSnapshot:
    """Devices, their addresses of both families, the IPv4 default route's device and (when
    asked) the route to `can_reach`, all in the kernel's order (runs on the netlink thread)."""
    addrs: dict[int, list[IPv4Address]] = {}
    for a in dumps.addresses(socket.AF_INET):
        # IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer on point-to-point links)
        raw = a.local or a.address
        if raw:
            addrs.setdefault(a.index, []).append(IPv4Address(raw))
    addrs6: dict[int, list[IPv6Address]] = {}
    for a in dumps.addresses(socket.AF_INET6):
        raw = a.address or a.local
        if raw:
            addrs6.setdefault(a.index, []).append(IPv6Address(raw))
    links = tuple(LinkFacts(name=link.name, index=link.index, mtu=link.mtu, addrs=tuple(addrs.get(link.index, ())),
                            addrs6=tuple(addrs6.get(link.index, ())))
                  for link in dumps.links())
    default_index = next((r.oif for r in dumps.all_routes(socket.AF_INET)
                          if r.table == MAIN_TABLE and r.dst_len == 0 and r.oif), None)
    reach = None
    if can_reach is not None:
        reach = tuple(oif for oif, _gw in route_get_hops(dumps, can_reach) if oif) or None
    return HostSnapshot(links=links, default_index=default_index, reach_indexes=reach)


async def select_interface(
    nl: NetlinkThread, ifaces: list[str], iface_regexes: list[str], can_reach: str, public_ip: str,
    *, public_ipv6: str = "", ipv6: bool = False,
) -> ExternalInterface:
    """The external interface per the flags (see module doc); FlannelError when none fits."""
    flags = check_flags(list(ifaces), list(iface_regexes), can_reach, public_ip, public_ipv6, ipv6)
    snap = await nl.rtnl_call(read_snapshot, flags.can_reach)
    ext = choose_interface(snap, flags)
    log.info("using interface %s with address %s (public %s, mtu %d)", ext.name, ext.ip, ext.public_ip, ext.mtu)
    if ext.ip6 is not None:
        log.info("using IPv6 address %s of %s (public %s)", ext.ip6, ext.name, ext.public_ipv6)
    return ext
