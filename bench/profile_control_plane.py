"""Where flannelpy's control plane spends its time (issue #19), measured in the namespace lab.

    python3 bench/profile_control_plane.py [--api v3] [--peers 1000] [--joins 100]

1. Cold start with --peers fake leases in etcd: the agent runs under `py-spy record` (all threads,
   on-CPU samples) from exec until every peer is programmed.
2. Joins with 10 and with --peers peers present: py-spy attached to the running agent for the
   joins only; samples per join side by side, so what grows with the number of peers stands out.
3. etcd requests per lease: etcd's own gRPC counters (the JSON gateway goes through them) before
   and after a cold start and a round of joins, for flannelpy and for the real flanneld of that
   API (when ../shared/anchors has it): how many Range / LeaseTimeToLive / ... calls each makes.

Prints, per phase, the samples by category (imports, etcd HTTP, JSON, netlink, logging, ...) and
the top functions, inclusive and self.  py-spy: `pip install py-spy` (any venv; --py-spy PATH).
flannelpy runs from `git archive HEAD` as in vs_flanneld.py.  Root only; cleans up like the
other lab benchmarks.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from benchlib import (
    BENCH_NETWORK,
    BENCH_SUBNET_MAX,
    BENCH_SUBNET_MIN,
    Resources,
    ns_cmd,
)
from vs_flanneld import (
    ANCHORS,
    REFERENCE,
    Results,
    Rig,
    VsLab,
    snapshot_flannelpy,
    unpack_flanneld,
)

from flannelpy.lab.netns_lab import LabHost

RATE = 250  # py-spy samples per second

# py-spy's own idle detection lets blocked threads through here (a VM); these leaves are waits.
IDLE_LEAVES = ("Condition.wait", "EpollIOManager.get_events", "WorkerThread._work", "EpollSelector.select",
               "Event.wait", "Thread.join")

# Category of a sample: the first rule whose pattern occurs in the stack (outermost rules first
# would hide detail, so the specific ones come first).
CATEGORIES = [
    ("import (module loading)", ("_find_and_load",)),
    ("logging", ("logging/__init__.py", "logsetup.py")),
    ("JSON decode/encode", ("json/decoder.py", "json/encoder.py", "json/__init__.py")),
    ("netlink (pyroute2)", ("pyroute2/",)),
    ("etcd HTTP (httpx/httpcore/h11)", ("httpx/", "httpcore/", "h11/", "anyio/")),
    ("lease codecs (subnet/lease.py)", ("subnet/lease.py",)),
    ("ipaddress", ("ipaddress.py",)),
    ("health/status server (hypercorn)", ("hypercorn/",)),
    ("iptables", ("hostnet/iptables",)),
    ("trio scheduler / waiting", ("trio/",)),
    ("thread handoff (queue/threading)", ("queue.py", "threading.py")),
]


@dataclass
class Profile:
    samples: int  # on-CPU samples (idle leaves excluded)
    idle: int
    by_category: dict[str, int]
    inclusive: collections.Counter
    self_: collections.Counter
    threads: collections.Counter


def _frame_name(frame: str) -> str:
    # py-spy raw frames: "function (path/to/file.py)" (with --nolineno); keep file + function.
    frame = frame.strip()
    if frame.endswith(")") and " (" in frame:
        func, path = frame[:-1].split(" (", 1)
        parts = path.split("/")
        short = "/".join(parts[-2:]) if len(parts) > 1 else path
        return f"{short}:{func}"
    return frame


def read_profile(path: str) -> Profile:
    by_cat: dict[str, int] = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    self_: collections.Counter = collections.Counter()
    threads: collections.Counter = collections.Counter()
    total = idle = 0
    with open(path) as f:
        for line in f:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            count = int(count_text)
            frames = stack.split(";")
            thread = next((fr for fr in frames if fr.startswith("thread")), "?")
            frames = [fr for fr in frames if not fr.startswith(("thread", "process"))]
            if frames and any(frames[-1].strip().startswith(leaf + " ") for leaf in IDLE_LEAVES):
                idle += count
                continue
            total += count
            threads[thread] += count
            for rule, patterns in CATEGORIES:
                if any(p in stack for p in patterns):
                    by_cat[rule] += count
                    break
            else:
                by_cat["other (flannelpy code, interpreter)"] += count
            names = [_frame_name(fr) for fr in frames]
            for name in set(names):
                inclusive[name] += count
            if names:
                self_[names[-1]] += count
    return Profile(total, idle, dict(by_cat), inclusive, self_, threads)


def report(title: str, prof: Profile, per: float = 1.0, per_label: str = "", top: int = 25) -> str:
    scale = 1000.0 / RATE / per  # ms of CPU per sample, per unit
    unit = f"ms{per_label}"
    lines = [f"== {title}: {prof.samples} samples at {RATE}/s = {prof.samples / RATE:.2f} s on CPU "
             f"({prof.idle} more samples of threads blocked in a wait, left out)"
             + (f", {prof.samples * scale:.2f} {unit}" if per != 1.0 else "")]
    lines.append("  threads: " + ", ".join(f"{t} {c * scale:.1f} {unit}" for t, c in prof.threads.most_common()))
    lines.append(f"  by category ({unit}, % of samples):")
    for cat, count in sorted(prof.by_category.items(), key=lambda kv: -kv[1]):
        lines.append(f"    {count * scale:9.2f}  {count / max(prof.samples, 1) * 100:5.1f}%  {cat}")
    lines.append(f"  top functions, inclusive ({unit}):")
    for name, count in prof.inclusive.most_common(top):
        lines.append(f"    {count * scale:9.2f}  {name}")
    lines.append(f"  top functions, self ({unit}):")
    for name, count in prof.self_.most_common(top):
        lines.append(f"    {count * scale:9.2f}  {name}")
    return "\n".join(lines)


# --- the lab -----------------------------------------------------------------------------------


@dataclass
class ProfLab(VsLab):
    py_spy: str = ""
    spy_out: str = ""  # set before start_agent: kind "flannelpy-spy" records into this file

    def agent_command(self, host: LabHost) -> list[str]:
        if self.kinds.get(str(host.index)) != "flannelpy-spy":
            return super().agent_command(host)
        self.kinds[str(host.index)] = "flannelpy"
        try:
            inner = super().agent_command(host)
        finally:
            self.kinds[str(host.index)] = "flannelpy-spy"
        return [self.py_spy, "record", "--threads", "--nolineno", "--rate", str(RATE), "--format", "raw",
                "-o", self.spy_out, "--", *inner]


def etcd_calls(res: Resources, lab: VsLab) -> collections.Counter:
    """etcd's grpc_server_handled_total by method (the v3 JSON gateway's calls land there too),
    plus the v2 keys API's etcd_http_received_total-style counters when present."""
    code = ("import httpx,sys; sys.stdout.write(httpx.get('http://10.250.0.1:2379/metrics', timeout=10).text)")
    proc = res.popen(ns_cmd(lab.underlay_ns, sys.executable, "-c", code), stdout=subprocess.PIPE, text=True)
    text, _ = proc.communicate(timeout=30)
    res.stop(proc)
    out: collections.Counter = collections.Counter()
    for line in text.splitlines():
        if line.startswith("grpc_server_handled_total{"):
            labels, value = line.rsplit(" ", 1)
            method = labels.split('grpc_method="', 1)[1].split('"', 1)[0]
            out[method] += int(float(value))
        elif line.startswith(("etcd_http_received_total{", "etcd_debugging_store_reads_total{",
                              "etcd_debugging_store_writes_total{")):
            labels, value = line.rsplit(" ", 1)
            out["v2 " + labels.split("{", 1)[0].replace("etcd_debugging_store_", "") + " " +
                labels.split('"', 2)[1]] += int(float(value))
    return out


def diff(after: collections.Counter, before: collections.Counter) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] - before[k] > 0}


def stop_spied(lab: ProfLab, i: int) -> None:
    """SIGTERM the agent (py-spy's child): it exits cleanly and py-spy writes its file."""
    pid = lab.host(i).pid
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            children += [int(x) for x in f.read().split()]
    for child in children:
        os.kill(child, signal.SIGTERM)
    proc = lab._agent_procs.pop(i, None)
    if proc is not None:
        proc.wait(60)
    lab.host(i).pid = 0


def spy_attach(res: Resources, py_spy: str, pid: int, out: str) -> subprocess.Popen:
    return res.popen([py_spy, "record", "--threads", "--nolineno", "--rate", str(RATE), "--format", "raw",
                      "-o", out, "--pid", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--api", choices=("v3", "v2"), default="v3")
    p.add_argument("--peers", type=int, default=1000)
    p.add_argument("--joins", type=int, default=100)
    p.add_argument("--py-spy", default=shutil.which("py-spy") or "/tmp/pyspy-venv/bin/py-spy")
    p.add_argument("--commit", default="HEAD", help="profile flannelpy as of this commit (git archive)")
    p.add_argument("--keep", help="copy the raw py-spy files into this directory")
    p.add_argument("--phases", default="cold,join,calls",
                   help="comma list of: cold (the cold start under py-spy), join, calls (etcd requests per lease)")
    args = p.parse_args()
    phases = set(args.phases.split(","))
    if not phases or phases - {"cold", "join", "calls"}:
        sys.exit(f"--phases: {args.phases!r}: a comma list of cold, join, calls")
    if os.geteuid() != 0:
        sys.exit("profile_control_plane.py needs root (network namespaces)")
    if not os.access(args.py_spy, os.X_OK):
        sys.exit(f"py-spy not found at {args.py_spy}: pip install py-spy (any venv) and pass --py-spy PATH")
    have_flanneld = os.path.exists(os.path.join(ANCHORS, f"flanneld-{REFERENCE[args.api]}.xz"))
    tmp = tempfile.mkdtemp(prefix="fpprof-")
    try:
        tree = snapshot_flannelpy(tmp, args.commit)
        config = {"Network": BENCH_NETWORK, "SubnetMin": BENCH_SUBNET_MIN, "SubnetMax": BENCH_SUBNET_MAX,
                  "Backend": {"Type": "vxlan"}}
        with Resources() as res:
            lab = ProfLab(prefix=res.prefix + "p", hosts=2, backend="vxlan", etcd_api=args.api,
                          config=json.dumps(config), fp_tree=tree, py_spy=args.py_spy,
                          flanneld_bin=unpack_flanneld(REFERENCE[args.api], tmp) if have_flanneld else "")
            res.labs.append(lab)
            lab.up()
            rig = Rig(res, lab, args.api, argparse.Namespace(joins=args.joins, idle_wait=0), Results(args.api))
            rig.stop(1)
            rig.stop(2)
            # 1. cold start under py-spy
            if "cold" in phases:
                rig.fill_to(args.peers - 1)
                lab.spy_out = os.path.join(tmp, "cold.raw")
                r = rig.cold_start("flannelpy-spy")
                time.sleep(0.5)
                stop_spied(lab, 2)
                cold = read_profile(lab.spy_out)
                print(f"cold start with {args.peers} peers under py-spy: {r['seconds']:.2f} s to all routes "
                      f"(first at {r['first']:.2f} s)", flush=True)
                print(report(f"cold start, {args.peers} peers (whole process, exec -> all programmed + 0.5 s)",
                             cold), flush=True)
            # 2. joins at 10 and at --peers peers
            join_profiles = {}
            for peers in ((10, args.peers) if "join" in phases else ()):
                rig.stop(2)
                rig.fill_to(peers - 1)
                r = rig.cold_start("flannelpy")
                time.sleep(2)
                out = os.path.join(tmp, f"join{peers}.raw")
                spy = spy_attach(res, args.py_spy, r["pid"], out)
                time.sleep(1.0)
                t0 = time.monotonic()
                rig.join_once(peers, "flannelpy")
                wall = time.monotonic() - t0
                spy.send_signal(signal.SIGINT)
                spy.wait(30)
                res.procs.remove(spy)
                join_profiles[peers] = read_profile(out)
                print(report(f"{args.joins} joins with {peers} peers present ({wall:.1f} s, incl. the revoke)",
                             join_profiles[peers], per=args.joins, per_label=" per join"), flush=True)
            if join_profiles:
                lo, hi = join_profiles[10], join_profiles[args.peers]
                print(f"== what grows from 10 to {args.peers} peers (ms per join, inclusive):")
                growth = {k: (hi.inclusive[k] - lo.inclusive.get(k, 0)) * 1000.0 / RATE / args.joins
                          for k in hi.inclusive}
                for name, ms in sorted(growth.items(), key=lambda kv: -kv[1])[:20]:
                    print(f"    {ms:+8.2f}  {name}")
            rig.stop(2)
            # 3. etcd requests per lease, flannelpy and flanneld
            kinds = (["flannelpy"] + (["flanneld"] if have_flanneld else [])) if "calls" in phases else []
            if kinds:
                rig.fill_to(args.peers - 1)
            for kind in kinds:
                before = etcd_calls(res, lab)
                rig.cold_start(kind)
                time.sleep(2)
                mid = etcd_calls(res, lab)
                rig.join_once(args.peers, kind)
                after = etcd_calls(res, lab)
                print(f"== etcd calls by {kind}, cold start with {args.peers} peers: {diff(mid, before)}")
                print(f"== etcd calls during {args.joins} joins + their revoke (probe's own calls included): "
                      f"{diff(after, mid)}", flush=True)
                rig.stop(2)
            rig.remove_fakes()
            if args.keep:
                os.makedirs(args.keep, exist_ok=True)
                for name in os.listdir(tmp):
                    if name.endswith(".raw"):
                        shutil.copy(os.path.join(tmp, name), args.keep)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
