"""flannelpy side by side with the real flanneld (issue #19): the same namespace lab, the same
etcd, the same leases, the two agents taking turns (A B A B) on the same host namespace.

    python3 bench/vs_flanneld.py                         # both APIs, every measure (~25 min per API)
    python3 bench/vs_flanneld.py --api v3 --only cold,join --reps 3
    python3 bench/vs_flanneld.py --soak 600              # adds the 10-minute churn soak (RSS flat?)

APIs: `v3` runs flanneld v0.20.2 (config written with `etcdctl put`); `v2` runs flanneld v0.17.0
against etcd's v2 keys API (`--enable-v2`, config written with `etcdctl mk`).  flannelpy runs
with its defaults (`-etcd-api auto` picks the API where the config is).  Measures (`--only`):

  startup  agent restart -> subnet.env rewritten, lease kept (host 2; 2 ms polling)
  rss      idle RSS with 2 hosts (both hosts run the agent under test)
  cold     cold start (fresh flannel.1) with N remote leases in etcd -> every peer's ARP entry,
           FDB entry and route present; per-peer cost (T(N) - T(1 peer)) / N, and the same less
           the kernel's own cost per peer at N (the backend's requests sent alone from a fresh
           namespace: IPv4 route inserts get slower as the table grows); CPU; RSS after, and its
           growth per extra peer between the two sizes (1000 -> 5000: a large cluster's marginal cost)
  join     lease put -> its ARP+FDB+route, 40 joins with 10 / 300 / 1000 peers present, p50/p99;
           RSS growth per extra peer (10 -> 1000); idle CPU with 1000 peers over --idle-seconds
  churn    a writer puts 100 leases and removes them (v3: one range delete; v2: 100 deletes),
           paced to ~150 and then 1000 events/s, for --churn-seconds, while container 1 pings
           container 2; then: time until the kernel holds none of those entries, entries left,
           lost pings, RSS before/after

Every figure is printed as it is measured; the end is a table with flanneld, flannelpy, the
ratio and the issue's goal.  flannelpy runs from `git archive HEAD` (the commit is in the
header) unless `--tree live`, imported as a regular install is (benchlib.installed_python: no
editable install's import hook).  The real flanneld comes from ../shared/anchors; without it the
script says so and exits 0.  Known quirks of those builds, designed around: v0.20.2 panics on
SIGTERM (exit 2: harmless here), exits when its own lease is deleted (the churn range never
covers a host's lease), and agents started at the same moment can miss peers (agents here are
started one at a time, each after the previous one wrote subnet.env).

Root only; namespaces `fpb<4 hex><letter>-*`, every process stopped by PID at the end (also on
error or SIGTERM).  Timings on a shared machine: nothing is asserted; figures are provisional
when the header says the machine was busy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface
from typing import Any

from benchlib import (
    BENCH_NETWORK,
    BENCH_SUBNET_MAX,
    BENCH_SUBNET_MIN,
    HERE,
    PROBE,
    Resources,
    cpu_seconds,
    installed_python,
    machine_busy_seconds,
    median,
    ns_cmd,
    percentile,
    probe,
    proc_cmdline,
    rss_kib,
    wait_idle,
)

from flannelpy.lab.netns_lab import Lab, LabError, LabHost
from flannelpy.lab.netns_lab import run as lab_run

REPO = os.path.dirname(HERE)
ANCHORS = os.path.normpath(os.path.join(REPO, "..", "shared", "anchors"))
FP_LAUNCH = os.path.join(HERE, "fp_launch.py")
REFERENCE = {"v3": "v0.20.2", "v2": "v0.17.0"}
KINDS = ("flanneld", "flannelpy")
HOST_A, HOST_B = 1, 2  # host 2 runs the agent under test; host 1 holds a real peer lease
JOIN_FIRST, JOIN_SPAN = 5000, 880  # fake-peer indices for joins (below nsprobe's CHURN_FIRST)
ALL = ("startup", "rss", "cold", "join", "churn")


# --- the lab: one agent command per host, chosen per run --------------------------------------


class NoPingBeforeChurn(RuntimeError):
    """An agent's data plane did not carry pings before a churn step (so the step is skipped)."""


@dataclass
class VsLab(Lab):
    """netns_lab.Lab whose hosts each run either the real flanneld or flannelpy."""

    kinds: dict[str, str] = field(default_factory=dict)  # host index (as str, for lab.json) -> kind
    flanneld_bin: str = ""
    fp_tree: str = "-"  # fp_launch.py's TREE: a `git archive` of flannelpy, or "-" for the work tree
    fp_python: str = ""  # the interpreter for fp_launch.py (benchlib.installed_python for a tree); "" this one

    def agent_command(self, host: LabHost) -> list[str]:
        common = [f"-etcd-endpoints={self.etcd_endpoint}", f"-etcd-prefix={self.etcd_prefix}", "-iface=eth0",
                  f"-subnet-file={host.subnet_file}", "-ip-masq"]
        if self.kinds.get(str(host.index), "flannelpy") == "flanneld":
            return [self.flanneld_bin, *common]
        # flannelpy's status socket is on by default (/run/flannel/flanneld.sock); one per host here.
        return [self.fp_python or sys.executable, FP_LAUNCH, self.fp_tree, *common, f"-status-socket={host.status_socket}"]


def agent_pid(lab: Lab, i: int) -> int:
    """The lab starts nsenter, which execs the agent: wait until the PID is the agent itself."""
    pid = lab.host(i).pid
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        argv = proc_cmdline(pid)
        if argv and os.path.basename(argv[0]) != "nsenter":
            return pid
        time.sleep(0.01)
    raise RuntimeError(f"pid {pid} of host {i} is still nsenter: {proc_cmdline(pid)}")


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


# --- results ---------------------------------------------------------------------------------


@dataclass
class Measure:
    key: str
    label: str
    unit: str
    goal: str = ""
    # (flanneld median, flannelpy median, all results) -> met? (None: not decidable here)
    check: Callable[[float, float, Results], bool | None] | None = None


class Results:
    def __init__(self, api: str) -> None:
        self.api = api
        self.values: dict[str, dict[str, list[float]]] = {}
        self.notes: list[str] = []

    def add(self, key: str, kind: str, value: float | None, unit: str = "") -> None:
        if value is None:
            return
        self.values.setdefault(key, {}).setdefault(kind, []).append(value)
        print(f"  [{self.api}] {key} {kind}: {value:.4g} {unit}", flush=True)

    def med(self, key: str, kind: str) -> float | None:
        vals = self.values.get(key, {}).get(kind)
        return median(vals) if vals else None

    def spread(self, key: str, kind: str) -> str:
        vals = self.values.get(key, {}).get(kind)
        if not vals:
            return "-"
        m = median(vals)
        if len(vals) == 1:
            return _num(m)
        return f"{_num(m)} ({_num(min(vals))}–{_num(max(vals))})"


def _num(v: float) -> str:
    if v == float("inf"):
        return "never"  # churn: not converged within the window
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}" if abs(v) >= 1 else f"{v:.3g}"


def measures(args: argparse.Namespace) -> list[Measure]:
    out = [Measure("startup", "start → subnet.env, lease kept (p50 of runs)", "ms", "≤ 3× flanneld",
                   lambda fd, fp, r: fp <= 3 * fd),
           Measure("rss_idle", "idle RSS, 2 hosts (mean of both hosts)", "MiB", "≤ flanneld",
                   lambda fd, fp, r: fp <= fd),
           Measure("cold_1", "cold start, 1 peer → its routes", "s")]
    for n in args.cold_sizes:
        out.append(Measure(f"cold_{n}", f"cold start, {n} leases → all routes", "s",
                           "≤ 1.1× flanneld" if n == 1000 else "",
                           (lambda fd, fp, r: fp <= 1.1 * fd) if n == 1000 else None))
        big = n == max(args.cold_sizes) and n != min(args.cold_sizes)
        small = min(args.cold_sizes)
        out.append(Measure(
            f"perpeer_{n}", f"cold start: cost per extra peer at {n}", "ms",
            f"flannelpy's ≤ its cost at {small}" if big else "",
            (lambda fd, fp, r, s=small: fp <= (r.med(f"perpeer_{s}", "flannelpy") or 0) * 1.0) if big else None))
        out.append(Measure(f"kernel_{n}", f"  (the kernel alone: {n} peers' ARP+FDB+route, per peer)", "ms"))
        out.append(Measure(
            f"perpeer_own_{n}", f"cold start: cost per extra peer at {n}, less the kernel's", "ms",
            f"≤ its own at {small}" if big else "",
            (lambda fd, fp, r, s=small: fp <= (r.med(f"perpeer_own_{s}", "flannelpy") or 0) * 1.0) if big else None))
        out.append(Measure(f"coldcpu_{n}", f"cold start {n}: agent CPU until all routes", "s"))
        out.append(Measure(f"coldrss_{n}", f"cold start {n}: RSS 3 s after", "MiB"))
    if len(args.cold_sizes) > 1:
        # The marginal cost of a peer in a large cluster: a start's bursts (a listing page, two apply
        # rounds) cost a bounded amount that the 10 -> 1000 figure spreads over its peers.
        lo, hi = min(args.cold_sizes), max(args.cold_sizes)
        out.append(Measure("coldrss_per_peer", f"RSS growth per extra peer ({lo} → {hi} leases, cold starts)",
                           "KiB", "≤ 1 KiB", lambda fd, fp, r: fp <= 1.0))
    small_j, big_j = min(args.join_sizes), max(args.join_sizes)
    for p in args.join_sizes:
        out.append(Measure(f"join{p}_p50", f"join put → route, {p} peers present, p50", "ms",
                           f"≤ 1.2× own p50 at {small_j} peers" if p == big_j and p != small_j else "",
                           (lambda fd, fp, r: fp <= 1.2 * (r.med(f"join{small_j}_p50", "flannelpy") or 0))
                           if p == big_j and p != small_j else None))
        out.append(Measure(f"join{p}_p99", f"join put → route, {p} peers present, p99", "ms",
                           "≤ max(1.5× flanneld, 10 ms)" if p == big_j else "",
                           (lambda fd, fp, r: fp <= max(1.5 * fd, 10.0)) if p == big_j else None))
        out.append(Measure(f"join{p}_watch", f"  (etcd put → watch event p50, same joins, {p} peers)", "ms"))
    out += [Measure("rss_per_peer", f"RSS growth per extra peer ({small_j} → {big_j} peers)", "KiB",
                    "≤ 1 KiB", lambda fd, fp, r: fp <= 1.0),
            Measure("idle_cpu", f"idle CPU with {big_j} peers ({args.idle_seconds:.0f} s)", "% of a core",
                    "no periodic per-peer walk: ≈ flanneld", None)]
    for rate in args.churn_rates:
        tag = f"churn{rate:g}"
        out += [Measure(f"{tag}_rate", f"churn ~{rate:g} ev/s: events/s achieved by the writer", "ev/s"),
                Measure(f"{tag}_converge", f"churn ~{rate:g} ev/s: converged after the writer stopped "
                        f"(window {args.churn_window:.0f} s)", "s", "≤ 2 s",
                        lambda fd, fp, r: fp <= 2.0),
                Measure(f"{tag}_stale", f"churn ~{rate:g} ev/s: stale routes+ARP+FDB entries left "
                        "(both hosts, end of window)", "entries", "0", lambda fd, fp, r: fp == 0),
                Measure(f"{tag}_peak", f"churn ~{rate:g} ev/s: most stale entries seen after the stop", "entries"),
                Measure(f"{tag}_lost", f"churn ~{rate:g} ev/s: pings lost (c1 → c2, 5/s)", "pings", "0",
                        lambda fd, fp, r: fp == 0),
                Measure(f"{tag}_rss", f"churn ~{rate:g} ev/s: RSS growth over the run (mean of hosts)", "MiB")]
    if args.soak:
        out.append(Measure("soak_rss", f"soak {args.soak:.0f} s at ~{args.soak_rate:g} ev/s: RSS growth "
                           "(host 2, after the first minute)", "MiB", "≤ 1 MiB", lambda fd, fp, r: fp <= 1.0))
        out.append(Measure("soak_rate", "soak: events/s achieved", "ev/s"))
    return out


def render(results: list[Results], args: argparse.Namespace, markdown: bool) -> str:
    head = ["API", "measure", "unit", "flanneld", "flannelpy", "ratio", "goal", "met"]
    rows = []
    for res in results:
        for m in measures(args):
            if m.key not in res.values:
                continue
            fd, fp = res.med(m.key, "flanneld"), res.med(m.key, "flannelpy")
            finite = fd is not None and fp is not None and fd not in (0, float("inf")) and fp != float("inf")
            ratio = f"{fp / fd:.2f}x" if finite else "-"
            met = "-"
            if m.check is not None and fp is not None and fd is not None:
                ok = m.check(fd, fp, res)
                met = "-" if ok is None else ("yes" if ok else "no")
            rows.append([f"{res.api} ({REFERENCE[res.api]})", m.label, m.unit, res.spread(m.key, "flanneld"),
                         res.spread(m.key, "flannelpy"), ratio, m.goal or "-", met])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in [head, *rows])


def kernel_alone(netns: str, n: int) -> float:
    """ms per peer for the kernel alone to take n fake peers' ARP entry, FDB entry and onlink
    route: the requests flannelpy's vxlan backend sends, in its batches, from a fresh namespace
    with nothing else running in it.  Both agents pay this; it grows with the table size (IPv4
    route inserts: ~0.035 ms each into 1000 routes, ~0.1 ms into 5000, on this kernel)."""
    from nsprobe import fake_peer

    from flannelpy.backends.vxlan.backend import APPLY_CHUNK, _plan_requests
    from flannelpy.backends.vxlan.plan import Fdb, Neigh, PeerPlan, Route
    from flannelpy.hostnet.netlink import KernelDumps

    lab_run("ip", "netns", "add", netns)
    dumps = KernelDumps(netns)
    try:
        for args in (["link", "add", "u0", "type", "veth", "peer", "name", "u1"],
                     ["addr", "add", "10.250.0.1/16", "dev", "u0"], ["link", "set", "u0", "up"],
                     ["link", "add", "flannel.1", "type", "vxlan", "id", "1", "dev", "u0", "local", "10.250.0.1",
                      "dstport", "8472", "nolearning"], ["link", "set", "flannel.1", "up"]):
            lab_run("ip", "-n", netns, *args)
        index = dumps.link("flannel.1").index
        batches: list[list[Any]] = [[]]
        for i in range(n):
            subnet, mac, public = fake_peer(i)
            gateway = subnet.network_address
            plan = PeerPlan(Route(subnet, gateway, True), Neigh(gateway, mac), Fdb(mac, IPv4Address(public)))
            if len(batches[-1]) == 3 * APPLY_CHUNK:
                batches.append([])
            batches[-1] += [req for _what, req in _plan_requests(index, plan, True, True)]
        t0 = time.perf_counter()
        codes = [c for batch in batches for c in dumps.transact(batch)]
        seconds = time.perf_counter() - t0
        if any(codes):
            raise RuntimeError(f"kernel_alone: {sum(1 for c in codes if c)} requests refused ({os.strerror(max(codes))})")
        return seconds / n * 1e3
    finally:
        dumps.close()
        lab_run("ip", "netns", "del", netns, check=False)


# --- the rig: one lab per API ----------------------------------------------------------------


class Rig:
    def __init__(self, res: Resources, lab: VsLab, api: str, args: argparse.Namespace, out: Results) -> None:
        self.res, self.lab, self.api, self.args, self.out = res, lab, api, args, out
        self.fakes: list[tuple[int, int, int]] = []  # (lease_id, first, count) written by fill
        self.fake_count = 0
        self.join_runs = 0

    # agents

    def stop(self, i: int) -> None:
        if self.lab.agent_running(i):
            self.lab.stop_agent(i)

    def start(self, i: int, kind: str, fresh: bool = True) -> int:
        """(Re)start host i's agent as `kind`; fresh: without flannel.1, so nothing is inherited
        from the other agent.  Returns once subnet.env was rewritten."""
        self.stop(i)
        h = self.lab.host(i)
        if fresh:
            lab_run("ip", "link", "del", "flannel.1", netns=h.netns, check=False)
        self.lab.kinds[str(i)] = kind
        before = _file_id(h.subnet_file)
        self.lab.start_agent(i)
        pid = agent_pid(self.lab, i)
        deadline = time.monotonic() + 120
        while _file_id(h.subnet_file) == before:
            if not self.lab.agent_running(i) or time.monotonic() > deadline:
                raise LabError(f"{kind} on host {i} wrote no subnet.env:\n{self.lab.tail_log(i, 30)}")
            time.sleep(0.01)
        self.lab.wait_subnet_env(i, 10)  # parse it: subnet and MTU
        return pid

    def quiet(self, step: str) -> None:
        if self.args.idle_wait > 0:
            busy = wait_idle(self.args.idle_wait)
            self.out.notes.append(f"{step}: machine {busy * 100:.0f}% busy before")

    # fake leases

    def fill_to(self, count: int) -> None:
        if count < self.fake_count:
            self.remove_fakes()
        if count > self.fake_count:
            n = count - self.fake_count
            doc = probe(self.res, self.lab.underlay_ns, "fill", "--api", self.api, "--prefix", self.lab.etcd_prefix,
                        "--count", str(n), "--first", str(self.fake_count), "--threads", "4")
            self.fakes.append((doc["lease_id"], self.fake_count, n))
            self.fake_count = count

    def remove_fakes(self) -> None:
        for lease_id, first, count in self.fakes:
            probe(self.res, self.lab.underlay_ns, "revoke", "--api", self.api, "--prefix", self.lab.etcd_prefix,
                  "--lease-id", str(lease_id), "--first", str(first), "--count", str(count))
        self.fakes.clear()
        self.fake_count = 0

    def peer_spec(self, i: int) -> str:
        value = self.lab.lease_value(i)
        if value is None:
            raise LabError(f"host {i} has no lease in etcd")
        return f"{IPv4Interface(self.lab.host(i).subnet).network}={value['BackendData']['VtepMAC']}"

    def cold_start(self, kind: str) -> dict[str, Any]:
        """Start host B's agent with a fresh flannel.1; time until every peer in etcd (the fakes
        and host A) has its ARP entry, FDB entry and route."""
        h = self.lab.host(HOST_B)
        self.stop(HOST_B)
        lab_run("ip", "link", "del", "flannel.1", netns=h.netns, check=False)
        cmd = [PROBE, "scale", "--count", str(self.fake_count), "--timeout", "400", "--peer", self.peer_spec(HOST_A)]
        mon = self.res.popen(ns_cmd(h.netns, sys.executable, *cmd), stdout=subprocess.PIPE, text=True)
        try:
            if mon.stdout.readline().strip() != "ready":
                raise RuntimeError("nsprobe scale did not start")
            self.lab.kinds[str(HOST_B)] = kind
            t0 = time.monotonic()
            self.lab.start_agent(HOST_B)
            pid = agent_pid(self.lab, HOST_B)
            line = mon.stdout.readline()
        finally:
            self.res.stop(mon)
        doc = json.loads(line)
        if doc["done"] is None:
            raise RuntimeError(f"{kind}: {doc['missing']} peers never programmed:\n{self.lab.tail_log(HOST_B, 30)}")
        cpu = cpu_seconds(pid)
        self.lab.wait_subnet_env(HOST_B, 10)
        return {"seconds": doc["done"] - t0, "first": doc["first"] - t0, "cpu": cpu, "pid": pid,
                "overflows": doc["overflows"]}

    # measures

    def run_startup(self) -> None:
        self.quiet("startup")
        self.stop(HOST_A)
        path = self.lab.host(HOST_B).subnet_file
        for _ in range(self.args.startup_runs):
            for kind in KINDS:
                self.start(HOST_B, kind, fresh=False)  # warm-up: the device is now this agent's
                time.sleep(1.0)
                self.stop(HOST_B)
                before = _file_id(path)
                self.lab.kinds[str(HOST_B)] = kind
                t = time.monotonic()
                self.lab.start_agent(HOST_B)
                while _file_id(path) == before:
                    if time.monotonic() - t > 60:
                        raise RuntimeError(f"{kind}: subnet.env not rewritten in 60 s:\n{self.lab.tail_log(HOST_B)}")
                    time.sleep(0.002)
                self.out.add("startup", kind, (time.monotonic() - t) * 1e3, "ms")
                time.sleep(1.0)
        self.stop(HOST_B)

    def run_rss(self) -> None:
        self.quiet("rss")
        for _ in range(self.args.reps):
            for kind in KINDS:
                for attempt in (1, 2):  # flanneld now and then carries no ping after its start: try again once
                    pids = [self.start(i, kind) for i in (HOST_A, HOST_B)]
                    bad = [p for p, ok in self.lab.wait_all_pings(30).items() if not ok]
                    if not bad:
                        break
                    note = f"idle RSS, {kind}: no ping between {bad} within 30 s of both starts (attempt {attempt})"
                    self.out.notes.append(note)
                    print(f"  [{self.api}] {note}", flush=True)
                else:
                    continue  # not measured this round; the note says why
                time.sleep(5)
                self.out.add("rss_idle", kind, sum(rss_kib(p) for p in pids) / len(pids) / 1024, "MiB")
        self.stop(HOST_A)
        self.stop(HOST_B)

    def run_cold(self) -> None:
        self.stop(HOST_A)
        base: dict[str, list[float]] = {k: [] for k in KINDS}
        for n in [0, *self.args.cold_sizes]:
            self.stop(HOST_B)
            self.fill_to(n)
            self.quiet(f"cold {n}")
            for rep in range(self.args.reps):
                for kind in KINDS:
                    r = self.cold_start(kind)
                    time.sleep(3)
                    rss = rss_kib(r["pid"]) / 1024
                    if n == 0:
                        self.out.add("cold_1", kind, r["seconds"], "s")
                        base[kind].append(r["seconds"])
                        continue
                    self.out.add(f"cold_{n}", kind, r["seconds"], "s")
                    self.out.add(f"coldcpu_{n}", kind, r["cpu"], "s")
                    self.out.add(f"coldrss_{n}", kind, rss, "MiB")
                    self.out.add(f"perpeer_{n}", kind, (r["seconds"] - median(base[kind])) / n * 1e3, "ms")
                if n:
                    kernel = kernel_alone(self.res.prefix + "k", n)
                    self.out.add(f"kernel_{n}", "flannelpy", kernel, "ms")
                    for kind in KINDS:
                        own = self.out.values[f"perpeer_{n}"][kind][-1] - kernel
                        self.out.add(f"perpeer_own_{n}", kind, own, "ms")
            self.stop(HOST_B)  # the next fill must not be applied by a running agent
        lo, hi = min(self.args.cold_sizes, default=0), max(self.args.cold_sizes, default=0)
        if lo != hi:
            for kind in KINDS:
                pairs = zip(self.out.values.get(f"coldrss_{lo}", {}).get(kind, []),
                            self.out.values.get(f"coldrss_{hi}", {}).get(kind, []))
                for a, b in pairs:
                    self.out.add("coldrss_per_peer", kind, (b - a) * 1024 / (hi - lo), "KiB")
        self.remove_fakes()

    def run_join(self) -> None:
        self.stop(HOST_A)
        rss_at: dict[tuple[int, str], list[float]] = {}
        for p in sorted(self.args.join_sizes):
            self.stop(HOST_B)
            self.fill_to(p - 1)  # + host A = p peers
            self.quiet(f"join {p}")
            for _ in range(self.args.reps):
                for kind in KINDS:
                    r = self.cold_start(kind)
                    time.sleep(3)
                    rss_at.setdefault((p, kind), []).append(rss_kib(r["pid"]) / 1024)
                    if p == max(self.args.join_sizes) and self.args.idle_seconds > 0:
                        c0, t0 = cpu_seconds(r["pid"]), time.monotonic()
                        time.sleep(self.args.idle_seconds)
                        self.out.add("idle_cpu", kind, (cpu_seconds(r["pid"]) - c0) / (time.monotonic() - t0) * 100,
                                     "% of a core")
                    self.join_once(p, kind)
            self.stop(HOST_B)
        lo, hi = min(self.args.join_sizes), max(self.args.join_sizes)
        if lo != hi:
            for kind in KINDS:
                for a, b in zip(rss_at[(lo, kind)], rss_at[(hi, kind)]):
                    self.out.add("rss_per_peer", kind, (b - a) * 1024 / (hi - lo), "KiB")
        self.remove_fakes()

    def join_once(self, p: int, kind: str) -> None:
        first = JOIN_FIRST + (self.join_runs * self.args.joins) % JOIN_SPAN
        self.join_runs += 1
        h = self.lab.host(HOST_B)
        doc = probe(self.res, h.netns, "join", "--api", self.api, "--prefix", self.lab.etcd_prefix,
                    "--count", str(self.args.joins), "--first", str(first), "--pause", "0.05")
        rows = doc["joins"]
        # The agent removes them again before the next run (and a stopped agent leaves nothing).
        probe(self.res, self.lab.underlay_ns, "revoke", "--api", self.api, "--prefix", self.lab.etcd_prefix,
              "--lease-id", str(doc["lease_id"]), "--first", str(first), "--count", str(self.args.joins))
        missing = [r["subnet"] for r in rows if r["kernel"] is None or r["watch"] is None]
        if missing:
            raise RuntimeError(f"{kind}: {len(missing)} joins never completed, e.g. {missing[:3]}:\n"
                               f"{self.lab.tail_log(HOST_B, 30)}")
        kernel = [r["kernel"] * 1e3 for r in rows]
        self.out.add(f"join{p}_p50", kind, percentile(kernel, 50), "ms")
        self.out.add(f"join{p}_p99", kind, percentile(kernel, 99), "ms")
        self.out.add(f"join{p}_watch", kind, percentile([r["watch"] * 1e3 for r in rows], 50), "ms")
        time.sleep(2)

    def run_churn(self) -> None:
        self.remove_fakes()
        for rate in self.args.churn_rates:
            self.quiet(f"churn {rate:g}")
            for _ in range(self.args.churn_reps):
                for kind in KINDS:
                    try:
                        r = self.churn_once(kind, rate, self.args.churn_seconds, self.args.churn_window)
                    except NoPingBeforeChurn as err:
                        # A finding about that agent, not the end of the run: the rest is still measured.
                        self.out.notes.append(f"churn ~{rate:g} ev/s, {kind}: not measured: {err}")
                        print(f"  [{self.api}] churn {kind}: {err}", flush=True)
                        continue
                    tag = f"churn{rate:g}"
                    self.out.add(f"{tag}_rate", kind, r["rate"], "ev/s")
                    self.out.add(f"{tag}_converge", kind, r["converge"] if r["converge"] is not None
                                 else float("inf"), "s")
                    self.out.add(f"{tag}_stale", kind, r["stale_end"], "entries")
                    self.out.add(f"{tag}_peak", kind, r["peak_after_stop"], "entries")
                    self.out.add(f"{tag}_lost", kind, r["lost"], "pings")
                    self.out.add(f"{tag}_rss", kind, r["rss_growth"], "MiB")
                    self.out.notes.append(f"churn ~{rate:g} ev/s, {kind}: after the stop, stale entries (h1 / h2) "
                                          f"at +5 s {r['at'][5]}, +10 s {r['at'][10]}, +20 s {r['at'][20]}, "
                                          f"+40 s {r['at'][40]}; writer {r['rounds']} rounds")
        if self.args.soak:
            self.quiet("soak")
            for kind in KINDS:
                r = self.churn_once(kind, self.args.soak_rate, self.args.soak, 30, sample_rss=30.0)
                series = r["rss_series"]
                later = [v for t, v in series if t >= 60] or [v for _, v in series]
                self.out.add("soak_rss", kind, later[-1] - later[0], "MiB")
                self.out.add("soak_rate", kind, r["rate"], "ev/s")
                self.out.notes.append(f"soak {kind}: RSS host 2 (s, MiB) " +
                                      ", ".join(f"{t:.0f}:{v:.1f}" for t, v in series))

    def churn_once(self, kind: str, rate: float, seconds: float, window: float,
                   sample_rss: float = 0.0) -> dict[str, Any]:
        pids = [self.start(i, kind) for i in (HOST_A, HOST_B)]
        bad = [p for p, ok in self.lab.wait_all_pings(30).items() if not ok]
        if bad:
            raise NoPingBeforeChurn(f"{kind} started on both hosts, but no ping between {bad} within 30 s")
        time.sleep(3)
        rss0 = [rss_kib(p) / 1024 for p in pids]
        monitors = [self.res.popen(ns_cmd(self.lab.host(i).netns, sys.executable, PROBE, "stale",
                                          "--window", str(window), "--quiet", "5"),
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                    for i in (HOST_A, HOST_B)]
        a, b = self.lab.host(HOST_A), self.lab.host(HOST_B)
        pinger = self.res.popen(ns_cmd(a.container_ns, "busybox", "ping", "-i", "0.2", "-W", "1", b.container_ip),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        writer = self.res.popen(ns_cmd(self.lab.underlay_ns, sys.executable, PROBE, "churn", "--api", self.api,
                                       "--prefix", self.lab.etcd_prefix, "--rate", str(rate),
                                       "--seconds", str(seconds), "--threads", "4"),
                                stdout=subprocess.PIPE, text=True)
        series: list[tuple[float, float]] = []
        t_start = time.monotonic()
        next_sample = t_start
        while writer.poll() is None:
            if sample_rss and time.monotonic() >= next_sample:
                series.append((time.monotonic() - t_start, rss_kib(pids[1]) / 1024))
                next_sample += sample_rss
            time.sleep(0.2)
        out = writer.stdout.read()
        self.res.stop(writer)
        if writer.returncode != 0:
            raise RuntimeError(f"churn writer failed ({writer.returncode})")
        wdoc = json.loads(out.strip().splitlines()[-1])
        docs = []
        for mon in monitors:
            mon.stdin.write(f"stop {wdoc['t_stop']}\n")
            mon.stdin.flush()
        for mon in monitors:
            text, _ = mon.communicate(timeout=window + 60)
            self.res.stop(mon)
            docs.append(json.loads(text.strip().splitlines()[-1]))
        pinger.send_signal(signal.SIGINT)
        ping_text, _ = pinger.communicate(timeout=10)
        self.res.stop(pinger)
        sent, got = _ping_counts(ping_text)
        if sample_rss:
            series.append((time.monotonic() - t_start, rss_kib(pids[1]) / 1024))
        rss1 = [rss_kib(p) / 1024 for p in pids]
        t_stop = wdoc["t_stop"]
        converge: float | None = 0.0
        for doc in docs:
            after = [s for s in doc["samples"] if s[0] >= t_stop]
            if not after or sum(after[-1][1:]) > 0:
                converge = None
                break
            last_bad = max((s[0] for s in after if sum(s[1:]) > 0), default=None)
            if last_bad is not None:
                nxt = min(s[0] for s in after if s[0] > last_bad)
                converge = None if converge is None else max(converge, nxt - t_stop)

        def at(dt: float) -> str:
            vals = []
            for doc in docs:
                after = [s for s in doc["samples"] if s[0] >= t_stop + dt]
                vals.append(str(sum(after[0][1:])) if after else "-")
            return " / ".join(vals)

        return {"rate": wdoc["rate"], "rounds": wdoc["rounds"], "converge": converge,
                "stale_end": sum(sum(doc["samples"][-1][1:]) for doc in docs),
                "peak_after_stop": max((sum(s[1:]) for doc in docs for s in doc["samples"] if s[0] >= t_stop),
                                       default=0),
                "lost": sent - got, "sent": sent, "rss_growth": (sum(rss1) - sum(rss0)) / len(pids),
                "at": {dt: at(dt) for dt in (5, 10, 20, 40)}, "rss_series": series}


def _ping_counts(text: str) -> tuple[int, int]:
    for line in text.splitlines():
        if "packets transmitted" in line:
            parts = line.split()
            return int(parts[0]), int(parts[3])
    raise RuntimeError(f"no ping summary in: {text[-300:]!r}")


# --- set-up ----------------------------------------------------------------------------------


def machine(tree: str, rev: str = "HEAD") -> dict[str, str]:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", REPO, *a], check=False, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", rev if tree != "live" else "HEAD")
    if tree == "live":
        dirty = git("status", "--porcelain", "--", "flannelpy")
        commit += " + uncommitted changes in flannelpy/" if dirty else " (flannelpy/ clean)"
    else:
        commit += f" (flannelpy from git archive {rev})"
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{os.cpu_count()} CPUs ({cpu}), kernel {platform.release()}, "
                       f"Python {platform.python_version()}",
            "commit": commit}


def unpack_flanneld(version: str, into: str) -> str:
    src = os.path.join(ANCHORS, f"flanneld-{version}.xz")
    dst = os.path.join(into, f"flanneld-{version}")
    with open(dst, "wb") as out:
        subprocess.run(["xz", "-dc", src], stdout=out, check=True)
    os.chmod(dst, 0o755)
    return dst


def snapshot_flannelpy(into: str, commit: str = "HEAD") -> str:
    tree = os.path.join(into, "tree")
    os.makedirs(tree)
    archive = subprocess.run(["git", "-C", REPO, "archive", commit, "flannelpy"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", tree], input=archive.stdout, check=True)
    # Byte-compiled as an installed package is (pip compiles on install): the first start must
    # not pay for compiling every module.
    subprocess.run([sys.executable, "-m", "compileall", "-q", tree], check=True)
    return tree


def run_api(res: Resources, api: str, letter: str, args: argparse.Namespace, tmp: str, tree: str) -> Results:
    out = Results(api)
    config = {"Network": BENCH_NETWORK, "SubnetMin": BENCH_SUBNET_MIN, "SubnetMax": BENCH_SUBNET_MAX,
              "Backend": {"Type": "vxlan"}}
    lab = VsLab(prefix=res.prefix + letter, hosts=2, backend="vxlan", etcd_api=api, config=json.dumps(config),
                flanneld_bin=unpack_flanneld(REFERENCE[api], tmp), fp_tree=tree,
                fp_python=installed_python(tree, tmp) if tree != "-" else "")
    res.labs.append(lab)
    print(f"[{api}] lab {lab.prefix}: flanneld {REFERENCE[api]} vs flannelpy", flush=True)
    lab.up()  # flannelpy on both hosts first (the lab's containers need a subnet.env)
    rig = Rig(res, lab, api, args, out)
    busy0, t0 = machine_busy_seconds(), time.monotonic()
    steps = {"startup": rig.run_startup, "rss": rig.run_rss, "cold": rig.run_cold, "join": rig.run_join,
             "churn": rig.run_churn}
    for step in ALL:
        if step in args.only:
            print(f"[{api}] {step}", flush=True)
            steps[step]()
    out.notes.append(f"whole {api} run: machine {((machine_busy_seconds() - busy0) / (time.monotonic() - t0) / os.cpu_count()) * 100:.0f}% "
                     f"busy on average (this benchmark included), {time.monotonic() - t0:.0f} s")
    rig.remove_fakes()
    res.drop_lab(lab)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--api", default="v3,v2", help="comma list of v3 (flanneld v0.20.2), v2 (flanneld v0.17.0)")
    p.add_argument("--only", default=",".join(ALL), help="comma list of: " + ", ".join(ALL))
    p.add_argument("--reps", type=int, default=2, help="A B rounds per measure")
    p.add_argument("--cold-sizes", default="1000,5000")
    p.add_argument("--join-sizes", default="10,300,1000")
    p.add_argument("--joins", type=int, default=40)
    p.add_argument("--idle-seconds", type=float, default=60.0)
    p.add_argument("--startup-runs", type=int, default=3, help="A B rounds of start -> subnet.env")
    p.add_argument("--churn-rates", default="150,1000")
    p.add_argument("--churn-seconds", type=float, default=30.0)
    p.add_argument("--churn-window", type=float, default=60.0)
    p.add_argument("--churn-reps", type=int, default=1)
    p.add_argument("--soak", type=float, default=0.0, help="also a churn soak of this many s (600: the RSS check)")
    p.add_argument("--soak-rate", type=float, default=1000.0)
    p.add_argument("--tree", default="HEAD",
                   help="flannelpy from `git archive REV` (default HEAD: a commit, whatever the work tree holds) "
                        "or `live`: the work tree as it is")
    p.add_argument("--idle-wait", type=float, default=60.0, help="wait up to this long for a quiet machine per step")
    p.add_argument("--markdown", help="also write the table as Markdown to this file")
    p.add_argument("--json", help="also write every value to this file")
    args = p.parse_args()
    args.only = [x for x in args.only.split(",") if x]
    apis = [x for x in args.api.split(",") if x]
    if set(args.only) - set(ALL) or set(apis) - set(REFERENCE):
        p.error(f"--only takes {', '.join(ALL)}; --api takes v3, v2")
    args.cold_sizes = [int(x) for x in args.cold_sizes.split(",") if x]
    args.join_sizes = [int(x) for x in args.join_sizes.split(",") if x]
    args.churn_rates = [float(x) for x in args.churn_rates.split(",") if x]
    if max(args.cold_sizes + args.join_sizes) > JOIN_FIRST:
        p.error(f"at most {JOIN_FIRST} fake peers (the index space above is for joins and churn)")
    if os.geteuid() != 0:
        sys.exit("vs_flanneld.py needs root (network namespaces)")
    missing = [v for v in (REFERENCE[a] for a in apis) if not os.path.exists(os.path.join(ANCHORS, f"flanneld-{v}.xz"))]
    if missing:
        print(f"skipped: no real flanneld to compare with ({', '.join(missing)} not in {ANCHORS}; "
              "see the anchors README)")
        return
    info = machine(args.tree, args.tree)
    load0 = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    started = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="vsflanneld-")
    results: list[Results] = []
    try:
        tree = snapshot_flannelpy(tmp, args.tree) if args.tree != "live" else "-"
        with Resources() as res:
            print(f"run prefix {res.prefix}; {info['date']}; load {load0}", file=sys.stderr, flush=True)
            for n, api in enumerate(apis):
                results.append(run_api(res, api, "ab"[n], args, tmp, tree))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if results:
            head = (f"{info['date']} | {info['machine']}\ncommit {info['commit']} | load {load0} at start, "
                    "%.2f %.2f %.2f at end | %.0f s" % (*os.getloadavg(), time.monotonic() - started))
            notes = [f"{r.api}: {n}" for r in results for n in r.notes]
            print("\n" + head)
            print(render(results, args, markdown=False))
            print("\n".join(notes))
            if args.markdown:
                with open(args.markdown, "w") as f:
                    f.write(head.replace("\n", "  \n") + "\n\n" + render(results, args, markdown=True) + "\n\n"
                            + "\n".join(f"* {n}" for n in notes) + "\n")
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"info": info, "args": {k: v for k, v in vars(args).items()},
                               "results": {r.api: r.values for r in results},
                               "notes": {r.api: r.notes for r in results}}, f, indent=1)


if __name__ == "__main__":
    main()
