"""V3Store and LeaseManager costs on a local etcd: create, list, renew, watch latency,
concurrent acquisition and own-key re-creation.

Run: cd /work/main && PYTHONPATH=.:tests python3 bench/etcd_v3.py [N]
Prints a table; nothing is asserted.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from ipaddress import IPv4Address, IPv4Network

import trio
from etcd_server import EtcdServer

from flannelpy.backends.base import LeaseData
from flannelpy.config.network import parse_config
from flannelpy.etcd.store import EtcdOptions
from flannelpy.etcd.v3 import V3Store
from flannelpy.subnet.lease import SUBNET_TTL, LeaseAttrs
from flannelpy.subnet.manager import LeaseManager

ATTRS = LeaseAttrs(IPv4Address("10.0.0.1"), "vxlan", {"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:ff"})


def subnet(i: int) -> IPv4Network:
    return IPv4Network(f"10.{100 + i // 256}.{i % 256}.0/24")


async def store_ops(etcd: EtcdServer, n: int, rows: list) -> None:
    opts = EtcdOptions(endpoints=(etcd.endpoint,), prefix="/bench/a")
    async with V3Store(opts) as s, V3Store(opts) as w:
        t = time.perf_counter()
        for i in range(n):
            await s.create_lease(subnet(i), ATTRS, SUBNET_TTL)
        rows.append(("create_lease (grant+txn, sequential)", n, time.perf_counter() - t))
        t = time.perf_counter()
        leases, rev = await s.list_leases()
        rows.append((f"list_leases ({len(leases)} leases, 1 timetolive each)", 1, time.perf_counter() - t))
        t = time.perf_counter()
        for i in range(n):
            await s.renew_lease(subnet(i), ATTRS, SUBNET_TTL)
        rows.append(("renew_lease (grant+put, sequential)", n, time.perf_counter() - t))

        lat: list[float] = []
        send, recv = trio.open_memory_channel(0)

        async def watch(task_status=trio.TASK_STATUS_IGNORED):
            task_status.started()
            async for batch in w.watch_leases(rev + n):
                for _ in batch.events:
                    await send.send(time.perf_counter())

        async with trio.open_nursery() as nursery:
            await nursery.start(watch)
            await trio.sleep(0.2)
            for i in range(50):
                t = time.perf_counter()
                await s.delete_lease(subnet(i % n))
                lat.append(await recv.receive() - t)
            nursery.cancel_scope.cancel()
        rows.append((f"delete -> watch event median (p max {max(lat) * 1e3:.1f} ms)", 50, statistics.median(lat) * 50))


async def managers(etcd: EtcdServer, k: int, rows: list) -> None:
    cfg = parse_config('{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}')
    data = LeaseData("vxlan", {"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:ff"})
    opts = EtcdOptions(endpoints=(etcd.endpoint,), prefix="/bench/b")
    for label, seed in (("same rng seed: every create races", 7), ("independent rng", None)):
        etcd.etcdctl("del", "/bench/b/", "--prefix")

        async def one(i: int) -> None:
            async with V3Store(opts) as s:
                rng = random.Random(seed if seed is not None else i)
                await LeaseManager(s, cfg, IPv4Address(f"192.168.1.{i + 1}"), data, None, 3600, rng=rng).acquire()

        t = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(k):
                nursery.start_soon(one, i)
        rows.append((f"{k} concurrent acquire() ({label})", 1, time.perf_counter() - t))

    async with V3Store(opts) as s:
        mgr = LeaseManager(s, cfg, IPv4Address("192.168.2.1"), data, None, 3600)
        lease = await mgr.acquire()
        async with trio.open_nursery() as nursery:
            await nursery.start(mgr.keep_lease)
            lat = []
            for _ in range(10):
                changed = mgr.changed
                t = time.perf_counter()
                await s.delete_lease(mgr.current.subnet)
                await changed.wait()
                lat.append(time.perf_counter() - t)
            nursery.cancel_scope.cancel()
        rows.append((f"own key deleted -> re-created {lease.subnet} (median)", 10, statistics.median(lat) * 10))


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    rows: list = []
    with EtcdServer() as etcd:
        trio.run(store_ops, etcd, n, rows)
        trio.run(managers, etcd, 10, rows)
    print(f"{'operation':60} {'count':>6} {'total s':>9} {'per op ms':>10}")
    for name, count, total in rows:
        print(f"{name:60} {count:>6} {total:>9.3f} {total / count * 1e3:>10.2f}")


if __name__ == "__main__":
    main()
