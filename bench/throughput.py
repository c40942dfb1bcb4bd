"""Container-to-container TCP throughput across two lab hosts (issue #3), with iperf3.

For each backend (vxlan, udp, host-gw) a 2-host lab is built and measured: first the raw
underlay (host 1 -> host 2 over the veth bridge, no flannel: the baseline for that backend's
ratio), then container 1 -> container 2 through the backend.  Each figure is the best of
--runs iperf3 runs of --seconds (on a shared machine other jobs only ever lower a run).  For udp the flanneld processes' CPU use during the runs is
read from /proc/<pid>/stat (utime + stime, all threads).

    python3 bench/throughput.py [--backends vxlan,udp,host-gw] [--seconds 5] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import time

import httpx
from benchlib import (
    Resources,
    Row,
    agent_pid,
    bench_lab,
    cpu_seconds,
    machine_busy_seconds,
    machine_times,
    median,
    ns_cmd,
    table,
    wait_idle,
    wait_peers_programmed,
)

from flannelpy.lab.netns_lab import Lab

# Before each iperf3 run, wait up to this long for the shared machine to go quiet (0: don't).
IDLE_WAIT_S = 60.0
_busy_before: list[float] = []


def _sample(pids: list[int]) -> dict[str, float]:
    m = machine_times()
    out = {f"pid{i}": cpu_seconds(p) for i, p in enumerate(pids)}
    out.update(busy=machine_busy_seconds(), softirq=m["softirq"], steal=m["steal"], wall=time.monotonic())
    return out


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def iperf(res: Resources, server_ns: str, client_ns: str, address: str, seconds: int,
          cpu_of: list[int] = (), acc: dict[str, float] | None = None) -> float:
    """One iperf3 run; Gbit/s received.  The server is ours, stopped by PID.  With `acc`, the
    CPU seconds the `cpu_of` PIDs (pid0, pid1...), the whole machine (busy, softirq, steal) and
    both iperf3 processes (iperf3) used during the client's run, and its wall time, are added."""
    if IDLE_WAIT_S > 0:
        _busy_before.append(wait_idle(IDLE_WAIT_S))
    children0 = _children_cpu()
    server = res.popen(ns_cmd(server_ns, "iperf3", "-s", "-1", "-B", address),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    used: dict[str, float] = {}
    try:
        for _attempt in range(20):
            before = _sample(list(cpu_of))
            out = subprocess.run(ns_cmd(client_ns, "iperf3", "-c", address, "-t", str(seconds), "-J"),
                                 capture_output=True, text=True, timeout=seconds + 30)
            after = _sample(list(cpu_of))
            used = {k: after[k] - before[k] for k in before}
            doc = json.loads(out.stdout) if out.stdout.strip() else {"error": out.stderr}
            if "error" in doc and "refused" in str(doc["error"]):
                time.sleep(0.25)  # server not listening yet
                continue
            if "error" in doc:
                raise RuntimeError(f"iperf3 {client_ns} -> {address}: {doc['error']}")
            end = doc["end"]
            return (end.get("sum_received") or end["sum"])["bits_per_second"] / 1e9
        raise RuntimeError(f"iperf3 server on {address} never answered")
    finally:
        res.stop(server)  # reaped: its CPU now counts in RUSAGE_CHILDREN, like the client's
        if acc is not None and used:
            used["iperf3"] = _children_cpu() - children0
            for k, v in used.items():
                acc[k] = acc.get(k, 0.0) + v


def backend_counters(lab: Lab, i: int) -> dict[tuple[str, str], float]:
    """flannel_backend_{packets,bytes}_total by (metric, direction) from host i's agent's
    /metrics on its status socket (the udp forwarder's counters)."""
    with httpx.Client(transport=httpx.HTTPTransport(uds=lab.host(i).status_socket), timeout=5) as c:
        text = c.get("http://flanneld/metrics").text
    out = {}
    for m in re.finditer(r'^flannel_backend_(packets|bytes)_total\{([^}]*)\} (\S+)$', text, re.M):
        direction = re.search(r'direction="(\w+)"', m.group(2))
        if direction:
            out[(m.group(1), direction.group(1))] = float(m.group(3))
    return out


def measure(res: Resources, lab: Lab, backend: str, seconds: int, runs: int) -> list[Row]:
    h1, h2 = lab.host(1), lab.host(2)
    # Best of `runs`: other jobs on a shared machine only ever lower a run's figure.
    underlay = max(iperf(res, h2.netns, h1.netns, h2.ip, seconds) for _ in range(runs))
    pids = [agent_pid(lab, 1), agent_pid(lab, 2)]
    counters0 = [backend_counters(lab, 1), backend_counters(lab, 2)] if backend == "udp" else None
    acc: dict[str, float] = {}
    runs_gbps = [iperf(res, h2.container_ns, h1.container_ns, h2.container_ip, seconds, pids, acc)
                 for _ in range(runs)]
    overlay = max(runs_gbps)
    pct = {k: v / acc["wall"] * 100 for k, v in acc.items()}
    if counters0 is not None:
        c1, c2 = backend_counters(lab, 1), backend_counters(lab, 2)
        tx = c1.get(("packets", "tx"), 0) - counters0[0].get(("packets", "tx"), 0)
        tx_bytes = c1.get(("bytes", "tx"), 0) - counters0[0].get(("bytes", "tx"), 0)
        rx = c2.get(("packets", "rx"), 0) - counters0[1].get(("packets", "rx"), 0)
    label = f"iperf3 -t {seconds}, best of {' / '.join(f'{g:.2f}' for g in runs_gbps)}"
    rows = [Row("throughput", f"{backend}: container -> container ({label}, MTU {h1.mtu})", overlay, "Gbit/s",
                "underlay host -> host (same lab)", underlay)]
    if backend == "udp":
        rows += [Row("throughput", "udp: flanneld CPU during the runs, sending host h1 (100% = 1 core)", pct["pid0"], "%"),
                 Row("throughput", "udp: flanneld CPU during the runs, receiving host h2", pct["pid1"], "%"),
                 Row("throughput", "udp: iperf3 client + server CPU during the runs", pct["iperf3"], "%"),
                 Row("throughput", "udp: softirq (kernel packet processing) during the runs", pct["softirq"], "%"),
                 Row("throughput", f"udp: whole machine busy during the runs (of {os.cpu_count() * 100}%, steal "
                     f"{pct['steal']:.0f}%)", pct["busy"], "%")]
        if tx:
            rows += [Row("throughput", f"udp: packets/s, h1 TUN -> UDP, mean of all runs ({tx_bytes / tx:.0f} B avg)",
                         tx / acc["wall"], "pkt/s"),
                     Row("throughput", "udp: h1 flanneld CPU per forwarded packet", acc["pid0"] / tx * 1e6, "us"),
                     Row("throughput", "udp: h2 flanneld CPU per forwarded packet", acc["pid1"] / max(rx, 1) * 1e6, "us")]
    return rows


def run(res: Resources, backends: list[str], seconds: int = 5, runs: int = 3,
        labs: dict[str, Lab] | None = None) -> list[Row]:
    """`labs` may supply an already running lab for a backend (run_all reuses its vxlan lab)."""
    rows: list[Row] = []
    for backend in backends:
        lab = (labs or {}).get(backend)
        own = lab is None
        if own:
            lab = bench_lab(res, {"vxlan": "x", "udp": "u", "host-gw": "g"}[backend], backend, hosts=2)
        try:
            wait_peers_programmed(lab)
            rows += measure(res, lab, backend, seconds, runs)
        finally:
            if own:
                res.drop_lab(lab)
    return rows


def set_idle_wait(seconds: float) -> None:
    global IDLE_WAIT_S
    IDLE_WAIT_S = seconds


def busy_note() -> str:
    if not _busy_before:
        return "no idle wait"
    b = sorted(_busy_before)
    return (f"machine busy (other jobs) just before the {len(b)} iperf3 runs: median {median(b) * 100:.0f}%, "
            f"max {b[-1] * 100:.0f}% of all CPUs")


def underlay_row(rows: list[Row]) -> Row:
    values = [r.base_value for r in rows if r.base_value is not None and r.unit == "Gbit/s"]
    return Row("throughput", f"underlay host -> host (veth bridge), median of the {len(values)} labs' figures",
               median(values), "Gbit/s")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--backends", default="vxlan,udp,host-gw")
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--idle-wait", type=float, default=IDLE_WAIT_S,
                   help="before each run wait up to this many s for the machine to be <25%% busy")
    args = p.parse_args()
    set_idle_wait(args.idle_wait)
    with Resources() as res:
        rows = run(res, args.backends.split(","), args.seconds, args.runs)
    print(table([underlay_row(rows), *rows]))
    print(busy_note())


if __name__ == "__main__":
    main()
