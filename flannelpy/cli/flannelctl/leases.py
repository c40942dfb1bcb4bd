"""flannelctl leases: every lease under <prefix>/subnets/, as a table or JSON."""

from __future__ import annotations

import json
import time
from typing import Any

import trio

from flannelpy.etcd.store import EtcdOptions
from flannelpy.subnet.lease import Lease


def _expires_in(lease: Lease, now: float) -> str:
    if lease.expiration is None:
        return "never (reservation)"
    left = int(lease.expiration - now)
    if left <= 0:
        return "expired"
    h, rem = divmod(left, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s"


def lease_rows(leases: list[Lease], now: float) -> list[dict[str, Any]]:
    """Pure: one dict per lease, sorted by subnet."""
    rows = []
    for lease in sorted(leases, key=lambda l: l.subnet):
        rows.append({
            "subnet": str(lease.subnet),
            "public_ip": str(lease.attrs.public_ip),
            "backend": lease.attrs.backend_type or "udp",  # the udp backend never writes BackendType
            "vtep_mac": lease.attrs.vtep_mac,
            "vni": lease.attrs.vni,
            "expiration": lease.expiration,
            "expires_in": _expires_in(lease, now),
        })
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ("SUBNET", "PUBLIC IP", "BACKEND", "VTEP MAC", "EXPIRES IN")
    body = [(r["subnet"], r["public_ip"], r["backend"], r["vtep_mac"] or "-", r["expires_in"]) for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in (head, *body)) + "\n"


async def _fetch(options: EtcdOptions, api: str) -> list[Lease]:
    from flannelpy.etcd.select import open_store

    store = await open_store(options, api)
    try:
        leases, _rev = await store.list_leases()
    finally:
        await store.aclose()
    return leases


def run(args) -> int:
    endpoints = tuple(e.strip() for e in args.etcd_endpoints.split(",") if e.strip())
    options = EtcdOptions(endpoints=endpoints, prefix=args.etcd_prefix)
    leases = trio.run(_fetch, options, args.etcd_api)
    rows = lease_rows(leases, time.time())
    print(json.dumps(rows, indent=2) if args.json else format_table(rows), end="" if not args.json else "\n")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("leases", help="list every subnet lease in etcd")
    p.add_argument("--etcd-endpoints", default="http://127.0.0.1:4001,http://127.0.0.1:2379")
    p.add_argument("--etcd-prefix", default="/coreos.com/network")
    p.add_argument("--etcd-api", choices=("v3", "v2", "auto"), default="auto")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)
