"""Agent start-up: process start -> subnet.env written, against a local etcd (the lab's), as a
restart of host 1's flanneld (lease and subnet.env kept, as after a reboot).  Baselines, started
the same way (nsenter into the host namespace, `python` through the same pyenv shim that runs
`flanneld`): `python -c pass` and `python -c "import flannelpy.agent"`.

    python3 bench/agent_startup.py [--runs 7]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from benchlib import Resources, Row, agent_pid, bench_lab, median, ns_cmd, table, wait_peers_programmed
from flannelpy.lab import Lab


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
    shim_pass = _time_cmd(ns_cmd(netns, "python", "-c", "pass"), runs)
    direct_pass = _time_cmd(ns_cmd(netns, sys.executable, "-c", "pass"), runs)
    imp = _time_cmd(ns_cmd(netns, "python", "-c", "import flannelpy.agent"), runs)
    times = restart_times(lab, host, runs)
    p50 = median(times)
    return [
        Row("start-up", f"flanneld start -> subnet.env p50, n={runs}", p50, "ms", "python -c pass", shim_pass,
            extra={"all_ms": times}),
        Row("start-up", f"flanneld start -> subnet.env p50, n={runs}", p50, "ms",
            "python -c 'import flannelpy.agent'", imp),
        Row("start-up", "python -c pass without the pyenv shim", direct_pass, "ms", "python -c pass (shim)", shim_pass),
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
