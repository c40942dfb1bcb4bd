"""Issue 12's "hostile etcd" catalogue, on the namespace lab: real etcd, two real `flanneld`, real kernels.

One lab per backend (vxlan on Network 10.5.0.0/16; host-gw on 10.0.0.0/8, which contains the lab's
underlay 10.250.0.0/24, so the underlay rule is exercised too).  The cases run one after another
on it; each writes what an attacker (or a careless operator) would write under <prefix>/subnets/,
waits until both agents have read it, then asserts that

- both agents are still up, with the PIDs they started with, and never logged a traceback;
- a container pinging the other host's container every 50 ms lost nothing;
- nothing outside Network is routed: the routes outside Network are exactly those before;
- the kernel holds the accepted state: routes (and, for vxlan, neighbours and FDB entries) are
  those before the case, plus the entries of a lease the case expects one agent to accept;
- each lease the case expects refused is in both agents' /status with its reason;

and then deletes what it wrote and asserts that the kernel is exactly as before the case.  The
figures (cases, seconds, pings lost) are printed on a `FIGURE` line (`pytest -s`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any, Callable, Iterator

import pytest

from flannelpy.lab.netns_lab import Lab

pytestmark = [pytest.mark.root, pytest.mark.etcd, pytest.mark.slow]

PING_INTERVAL = 0.05
SENTINEL = "10.5.254.0-24"  # a refused lease whose log line proves everything before it was read


# --- the lab and what it looks like -------------------------------------------------------------


@dataclass
class World:
    """The lab plus what every case needs to know about it."""

    lab: Lab
    backend: str
    network: IPv4Network
    subnets: dict[int, IPv4Network] = field(default_factory=dict)
    macs: dict[int, str] = field(default_factory=dict)
    pids: dict[int, int] = field(default_factory=dict)
    baseline: dict[int, dict[str, set]] = field(default_factory=dict)
    log_offsets: dict[int, int] = field(default_factory=dict)
    sentinel_n: int = 0
    lost_pings: int = 0
    sent_pings: int = 0

    @property
    def prefix(self) -> str:
        return f"{self.lab.etcd_prefix.rstrip('/')}/subnets/"

    def put(self, key: str, value: str) -> None:
        self.lab.etcdctl("put", "--", self.prefix + key, value)

    def delete(self, key: str) -> None:
        self.lab.etcdctl("del", "--", self.prefix + key)

    def value(self, ip: str, mac: str | None = None, btype: str | None = None) -> str:
        btype = self.backend if btype is None else btype
        doc: dict[str, Any] = {"PublicIP": ip, "PublicIPv6": None, "BackendType": btype}
        if btype == "vxlan":
            doc["BackendData"] = {"VNI": 1, "VtepMAC": mac or _fresh_mac()}
        return json.dumps(doc, separators=(",", ":"))

    def key_of(self, i: int) -> str:
        net = self.subnets[i]
        return f"{net.network_address}-{net.prefixlen}"

    def log_since(self, i: int) -> str:
        with open(self.lab.host(i).log_file, "rb") as f:
            f.seek(self.log_offsets.get(i, 0))
            return f.read().decode(errors="replace")

    def mark_logs(self) -> None:
        for h in (1, 2):
            with open(self.lab.host(h).log_file, "rb") as f:
                self.log_offsets[h] = f.seek(0, 2)

    def settle(self) -> None:
        """Put a refused sentinel lease and wait until both agents logged refusing it: events are
        applied in order, so everything written before it has been read."""
        self.sentinel_n += 1
        ip = f"127.0.{self.sentinel_n // 250}.{1 + self.sentinel_n % 250}"
        self.put(SENTINEL, json.dumps({"PublicIP": ip, "BackendType": self.backend}))
        line = f"refusing lease {SENTINEL.replace('-', '/')} (PublicIP {ip})"
        wait_for(lambda: all(line in self.log_since(h) for h in (1, 2)), 10, f"both agents to log {line!r}", self)
        self.delete(SENTINEL)


def _fresh_mac() -> str:
    return "02:" + ":".join(secrets.token_hex(1) for _ in range(5))


def wait_for(pred: Callable[[], bool], timeout: float, what: str, world: World) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- host {h} ---\n{world.lab.tail_log(h, 25)}" for h in (1, 2))
            pytest.fail(f"timed out after {timeout}s waiting for {what}\n{tails}")
        time.sleep(0.02)


def kernel_state(world: World, i: int) -> dict[str, set]:
    """The entries flannel could touch, normalised: main-table routes; vxlan neighbours and FDB."""
    lab = world.lab
    routes = {(r["dst"], r.get("gateway"), r.get("dev"), "onlink" in r.get("flags", []))
              for r in lab.ip_json(i, "route", "show", "table", "main")}
    state: dict[str, set] = {"routes": routes}
    if world.backend == "vxlan":
        state["neigh"] = {(n["dst"], n.get("lladdr"), tuple(n.get("state", [])))
                          for n in lab.ip_json(i, "neigh", "show", "dev", "flannel.1")}
        state["fdb"] = {(f["mac"], f.get("dst")) for f in lab.bridge_json(i, "fdb", "show", "dev", "flannel.1")
                        if f.get("dst")}
    return state


def _dst(route: tuple) -> IPv4Network:
    return IPv4Network("0.0.0.0/0" if route[0] == "default" else route[0])


def expected_entries(world: World, subnet: IPv4Network, ip: str, mac: str | None) -> dict[str, set]:
    """What the backend programs for one accepted peer lease."""
    base = str(subnet.network_address)
    dst = str(subnet) if subnet.prefixlen < 32 else base
    if world.backend == "vxlan":
        return {"routes": {(dst, base, "flannel.1", True)}, "neigh": {(base, mac, ("PERMANENT",))},
                "fdb": {(mac, ip)}}
    return {"routes": {(dst, ip, "eth0", False)}}


class Pinger:
    """`busybox ping -i 0.05` from container 1 to container 2 for the length of one case."""

    def __init__(self, lab: Lab) -> None:
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/var/run/netns/{lab.host(1).container_ns}",
             "busybox", "ping", "-i", str(PING_INTERVAL), lab.host(2).container_ip],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def stop(self) -> tuple[int, int, list[int]]:
        """(sent, lost, lost sequence numbers); the last request may still be in flight: not counted."""
        time.sleep(PING_INTERVAL * 3)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=10)
        m = re.search(r"(\d+) packets transmitted", out)
        assert m, f"no ping statistics in:\n{out[-2000:]}"
        sent = int(m.group(1))
        seqs = {int(s) for s in re.findall(r"seq=(\d+)", out)}
        lost = sorted(set(range(sent - 1)) - seqs)
        return sent, len(lost), lost

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module", params=["vxlan", "host-gw"])
def world(request) -> Iterator[World]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    backend = request.param
    if backend == "vxlan":
        network = IPv4Network("10.5.0.0/16")
        config = {"Network": str(network), "Backend": {"Type": "vxlan"}}
    else:
        # A Network around the lab's underlay (10.250.0.0/24): leases there must be refused.
        network = IPv4Network("10.0.0.0/8")
        config = {"Network": str(network), "SubnetLen": 24, "SubnetMin": "10.5.1.0", "SubnetMax": "10.5.100.0",
                  "Backend": {"Type": "host-gw"}}
    prefix = "fph" + secrets.token_hex(2)
    lab = Lab(prefix=prefix, workdir=tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp"), hosts=2, backend=backend,
              config=json.dumps(config))
    try:
        lab.up(wait=30)
        w = World(lab=lab, backend=backend, network=network)
        for h in (1, 2):
            w.subnets[h] = IPv4Interface(lab.host(h).subnet).network
            w.pids[h] = lab.host(h).pid
            if backend == "vxlan":
                w.macs[h] = next(l["address"] for l in lab.ip_json(h, "link", "show") if l["ifname"] == "flannel.1")
        results = lab.wait_all_pings(20)
        assert all(results.values()), results
        wait_for(lambda: all(_peer_programmed(w, h) for h in (1, 2)), 10, "both peers programmed", w)
        for h in (1, 2):
            w.baseline[h] = kernel_state(w, h)
        yield w
    finally:
        lab.down()
        leftover = [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
                    if n.startswith(prefix + "-")]
        assert not leftover, leftover


def _peer_programmed(w: World, h: int) -> bool:
    other = 3 - h
    dst = str(w.subnets[other])
    return any(r[0] == dst for r in kernel_state(w, h)["routes"])


# --- the cases ---------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    puts: list[tuple[str, str]]  # (key under subnets/, value), written in order
    refused: list[str] = field(default_factory=list)  # subnets both agents must refuse
    skipped: bool = False  # the codec refuses the value/key: a "skipping" log line on both hosts
    # host -> (subnet, PublicIP, VtepMAC) the case expects that host to accept and program
    accepted: dict[int, tuple[str, str, str | None]] = field(default_factory=dict)
    check: Callable[[World], None] | None = None  # anything else, while the keys are in etcd
    backends: tuple[str, ...] = ("vxlan", "host-gw")


def _half(net: IPv4Network, which: int = 0) -> IPv4Network:
    return list(net.subnets(1))[which]


def _key(net: IPv4Network | str) -> str:
    net = IPv4Network(net)
    return f"{net.network_address}-{net.prefixlen}"


def cases(w: World) -> list[Case]:
    s1, s2 = w.subnets[1], w.subnets[2]
    ip1, ip2 = w.lab.host(1).ip, w.lab.host(2).ip
    v = w.value
    free = [f"10.5.{n}.0/24" for n in range(200, 240)]  # outside the lab's allocation range (first 100)
    c: list[Case] = [
        # --- subnets that would take the host off its network (the route hijacks)
        Case("lease at the underlay's subnet", [("10.250.0.0-24", v("10.250.0.99"))], ["10.250.0.0/24"]),
        Case("lease at 0.0.0.0/0 (the default route)", [("0.0.0.0-0", v("10.250.0.99"))], ["0.0.0.0/0"]),
        Case("lease outside Network", [("192.168.77.0-24", v("10.250.0.99"))], ["192.168.77.0/24"]),
        Case("lease for the whole Network", [(_key(w.network), v("10.250.0.99"))], [str(w.network)]),
        Case("lease for half the Network", [(_key(_half(w.network)), v("10.250.0.99"))], [str(_half(w.network))]),
        Case("lease covering the Network", [("8.0.0.0-5" if w.network.prefixlen == 8 else "10.0.0.0-8",
                                             v("10.250.0.99"))],
             ["8.0.0.0/5" if w.network.prefixlen == 8 else "10.0.0.0/8"]),
        Case("a peer's underlay IP as a /32 lease", [("10.250.0.12-32", v("10.250.0.99"))], ["10.250.0.12/32"]),
        Case("etcd's IP as a /32 lease", [("10.250.0.1-32", v("10.250.0.99"))], ["10.250.0.1/32"]),
        # --- subnets that would hijack containers
        Case("/32 inside host 1's subnet", [(_key(IPv4Network((int(s1.network_address) + 2, 32))),
                                              v("10.250.0.99"))],
             [str(IPv4Network((int(s1.network_address) + 2, 32)))]),
        Case("/25 inside host 2's subnet", [(_key(_half(s2, 1)), v("10.250.0.99"))], [str(_half(s2, 1))]),
        Case("supernet of both hosts' subnets", [(_key(s1.supernet(new_prefix=max(w.network.prefixlen + 2, 17))),
                                                  v("10.250.0.99"))],
             [str(s1.supernet(new_prefix=max(w.network.prefixlen + 2, 17)))]),
        # --- PublicIPs that loop, blackhole or spray
        Case("PublicIP 127.0.0.1", [(_key(free[0]), v("127.0.0.1"))], [free[0]]),
        Case("PublicIP 0.0.0.0", [(_key(free[1]), v("0.0.0.0"))], [free[1]]),
        Case("PublicIP multicast", [(_key(free[2]), v("224.0.0.1"))], [free[2]]),
        Case("PublicIP 255.255.255.255", [(_key(free[3]), v("255.255.255.255"))], [free[3]]),
        Case("PublicIP link-local", [(_key(free[4]), v("169.254.1.1"))], [free[4]]),
        Case("PublicIP the underlay's broadcast", [(_key(free[5]), v("10.250.0.255"))], [free[5]]),
        Case("PublicIP reserved (240/4)", [(_key(free[6]), v("240.0.0.1"))], [free[6]]),
        Case("PublicIP inside host 1's subnet", [(_key(free[7]), v(str(s1.network_address + 5)))], [free[7]]),
        Case("PublicIP inside its own subnet", [(_key(free[8]), v(str(IPv4Network(free[8]).network_address + 1)))],
             [free[8]]),
        # A peer may share a host's IP as far as host 2 knows; host 1 refuses its own address.
        Case("PublicIP host 1's own IP", [(_key(free[9]), v(ip1, mac="02:00:00:00:0a:09"))],
             accepted={2: (free[9], ip1, "02:00:00:00:0a:09" if w.backend == "vxlan" else None)},
             check=lambda w: _refused_on(w, 1, free[9], "own_address")),
        # --- codec refusals: values and keys that used to crash every agent
        Case("value nested 5,000 arrays deep", [(_key(free[10]), "[" * 5000 + "]" * 5000)], skipped=True),
        Case("value of 100 kB", [(_key(free[11]), json.dumps({"PublicIP": "10.250.0.99", "Pad": "x" * 100_000}))],
             skipped=True),
        Case("value not JSON", [(_key(free[12]), "not json {")], skipped=True),
        Case("value a JSON array", [(_key(free[13]), '["PublicIP","10.250.0.99"]')], skipped=True),
        Case("number 1e400 in the value", [(_key(free[14]), '{"PublicIP":"10.250.0.99","BackendType":"vxlan",'
                                                             '"BackendData":{"VNI":1e400,"VtepMAC":"02:00:00:00:0e:01"}}')],
             skipped=True),
        Case("key with garbage", [(_key(free[15]) + "garbage", v("10.250.0.99"))], skipped=True),
        Case("dual-stack key for host 2's subnet", [(w.key_of(2) + "&fc00::-64", v("10.250.0.66"))], skipped=True),
        Case("zero-padded key for host 2's subnet",
             [(w.key_of(2).replace("10.", "010.", 1), v("10.250.0.66"))], skipped=True),
        Case("nested key for host 2's subnet", [("evil/" + w.key_of(2), v("10.250.0.66"))], skipped=True),
        # --- refused values put again and again: one log line, not one per put
        Case("the same refused value put 20 times", [(_key(free[16]), v("127.0.0.2"))] * 20, [free[16]],
             check=lambda w: _logged_once(w, free[16])),
        # --- another backend type: admitted, ignored by the backend (flanneld does the same)
        Case("lease of another backend type", [(_key(free[17]), v("10.250.0.99", btype="udp"))]),
    ]
    if w.backend == "vxlan":
        c += [
            Case("VtepMAC copied from host 2", [(_key(free[20]), v("10.250.0.66", mac=w.macs[2]))], [free[20]]),
            Case("host 2's whole value cloned at another subnet",
                 [(_key(free[21]), v(ip2, mac=w.macs[2]))], [free[21]]),
            Case("VtepMAC multicast", [(_key(free[22]), v("10.250.0.99", mac="01:00:5e:00:00:01"))], [free[22]]),
            Case("VtepMAC zero", [(_key(free[23]), v("10.250.0.99", mac="00:00:00:00:00:00"))], [free[23]]),
            Case("VtepMAC broadcast", [(_key(free[24]), v("10.250.0.99", mac="ff:ff:ff:ff:ff:ff"))], [free[24]]),
            Case("vxlan lease without BackendData",
                 [(_key(free[25]), json.dumps({"PublicIP": "10.250.0.99", "BackendType": "vxlan"}))], [free[25]]),
        ]
    else:
        c += [
            Case("host-gw peer not on the local link", [(_key(free[20]), v("198.51.100.7"))], [free[20]]),
            Case("lease at a /16 around the underlay", [("10.250.0.0-16", v("10.250.0.99"))], ["10.250.0.0/16"]),
            Case("lease at host 1's underlay IP", [("10.250.0.11-32", v("10.250.0.99"))], ["10.250.0.11/32"]),
            Case("lease containing another host's PublicIP", [("10.250.0.0-25", v("10.250.0.99"))],
                 ["10.250.0.0/25"]),
            Case("VtepMAC multicast in a host-gw cluster",
                 [(_key(free[22]), v("10.250.0.99", mac="01:00:5e:00:00:01", btype="vxlan"))], [free[22]]),
        ]
    return [case for case in c if w.backend in case.backends]


def _refused_on(w: World, host: int, subnet: str, code_text: str) -> None:
    status = w.lab.agent_status(host)
    assert subnet in status["refused"], status


def _logged_once(w: World, subnet: str) -> None:
    for h in (1, 2):
        lines = [l for l in w.log_since(h).splitlines() if f"refusing lease {subnet} " in l]
        assert len(lines) == 1, lines


# --- the catalogue -------------------------------------------------------------------------------


def test_hostile_etcd_catalogue(world: World) -> None:
    w = world
    started = time.monotonic()
    all_cases = cases(w)
    assert len(all_cases) >= 36
    for case in all_cases:
        run_case(w, case)
    elapsed = time.monotonic() - started
    print(f"FIGURE hostile etcd {w.backend}: cases={len(all_cases)}, seconds={elapsed:.1f}, "
          f"pings_sent={w.sent_pings}, pings_lost={w.lost_pings}", flush=True)
    assert w.lost_pings == 0


def run_case(w: World, case: Case) -> None:
    lab = w.lab
    w.mark_logs()
    pinger = Pinger(lab)
    try:
        for key, value in case.puts:
            w.put(key, value)
        w.settle()
        for host, (subnet, ip, mac) in case.accepted.items():
            want = expected_entries(w, IPv4Network(subnet), ip, mac)["routes"]
            wait_for(lambda: want <= kernel_state(w, host)["routes"], 10, f"host {host} to program {subnet}", w)
        problems = check_state(w, case, during=True)
        if case.check is not None:
            case.check(w)
        for key in dict.fromkeys(k for k, _ in case.puts):
            w.delete(key)
        w.settle()
        for host, (subnet, _ip, _mac) in case.accepted.items():
            wait_for(lambda: not any(r[0] == subnet for r in kernel_state(w, host)["routes"]), 10,
                     f"host {host} to remove {subnet}", w)
        problems += check_state(w, case, during=False)
    finally:
        sent, lost, lost_seqs = pinger.stop()
    w.sent_pings += sent
    w.lost_pings += lost
    assert not problems, f"{case.name}: " + "; ".join(problems)
    assert lost == 0, f"{case.name}: {lost} of {sent} pings lost (seq {lost_seqs})"


def check_state(w: World, case: Case, during: bool) -> list[str]:
    problems: list[str] = []
    for h in (1, 2):
        where = f"host {h} ({'with' if during else 'after'} the hostile keys)"
        if not (w.lab.agent_running(h) and w.lab.host(h).pid == w.pids[h]):
            problems.append(f"{where}: agent exited\n{w.lab.tail_log(h, 30)}")
            continue
        log = w.log_since(h)
        if "Traceback" in log:
            problems.append(f"{where}: traceback in the log:\n{log[-3000:]}")
        now = kernel_state(w, h)
        want = {kind: set(entries) for kind, entries in w.baseline[h].items()}
        if during and h in case.accepted:
            subnet, ip, mac = case.accepted[h]
            for kind, entries in expected_entries(w, IPv4Network(subnet), ip, mac).items():
                want[kind] |= entries
        outside = {r for r in now["routes"] if not _dst(r).subnet_of(w.network)}
        was_outside = {r for r in w.baseline[h]["routes"] if not _dst(r).subnet_of(w.network)}
        if outside != was_outside:
            problems.append(f"{where}: routes outside Network changed: added {outside - was_outside}, "
                            f"removed {was_outside - outside}")
        for kind in want:
            if now[kind] != want[kind]:
                problems.append(f"{where}: {kind} differ from the accepted state: extra {now[kind] - want[kind]}, "
                                f"missing {want[kind] - now[kind]}")
        if during:
            status = w.lab.agent_status(h)
            for subnet in case.refused:
                if subnet not in status["refused"]:
                    problems.append(f"{where}: {subnet} not refused in /status: {status['refused']}")
            if case.skipped and "skipping" not in log:
                problems.append(f"{where}: no 'skipping' log line for the undecodable lease")
    return problems
