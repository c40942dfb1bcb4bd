"""flannelctl leases: every lease under <prefix>/subnets/, as a table or JSON.

The REFUSED column says why an agent would refuse a lease (subnet/admission.py), judged against the
network config in etcd in the order etcd lists the leases.  The checks that need a host (its own
subnet, addresses and routes) are left out here: an agent may refuse more.

Nothing at all under the prefix (no config, no lease) is almost always a wrong --etcd-prefix: that
exits 1 and names the prefixes that do hold a network.  A config without leases (no agent started
yet) is a normal, empty table, exit 0.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import trio

from flannelpy.config.network import NetworkConfig, check_config
from flannelpy.errors import FlannelError
from flannelpy.etcd.store import EtcdOptions
from flannelpy.subnet.admission import AdmissionRules, Refusal, judge_listing
from flannelpy.subnet.lease import Lease

from ._etcd_args import add_etcd_options, host_settings, options_from_args


def _expires_in(lease: Lease, now: float) -> str:
    if lease.expiration is None:
        return "never (reservation)"
    left = int(lease.expiration - now)
    if left <= 0:
        return "expired"
    h, rem = divmod(left, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s"


def refusals(leases: list[Lease], config: NetworkConfig | None) -> dict[Any, Refusal]:
    """Pure: why each lease would be refused, in listing order (none judged without a valid config)."""
    if config is None:
        return {}
    ipv6_network = config.ipv6_network if config.enable_ipv6 else None
    return judge_listing(AdmissionRules(network=config.network, ipv6_network=ipv6_network), leases)


def lease_rows(leases: list[Lease], now: float, refused: dict[Any, Refusal] | None = None) -> list[dict[str, Any]]:
    """Pure: one dict per lease, sorted by subnet."""
    refused = refused or {}
    rows = []
    for lease in sorted(leases, key=lambda l: l.subnet):
        refusal = refused.get(lease.subnet)
        rows.append({
            "subnet": str(lease.subnet),
            "public_ip": str(lease.attrs.public_ip),
            # dual stack (EnableIPv6): the key's IPv6 subnet and PublicIPv6; None in an IPv4-only network
            "ipv6_subnet": str(lease.ipv6_subnet) if lease.ipv6_subnet is not None else None,
            "public_ipv6": str(lease.attrs.public_ipv6) if lease.attrs.public_ipv6 is not None else None,
            "backend": lease.attrs.backend_type or "udp",  # the udp backend never writes BackendType
            "vtep_mac": lease.attrs.vtep_mac,
            "vni": lease.attrs.vni,
            "expiration": lease.expiration,
            "expires_in": _expires_in(lease, now),
            "refused": refusal.reason if refusal is not None else None,
            "refused_code": refusal.code if refusal is not None else None,
        })
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The table; IPv6 columns only when some lease has an IPv6 side (dual stack)."""
    dual = any(r.get("ipv6_subnet") or r.get("public_ipv6") for r in rows)
    head: tuple[str, ...] = ("SUBNET", "PUBLIC IP", "BACKEND", "VTEP MAC", "EXPIRES IN", "REFUSED")
    body = [(r["subnet"], r["public_ip"], r["backend"], r["vtep_mac"] or "-", r["expires_in"], r["refused"] or "-")
            for r in rows]
    if dual:
        head = head[:2] + ("IPV6 SUBNET", "PUBLIC IPV6") + head[2:]
        body = [b[:2] + (r.get("ipv6_subnet") or "-", r.get("public_ipv6") or "-") + b[2:] for b, r in zip(body, rows)]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in (head, *body)) + "\n"


async def _fetch(options: EtcdOptions, api: str) -> tuple[list[Lease], str | None]:
    from flannelpy.etcd.select import open_store

    store = await open_store(options, api)
    try:
        config = await store.get_config()
        # a dual-stack network's keys (`10.42.63.0-24&fd42:0:0:1f::-64`) are read as the agents read them
        parsed = check_config(config, collect=True) if config is not None else None
        store.dual_stack = isinstance(parsed, NetworkConfig) and parsed.enable_ipv6
        leases, _rev = await store.list_leases()
    finally:
        await store.aclose()
    return leases, config


def _config(text: str | None) -> NetworkConfig | None:
    """The config the agents run with, or None (said on stderr) when there is none to judge by."""
    if text is None:
        print("no network config in etcd: the REFUSED column is not filled", file=sys.stderr)
        return None
    result = check_config(text, collect=True)
    if isinstance(result, NetworkConfig):
        return result
    print(f"the network config in etcd is invalid ({result[0]}): the REFUSED column is not filled", file=sys.stderr)
    return None


async def _nothing_here(options: EtcdOptions, api: str) -> FlannelError:
    """The error for a prefix with no config and no lease, naming the prefixes that hold a network."""
    from ._prefixes import find_networks, hint

    found = await find_networks(options, api, extra=(host_settings().value("etcd-prefix"),))
    return FlannelError(f"nothing under {options.prefix.rstrip('/')}/ (no config, no leases): {hint(options.prefix, found)}")


def run(args) -> int:
    options = options_from_args(args)
    leases, config_text = trio.run(_fetch, options, args.etcd_api)
    if not leases and config_text is None:
        raise trio.run(_nothing_here, options, args.etcd_api)
    rows = lease_rows(leases, time.time(), refusals(leases, _config(config_text)))
    print(json.dumps(rows, indent=2) if args.json else format_table(rows), end="" if not args.json else "\n")
    if not leases:
        print(f"no leases under {options.prefix.rstrip('/')}/subnets/ yet: no agent has started with this prefix",
              file=sys.stderr)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("leases", help="list every subnet lease in etcd",
                              description="Every lease under <prefix>/subnets/. Exit 0 with the table (empty when "
                                          "the config is there but no agent has started); exit 1 when the prefix "
                                          "holds neither a config nor a lease, naming the prefixes that do.")
    add_etcd_options(p)  # the same connection options (TLS, auth, API, transport) as `config`
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)
