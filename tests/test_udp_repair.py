"""udp backend: flannel0 is kept as it should be (issue #12), and only a sender's own inner
sources get through, on the namespace lab with real etcd and the real `flanneld`.

The pure part (flannelpy.backends.udp.plan) is checked first without root.  Then one lab of
two udp hosts: each case tampers with host 1's flannel0 while host 1's container pings host
2's every 50 ms, measures the seconds until the agent has repaired it and counts the pings
lost.  Figures are printed as `FIGURE udp-repair ...` lines (pytest -s).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

import httpx
import pytest
from scapy.layers.inet import IP, UDP

from flannelpy.backends.udp.plan import (
    TunFacts,
    TunRepair,
    TunSpec,
    change_matters,
    tun_repair,
)
from flannelpy.hostnet.monitor import OVERFLOW, KernelChange
from flannelpy.lab.netns_lab import Lab, run

NETWORK = IPv4Network("10.5.0.0/16")
SPEC = TunSpec("flannel0", 7, IPv4Address("10.5.3.0"), 1472, NETWORK)
HEALTHY = TunFacts(present=True, up=True, mtu=1472, addresses=frozenset({(IPv4Address("10.5.3.0"), 32)}),
                   network_route_oifs=(7,))
REPAIR_BOUND = 2.0  # seconds, for every case (the kernel's notification, not the 10 s resync)
PING_INTERVAL = 0.05


# --- pure: what flannel0 needs ------------------------------------------------------------------


def test_healthy_device_needs_nothing() -> None:
    fix = tun_repair(SPEC, HEALTHY)
    assert fix == TunRepair() and not fix.needed and fix.problems(SPEC) == []
    # Someone else's extra route to Network (another metric) beside ours is not our business.
    assert tun_repair(SPEC, HEALTHY._replace(network_route_oifs=(7, 2))) == TunRepair()


def test_each_kind_of_damage_has_its_repair_and_its_line() -> None:
    gone = tun_repair(SPEC, TunFacts(present=False))
    assert gone.reopen and gone.problems(SPEC) == ["flannel0 is missing"]
    assert tun_repair(SPEC, HEALTHY, fd_broken=True).reopen  # the fd reads EBADFD: a new TUN either way
    down = tun_repair(SPEC, TunFacts(present=True, up=False, mtu=1472, addresses=HEALTHY.addresses))
    # A link that goes down loses its routes, so the route comes back with it.
    assert (down.set_up, down.add_route, down.add_address, down.set_mtu) == (True, True, False, False)
    assert down.problems(SPEC) == ["flannel0 is down", "no route 10.5.0.0/16 dev flannel0"]
    assert down.done(SPEC) == "flannel0: restored link up, route 10.5.0.0/16"
    bare = tun_repair(SPEC, TunFacts(present=True, up=True, mtu=1300, addresses=frozenset()))
    assert (bare.set_mtu, bare.add_address, bare.add_route) == (True, True, True)
    assert "flannel0 has no address 10.5.3.0/32" in bare.problems(SPEC)
    # Another address on the device (ours removed) still means ours is missing.
    other = HEALTHY._replace(addresses=frozenset({(IPv4Address("10.5.9.0"), 32)}))
    assert tun_repair(SPEC, other).add_address


def test_network_routed_elsewhere_is_reported_never_fought() -> None:
    fix = tun_repair(SPEC, HEALTHY._replace(network_route_oifs=(2,)))
    assert not fix.needed and fix.routed_elsewhere == (2,)
    assert fix.problems(SPEC) == ["10.5.0.0/16 is routed via ifindex 2, not flannel0"]


def test_which_kernel_changes_concern_flannel0() -> None:
    def route(dst: str, oif: int | None = None, table: int = 254) -> KernelChange:
        return KernelChange("route", True, family=socket.AF_INET, ifindex=oif, table=table, dst=IPv4Network(dst))

    def matters(c: KernelChange) -> bool:
        return change_matters(c, index=7, network=NETWORK)

    assert matters(OVERFLOW)
    assert matters(KernelChange("link", True, ifindex=7)) and matters(KernelChange("addr", True, ifindex=7))
    assert not matters(KernelChange("link", True, ifindex=8)) and not matters(KernelChange("addr", False, ifindex=3))
    assert matters(route("10.5.0.0/16")) and matters(route("10.5.0.0/16", oif=2))  # someone else took Network
    assert matters(route("10.9.0.0/24", oif=7))  # anything on our device
    assert not matters(route("10.5.3.0/24", oif=4))  # docker0's subnet route: not ours
    assert not matters(route("10.5.0.0/16", table=255))
    assert not matters(KernelChange("neigh", True, ifindex=7))  # a TUN has no neighbours
    assert not change_matters(KernelChange("link", True, ifindex=7), index=None, network=NETWORK)


# --- the lab ------------------------------------------------------------------------------------

FIGURES: list[dict[str, Any]] = []


def figure(case: str, **values: Any) -> None:
    FIGURES.append({"case": case, **values})
    print(f"FIGURE udp-repair {case}: " + ", ".join(f"{k}={v}" for k, v in values.items()), flush=True)


class ULab(Lab):
    def get(self, i: int, path: str) -> tuple[int, str]:
        with httpx.Client(transport=httpx.HTTPTransport(uds=self.host(i).status_socket), timeout=5) as c:
            r = c.get(f"http://flanneld{path}")
            return r.status_code, r.text

    def sh(self, i: int, *args: str) -> str:
        return run(*args, netns=self.host(i).netns).stdout

    def net(self, i: int) -> IPv4Network:
        return IPv4Interface(self.host(i).subnet).network

    def tun_ok(self, i: int) -> bool:
        """flannel0 as flanneld makes it: a non-persistent TUN, up, MTU 1472, exactly the
        lease base as /32, and Network routed through it."""
        links = [link for link in self.ip_json(i, "-d", "addr", "show") if link["ifname"].startswith("flannel")]
        if len(links) != 1:
            return False
        link = links[0]
        info = link.get("linkinfo", {}).get("info_data", {})
        if info.get("type") != "tun" or link["mtu"] != 1472 or "UP" not in link["flags"]:
            return False
        if [(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["family"] == "inet"] != \
                [(str(self.net(i).network_address), 32)]:
            return False
        routes = self.ip_json(i, "route", "show", str(NETWORK))
        return [r.get("dev") for r in routes] == [link["ifname"]]

    def logs(self) -> str:
        return "\n".join(f"--- host {h.index} ---\n{self.tail_log(h.index, 25)}" for h in self.host_list)


class Pinger:
    """busybox ping from container 1 to container 2 every 50 ms; stop() -> (sent, lost), lost
    counting only the unanswered requests before the last answered one."""

    def __init__(self, lab: ULab) -> None:
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/var/run/netns/{lab.host(1).container_ns}", "busybox", "ping",
             "-i", str(PING_INTERVAL), "-W", "1", lab.host(2).container_ip],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def stop(self) -> tuple[int, int]:
        time.sleep(0.3)  # a few answered requests after the repair
        self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=10)
        m = re.search(r"(\d+) packets transmitted", out)
        assert m, f"no ping summary in {out!r}"
        answered = {int(x) for x in re.findall(r"seq=(\d+)", out)}
        assert answered, f"no reply at all: {out[-500:]!r}"
        return int(m.group(1)), len(set(range(max(answered))) - answered)


def wait_for(pred: Callable[[], bool], timeout: float, what: str, lab: ULab) -> float:
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            pytest.fail(f"timed out after {timeout}s waiting for {what}\n{lab.logs()}")
        time.sleep(0.01)
    return round(time.monotonic() - start, 3)


@pytest.fixture(scope="module")
def lab() -> Iterator[ULab]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    prefix = "fpu" + secrets.token_hex(2)
    lab = ULab(prefix=prefix, workdir=tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp"), backend="udp")
    try:
        lab.up(wait=30)
        results = lab.wait_all_pings(30)
        assert all(results.values()), f"pings before tampering: {results}\n{lab.logs()}"
        yield lab
    finally:
        lab.down()
        leftover = [n for n in run("ip", "netns", "list").stdout.split() if n.startswith(prefix + "-")]
        assert not leftover, f"lab.down() left namespaces {leftover}"


def tamper_case(lab: ULab, case: str, tamper: Callable[[], None], cuts: bool) -> float:
    """Tamper with host 1's flannel0, measure the repair and the pings lost; assert both."""
    assert lab.tun_ok(1), f"{case}: flannel0 not right before tampering\n{lab.logs()}"
    pinger = Pinger(lab)
    time.sleep(0.5)
    tamper()
    seconds = wait_for(lambda: lab.tun_ok(1), 15, f"{case}: repair", lab)
    sent, lost = pinger.stop()
    figure(case, repair_s=seconds, pings_sent=sent, pings_lost=lost)
    assert lab.agent_running(1) and lab.agent_running(2), lab.logs()
    assert seconds <= REPAIR_BOUND, f"{case}: repaired after {seconds}s, bound {REPAIR_BOUND}s\n{lab.logs()}"
    if cuts:
        assert lost <= int(seconds / PING_INTERVAL) + 4, f"{case}: {lost} pings lost in {seconds}s"
    else:
        assert lost == 0, f"{case}: {lost} pings lost though the data path was not cut"
    wait_for(lambda: lab.get(1, "/readyz") == (200, "flanneld is ready"), 2, f"{case}: ready again", lab)
    return seconds


def test_delete_flannel0(lab: ULab) -> None:
    tamper_case(lab, "udp: delete flannel0", lambda: lab.sh(1, "ip", "link", "del", "flannel0"), cuts=True)
    assert "re-created flannel0" in lab.tail_log(1, 40)
    # The host's own traffic (source: its flannel0 address) crosses the new device both ways.
    for src, dst in ((1, 2), (2, 1)):
        r = run("busybox", "ping", "-c", "2", "-W", "2", lab.host(dst).container_ip, netns=lab.host(src).netns,
                check=False)
        assert "2 packets received" in r.stdout, r.stdout + lab.logs()


def test_delete_network_route(lab: ULab) -> None:
    tamper_case(lab, "udp: delete route to Network", lambda: lab.sh(1, "ip", "route", "del", str(NETWORK)), cuts=True)


def test_delete_flannel0_address(lab: ULab) -> None:
    own = f"{lab.net(1).network_address}/32"
    # The kernel flushes the routes of a device that loses its last IPv4 address: this cuts.
    tamper_case(lab, "udp: delete flannel0 address",
                lambda: lab.sh(1, "ip", "addr", "del", own, "dev", "flannel0"), cuts=True)


def test_flannel0_down(lab: ULab) -> None:
    tamper_case(lab, "udp: set flannel0 down", lambda: lab.sh(1, "ip", "link", "set", "flannel0", "down"), cuts=True)


def test_flannel0_mtu(lab: ULab) -> None:
    tamper_case(lab, "udp: change flannel0 MTU", lambda: lab.sh(1, "ip", "link", "set", "flannel0", "mtu", "1300"),
                cuts=False)


def test_network_routed_elsewhere_is_reported_until_given_back(lab: ULab) -> None:
    """Someone points Network at another device: not ours to undo, so /readyz says so (and the
    agent does not fight); once the route is gone, ours comes back."""
    lab.sh(1, "ip", "route", "replace", str(NETWORK), "dev", "eth0")
    wait_for(lambda: lab.get(1, "/readyz")[0] == 503, 2, "/readyz 503", lab)
    _, text = lab.get(1, "/readyz")
    assert f"{NETWORK} is routed via ifindex" in text and "not flannel0" in text, text
    time.sleep(0.5)
    assert [r["dev"] for r in lab.ip_json(1, "route", "show", str(NETWORK))] == ["eth0"]  # left alone
    lab.sh(1, "ip", "route", "del", str(NETWORK), "dev", "eth0")
    seconds = wait_for(lambda: lab.tun_ok(1) and lab.get(1, "/readyz")[0] == 200, 5, "repair", lab)
    figure("udp: Network routed elsewhere, then given back", repair_s=seconds)
    assert lab.ping(1, 2) and lab.ping(2, 1)


def test_spoofed_datagram_dropped_and_in_metrics(lab: ULab) -> None:
    """From host 2's own address, an inner packet from 8.8.8.8 to host 1's container: dropped,
    and /metrics counts it under reason spoofed_source."""
    def spoofed() -> float:
        text = lab.get(1, "/metrics")[1]
        m = re.search(r'flannel_backend_drops_total\{backend="udp",direction="rx",reason="spoofed_source"\} (\S+)', text)
        return float(m.group(1)) if m else -1.0

    before = spoofed()
    assert before >= 0
    inner = bytes(IP(src="8.8.8.8", dst=lab.host(1).container_ip, ttl=10) / UDP(sport=53, dport=9) / b"forged")
    code = ("import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            f"s.bind(('{lab.host(2).ip}', 0)); s.sendto(bytes.fromhex(sys.argv[1]), ('{lab.host(1).ip}', 8285))")
    run("python3", "-c", code, inner.hex(), netns=lab.host(2).netns)
    wait_for(lambda: spoofed() == before + 1, 5, "spoofed_source to count the datagram", lab)


def test_print_figures() -> None:
    for f in FIGURES:
        print(f"FIGURE udp-repair {f}")
