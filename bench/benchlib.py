"""Shared pieces of the lab benchmarks: a unique namespace prefix, clean-up of everything a run
started (labs by name, processes by PID) even on failure, /proc readers and the result table.

The labs are flannelpy.lab.netns_lab.Lab instances, used as they are (lab.py belongs to someone else);
every namespace is named `<run prefix><letter>-...`, e.g. fpb3a9cv-h1, so a final sweep can
delete exactly this run's namespaces by name.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from flannelpy.lab.netns_lab import Lab, default_config, stop_pid  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
PROBE = os.path.join(HERE, "nsprobe.py")
# The benchmark lab's Network: wide enough for 1000 fake /24 peers, which nsprobe puts in
# 10.100.0.0/14; SubnetMax keeps the hosts' own (random) subnets below that range.
BENCH_NETWORK = "10.64.0.0/10"
BENCH_SUBNET_MIN, BENCH_SUBNET_MAX = "10.64.1.0", "10.99.255.0"


def new_prefix() -> str:
    return "fpb" + secrets.token_hex(2)


# --- /proc --------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent not idle (user..steal from /proc/stat; idle, iowait excluded)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / TICK


def machine_times() -> dict[str, float]:
    """All CPUs' seconds by /proc/stat column (user nice system idle iowait irq softirq steal)."""
    with open("/proc/stat") as f:
        v = [int(x) / TICK for x in f.readline().split()[1:9]]
    return dict(zip(("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"), v))


def wait_idle(max_wait: float, busy_below: float = 0.25, sample: float = 1.0) -> float:
    """Wait (up to max_wait s) until the machine is mostly idle (other people's tests share it):
    busy fraction of all CPUs over `sample` s below busy_below.  Returns the last fraction."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = machine_busy_seconds(), time.monotonic()
        time.sleep(sample)
        busy = (machine_busy_seconds() - b0) / (time.monotonic() - t0) / os.cpu_count()
        if busy < busy_below or time.monotonic() >= deadline:
            return busy


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def proc_cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]


def agent_pid(lab: Lab, i: int) -> int:
    """The PID the lab started is nsenter, which execs flanneld (and a pyenv shim, when PATH
    gives one, execs too): check that it is now the Python flanneld process, so /proc/<pid>
    is its RSS and CPU time."""
    pid = lab.host(i).pid
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        argv = proc_cmdline(pid)
        if argv and "python" in os.path.basename(argv[0]) and any(a.endswith("flanneld") for a in argv[1:2]):
            return pid
        time.sleep(0.05)
    raise RuntimeError(f"pid {pid} of host {i} is not the Python flanneld: {proc_cmdline(pid)}")


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (p99 of 100 values is the 99th smallest)."""
    s = sorted(values)
    return s[max(0, math.ceil(pct / 100 * len(s)) - 1)]


# --- clean-up -----------------------------------------------------------------------------


class Resources:
    """Everything one run started; close() undoes it (also from SIGTERM/SIGINT)."""

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or new_prefix()
        self.labs: list[Lab] = []
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "Resources":
        def raise_exit(signum, _frame):
            raise SystemExit(128 + signum)

        self._old = {s: signal.signal(s, raise_exit) for s in (signal.SIGTERM, signal.SIGHUP)}
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        for s, h in self._old.items():
            signal.signal(s, h)

    def lab(self, letter: str, **kwargs) -> Lab:
        """A lab named <prefix><letter>, brought up (Lab.up tears itself down on failure)."""
        lab = Lab(prefix=self.prefix + letter, **kwargs)
        self.labs.append(lab)
        lab.up()
        return lab

    def drop_lab(self, lab: Lab) -> None:
        lab.down()
        self.labs.remove(lab)

    def popen(self, cmd: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, **kwargs)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            stop_pid(proc.pid, timeout=5)
        proc.poll()
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        for proc in list(self.procs):
            try:
                self.stop(proc)
            except Exception as exc:  # keep cleaning up
                print(f"clean-up: pid {proc.pid}: {exc}", file=sys.stderr)
        for lab in list(self.labs):
            try:
                lab.down()
            except Exception as exc:
                print(f"clean-up: lab {lab.prefix}: {exc}", file=sys.stderr)
        self.labs.clear()
        # Anything of ours left (e.g. a lab that died half-way): by name, only this run's prefix.
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        for name in (line.split()[0] for line in out.splitlines() if line.strip()):
            if name.startswith(self.prefix):
                subprocess.run(["ip", "netns", "del", name], capture_output=True)


def ns_cmd(netns: str, *args: str) -> list[str]:
    return ["nsenter", f"--net=/var/run/netns/{netns}", *args]


def probe(res: Resources, netns: str, *args: str, timeout: float = 600) -> dict:
    """Run nsprobe.py in a namespace and return its JSON result."""
    proc = res.popen(ns_cmd(netns, sys.executable, PROBE, *args), stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        res.stop(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"nsprobe {' '.join(args)} in {netns} failed ({proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def bench_lab(res: Resources, letter: str, backend: str = "vxlan", hosts: int = 3) -> Lab:
    config = json.loads(default_config(backend, BENCH_NETWORK))
    config.update(SubnetMin=BENCH_SUBNET_MIN, SubnetMax=BENCH_SUBNET_MAX)
    return res.lab(letter, hosts=hosts, backend=backend, config=json.dumps(config))


def wait_peers_programmed(lab: Lab, timeout: float = 30.0) -> None:
    """Until every container pings every other one (the watch has delivered all peers)."""
    results = lab.wait_all_pings(timeout)
    bad = [pair for pair, ok in results.items() if not ok]
    if bad:
        raise RuntimeError(f"lab {lab.prefix}: no ping between {bad}")


# --- results ------------------------------------------------------------------------------


@dataclass
class Row:
    group: str
    metric: str
    value: float
    unit: str
    baseline: str = ""
    base_value: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.base_value is None or self.base_value == 0:
            return None
        return self.value / self.base_value


def fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    if unit == "us":
        return f"{v:.1f}"
    if unit in ("ms",):
        return f"{v:.1f}" if v < 100 else f"{v:.0f}"
    if unit in ("MiB", "Gbit/s", "s"):
        return f"{v:.2f}"
    if unit == "pkt/s":
        return f"{v:,.0f}"
    if unit in ("%", "B"):
        return f"{v:.0f}"
    return f"{v:.3g}"


def table(rows: list[Row], markdown: bool = False) -> str:
    head = ["benchmark", "metric", "value", "unit", "baseline (same run)", "baseline", "ratio"]
    body = [[r.group, r.metric, fmt(r.value, r.unit), r.unit, r.baseline or "-", fmt(r.base_value, r.unit),
             "-" if r.ratio is None else f"{r.ratio:.2f}x"] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    right = {2, 5, 6}
    out = []
    for line in [head, *body]:
        out.append("  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))))
    return "\n".join(out)


def median(values: list[float]) -> float:
    return statistics.median(values)


def installed_python(tree: str, into: str) -> str:
    """An interpreter that imports `tree`'s flannelpy as a regular (non-editable) install does,
    for start-up figures that are a user's: a venv made from the base Python whose first .pth
    line puts `tree` and then this venv's site-packages (the dependencies) on sys.path.  The
    dev venv's other .pth files are copied, except the editable install's import hook, which
    no user install has and which costs every start ~13 ms (it loads pathlib and more)."""
    import glob
    import shutil
    import sysconfig

    venv = os.path.join(into, "installed-venv")
    if os.path.exists(os.path.join(venv, "bin", "python")):
        return os.path.join(venv, "bin", "python")
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", venv], check=True)
    deps = sysconfig.get_paths()["purelib"]
    (target,) = glob.glob(os.path.join(venv, "lib", "python3*", "site-packages"))
    with open(os.path.join(target, "00-flannelpy-bench.pth"), "w") as f:  # sorts first: the others may import from deps
        f.write(f"{os.path.abspath(tree)}\n{deps}\n")
    for pth in glob.glob(os.path.join(deps, "*.pth")):
        if not os.path.basename(pth).startswith("__editable__"):
            shutil.copy(pth, target)
    return os.path.join(venv, "bin", "python")
