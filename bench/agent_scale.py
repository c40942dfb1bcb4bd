"""Scale and memory of the vxlan agent.

 - RSS of an idle flanneld with 2 peers (3-host lab), against a Python that only imported
   flannelpy.agent (the floor set by the imports).
 - 1000 remote leases present at start: time from starting host 3's flanneld until all 1000 (+2
   real) peers have their ARP entry, FDB entry and route, its CPU time and RSS afterwards;
   baseline: the same cold start with only the 2 real peers.  "Cold": the other agents are
   stopped (their leases stay) and host 3's flannel.1 is deleted first, so every entry is new.

    python3 bench/agent_scale.py [--peers 1000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from ipaddress import IPv4Interface

from benchlib import (
    PROBE,
    Resources,
    Row,
    agent_pid,
    bench_lab,
    cpu_seconds,
    ns_cmd,
    probe,
    rss_kib,
    table,
    wait_peers_programmed,
)

from flannelpy.lab.netns_lab import Lab
from flannelpy.lab.netns_lab import run as lab_run


def import_only_rss(res: Resources, netns: str) -> float:
    proc = res.popen(ns_cmd(netns, sys.executable, "-c",
                            "import flannelpy.agent, sys; print('up', flush=True); sys.stdin.read()"),
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()
        return rss_kib(proc.pid) / 1024
    finally:
        proc.stdin.close()
        res.stop(proc)


def idle_rss(res: Resources, lab: Lab, settle: float = 3.0) -> list[Row]:
    time.sleep(settle)
    values = [rss_kib(agent_pid(lab, h.index)) / 1024 for h in lab.host_list]
    floor = import_only_rss(res, lab.host(1).netns)
    return [Row("memory", "RSS idle flanneld, 2 peers (host 1)", values[0], "MiB",
                "python + import flannelpy.agent", floor,
                note="hosts: " + ", ".join(f"{v:.1f}" for v in values))]


def cold_start(res: Resources, lab: Lab, host: int, fake: int) -> dict:
    """Start `host`'s agent with a fresh flannel.1 and time until every peer is programmed."""
    h = lab.host(host)
    lab_run("ip", "link", "del", "flannel.1", netns=h.netns, check=False)
    real = [f"{IPv4Interface(o.subnet).network}={lab.lease_value(o.index)['BackendData']['VtepMAC']}"
            for o in lab.host_list if o.index != host]
    args = [PROBE, "scale", "--count", str(fake), "--timeout", "180"]
    for spec in real:
        args += ["--peer", spec]
    mon = res.popen(ns_cmd(h.netns, sys.executable, *args), stdout=subprocess.PIPE, text=True)
    try:
        if mon.stdout.readline().strip() != "ready":
            raise RuntimeError("nsprobe scale did not start")
        t0 = time.monotonic()
        lab.start_agent(host)
        pid = agent_pid(lab, host)
        doc = json.loads(mon.stdout.readline())
    finally:
        res.stop(mon)
    if doc["done"] is None:
        raise RuntimeError(f"{doc['missing']} peers never programmed; see {h.log_file}:\n{lab.tail_log(host)}")
    cpu = cpu_seconds(pid)
    time.sleep(3)
    return {"seconds": doc["done"] - t0, "first": doc["first"] - t0, "cpu": cpu,
            "rss": rss_kib(pid) / 1024, "overflows": doc["overflows"], "peers": fake + len(real)}


def run(res: Resources, lab: Lab, peers: int = 1000, host: int = 3) -> list[Row]:
    for h in lab.host_list:
        lab.stop_agent(h.index)
    base = cold_start(res, lab, host, 0)
    lab.stop_agent(host)
    fill = probe(res, lab.host(host).netns, "fill", "--prefix", lab.etcd_prefix, "--count", str(peers))
    big = cold_start(res, lab, host, peers)
    n = big["peers"]
    return [
        Row("scale (vxlan)", f"start -> {n} peers programmed", big["seconds"], "s",
            f"start -> {base['peers']} peers programmed", base["seconds"]),
        Row("scale (vxlan)", f"start -> first peer programmed ({n} leases listed)", big["first"], "s",
            f"start -> first peer, {base['peers']} leases", base["first"]),
        Row("scale (vxlan)", f"agent CPU time for that ({n} peers)", big["cpu"], "s",
            f"CPU time, {base['peers']} peers", base["cpu"]),
        Row("scale (vxlan)", f"RSS after programming {n} peers", big["rss"], "MiB",
            f"RSS, {base['peers']} peers (same cold start)", base["rss"]),
        Row("scale (vxlan)", "incremental time per extra peer", (big["seconds"] - base["seconds"]) / peers * 1e3, "ms",
            extra={"fill_seconds": fill["seconds"], "overflows": big["overflows"]}),
    ]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--peers", type=int, default=1000)
    args = p.parse_args()
    with Resources() as res:
        lab = bench_lab(res, "v")
        wait_peers_programmed(lab)
        rows = idle_rss(res, lab) + run(res, lab, args.peers)
    print(table(rows))


if __name__ == "__main__":
    main()
