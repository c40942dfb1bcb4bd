"""All lab benchmarks of issues #7 and #3 in one run, one table:

  memory      RSS of an idle flanneld with 2 peers
  throughput  iperf3 container -> container over vxlan, udp and host-gw vs the raw underlay,
              plus flanneld's CPU during the udp run
  join        etcd put -> neigh/FDB/route on a running agent, p50/p99 of 100, vs put -> watch event
  startup     flanneld start -> subnet.env (p50), vs `python -c pass` / import flannelpy.agent
  scale       1000 leases present at start -> all programmed; CPU and RSS, vs 2 peers

    python3 bench/run_all.py [--only memory,throughput,join,startup,scale] [--markdown FILE]

Root only.  Every namespace is named fpb<4 hex><letter>-*; labs, probes and iperf3 servers are
stopped by PID and the namespaces deleted by name when the run ends, also on error or SIGTERM.
Figures are timings on a shared machine: nothing here is asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

import agent_scale
import agent_startup
import peer_join
import throughput
from benchlib import Resources, Row, bench_lab, table, wait_idle, wait_peers_programmed

ALL = ("memory", "throughput", "join", "startup", "scale")


def machine() -> dict[str, str]:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    git = lambda *a: subprocess.run(["git", "-C", repo, *a], capture_output=True, text=True).stdout.strip()
    dirty = git("status", "--porcelain", "--", "flannelpy/udpforward.py")
    return {
        "date": subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip(),
        "machine": f"{os.cpu_count()} CPUs ({cpu}), kernel {platform.release()}, Python {platform.python_version()}",
        "commit": git("rev-parse", "--short", "HEAD") + (
            f" + uncommitted udpforward.py (blob {git('hash-object', 'flannelpy/udpforward.py')[:10]})" if dirty else ""),
        "load": "load average %.2f %.2f %.2f" % os.getloadavg(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(ALL), help="comma list of: " + ", ".join(ALL))
    p.add_argument("--joins", type=int, default=100)
    p.add_argument("--peers", type=int, default=1000)
    p.add_argument("--startup-runs", type=int, default=7)
    p.add_argument("--seconds", type=int, default=5, help="iperf3 -t")
    p.add_argument("--runs", type=int, default=3, help="iperf3 runs per path (median)")
    p.add_argument("--backends", default="vxlan,udp,host-gw")
    p.add_argument("--idle-wait", type=float, default=throughput.IDLE_WAIT_S,
                   help="before each iperf3 run wait up to this many s for the machine to be <25%% busy")
    p.add_argument("--markdown", help="also write the table as Markdown to this file")
    args = p.parse_args()
    only = [x for x in args.only.split(",") if x]
    unknown = set(only) - set(ALL)
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    if os.geteuid() != 0:
        sys.exit("run_all.py needs root (network namespaces)")

    throughput.set_idle_wait(args.idle_wait)
    info = machine()
    rows: list[Row] = []
    quiet: dict[str, float] = {}
    started = time.monotonic()
    with Resources() as res:
        print(f"run prefix {res.prefix}; {info['date']}; {info['load']}", file=sys.stderr)
        backends = [b for b in args.backends.split(",") if b]
        needs_vxlan = {"memory", "join", "startup", "scale"} & set(only) or (
            "throughput" in only and "vxlan" in backends)
        lab = None
        if needs_vxlan:
            lab = bench_lab(res, "v", "vxlan", hosts=3)
            wait_peers_programmed(lab)
        if "memory" in only:
            rows += agent_scale.idle_rss(res, lab)
        if "throughput" in only:
            tp = throughput.run(res, backends, args.seconds, args.runs, labs={"vxlan": lab} if lab else None)
            rows += [throughput.underlay_row(tp), *tp]
        def settle(step: str) -> None:
            # Others' jobs share the machine: start each timed step on a quiet machine if we can.
            if args.idle_wait > 0:
                quiet[step] = wait_idle(args.idle_wait)

        if "join" in only:
            settle("join")
            rows += peer_join.run(res, lab, args.joins)
        if "startup" in only:
            settle("startup")
            rows += agent_startup.run(res, lab, args.startup_runs)
        if "scale" in only:
            settle("scale")
            rows += agent_scale.run(res, lab, args.peers)  # last: it stops the other agents
    info["load_end"] = "load average %.2f %.2f %.2f" % os.getloadavg()
    head = (f"{info['date']} | {info['machine']}\ncommit {info['commit']} | {info['load']} at start, "
            f"{info['load_end']} at end | {time.monotonic() - started:.0f} s")
    if "throughput" in only:
        head += "\n" + throughput.busy_note()
    if quiet:
        head += "\nmachine busy (other jobs) before " + ", ".join(f"{k} {v * 100:.0f}%" for k, v in quiet.items())
    print(head)
    print(table(rows))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(head.replace("\n", "  \n") + "\n\n" + table(rows, markdown=True) + "\n")


if __name__ == "__main__":
    main()
