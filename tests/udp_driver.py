"""Run the udp backend in this process's network namespace, driven over stdin/stdout.

    nsenter --net=/var/run/netns/NS python3 tests/udp_driver.py --iface IF --lease 10.5.1.0/24 \
        --network 10.5.0.0/16 [--port 8285] [--peer 10.5.2.0/24=192.168.9.2 ...]

Prints `ready <tun> <mtu>` once the forwarder runs.  Commands, one per line:
`add SUBNET IP`, `del SUBNET`, `stats` (prints one JSON line of counters), `path` (one JSON line:
the data path, bpf or python, and why), `health` (one JSON
line: data_plane_problems, repair_counters, the TUN's name and index), `quit`.
A subprocess, because the TUN device and the socket belong to the namespace of the thread
that creates them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import trio
from pyroute2 import IPRoute

from flannelpy.backends.base import ExternalInterface
from flannelpy.backends.udp.backend import UdpBackend
from flannelpy.config.network import parse_config
from flannelpy.hostnet.netlink import NetlinkThread
from flannelpy.subnet.lease import EventKind, Lease, LeaseAttrs, LeaseEvent


def external(name: str) -> ExternalInterface:
    with IPRoute() as ipr:
        link = ipr.get_links(ifname=name)[0]
        addr = ipr.get_addr(index=link["index"], family=2)[0].get_attr("IFA_ADDRESS")
    ip = IPv4Address(addr)
    return ExternalInterface(name=name, index=link["index"], ip=ip, public_ip=ip, mtu=link.get_attr("IFLA_MTU"))


def lease(subnet: str, ip: str) -> Lease:
    return Lease(IPv4Network(subnet), LeaseAttrs(public_ip=IPv4Address(ip)))


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--iface", required=True)
    p.add_argument("--lease", required=True)
    p.add_argument("--network", required=True)
    p.add_argument("--port", type=int, default=8285)
    p.add_argument("--peer", action="append", default=[])
    p.add_argument("--resync", type=float, default=10.0, help="the repair loop's period, seconds")
    p.add_argument("--forwarder", default="python", choices=("auto", "bpf", "python"),
                   help="-udp-forwarder (python here: most tests are about the Python forwarder)")
    p.add_argument("--bpf-object", default="", help="load this object instead of the shipped one (a refusal test)")
    args = p.parse_args()

    ext = external(args.iface)
    config = parse_config(json.dumps({"Network": args.network, "Backend": {"Type": "udp", "Port": args.port}}))
    nl = NetlinkThread()
    backend = UdpBackend(ext, config, nl, resync_interval=args.resync)
    backend.forwarder_choice = args.forwarder
    if args.bpf_object:
        from flannelpy.backends.udp import bpfpath

        bpfpath.OBJECT = Path(args.bpf_object)
    await backend.prepare()
    await backend.start(lease(args.lease, str(ext.ip)))
    subnets: dict[str, Lease] = {}
    for spec in args.peer:
        subnet, ip = spec.split("=")
        subnets[subnet] = lease(subnet, ip)
    await backend.apply([LeaseEvent(EventKind.ADDED, l) for l in subnets.values()])

    def say(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    stdin = trio.lowlevel.FdStream(os.dup(0))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.run)
            say(f"ready {backend.tun_name} {backend.mtu()}")
            pending = b""
            while True:
                chunk = await stdin.receive_some()
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    cmd = raw.decode().split()
                    if not cmd:
                        continue
                    if cmd[0] == "add":
                        subnets[cmd[1]] = lease(cmd[1], cmd[2])
                        await backend.apply([LeaseEvent(EventKind.ADDED, subnets[cmd[1]])])
                        say("ok")
                    elif cmd[0] == "del":
                        await backend.apply([LeaseEvent(EventKind.REMOVED, subnets.pop(cmd[1]))])
                        say("ok")
                    elif cmd[0] == "stats":
                        say(json.dumps(backend.counters()))
                    elif cmd[0] == "path":
                        say(json.dumps({"path": backend.data_path, "reason": backend.data_path_reason}))
                    elif cmd[0] == "health":
                        say(json.dumps({"problems": backend.data_plane_problems(),
                                        "repairs": dict(backend.repair_counters()),
                                        "tun": backend.tun_name, "index": backend.tun_index}))
                    elif cmd[0] == "quit":
                        nursery.cancel_scope.cancel()
                        break
            nursery.cancel_scope.cancel()
    finally:
        await backend.close()
        nl.stop()


if __name__ == "__main__":
    trio.run(main)


# --- Lab used by tests/test_udp_backend.py and bench/udp_forward.py --------------------------

import contextlib
import ctypes
import select
import subprocess

DRIVER = os.path.abspath(__file__)
UNDERLAY = ("192.168.77.1", "192.168.77.2")
NETWORK = "10.50.0.0/16"
LEASES = ("10.50.1.0/24", "10.50.2.0/24")
CONTAINERS = ("10.50.1.2", "10.50.2.2")

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


@contextlib.contextmanager
def in_netns(name: str):
    """Run the body with this thread in netns `name` (sockets made here stay there)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(own)
        os.close(target)


class Driver:
    """One udp_driver.py process inside a namespace."""

    def __init__(self, ns: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/var/run/netns/{ns}", sys.executable, DRIVER, *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        words = self.read_line().split()
        if words[:1] != ["ready"]:
            raise RuntimeError(f"driver in {ns} did not start: {words}")
        self.tun, self.mtu = words[1], int(words[2])

    def read_line(self, timeout: float = 30.0) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise RuntimeError("udp driver gave no answer")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"udp driver exited with {self.proc.wait()}")
        return line.strip()

    def command(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.read_line()

    def stats(self) -> dict[str, int]:
        return json.loads(self.command("stats"))

    def health(self) -> dict:
        return json.loads(self.command("health"))

    def stop(self) -> int:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                pass
            try:
                return self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # our own child, by its Popen handle
        return self.proc.wait()


class UdpLab:
    """Two hosts (h1, h2) on a veth underlay, each with one container (c1, c2) behind it."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.h = (f"{prefix}-h1", f"{prefix}-h2")
        self.c = (f"{prefix}-c1", f"{prefix}-c2")
        self.drivers: list[Driver] = []

    def build(self) -> None:
        h, c = self.h, self.c
        for ns in (*h, *c):
            sh("ip", "netns", "add", ns)
        sh("ip", "-n", h[0], "link", "add", "fpudu", "type", "veth", "peer", "name", "fpudu", "netns", h[1])
        for i in (0, 1):
            sh("ip", "-n", h[i], "addr", "add", f"{UNDERLAY[i]}/24", "dev", "fpudu")
            sh("ip", "-n", h[i], "link", "set", "fpudu", "up")
            sh("ip", "-n", h[i], "link", "set", "lo", "up")
            sh("ip", "-n", h[i], "link", "add", "fpudc", "type", "veth", "peer", "name", "fpudc", "netns", c[i])
            gw = LEASES[i].replace(".0/24", ".1")
            sh("ip", "-n", h[i], "addr", "add", LEASES[i].replace(".0/24", ".1/24"), "dev", "fpudc")
            sh("ip", "-n", h[i], "link", "set", "fpudc", "up")
            sh("ip", "-n", c[i], "addr", "add", f"{CONTAINERS[i]}/24", "dev", "fpudc")
            sh("ip", "-n", c[i], "link", "set", "fpudc", "up")
            sh("ip", "-n", c[i], "link", "set", "lo", "up")
            sh("ip", "-n", c[i], "route", "add", "default", "via", gw)
            sh("ip", "netns", "exec", h[i], "sysctl", "-qw", "net.ipv4.ip_forward=1")

    def start(self, port: int = 8285, resync: float = 10.0,
              forwarders: tuple[str, str] = ("python", "python"), extra: tuple[str, ...] = ()) -> tuple[Driver, Driver]:
        for i in (0, 1):
            j = 1 - i
            self.drivers.append(Driver(
                self.h[i], "--iface", "fpudu", "--lease", LEASES[i], "--network", NETWORK,
                "--port", str(port), "--peer", f"{LEASES[j]}={UNDERLAY[j]}", "--resync", str(resync),
                "--forwarder", forwarders[i], *extra,
            ))
        return self.drivers[0], self.drivers[1]

    def destroy(self) -> None:
        for d in self.drivers:
            d.stop()
        for ns in (*self.h, *self.c):
            sh("ip", "netns", "del", ns, check=False)
