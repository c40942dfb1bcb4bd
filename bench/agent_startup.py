"""Agent start-up: process start -> subnet.env written, against a local etcd (the lab's), as a
restart of host 1's flanneld (lease and subnet.env kept, as after a reboot).  Baselines, started
the same way (nsenter into the host namespace) with the interpreter that runs `flanneld` (its
shebang): `python -c pass`, `python -c "import flannelpy.agent"`, and the dependencies alone
(trio, httpx, httpcore; the floor of any start).  Note that under pyenv the
`flanneld` the lab finds on PATH is the real script when this runs from a pyenv Python (pyenv
exec puts the version's bin/ first), but the shim (+20-40 ms) from a plain shell.

    python3 bench/agent_startup.py [--runs 7]

`--trees A,B` compares two commits of flannelpy instead, interleaved in one lab (A B A B ...,
each timed start after an untimed one of the same tree, as bench/vs_flanneld.py does for
flanneld): start -> subnet.env, the agent's CPU time (all threads) at that moment, and its idle
RSS 5 s after a start, as medians with the ratio B/A.  Each tree is `git archive REV`
byte-compiled and run through fp_launch.py, so the work tree's state does not matter, by an
interpreter that imports it as a regular install does (benchlib.installed_python).

    python3 bench/agent_startup.py --trees 1055217,HEAD --runs 9
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchlib import (
    Resources,
    Row,
    agent_pid,
    bench_lab,
    installed_python,
    median,
    ns_cmd,
    table,
    wait_peers_programmed,
)

from flannelpy.lab.netns_lab import Lab


def flanneld_interpreter() -> str:
    """The Python in the shebang of the `flanneld` that Lab.agent_command will run."""
    path = shutil.which("flanneld")
    if path is None:
        raise RuntimeError("flanneld not on PATH")
    with open(path, "rb") as f:
        first = f.readline().decode(errors="replace")
    if first.startswith("#!") and "python" in first:
        return first[2:].split()[0]
    return sys.executable  # a pyenv shim (bash): the shim would pick this same version


def _time_cmd(cmd: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.monotonic()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        times.append(time.monotonic() - t)
    return median(times) * 1e3


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def restart_times(lab: Lab, host: int, runs: int) -> list[float]:
    out = []
    path = lab.host(host).subnet_file
    for _ in range(runs):
        lab.stop_agent(host)
        before = _file_id(path)
        t = time.monotonic()
        lab.start_agent(host)
        while _file_id(path) == before:
            if time.monotonic() - t > 60:
                raise RuntimeError(f"host {host}: subnet.env not rewritten in 60s:\n{lab.tail_log(host)}")
            time.sleep(0.002)
        out.append((time.monotonic() - t) * 1e3)
        agent_pid(lab, host)  # still the flanneld process
        time.sleep(1.0)  # let it finish starting (watch, iptables) before the next stop
    return out


# h2 kept out as the etcd clients keep it out (etcd/select.py): httpcore imports it when installed.
DEPENDENCIES_ALONE = "import gc, sys; gc.disable(); sys.modules['h2'] = None; import trio, httpx, httpcore"


def run(res: Resources, lab: Lab, runs: int = 7, host: int = 1) -> list[Row]:
    netns = lab.host(host).netns
    python = flanneld_interpreter()
    bare = _time_cmd(ns_cmd(netns, python, "-c", "pass"), runs)
    imp = _time_cmd(ns_cmd(netns, python, "-c", "import flannelpy.agent"), runs)
    # The floor no change to flannelpy lowers: its dependencies' imports alone, loaded as flanneld
    # loads them (collector off), httpcore included (the etcd client loads it at its first request).
    deps = _time_cmd(ns_cmd(netns, python, "-c", DEPENDENCIES_ALONE), runs)
    times = restart_times(lab, host, runs)
    p50 = median(times)
    return [
        Row("start-up", f"flanneld start -> subnet.env p50, n={runs}", p50, "ms", "python -c pass", bare,
            extra={"all_ms": times}),
        Row("start-up", f"flanneld start -> subnet.env p50, n={runs}", p50, "ms",
            "python -c 'import flannelpy.agent'", imp),
        Row("start-up", f"flanneld start -> subnet.env p50, n={runs}", p50, "ms",
            "python -c 'import trio, httpx, httpcore' (collector off, no h2)", deps),
    ]


def _snapshot(rev: str, into: str) -> str:
    """flannelpy of commit `rev`, extracted and byte-compiled (as pip installs it) under `into`;
    a directory holding a flannelpy/ package is used as it is."""
    if os.path.isdir(os.path.join(rev, "flannelpy")):
        return rev
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tree = os.path.join(into, rev.replace("/", "_"))
    os.makedirs(tree)
    archive = subprocess.run(["git", "-C", repo, "archive", rev, "flannelpy"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", tree], input=archive.stdout, check=True)
    subprocess.run([sys.executable, "-m", "compileall", "-q", tree], check=True)
    return tree


def _cpu_ms(pid: int) -> float:
    """CPU time of every thread of `pid` so far (schedstat: ns of run time)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e6


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def compare_trees(res: Resources, revs: list[str], runs: int, tmp: str, host: int = 1) -> list[Row]:
    """Interleaved restarts of host `host`'s agent from each tree in turn (see the docstring)."""
    trees = {rev: _snapshot(rev, tmp) for rev in revs}
    # Each tree imported as a regular install is (no editable install's import hook).
    pythons = {rev: installed_python(tree, os.path.join(tmp, f"python-{n}")) for n, (rev, tree) in enumerate(trees.items())}
    launch = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fp_launch.py")
    current = {"tree": trees[revs[0]], "python": pythons[revs[0]]}

    class TreeLab(Lab):
        def agent_command(self, h):  # type: ignore[no-untyped-def]
            return [current["python"], launch, current["tree"], *super().agent_command(h)[1:]]

    lab = _tree_lab(res, TreeLab)
    wait_peers_programmed(lab)
    path = lab.host(host).subnet_file
    got: dict[str, dict[str, list[float]]] = {rev: {"ms": [], "cpu": [], "rss": []} for rev in revs}
    for _ in range(runs):
        for rev in revs:
            current["tree"], current["python"] = trees[rev], pythons[rev]
            lab.stop_agent(host)
            lab.start_agent(host)  # untimed: this tree's first start after the other's
            lab.wait_subnet_env(host, 30)
            time.sleep(1.0)
            lab.stop_agent(host)
            before = _file_id(path)
            t = time.monotonic()
            pid = lab.start_agent(host)
            while _file_id(path) == before:
                if time.monotonic() - t > 60:
                    raise RuntimeError(f"{rev}: subnet.env not rewritten in 60s:\n{lab.tail_log(host)}")
                time.sleep(0.002)
            got[rev]["ms"].append((time.monotonic() - t) * 1e3)
            got[rev]["cpu"].append(_cpu_ms(pid))  # nsenter execs the agent: same pid
            time.sleep(5.0)
            got[rev]["rss"].append(_rss_mib(pid))
    base, new = revs[0], revs[-1]
    rows = []
    for key, label, unit in (("ms", "flanneld start -> subnet.env p50", "ms"),
                             ("cpu", "agent CPU (all threads) at subnet.env p50", "ms"),
                             ("rss", "idle RSS 5 s after the start p50", "MiB")):
        rows.append(Row("start-up", f"{label}, n={runs}, {new}", median(got[new][key]), unit, base,
                        median(got[base][key]), extra={rev: got[rev][key] for rev in revs}))
    return rows


def _tree_lab(res: Resources, cls: type) -> Lab:
    """bench_lab's 2-host vxlan lab, built from `cls` (a Lab whose agents run from a tree)."""
    import json

    from benchlib import BENCH_NETWORK, BENCH_SUBNET_MAX, BENCH_SUBNET_MIN

    from flannelpy.lab.netns_lab import default_config

    config = json.loads(default_config("vxlan", BENCH_NETWORK))
    config.update(SubnetMin=BENCH_SUBNET_MIN, SubnetMax=BENCH_SUBNET_MAX)
    lab = cls(prefix=res.prefix + "t", hosts=2, backend="vxlan", config=json.dumps(config))
    res.labs.append(lab)
    lab.up()
    return lab


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--trees", default="", help="A,B: two commits of flannelpy, interleaved (see above)")
    args = p.parse_args()
    if args.trees:
        revs = [r.strip() for r in args.trees.split(",") if r.strip()]
        if len(revs) != 2:
            p.error("--trees takes two commits, A,B")
        with Resources() as res, tempfile.TemporaryDirectory(prefix="fp-startup-") as tmp:
            rows = compare_trees(res, revs, args.runs, tmp)
        print(table(rows))
        for row in rows:
            print(f"{row.metric}: " + "; ".join(f"{rev}: {' '.join(f'{v:.0f}' if v > 100 else f'{v:.1f}' for v in vals)}"
                                             for rev, vals in row.extra.items()))
        return
    with Resources() as res:
        lab = bench_lab(res, "v")
        wait_peers_programmed(lab)
        rows = run(res, lab, args.runs)
    print(table(rows))


if __name__ == "__main__":
    main()
