"""Peer join latency: a vxlan lease written to etcd -> its ARP entry, FDB entry and route on a
host running flanneld.  Baseline: the same put -> the raw etcd watch event, seen by a second
watcher in the same host namespace (so what is left is the agent's own work).

    python3 bench/peer_join.py [--joins 100]

Runs nsprobe.py `join` inside host 1's namespace; prints the table.
"""

from __future__ import annotations

import argparse
import time

from benchlib import Resources, Row, bench_lab, percentile, probe, table, wait_peers_programmed

from flannelpy.lab.netns_lab import Lab


def run(res: Resources, lab: Lab, joins: int = 100, host: int = 1) -> list[Row]:
    doc = probe(res, lab.host(host).netns, "join", "--prefix", lab.etcd_prefix, "--count", str(joins),
                "--first", "0", "--pause", "0.05")
    rows = doc["joins"]
    missing = [r["subnet"] for r in rows if r["kernel"] is None or r["watch"] is None]
    if missing:
        raise RuntimeError(f"{len(missing)} joins never completed, e.g. {missing[:3]}; see {lab.host(host).log_file}")
    kernel = [r["kernel"] * 1e3 for r in rows]
    watch = [r["watch"] * 1e3 for r in rows]
    put = [r["put"] * 1e3 for r in rows]
    neigh = [r["neigh"] * 1e3 for r in rows]
    out = []
    for pct in (50, 99):
        out.append(Row("peer join (vxlan)", f"put -> neigh+FDB+route p{pct}, n={joins}", percentile(kernel, pct),
                       "ms", f"put -> etcd watch event p{pct}", percentile(watch, pct)))
    out.append(Row("peer join (vxlan)", "put -> ARP entry (the first of the three) p50", percentile(neigh, 50), "ms",
                   "put -> etcd watch event p50", percentile(watch, 50)))
    out.append(Row("peer join (vxlan)", "put -> etcd ack p50", percentile(put, 50), "ms"))
    # Remove the fake peers again (the agents tear their entries down) before the next benchmark.
    probe(res, lab.host(host).netns, "revoke", "--lease-id", str(doc["lease_id"]))
    time.sleep(2)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--joins", type=int, default=100)
    args = p.parse_args()
    with Resources() as res:
        lab = bench_lab(res, "v")
        wait_peers_programmed(lab)
        rows = run(res, lab, args.joins)
    print(table(rows))


if __name__ == "__main__":
    main()
