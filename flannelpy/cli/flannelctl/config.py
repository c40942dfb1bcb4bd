"""flannelctl config get|set|validate: the network config at <prefix>/config, through v3 or v2.

`set` never writes a config flanneld would refuse; `validate` lists every problem at once
(not just the first, as flanneld does) and otherwise prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

import trio

from flannelpy.backends import backend_class
from flannelpy.config.network import NetworkConfig, check_config
from flannelpy.errors import FlannelError
from flannelpy.etcd.select import (
    API_CHOICES,
    check_api,
    config_key,
    create_command,
    failure_message,
    make_store,
    probe,
)
from flannelpy.etcd.store import EtcdOptions, Store
from flannelpy.etcd.transport_choice import TRANSPORT_CHOICES


def add_etcd_options(p: argparse.ArgumentParser) -> None:
    """The connection options, named like flanneld's flags."""
    d = EtcdOptions()
    p.add_argument("--etcd-endpoints", default=",".join(d.endpoints), help="comma-separated etcd endpoints")
    p.add_argument("--etcd-prefix", default=d.prefix, help="etcd prefix (default %(default)s)")
    p.add_argument("--etcd-api", default="auto", choices=API_CHOICES,
                   help="etcd API: v3, v2 or auto (the one holding the config; v3 first)")
    p.add_argument("--etcd-keyfile", default="", help="TLS client key")
    p.add_argument("--etcd-certfile", default="", help="TLS client certificate")
    p.add_argument("--etcd-cafile", default="", help="TLS CA bundle")
    p.add_argument("--etcd-username", default="", help="etcd basic auth user")
    p.add_argument("--etcd-password", default="", help="etcd basic auth password")
    p.add_argument("--etcd-transport", default="auto", choices=TRANSPORT_CHOICES,
                   help="etcd v3 transport: gateway (JSON), grpc, or auto (the gateway; gRPC where it cannot serve)")


def options_from_args(args: argparse.Namespace) -> EtcdOptions:
    endpoints = tuple(e.strip() for e in args.etcd_endpoints.split(",") if e.strip())
    if not endpoints:
        raise FlannelError("--etcd-endpoints: empty; give at least one http(s)://host:port")
    return EtcdOptions(endpoints=endpoints, prefix=args.etcd_prefix, keyfile=args.etcd_keyfile,
                       certfile=args.etcd_certfile, cafile=args.etcd_cafile,
                       username=args.etcd_username, password=args.etcd_password, transport=args.etcd_transport)


# --- pure helpers ---------------------------------------------------------------------------

def summary(cfg: NetworkConfig) -> str:
    count = (int(cfg.subnet_max) - int(cfg.subnet_min)) // cfg.subnet_size + 1
    backend = cfg.backend_type + (" (no Backend given: udp)" if cfg.backend_defaulted else "")
    return (f"Network {cfg.network}, SubnetLen {cfg.subnet_len}, SubnetMin {cfg.subnet_min} .. "
            f"SubnetMax {cfg.subnet_max} ({count} subnets), backend {backend}")


def effective(cfg: NetworkConfig) -> dict[str, Any]:
    """The config as flanneld sees it: parsed, with every default filled in."""
    backend = dict(cfg.backend)
    if not any(k.lower() == "type" for k in backend):
        backend = {"Type": cfg.backend_type, **backend}
    return {
        "Network": str(cfg.network),
        "SubnetLen": cfg.subnet_len,
        "SubnetMin": str(cfg.subnet_min),
        "SubnetMax": str(cfg.subnet_max),
        "EnableIPv4": True,
        "EnableIPv6": cfg.enable_ipv6,
        "EnableNFTables": cfg.enable_nftables,
        "Backend": backend,
    }


def check(text: str) -> tuple[NetworkConfig | None, list[str]]:
    """The agent's own checks, in its order: the config (check_config), then the backend type it
    looks up (backend_class), so `validate` refuses exactly what flanneld would."""
    result = check_config(text, collect=True)
    if not isinstance(result, NetworkConfig):
        return None, [str(e) for e in result]
    try:
        backend_class(result.backend_type)
    except FlannelError as err:
        return None, [str(err)]
    return result, []


def report_problems(where: str, problems: list[str], out: TextIO) -> None:
    print(f"{where}: invalid config ({len(problems)} problem{'s' if len(problems) != 1 else ''}):", file=out)
    for p in problems:
        print(f"  - {p}", file=out)


# --- etcd access -------------------------------------------------------------------------

async def _read(options: EtcdOptions, api: str) -> tuple[str, str]:
    """(config text, api it came from); FlannelError saying what was probed when absent."""
    apis = ["v3", "v2"] if api == "auto" else [api]
    probes = []
    for a in apis:
        store = make_store(options, a)
        try:
            p = await probe(store, a)
        finally:
            await store.aclose()
        if p.state == "found" and p.config is not None:
            return p.config, a
        probes.append(p)
        if p.state not in ("missing", "disabled"):
            break  # v3 unreachable or failing: do not fall back to a possibly stale v2 config
    failure = failure_message(options, probes)
    if failure is not None:
        raise FlannelError(failure)  # etcd failed or refused us: not a missing key
    found = "; ".join(p.describe() for p in probes)
    hint = "; create it with: " + " or ".join(create_command(options, p.api) for p in probes) \
        if all(p.state in ("missing", "disabled") for p in probes) else ""
    raise FlannelError(f"no network config at {config_key(options)} ({found}){hint}")


async def _write(options: EtcdOptions, api: str, text: str) -> str:
    """Write the config; "auto" writes where one already is (v3 first), else v3."""
    target = api
    if api == "auto":
        target = "v3"
        try:
            _, target = await _read(options, "auto")
        except FlannelError:
            pass
    store: Store = make_store(options, target)
    try:
        await store.put_config(text)  # type: ignore[attr-defined]  # both stores have it
    finally:
        await store.aclose()
    return target


# --- subcommands ---------------------------------------------------------------------------

def cmd_get(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    text, _api = trio.run(_read, options, check_api(args.etcd_api))
    if not args.json:
        print(text)
        return 0
    cfg, problems = check(text)
    if cfg is None:
        report_problems(config_key(options), problems, sys.stderr)
        return 1
    print(json.dumps(effective(cfg), indent=2))
    return 0


def _read_source(source: str) -> tuple[str, str]:
    if source == "-":
        return sys.stdin.read(), "stdin"
    try:
        with open(source, encoding="utf-8") as fh:
            return fh.read(), source
    except OSError as exc:
        raise FlannelError(f"{source}: {exc.strerror}") from None


def cmd_set(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    api = check_api(args.etcd_api)
    text, where = (args.value, "argument") if args.value != "-" else _read_source("-")
    text = text.strip()
    cfg, problems = check(text)
    if cfg is None:
        report_problems(where, problems, sys.stderr)
        print("not written", file=sys.stderr)
        return 1
    used = trio.run(_write, options, api, text)
    print(f"wrote {config_key(options)} (etcd {used} API): {summary(cfg)}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    if args.source is None:
        options = options_from_args(args)
        text, api = trio.run(_read, options, check_api(args.etcd_api))
        where = f"{config_key(options)} (etcd {api})"
    else:
        text, where = _read_source(args.source)
    cfg, problems = check(text)
    if cfg is None:
        report_problems(where, problems, sys.stdout)
        return 1
    print(f"valid: {summary(cfg)}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("config", help="get, set or validate the network config in etcd")
    sub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)

    g = sub.add_parser("get", help="print <prefix>/config")
    add_etcd_options(g)
    g.add_argument("--json", action="store_true", help="pretty-print it parsed, with defaults filled in")
    g.set_defaults(func=cmd_get)

    s = sub.add_parser("set", help="validate, then write <prefix>/config")
    add_etcd_options(s)
    s.add_argument("value", help="the config JSON, or - to read it from stdin")
    s.set_defaults(func=cmd_set)

    v = sub.add_parser("validate", help="check a config file, stdin (-) or, with no argument, the one in etcd")
    add_etcd_options(v)
    v.add_argument("source", nargs="?", default=None, help="file, - for stdin, or nothing for etcd")
    v.set_defaults(func=cmd_validate)
