"""Memory of one vxlan repair pass: what a pass holds at its highest point, per peer.

A pass reads the main table's routes, the device's neighbours and its FDB (one dump each) and
compares them with every accepted peer's entries.  Its high-water mark is the agent's RSS after
the first pass with the whole peer set (pymalloc keeps the pools a peak touched), so it sets
what an extra peer costs in RSS.  The pass compares each table as the kernel sends it, with each
peer's wanted entries worked out afresh per table; the baseline, measured in the same run on the
same kernel tables, reads all three, makes every peer's plan, then compares (entry_diff, as passes
did before).

Root only: one namespace pair `fprm-<hex>-a/-b` with a vxlan device and N peers programmed
through VxlanBackend, deleted afterwards.  tracemalloc figures (Python's own allocations).

    python3 bench/repair_memory.py [--peers 1000,3000]
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import sys
import tracemalloc
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Callable

import trio

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from benchlib import Row, table  # noqa: E402
from netns_helpers import add_addr, add_veth, ifindex, namespaces, unique_name  # noqa: E402

from flannelpy.backends.base import ExternalInterface  # noqa: E402
from flannelpy.backends.vxlan.backend import VxlanBackend  # noqa: E402
from flannelpy.backends.vxlan.plan import entry_diff, peer_plan  # noqa: E402
from flannelpy.config.network import parse_config  # noqa: E402
from flannelpy.hostnet.netlink import NetlinkThread  # noqa: E402
from flannelpy.subnet.lease import EventKind, Lease, LeaseAttrs, LeaseEvent  # noqa: E402

UNDERLAY = IPv4Address("192.168.100.1")
CONFIG = '{"Network": "10.0.0.0/8", "SubnetLen": 24, "Backend": {"Type": "vxlan"}}'


def peer(i: int) -> Lease:
    subnet = IPv4Network(((10 << 24) + ((i + 1) << 8), 24))
    mac = f"02:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}:00:02"
    return Lease(subnet, LeaseAttrs(IPv4Address(int(UNDERLAY) + 1 + i), "vxlan", {"VNI": 1, "VtepMAC": mac}))


def peak_of(fn: Callable[[], Any]) -> float:
    """Bytes above the starting point at fn's highest point (what it returns counts)."""
    gc.collect()
    tracemalloc.reset_peak()
    start = tracemalloc.get_traced_memory()[0]
    kept = fn()
    peak = tracemalloc.get_traced_memory()[1] - start
    del kept
    return peak


async def measure(n: int) -> list[Row]:
    p = unique_name("fprm")
    with namespaces(f"{p}-a", f"{p}-b"):
        ns = f"{p}-a"
        add_veth(ns, "ua", f"{p}-b", "ub")
        add_addr(ns, "ua", f"{UNDERLAY}/24")
        nl = NetlinkThread(netns=ns)
        try:
            be = VxlanBackend(ExternalInterface("ua", ifindex(ns, "ua"), UNDERLAY, UNDERLAY, 1500),
                              parse_config(CONFIG), nl, resync_interval=3600)
            await be.prepare()
            await be.start(Lease(IPv4Network("10.0.0.0/24"),
                                 LeaseAttrs(UNDERLAY, "vxlan", {"VNI": 1, "VtepMAC": "02:00:00:00:00:01"})))
            await be.apply([LeaseEvent(EventKind.ADDED, peer(i)) for i in range(n)])
            be.peers_synced()
            await be.reconcile_once()  # the first pass: anything left over is fixed before measuring
            index = be.index
            assert index is not None

            def pass_now() -> None:
                trio.from_thread.run(be.reconcile_once)

            def all_at_once() -> object:
                # The baseline: all three tables read, then compared.
                wanted = [(s, peer_plan(lease, False)) for s, lease in be._wanted.items()]
                dumps = nl.dumps
                routes, neighs, fdbs = dumps.routes(), dumps.neighbours(index), dumps.fdb(index, socket.AF_INET)
                return entry_diff(wanted, routes, neighs, fdbs, device_index=index, underlay_index=be.spec.vtep_index,
                                  network=be.network, remove_unexplained=True)

            tracemalloc.start()
            try:
                per_table = await trio.to_thread.run_sync(peak_of, pass_now)
                baseline = await nl.rtnl_call(lambda _dumps: peak_of(all_at_once))
            finally:
                tracemalloc.stop()
        finally:
            nl.stop()
    return [Row("repair pass", f"vxlan, {n} peers: highest point of one pass (per peer)", per_table / n, "B",
                "all tables read, then compared", baseline / n)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default="1000,3000", help="comma-separated peer counts")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("skipped: needs root (network namespaces)")
        return 0
    rows: list[Row] = []
    for n in (int(x) for x in args.peers.split(",")):
        rows += trio.run(measure, n)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
