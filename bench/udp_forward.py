"""Throughput of the udp backend's forwarder vs the bare veth underlay, with iperf3.

    python3 bench/udp_forward.py [--seconds 5] [--wait-idle 300]

Builds two hosts + two containers in namespaces named fpud-bench-*, runs the backend in each
host (tests/udp_driver.py), and prints Gbit/s plus the forwarders' CPU (from /proc/<pid>/stat).
The forwarders and iperf3 share the machine's cores, so other load skews the figures: with
--wait-idle the run waits (up to that many seconds) for a quiet machine, and the CPU the
rest of the machine used during each run is printed as "other".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from udp_driver import CONTAINERS, UNDERLAY, UdpLab  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def busy_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4], sum(v)  # (busy, total); idle and iowait excluded from busy


def wait_idle(limit: float) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        b0, t0 = busy_jiffies()
        time.sleep(1)
        b1, t1 = busy_jiffies()
        if (b1 - b0) / max(t1 - t0, 1) < 0.05:
            return
    print("warning: the machine stayed busy; figures are skewed", file=sys.stderr)


def iperf(server_ns: str, client_ns: str, address: str, seconds: int, extra: list[str]) -> float:
    server = subprocess.Popen(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-B", address],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        out = subprocess.run(["ip", "netns", "exec", client_ns, "iperf3", "-c", address, "-t", str(seconds), "-J", *extra],
                             capture_output=True, text=True, timeout=seconds + 30)
        doc = json.loads(out.stdout)
        if "error" in doc:
            raise RuntimeError(doc["error"])
        end = doc["end"]
        summary = end.get("sum_received") or end["sum"]
        return summary["bits_per_second"] / 1e9
    finally:
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()  # our own iperf3 server, by its handle
            server.wait()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--wait-idle", type=float, default=0, help="wait up to this long for an idle machine")
    args = p.parse_args()
    ncpu = os.cpu_count() or 1
    lab = UdpLab(f"fpud-bench-{os.getpid() % 10000}")
    rows = []
    try:
        lab.build()
        if args.wait_idle:
            wait_idle(args.wait_idle)
        rows.append(("veth underlay, TCP", iperf(lab.h[1], lab.h[0], UNDERLAY[1], args.seconds, []), None, None, None))
        d1, d2 = lab.start()
        for label, extra in (("udp backend, TCP", []), ("udp backend, TCP reverse", ["-R"])):
            if args.wait_idle:
                wait_idle(args.wait_idle)
            c1, c2, t0 = cpu_seconds(d1.proc.pid), cpu_seconds(d2.proc.pid), time.monotonic()
            b0, j0 = busy_jiffies()
            gbps = iperf(lab.c[1], lab.c[0], CONTAINERS[1], args.seconds, extra)
            wall = time.monotonic() - t0
            b1, j1 = busy_jiffies()
            fwd1, fwd2 = (cpu_seconds(d1.proc.pid) - c1) / wall, (cpu_seconds(d2.proc.pid) - c2) / wall
            # Everything the machine did besides the two forwarders (iperf3 and softirq included).
            other = (b1 - b0) / max(j1 - j0, 1) * ncpu - fwd1 - fwd2
            rows.append((label, gbps, fwd1, fwd2, other))
        stats = d1.stats()
    finally:
        lab.destroy()
    print(f"{'path':28} {'Gbit/s':>8} {'CPU h1':>8} {'CPU h2':>8} {'other':>8}  (of {ncpu * 100}%)")
    for label, gbps, cpu1, cpu2, other in rows:
        fmt = lambda v: f"{v * 100:7.0f}%" if v is not None else f"{'-':>8}"
        print(f"{label:28} {gbps:8.2f} {fmt(cpu1)} {fmt(cpu2)} {fmt(other)}")
    print("h1 counters:", stats)


if __name__ == "__main__":
    main()
