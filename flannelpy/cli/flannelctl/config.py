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

from flannelpy.config.network import NetworkConfig, check_config
from flannelpy.errors import FlannelError
from flannelpy.etcd.select import (
    check_api,
    config_key,
    create_command,
    failure_message,
    make_store,
    probe,
)
from flannelpy.etcd.diagnose import UNREACHABLE
from flannelpy.etcd.store import EtcdOptions, Store, StoreUnavailable

# The connection options, whose defaults are flanneld's settings on this host, shared with `leases`.
from ._etcd_args import add_etcd_options, options_from_args


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
    """The agent's own checks: the config (check_config), then the backend type it looks up
    (backend_class), so `validate` refuses exactly what flanneld would.  Every problem at once:
    an unknown Backend.Type is reported beside the config's other problems."""
    from flannelpy.backends import backend_class  # here, not at the top: pyroute2 costs every command ~0.6 s

    result = check_config(text, collect=True)
    backend_type = result.backend_type if isinstance(result, NetworkConfig) else _declared_backend_type(text)
    problems = [] if isinstance(result, NetworkConfig) else [str(e) for e in result]
    if backend_type:
        try:
            backend_class(backend_type)
        except FlannelError as err:
            if str(err) not in problems:
                problems.append(str(err))
    if problems or not isinstance(result, NetworkConfig):
        return None, problems
    return result, []


def _declared_backend_type(text: str) -> str:
    """Backend.Type as the agent would read it, or "" when the text does not get that far."""
    from flannelpy.config.network import MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH, backend_option
    from flannelpy.jsonlimits import load_json

    try:
        doc = load_json(text, max_bytes=MAX_CONFIG_BYTES, max_depth=MAX_CONFIG_DEPTH)
        backend = doc.get("Backend") if isinstance(doc, dict) else None
        value = backend_option(backend, "Type", str, "") if isinstance(backend, dict) else ""
    except (ValueError, FlannelError):
        return ""
    return value.lower() if isinstance(value, str) else ""


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
    if failure is not None:  # etcd failed or refused us: not a missing key
        if all(p.state == UNREACHABLE for p in probes):
            raise StoreUnavailable(failure)  # flannelctl adds where the endpoints came from
        raise FlannelError(failure)
    if api == "v2" and probes[0].state == "disabled":
        raise FlannelError(f"etcd at {','.join(options.endpoints)} does not serve the v2 API: start etcd with "
                           f"--enable-v2=true, or use --etcd-api v3 (or auto)")
    found = "; ".join(p.describe() for p in probes)
    usable = [p for p in probes if p.state == "missing"]  # no use suggesting a write to a disabled API
    hint = "; create it with: " + " or ".join(create_command(options, p.api) for p in usable) \
        if usable and all(p.state in ("missing", "disabled") for p in probes) else ""
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
    """(text, where): `-` is stdin, text starting with `{` is the config itself, anything else a file."""
    if source == "-":
        return sys.stdin.read(), "stdin"
    if source.lstrip().startswith("{"):
        return source, "argument"
    try:
        with open(source, encoding="utf-8") as fh:
            return fh.read(), source
    except OSError as exc:
        raise FlannelError(f"{source}: {exc.strerror}; give a file, - for stdin, or the config JSON itself") from None
    except UnicodeDecodeError:
        raise FlannelError(f"{source}: not UTF-8 text; a config is JSON") from None


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

    v = sub.add_parser("validate", help="check a config (JSON, file, stdin) or, with no argument, the one in etcd")
    add_etcd_options(v)
    v.add_argument("source", nargs="?", default=None,
                   help="the config JSON itself ('{...}'), a file, - for stdin, or nothing for the one in etcd")
    v.set_defaults(func=cmd_validate)
