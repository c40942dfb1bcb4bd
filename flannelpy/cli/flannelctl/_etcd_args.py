"""The etcd connection options every etcd-talking subcommand shares (leases, config get|set|validate).

Named like flanneld's flags; their defaults are flanneld's own settings on this host (FLANNELD_* in the
environment, /etc/sysconfig/flanneld; see _flanneld_settings.py), so on a host configured the RHEL way
`flannelctl leases` needs no flags.  `--help` shows each default and where it came from.
"""

from __future__ import annotations

import argparse
import os
import sys

from flannelpy.config.flags import ETCD_APIS, split_endpoints
from flannelpy.errors import UsageError
from flannelpy.etcd.store import EtcdOptions
from flannelpy.etcd.transport_choice import TRANSPORT_CHOICES

from ._flanneld_settings import SYSCONFIG, SYSCONFIG_ENV, FlanneldSettings, resolve

EPILOG = ("Defaults come from flanneld's own settings on this host, in this order: FLANNELD_<FLAG> in the "
          f"environment, then {SYSCONFIG} (FLANNEL_ETCD_ENDPOINTS, FLANNEL_ETCD_PREFIX, the -etcd-* flags in "
          f"FLANNEL_OPTIONS; {SYSCONFIG_ENV}=FILE reads another file, empty for none), then flanneld's defaults. "
          "A flag given here always wins.")


def sysconfig_path(environ: dict[str, str] | os._Environ[str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return env.get(SYSCONFIG_ENV, SYSCONFIG)


def host_settings() -> FlanneldSettings:
    """flanneld's etcd settings on this host (never raises; a small file, read per use so that
    in-process callers with another environment see theirs)."""
    path = sysconfig_path()
    text: str | None = None
    warnings: list[str] = []
    if path:
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                text = fh.read()
        except FileNotFoundError:
            text = None
        except OSError as err:
            warnings.append(f"{path}: {err.strerror}; ignoring it")
    settings = resolve(os.environ, text, path)
    settings.warnings[:0] = warnings
    return settings


def _shown(flag: str, settings: FlanneldSettings) -> str:
    value = settings.value(flag)
    if flag == "etcd-password" and value:
        value = "(set)"
    source = settings.source(flag)
    return f"{value or '(none)'}" + ("" if source == "default" else f", from {source}")


def add_etcd_options(p: argparse.ArgumentParser) -> None:
    """The connection options; their defaults are flanneld's settings on this host."""
    s = host_settings()
    p.add_argument("--etcd-endpoints", default=s.value("etcd-endpoints"),
                   help=f"comma-separated etcd endpoints (default {_shown('etcd-endpoints', s)})")
    p.add_argument("--etcd-prefix", default=s.value("etcd-prefix"),
                   help=f"etcd prefix (default {_shown('etcd-prefix', s)})")
    p.add_argument("--etcd-api", default=s.value("etcd-api"), choices=ETCD_APIS,
                   help="etcd API: v3, v2 or auto (the one holding the config; v3 first) "
                        f"(default {_shown('etcd-api', s)})")
    p.add_argument("--etcd-keyfile", default=s.value("etcd-keyfile"),
                   help=f"TLS client key (default {_shown('etcd-keyfile', s)})")
    p.add_argument("--etcd-certfile", default=s.value("etcd-certfile"),
                   help=f"TLS client certificate (default {_shown('etcd-certfile', s)})")
    p.add_argument("--etcd-cafile", default=s.value("etcd-cafile"),
                   help=f"TLS CA bundle (default {_shown('etcd-cafile', s)})")
    p.add_argument("--etcd-username", default=s.value("etcd-username"),
                   help=f"etcd basic auth user (default {_shown('etcd-username', s)})")
    p.add_argument("--etcd-password", default=s.value("etcd-password"),
                   help=f"etcd basic auth password (default {_shown('etcd-password', s)})")
    p.add_argument("--etcd-transport", default=s.value("etcd-transport"), choices=TRANSPORT_CHOICES,
                   help="etcd v3 transport: gateway (JSON), grpc, or auto (the gateway; gRPC where it cannot serve)")
    p.set_defaults(etcd_options=True)
    if p.epilog is None:
        p.epilog = EPILOG


def source_of(args: argparse.Namespace, flag: str) -> str:
    """Where the value of --<flag> came from, for messages: "--etcd-prefix" when given here, else
    "flanneld's default", "FLANNELD_ETCD_PREFIX" or "/etc/sysconfig/flanneld (FLANNEL_ETCD_PREFIX)"."""
    value = getattr(args, flag.replace("-", "_"))
    s = host_settings()
    if value != s.value(flag):
        return f"--{flag}"
    source = s.source(flag)
    return "flanneld's default" if source == "default" else source


def warn_about_settings() -> None:
    """Say once (stderr) which of flanneld's settings on this host could not be used."""
    for warning in host_settings().warnings:
        print(f"flannelctl: warning: {warning}", file=sys.stderr)


def options_from_args(args: argparse.Namespace) -> EtcdOptions:
    """EtcdOptions from the parsed options; UsageError naming a bad endpoint, where it came from, and the fix."""
    warn_about_settings()
    try:
        endpoints = split_endpoints(args.etcd_endpoints)
    except ValueError as err:
        raise UsageError(f"{source_of(args, 'etcd-endpoints')}: {err}") from None
    return EtcdOptions(endpoints=endpoints, prefix=args.etcd_prefix, keyfile=args.etcd_keyfile,
                       certfile=args.etcd_certfile, cafile=args.etcd_cafile,
                       username=args.etcd_username, password=args.etcd_password, transport=args.etcd_transport)
