"""Agent start-up: process start -> subnet.env written, against a local etcd (the lab's), as a
restart of host 1's flanneld (lease and subnet.env kept, as after a reboot).  Baselines, started
the same way (nsenter into the host namespace) with the interpreter that runs `flanneld` (its
shebang): `python -c pass` and `python -c "import flannelpy.agent"`.  Note that under pyenv the
`flanneld` the lab finds on PATH is the real script when this runs from a pyenv Python (pyenv
exec puts the version's bin/ first), but the shim (+20-40 ms) from a plain shell.

    python3 bench/agent_startup.py [--runs 7]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

from benchlib import Resources, Row, agent_pid, bench_lab, median, ns_cmd, table, wait_peers_programmed

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


def run(res: Resources, lab: Lab, runs: int = 7, host: int = 1) -> list[Row]:
    netns = lab.host(host).netns
    python = flanneld_interpreter()
    bare = _time_cmd(ns_cmd(netns, python, "-c", "pass"), runs)
    imp = _time_cmd(ns_cmd(netns, python, "-c", "import flannelpy.agent"), runs)
    times = restart_times(lab, host, runs)
    p50 = median(times)
    return [
        Row("start-up", f"flanneld start -> subnet.env p50, n={runs}", p50, "ms", "python -c pass", bare,
            extra={"all_ms": times}),
        Row("start-up", f"flanneld start -> subnet.env p50, n={runs}", p50, "ms",
            "python -c 'import flannelpy.agent'", imp),
    ]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=7)
    args = p.parse_args()
    with Resources() as res:
        lab = bench_lab(res, "v")
        wait_peers_programmed(lab)
        rows = run(res, lab, args.runs)
    print(table(rows))


if __name__ == "__main__":
    main()
