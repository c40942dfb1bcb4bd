"""Fixed container addresses on the overlay (pipework's job), decided: which address, and why not.

A host's leased subnet is split in two halves.  Docker allocates in the lower one: flanneld writes it as
`fixed-cidr` into daemon.json (`-docker-fixed-cidr`), beside `bip`, which still spans the whole subnet
so that docker0 is on-link for every address of it.  `flannelctl attach` gives out the upper half.  The
two allocators never meet, so neither has to know what the other has handed out.

Everything here is pure: the caller gathers what the kernel and Docker say (addresses in use, Docker's
pool) and performs the plan (flannelpy.docker.attach).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from flannelpy.errors import FlannelError

# Halves of a /28 hold 8 addresses each; anything smaller leaves Docker (or attach) one or none.
SMALLEST_SPLIT_PREFIX = 28
HOST_LINK_PREFIX = "fpa"  # host side of an attachment's veth: fpa + the address in hex (11 characters)
PEER_LINK_PREFIX = "fpb"  # its other end, named so only until it is moved into the container
LINK_ALIAS = "flannelpy attach"  # ifalias of both ends: how detach finds them in the kernel
CONTAINER_IFNAME_STEM = "eth"  # first free ethN (N >= 1) in the container, as pipework's default eth1


class AttachError(FlannelError):
    """An attach or detach that cannot be done; the message is the one line the user sees."""


def _check_splittable(subnet: IPv4Network) -> None:
    if subnet.prefixlen > SMALLEST_SPLIT_PREFIX:
        raise AttachError(f"subnet {subnet} is too small to share with Docker: halves need a /{SMALLEST_SPLIT_PREFIX} "
                          f"or larger lease (SubnetLen in the network config)")


def docker_half(subnet: IPv4Network) -> IPv4Network:
    """The lower half: Docker's `fixed-cidr`."""
    _check_splittable(subnet)
    return next(subnet.subnets(prefixlen_diff=1))


def attach_half(subnet: IPv4Network) -> IPv4Network:
    """The upper half: what `flannelctl attach` gives out."""
    _check_splittable(subnet)
    return list(subnet.subnets(prefixlen_diff=1))[1]


def gateway(subnet: IPv4Network) -> IPv4Address:
    """docker0's address (flanneld's bip): the subnet's first host address."""
    return subnet.network_address + 1


def host_link_name(address: IPv4Address) -> str:
    """The host-side veth of the attachment of `address`: one name per address, so an address
    attached twice is a name clash the kernel refuses, and detach by address needs no lookup."""
    return f"{HOST_LINK_PREFIX}{int(address):08x}"


def peer_link_name(address: IPv4Address) -> str:
    return f"{PEER_LINK_PREFIX}{int(address):08x}"


def address_of_link(name: str) -> IPv4Address | None:
    """The address an attachment's host-side veth stands for (None: not one of ours)."""
    if len(name) != len(HOST_LINK_PREFIX) + 8 or not name.startswith(HOST_LINK_PREFIX):
        return None
    try:
        return IPv4Address(int(name[len(HOST_LINK_PREFIX):], 16))
    except ValueError:
        return None


def container_ifname(existing: Iterable[str]) -> str:
    """The first ethN, N >= 1, not already in the container."""
    taken = set(existing)
    n = 1
    while f"{CONTAINER_IFNAME_STEM}{n}" in taken:
        n += 1
    return f"{CONTAINER_IFNAME_STEM}{n}"


def check_docker_pool(subnet: IPv4Network, pool: IPv4Network | None, bridge: str) -> None:
    """Refuse when Docker allocates (part of) the attach half: the two would hand out the same address."""
    if pool is None:
        return
    half = attach_half(subnet)
    if pool.overlaps(half):
        raise AttachError(
            f"Docker allocates addresses on {bridge} from {pool}, which overlaps {half}, where attach puts them: "
            f"run flanneld with -docker-fixed-cidr (daemon.json \"fixed-cidr\": \"{docker_half(subnet)}\") "
            f"and restart Docker")


def parse_requested(text: str, subnet: IPv4Network) -> IPv4Address:
    """`10.5.69.200` or `10.5.69.200/24` (the subnet's own prefix length: the only one it can have)."""
    try:
        iface = IPv4Interface(text)
    except ValueError:
        raise AttachError(f"{text!r} is not an IPv4 address") from None
    if "/" in text and iface.network.prefixlen != subnet.prefixlen:
        raise AttachError(f"{text}: an attached address has this host's subnet's prefix length "
                          f"(/{subnet.prefixlen}); give it without one")
    return iface.ip


def check_requested(address: IPv4Address, subnet: IPv4Network, taken: Mapping[IPv4Address, str],
                    where: str = "") -> None:
    """Raise AttachError naming why `address` cannot be attached on this host; `taken` maps
    addresses in use to who uses them.  `where` names the source of `subnet` for the message."""
    source = f" ({where})" if where else ""
    if address not in subnet:
        raise AttachError(f"{address} is outside this host's subnet {subnet}{source}; "
                          f"attach gives addresses from {attach_half(subnet)}")
    if address in (subnet.network_address, subnet.broadcast_address):
        kind = "network" if address == subnet.network_address else "broadcast"
        raise AttachError(f"{address} is the {kind} address of {subnet}")
    if address == gateway(subnet):
        raise AttachError(f"{address} is the bridge's own address (the containers' gateway)")
    if address in docker_half(subnet):
        raise AttachError(f"{address} is in Docker's half of the subnet, {docker_half(subnet)} (fixed-cidr); "
                          f"attach gives addresses from {attach_half(subnet)}")
    if address in taken:
        raise AttachError(f"{address} is already in use: {taken[address]}")


def choose_address(subnet: IPv4Network, requested: str | None, taken: Mapping[IPv4Address, str],
                   where: str = "") -> IPv4Address:
    """The address to attach: the requested one if it may be used, else the lowest free one in the
    attach half (its broadcast address excluded)."""
    if requested is not None:
        address = parse_requested(requested, subnet)
        check_requested(address, subnet, taken, where)
        return address
    half = attach_half(subnet)
    for address in half:
        if address != subnet.broadcast_address and address not in taken:
            return address
    raise AttachError(f"no free address left in {half} (attach's half of {subnet})")


@dataclass(frozen=True)
class AttachPlan:
    """What to build for one attachment."""

    address: IPv4Interface  # in the container, with the subnet's prefix length
    gateway: IPv4Address  # the bridge's address: next hop across the overlay
    network: IPv4Network  # the flannel Network, routed via gateway from the attached address
    bridge: str
    host_link: str
    peer_link: str
    container_ifname: str
    mtu: int
    default_route: bool  # the container has none (e.g. --network none): give it one via the bridge


def make_plan(address: IPv4Address, subnet: IPv4Network, network: IPv4Network, *, bridge: str, mtu: int,
              container_links: Iterable[str], container_has_default_route: bool) -> AttachPlan:
    return AttachPlan(
        address=IPv4Interface((address, subnet.prefixlen)),
        gateway=gateway(subnet),
        network=network,
        bridge=bridge,
        host_link=host_link_name(address),
        peer_link=peer_link_name(address),
        container_ifname=container_ifname(container_links),
        mtu=mtu,
        default_route=not container_has_default_route,
    )
