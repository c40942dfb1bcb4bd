"""V2Store costs on a local etcd: create, list, renew and watch-event latency.

Run: cd /work/main && PYTHONPATH=.:tests python3 bench/etcd_v2.py [N]
Prints a table; nothing is asserted.

    PYTHONPATH=.:tests .venv/bin/python bench/etcd_v2.py --list-trees A,B [--count 5000] [--rounds 3]

The agent's start-up listings (issue #19), two commits side by side: N vxlan leases in a local etcd,
then for each commit (`git archive`, run in a process of its own) a store lists twice, as a start
does (acquire, then watch_peers); the CPU of each listing, rounds interleaved A B A B.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from ipaddress import IPv4Address, IPv4Network

import trio
from etcd_server import EtcdServer

from flannelpy.etcd.store import EtcdOptions
from flannelpy.etcd.v2 import V2Store
from flannelpy.subnet.lease import SUBNET_TTL, LeaseAttrs


def subnet(i: int) -> IPv4Network:
    return IPv4Network(f"10.{100 + i // 256}.{i % 256}.0/24")


async def bench(endpoint: str, n: int) -> list[tuple[str, int, float]]:
    attrs = LeaseAttrs(IPv4Address("10.0.0.1"), "vxlan", {"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:ff"})
    rows = []
    async with V2Store(EtcdOptions(endpoints=(endpoint,))) as s, V2Store(EtcdOptions(endpoints=(endpoint,))) as w:
        t = time.perf_counter()
        for i in range(n):
            await s.create_lease(subnet(i), attrs, SUBNET_TTL)
        rows.append(("create_lease (sequential)", n, time.perf_counter() - t))

        t = time.perf_counter()
        leases, index = await s.list_leases()
        rows.append((f"list_leases ({len(leases)} leases)", 1, time.perf_counter() - t))

        t = time.perf_counter()
        for i in range(n):
            await s.renew_lease(subnet(i), attrs, SUBNET_TTL)
        rows.append(("renew_lease (sequential)", n, time.perf_counter() - t))

        # watch latency: write, then time until the event arrives
        _, index = await s.list_leases()
        it = w.watch_leases(index).__aiter__()
        lat = 0.0
        for i in range(n):
            t = time.perf_counter()
            await s.renew_lease(subnet(i), attrs, SUBNET_TTL)
            while not (await it.__anext__()).events:
                pass
            lat += time.perf_counter() - t
        await it.aclose()
        rows.append(("write -> watch event", n, lat))
    return rows


async def fill(endpoint: str, n: int) -> None:
    async with V2Store(EtcdOptions(endpoints=(endpoint,))) as s:
        async def some(lo: int, hi: int) -> None:
            for i in range(lo, hi):
                attrs = LeaseAttrs(IPv4Address(f"10.251.{i // 256}.{i % 256}"), "vxlan",
                                   {"VNI": 1, "VtepMAC": f"aa:bb:cc:dd:{i // 256:02x}:{i % 256:02x}"})
                await s.create_lease(subnet(i), attrs, SUBNET_TTL)
        async with trio.open_nursery() as nursery:
            for k in range(8):
                nursery.start_soon(some, k * n // 8, (k + 1) * n // 8)


# Run in a child per tree: the editable install's import hook is taken out so the tree's own wins.
_CHILD = """
import resource, sys, trio
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path.insert(0, sys.argv[1])
from flannelpy.etcd.store import EtcdOptions
from flannelpy.etcd.v2 import V2Store
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
async def main():
    async with V2Store(EtcdOptions(endpoints=(sys.argv[2],))) as s:
        t0 = cpu(); a, _ = await s.list_leases(); t1 = cpu(); b, _ = await s.list_leases(); t2 = cpu()
    assert sorted(a, key=lambda x: x.subnet) == sorted(b, key=lambda x: x.subnet)
    print(len(a), t1 - t0, t2 - t1)
trio.run(main)
"""


def list_trees(trees: list[str], n: int, rounds: int) -> None:
    tmp = tempfile.mkdtemp(prefix="etcdv2-trees-")
    try:
        dirs = {}
        for rev in trees:
            dirs[rev] = os.path.join(tmp, rev)
            os.makedirs(dirs[rev])
            archive = subprocess.run(["git", "archive", rev, "flannelpy"], check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", dirs[rev]], input=archive, check=True)
        rows: dict[str, list[tuple[float, float]]] = {rev: [] for rev in trees}
        with EtcdServer() as server:
            trio.run(fill, server.endpoint, n)
            for _ in range(rounds):
                for rev in trees:
                    proc = subprocess.run([sys.executable, "-c", _CHILD, dirs[rev], server.endpoint], check=False,
                                          capture_output=True, text=True)
                    if proc.returncode != 0:
                        sys.exit(f"{rev}: {proc.stderr.strip()}")
                    out = proc.stdout.split()
                    assert int(out[0]) == n, out
                    rows[rev].append((float(out[1]), float(out[2])))
        print(f"{n} leases, {rounds} rounds interleaved; CPU ms of the process, median (min-max)")
        print(f"{'tree':12} {'first listing':>22} {'second listing':>22} {'both':>8}")
        for rev in trees:
            firsts = sorted(r[0] * 1000 for r in rows[rev])
            seconds = sorted(r[1] * 1000 for r in rows[rev])
            both = sorted(sum(r) * 1000 for r in rows[rev])
            med = lambda xs: xs[len(xs) // 2]
            print(f"{rev:12} {med(firsts):8.0f} ({firsts[0]:.0f}-{firsts[-1]:.0f}) {med(seconds):10.0f} "
                  f"({seconds[0]:.0f}-{seconds[-1]:.0f}) {med(both):8.0f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    if "--list-trees" in sys.argv:
        args = sys.argv[1:]

        def opt(name: str, default: str) -> str:
            return args[args.index(name) + 1] if name in args else default

        list_trees(opt("--list-trees", "").split(","), int(opt("--count", "5000")), int(opt("--rounds", "3")))
        return
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    with EtcdServer() as server:
        rows = trio.run(bench, server.endpoint, n)
    print(f"{'operation':32} {'count':>6} {'total ms':>10} {'per op ms':>10}")
    for name, count, total in rows:
        print(f"{name:32} {count:6d} {total * 1000:10.1f} {total * 1000 / count:10.2f}")


if __name__ == "__main__":
    main()
