"""V2Store costs on a local etcd: create, list, renew and watch-event latency.

Run: cd /work/main && PYTHONPATH=.:tests python3 bench/etcd_v2.py [N]
Prints a table; nothing is asserted.
"""

from __future__ import annotations

import sys
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


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    with EtcdServer() as server:
        rows = trio.run(bench, server.endpoint, n)
    print(f"{'operation':32} {'count':>6} {'total ms':>10} {'per op ms':>10}")
    for name, count, total in rows:
        print(f"{name:32} {count:6d} {total * 1000:10.1f} {total * 1000 / count:10.2f}")


if __name__ == "__main__":
    main()
