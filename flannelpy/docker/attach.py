"""Fixed overlay addresses for running containers (pipework's job): attach and detach, performed.

`attach` gives a container (a Docker name or ID, or a network namespace path) a veth whose other end is
enslaved to the bridge holding this host's subnet (docker0 with flanneld's bip), an address from the
upper half of the subnet, and a route to the whole flannel Network through the bridge, with that address
as source.  Everything it makes is kernel state: the veth pair lives as long as the container's
namespace, whatever flanneld does, and disappears with it.  Both ends carry the ifalias
"flannelpy attach", and the host end is named after the address (attach_plan.host_link_name), so the
kernel alone says what is attached; there is no state file to go stale.

Which address, and why one may not be used, is decided in flannelpy.docker.attach_plan; this module
gathers the facts (subnet.env, the bridge, Docker's pool and containers, an ARP probe) and runs `ip`.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

from flannelpy.subnet.envfile import parse_env_file

from . import attach_plan as P
from .attach_plan import AttachError, AttachPlan

DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"
ARP_PROBE_S = 0.3  # how long an address in use has to answer; a container answers in well under 1 ms
BRIDGE_NAME_OPTION = "com.docker.network.bridge.name"


# --- facts -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lease:
    """What subnet.env says about this host."""

    network: IPv4Network
    subnet: IPv4Network
    mtu: int
    source: str  # for messages: "FLANNEL_SUBNET in /run/flannel/subnet.env"


def read_lease(path: str) -> Lease:
    try:
        with open(path, encoding="utf-8") as fh:
            env = parse_env_file(fh.read())
    except FileNotFoundError:
        raise AttachError(f"{path} not found: is flanneld running on this host? (--subnet-file)") from None
    except OSError as err:
        raise AttachError(f"{path}: cannot read: {err.strerror}") from None
    try:
        return Lease(network=IPv4Network(env["FLANNEL_NETWORK"]), subnet=IPv4Interface(env["FLANNEL_SUBNET"]).network,
                     mtu=int(env["FLANNEL_MTU"]), source=f"FLANNEL_SUBNET in {path}")
    except (KeyError, ValueError) as err:
        raise AttachError(f"{path}: no valid FLANNEL_NETWORK, FLANNEL_SUBNET and FLANNEL_MTU ({err})") from None


@dataclass(frozen=True)
class Target:
    netns: str  # path of the network namespace
    label: str  # how the user named it, for messages


def _run(cmd: list[str], what: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise AttachError(f"{cmd[0]} not found: {what} needs it") from None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


class Docker:
    """The docker CLI against one daemon (`-H`, or DOCKER_HOST / the default socket)."""

    def __init__(self, host: str | None = None) -> None:
        self.host = host

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return _run(["docker", *(["-H", self.host] if self.host else []), *args], "a Docker container name")

    def reachable(self) -> bool:
        try:
            return self.run("version", "--format", "{{.Server.Version}}").returncode == 0
        except AttachError:
            return False  # no docker CLI: no Docker on this host to ask


def _own_netns_inode() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def resolve_target(container: str, docker: Docker) -> Target:
    """A path (anything with a '/') is a network namespace; anything else a Docker container."""
    if "/" in container:
        try:
            st = os.stat(container)
        except OSError as err:
            raise AttachError(f"{container}: {err.strerror}") from None
        if _run(["nsenter", f"--net={container}", "true"], "entering a namespace").returncode != 0:
            raise AttachError(f"{container} is not a network namespace")
        if st.st_ino == _own_netns_inode():
            raise AttachError(f"{container} is this host's own network namespace")
        return Target(container, container)
    proc = docker.run("inspect", "--type", "container", "-f", "{{.State.Pid}} {{.State.Running}}", container)
    if proc.returncode != 0:
        raise AttachError(f"docker inspect {container}: {_last_line(proc.stderr)}")
    pid, running = proc.stdout.split()
    if running != "true" or pid == "0":
        raise AttachError(f"container {container} is not running")
    path = f"/proc/{pid}/ns/net"
    if os.stat(path).st_ino == _own_netns_inode():
        raise AttachError(f"container {container} shares this host's network namespace (--network host); "
                          f"it has the host's addresses already")
    return Target(path, container)


def _ip(args: list[str], netns: str | None = None, what: str = "") -> subprocess.CompletedProcess:
    cmd = (["nsenter", f"--net={netns}"] if netns else []) + ["ip", *args]
    proc = _run(cmd, "attach")
    if proc.returncode != 0:
        raise AttachError(f"{what or 'ip ' + ' '.join(args)}: {_last_line(proc.stderr)}")
    return proc


def _ip_json(args: list[str], netns: str | None = None) -> list[dict[str, Any]]:
    return json.loads(_ip(["-j", *args], netns).stdout or "[]")


def find_bridge(subnet: IPv4Network, name: str | None = None) -> tuple[str, int]:
    """(bridge, MTU): the one named, or the bridge holding the subnet's gateway address (docker0)."""
    gw = P.gateway(subnet)
    if name is None:
        for link in _ip_json(["-4", "addr", "show"]):
            for addr in link.get("addr_info", []):
                if addr.get("local") == str(gw) and addr.get("prefixlen") == subnet.prefixlen:
                    name = link["ifname"]
        if name is None:
            raise AttachError(f"no interface on this host has {gw}/{subnet.prefixlen} (the subnet's gateway): "
                              f"is Docker running with flanneld's bip? (or name the bridge with --bridge)")
    try:
        link = _ip_json(["-d", "link", "show", "dev", name])[0]
    except AttachError:
        raise AttachError(f"no interface {name!r} on this host") from None
    if link.get("linkinfo", {}).get("info_kind") != "bridge":
        raise AttachError(f"{name} is not a bridge: attach plugs a veth into the bridge holding {gw}")
    return name, int(link["mtu"])


def docker_facts(docker: Docker, bridge: str) -> tuple[IPv4Network | None, dict[IPv4Address, str]]:
    """(Docker's allocation pool on `bridge`, addresses of Docker's containers there); (None, {}) when
    no Docker answers or none of its networks uses the bridge."""
    if not docker.reachable():
        return None, {}
    ids = docker.run("network", "ls", "-q", "--filter", "driver=bridge").stdout.split()
    if not ids:
        return None, {}
    proc = docker.run("network", "inspect", *ids)
    if proc.returncode != 0:
        raise AttachError(f"docker network inspect: {_last_line(proc.stderr)}")
    for net in json.loads(proc.stdout):
        if (net.get("Options") or {}).get(BRIDGE_NAME_OPTION) != bridge:
            continue
        pool = None
        for cfg in (net.get("IPAM") or {}).get("Config") or []:
            try:
                subnet = IPv4Network(cfg["Subnet"])
            except (KeyError, ValueError):
                continue  # an IPv6 pool
            pool = subnet
            if cfg.get("IPRange"):
                ip_range = IPv4Network(cfg["IPRange"])
                # dockerd 20.10 ignores a fixed-cidr outside bip and allocates from the whole subnet
                pool = ip_range if ip_range.subnet_of(subnet) else subnet
        taken: dict[IPv4Address, str] = {}
        for cid, c in (net.get("Containers") or {}).items():
            try:
                taken[IPv4Interface(c["IPv4Address"]).ip] = f"Docker container {c.get('Name') or cid[:12]}"
            except (KeyError, ValueError):
                pass
        return pool, taken
    return None, {}


def attached_on_host() -> dict[IPv4Address, str]:
    """Addresses attached on this host, from the names of the host-side veths."""
    out: dict[IPv4Address, str] = {}
    for link in _ip_json(["link", "show"]):
        address = P.address_of_link(link.get("ifname", ""))
        if address is not None:
            out[address] = f"attached by flannelctl attach (host link {link['ifname']})"
    return out


def arp_answered(bridge: str, address: IPv4Address, source: IPv4Address, timeout: float = ARP_PROBE_S) -> bool:
    """Whether anything on `bridge` answers an ARP request for `address`: catches what neither Docker
    nor attach knows of (pipework, a hand-made veth, a container with a static address)."""
    eth_p_arp = 0x0806
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(eth_p_arp))
    except PermissionError:
        raise AttachError("attach needs root (CAP_NET_ADMIN and CAP_NET_RAW)") from None
    with sock:
        sock.bind((bridge, eth_p_arp))
        mac = sock.getsockname()[4]
        arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + source.packed + b"\0" * 6 + address.packed
        try:
            sock.send(b"\xff" * 6 + mac + struct.pack("!H", eth_p_arp) + arp)
        except OSError:
            return False  # bridge down: nothing behind it can be using the address now
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([sock], [], [], left)[0]:
                break
            frame = sock.recv(128)
            # Ethernet header (14), then ARP: op at 20..22, sender IP at 28..32
            if len(frame) >= 42 and frame[20:22] == b"\0\x02" and frame[28:32] == address.packed:
                return True
    return False


# --- attach ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attached:
    target: Target
    plan: AttachPlan

    def describe(self) -> str:
        p = self.plan
        return (f"attached {p.address} to {self.target.label} as {p.container_ifname} (host side {p.host_link} "
                f"on {p.bridge}); {p.network} via {p.gateway}" + (", default route too" if p.default_route else ""))

    def as_json(self) -> dict[str, Any]:
        p = self.plan
        return {"container": self.target.label, "netns": self.target.netns, "address": str(p.address),
                "interface": p.container_ifname, "host_link": p.host_link, "bridge": p.bridge,
                "network": str(p.network), "gateway": str(p.gateway), "mtu": p.mtu, "default_route": p.default_route}


def _container_links(target: Target) -> tuple[list[str], bool]:
    names = [link["ifname"] for link in _ip_json(["link", "show"], target.netns)]
    has_default = bool(_ip_json(["-4", "route", "show", "default"], target.netns))
    return names, has_default


def attach(container: str, requested: str | None = None, *, subnet_file: str = DEFAULT_SUBNET_FILE,
           docker_host: str | None = None, bridge: str | None = None) -> Attached:
    lease = read_lease(subnet_file)
    docker = Docker(docker_host)
    target = resolve_target(container, docker)
    bridge, mtu = find_bridge(lease.subnet, bridge)
    pool, taken = docker_facts(docker, bridge)
    P.check_docker_pool(lease.subnet, pool, bridge)
    taken.update(attached_on_host())
    gw = P.gateway(lease.subnet)
    while True:
        address = P.choose_address(lease.subnet, requested, taken, lease.source)
        if not arp_answered(bridge, address, gw):
            break
        taken[address] = f"something on {bridge} answers ARP for it"
        if requested is not None:
            P.check_requested(address, lease.subnet, taken, lease.source)  # raises, naming it
    links, has_default = _container_links(target)
    plan = P.make_plan(address, lease.subnet, lease.network, bridge=bridge, mtu=mtu, container_links=links,
                       container_has_default_route=has_default)
    _build(plan, target)
    return Attached(target, plan)


def _build(plan: AttachPlan, target: Target) -> None:
    """Make the veth pair and configure both ends; on any failure remove it again (nothing half-done)."""
    ns = target.netns
    try:
        _ip(["link", "add", plan.host_link, "mtu", str(plan.mtu), "type", "veth",
             "peer", "name", plan.peer_link, "mtu", str(plan.mtu)])
    except AttachError as err:
        raise AttachError(f"{plan.address.ip} is already in use: {err}" if "exists" in str(err) else str(err)) from None
    try:
        _ip(["link", "set", plan.peer_link, "netns", ns])
        _ip(["link", "set", plan.peer_link, "name", plan.container_ifname], ns)
        _ip(["link", "set", plan.container_ifname, "alias", P.LINK_ALIAS], ns)
        _ip(["addr", "add", str(plan.address), "dev", plan.container_ifname], ns)
        _ip(["link", "set", plan.container_ifname, "up"], ns)
        _ip(["route", "add", str(plan.network), "via", str(plan.gateway), "dev", plan.container_ifname,
             "src", str(plan.address.ip)], ns)
        if plan.default_route:
            _ip(["route", "add", "default", "via", str(plan.gateway), "dev", plan.container_ifname], ns)
        _ip(["link", "set", plan.host_link, "alias", f"{P.LINK_ALIAS} {plan.address.ip}"])
        _ip(["link", "set", plan.host_link, "master", plan.bridge])
        _ip(["link", "set", plan.host_link, "up"])
    except BaseException:
        # Deleting one end of a veth deletes the other, wherever it has been moved.
        subprocess.run(["ip", "link", "del", plan.host_link], capture_output=True)
        raise


# --- detach ------------------------------------------------------------------------------------------


def attached_in(target: Target) -> dict[str, list[IPv4Address]]:
    """Interfaces in the target made by attach, and their IPv4 addresses."""
    out: dict[str, list[IPv4Address]] = {}
    for link in _ip_json(["-d", "addr", "show"], target.netns):
        if link.get("ifalias") == P.LINK_ALIAS:
            out[link["ifname"]] = [IPv4Address(a["local"]) for a in link.get("addr_info", [])
                                   if a.get("family") == "inet"]
    return out


def detach(container: str, requested: str | None = None, *, docker_host: str | None = None) -> list[str]:
    """Remove what attach made in the container (only the one carrying `requested`, if given);
    returns the addresses removed."""
    target = resolve_target(container, Docker(docker_host))
    found = attached_in(target)
    if requested is not None:
        try:
            want = IPv4Interface(requested).ip
        except ValueError:
            raise AttachError(f"{requested!r} is not an IPv4 address") from None
        found = {name: addrs for name, addrs in found.items() if want in addrs}
        if not found:
            raise AttachError(f"{target.label} has no address {want} attached by flannelctl attach")
    if not found:
        raise AttachError(f"{target.label} has no address attached by flannelctl attach")
    removed = []
    for name, addrs in found.items():
        _ip(["link", "del", name], target.netns)
        removed += [str(a) for a in addrs] or [name]
    return removed
