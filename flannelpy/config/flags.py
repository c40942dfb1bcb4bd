"""flanneld's command line: Go `flag` syntax and the FLANNELD_* environment fallback.

Go's flag package accepts `-name` and `--name`, `-name=value` and `-name value`; a boolean
takes its value only as `-name=false` (a separate word would end flag parsing).  After the
command line, every flag not given falls back to FLANNELD_<NAME> (upper case, - and . as _),
with empty values ignored; `-version` is checked before the environment, as in flanneld.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence
from urllib.parse import urlsplit

from flannelpy.errors import UsageError


class FlagSpec(NamedTuple):
    name: str
    kind: type  # str, int, bool or list (repeatable string)
    default: Any
    help: str
    # Accepted for compatibility but without effect here; the text says why.
    inactive: str = ""
    # Refused when set (flanneld would run in a mode flannelpy does not have); the text says why and what to do.
    refused: str = ""
    # Checks a converted value at parse time: raises ValueError with the reason (the caller names the flag).
    check: Callable[[Any], None] | None = None


_KUBE = "Kubernetes mode is not supported: flannelpy runs in etcd mode only"
_KUBE_REFUSED = (f"{_KUBE}; start it without -kube-subnet-mgr, with -etcd-endpoints naming your etcd "
                 f"(the network config at <-etcd-prefix>/config)")

ETCD_APIS = ("v3", "v2", "auto")
UDP_FORWARDERS = ("auto", "bpf", "python")
LOG_FORMATS = ("text", "klog", "json")


def split_endpoints(raw: str) -> tuple[str, ...]:
    """-etcd-endpoints as a tuple of URLs; ValueError saying what is wrong with which one and the fix.

    Checked when the flag is parsed: a bad endpoint would otherwise only show up as an endless
    retry loop ("Request URL is missing an 'http://' or 'https://' protocol") long after start."""
    endpoints = tuple(e.strip() for e in raw.split(",") if e.strip())
    if not endpoints:
        raise ValueError("empty; give at least one http(s)://host:port, e.g. http://127.0.0.1:2379")
    for e in endpoints:
        parts = urlsplit(e)
        if "://" not in e:
            raise ValueError(f"{e!r} has no scheme; write it as http://{e} (or https:// for TLS)")
        if parts.scheme in ("unix", "unixs"):
            raise ValueError(f"{e!r}: unix socket endpoints are not supported; give http(s)://host:port")
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"{e!r}: scheme {parts.scheme!r} is not supported; use http:// or https://")
        if not parts.hostname:
            raise ValueError(f"{e!r} has no host; give http(s)://host:port")
        try:
            parts.port
        except ValueError:
            raise ValueError(f"{e!r}: the port is not a number between 1 and 65535") from None
    return endpoints


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value not in choices:
            raise ValueError(f"must be {', '.join(choices[:-1])} or {choices[-1]}")
    return check


def _check_endpoints(value: Any) -> None:
    split_endpoints(value)

FLAGS: tuple[FlagSpec, ...] = (
    FlagSpec("etcd-endpoints", str, "http://127.0.0.1:4001,http://127.0.0.1:2379", "a comma-delimited list of etcd endpoints",
             check=_check_endpoints),
    FlagSpec("etcd-prefix", str, "/coreos.com/network", "etcd prefix"),
    FlagSpec("etcd-keyfile", str, "", "SSL key file used to secure etcd communication"),
    FlagSpec("etcd-certfile", str, "", "SSL certification file used to secure etcd communication"),
    FlagSpec("etcd-cafile", str, "", "SSL Certificate Authority file used to secure etcd communication"),
    FlagSpec("etcd-username", str, "", "username for BasicAuth to etcd"),
    FlagSpec("etcd-password", str, "", "password for BasicAuth to etcd"),
    FlagSpec("etcd-api", str, "auto", "etcd API to use: v3, v2 or auto (v3 when the config is there, else v2)",
             check=_one_of(ETCD_APIS)),
    FlagSpec("etcd-transport", str, "auto", "etcd v3 transport: gateway (JSON), grpc, or auto (the gateway; etcd's gRPC API where the gateway cannot serve)"),
    FlagSpec("iface", list, [], "interface to use (IP or name) for inter-host communication; may be repeated"),
    FlagSpec("iface-regex", list, [], "regex expression to match the first interface to use (IP or name); may be repeated"),
    FlagSpec("iface-can-reach", str, "", "detect the interface to use from the route to this IP address"),
    FlagSpec("subnet-file", str, "/run/flannel/subnet.env", "filename where env variables (subnet, MTU, ...) will be written to"),
    FlagSpec("public-ip", str, "", "IP accessible by other nodes for inter-host communication"),
    FlagSpec("public-ipv6", str, "", "IPv6 accessible by other nodes for inter-host communication"),
    FlagSpec("subnet-lease-renew-margin", int, 60, "subnet lease renewal margin, in minutes, ranging from 1 to 1439"),
    FlagSpec("ip-masq", bool, False, "setup IP masquerade rule for traffic destined outside of overlay network"),
    FlagSpec("ip-masq-fully-random-disable", bool, False, "disable --random-fully in the masquerade rules"),
    FlagSpec("ip-blackhole-route", bool, False, "add a blackhole route for our own subnet",
             inactive="the blackhole route is not implemented in flannelpy"),
    FlagSpec("healthz-ip", str, "0.0.0.0", "the IP address for healthz server to listen"),
    FlagSpec("healthz-port", int, 0, "the port for healthz server to listen (0 to disable)"),
    FlagSpec("iptables-resync", int, 5, "resync period for iptables rules, in seconds"),
    FlagSpec("iptables-forward-rules", bool, True, "add default accept rules to FORWARD chain in iptables"),
    FlagSpec("docker-daemon-json", str, "", "set bip and mtu from the lease in this Docker daemon.json (empty: off)"),
    FlagSpec("docker-restart", bool, False, "restart Docker when bip or mtu in daemon.json changed"),
    FlagSpec("docker-fixed-cidr", bool, False, "also set fixed-cidr in -docker-daemon-json to the lower half of the "
             "subnet, leaving the upper half to `flannelctl attach`"),
    FlagSpec("udp-forwarder", str, "auto", "udp backend's data plane: auto (tc-BPF where the kernel takes it, "
             "else the Python forwarder), bpf (refuse to start without it) or python", check=_one_of(UDP_FORWARDERS)),
    FlagSpec("status-socket", str, "/run/flannel/flanneld.sock", "unix socket serving /status for flannelctl (empty: off)"),
    FlagSpec("kube-subnet-mgr", bool, False, "contact the Kubernetes API for subnet assignment", refused=_KUBE_REFUSED),
    FlagSpec("kube-api-url", str, "", "Kubernetes API server URL", inactive=_KUBE),
    FlagSpec("kubeconfig-file", str, "", "kubeconfig file location", inactive=_KUBE),
    FlagSpec("kube-annotation-prefix", str, "flannel.alpha.coreos.com", "Kubernetes annotation prefix", inactive=_KUBE),
    FlagSpec("net-config-path", str, "/etc/kube-flannel/net-conf.json", "path to the network configuration file", inactive=_KUBE),
    FlagSpec("set-node-network-unavailable", bool, True, "set NodeNetworkUnavailable after ready", inactive=_KUBE),
    FlagSpec("version", bool, False, "print version and exit"),
    FlagSpec("v", int, 0, "log level for V logs"),
    FlagSpec("log-format", str, "text", "log line format: text (ISO time, level letter, logger), klog (flanneld's "
             "'I1130 20:46:00.385123 pid file:line] msg') or json (one object per line)", check=_one_of(LOG_FORMATS)),
    FlagSpec("vmodule", str, "", "comma-separated list of pattern=N settings (accepted, ignored)"),
    FlagSpec("log_backtrace_at", str, "", "when logging hits line file:N, emit a stack trace (accepted, ignored)"),
)

_BY_NAME = {spec.name: spec for spec in FLAGS}

_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def env_name(flag: str) -> str:
    return "FLANNELD_" + flag.upper().replace("-", "_").replace(".", "_")


class ParsedFlags:
    """The flags' values.  (A plain class: a dataclass costs ~0.8 ms of every start.)"""

    __slots__ = ("values", "given", "from_env")

    def __init__(self, values: dict[str, Any], given: set[str] | None = None,
                 from_env: set[str] | None = None) -> None:
        self.values = values
        self.given = set() if given is None else given  # set on the command line or from the environment
        self.from_env = set() if from_env is None else from_env

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def inactive_in_use(self) -> list[str]:
        """Warnings for flags that were set but have no effect here."""
        out = []
        for name in sorted(self.given):
            spec = _BY_NAME[name]
            if spec.inactive and self.values[name] != spec.default:
                out.append(f"-{name} is accepted but has no effect: {spec.inactive}")
        return out

    def refusals(self) -> list[str]:
        """One line per flag that asks for a mode flannelpy does not have (the agent must not start)."""
        return [f"-{spec.name}: {spec.refused}" for spec in FLAGS
                if spec.refused and spec.name in self.given and self.values[spec.name] != spec.default]


def _convert(spec: FlagSpec, raw: str, source: str) -> Any:
    value = _convert_kind(spec, raw, source)
    if spec.check is not None:
        try:
            spec.check(value)
        except ValueError as err:
            raise UsageError(f'invalid value "{raw}" for {source}: {err}') from None
    return value


def _convert_kind(spec: FlagSpec, raw: str, source: str) -> Any:
    if spec.kind is bool:
        if raw in _TRUE:
            return True
        if raw in _FALSE:
            return False
        raise UsageError(f'invalid boolean value "{raw}" for {source}: parse error')
    if spec.kind is int:
        try:
            return int(raw, 0)
        except ValueError:
            raise UsageError(f'invalid value "{raw}" for {source}: parse error') from None
    return raw


def usage() -> str:
    lines = ["Usage: flanneld [OPTION]...", ""]
    for spec in FLAGS:
        kind = {str: " string", int: " int", bool: "", list: " value"}[spec.kind]
        default = ""
        if spec.kind is int or (spec.kind is not list and spec.default not in ("", False)):
            shown = f'"{spec.default}"' if spec.kind is str else str(spec.default).lower()
            default = f" (default {shown})"
        extra = f" [{spec.inactive or spec.refused.split(';')[0]}]" if spec.inactive or spec.refused else ""
        lines.append(f"  -{spec.name}{kind}")
        lines.append(f"    \t{spec.help}{default}{extra}")
    lines.append("")
    lines.append("Every flag can also be set with FLANNELD_<FLAG> in the environment, e.g. FLANNELD_ETCD_ENDPOINTS.")
    return "\n".join(lines)


class HelpRequested(Exception):
    pass


def parse_flags(argv: Sequence[str], environ: Mapping[str, str]) -> ParsedFlags:
    """Parse argv (without the program name), then apply the environment fallback.

    Raises UsageError (exit 2) for unknown flags, missing values, bad values or stray
    arguments, and HelpRequested for -h/-help.
    """
    values: dict[str, Any] = {spec.name: (list(spec.default) if spec.kind is list else spec.default) for spec in FLAGS}
    given: set[str] = set()
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            if i < len(args):
                raise UsageError(f"unexpected argument {args[i]!r}: flanneld takes only flags")
            break
        if len(arg) < 2 or not arg.startswith("-"):
            raise UsageError(f"unexpected argument {arg!r}: flanneld takes only flags")
        body = arg[2:] if arg.startswith("--") else arg[1:]
        if not body or body.startswith("-") or body.startswith("="):
            raise UsageError(f"bad flag syntax: {arg}")
        name, has_value, value = body.partition("=")
        if name in ("h", "help"):
            raise HelpRequested()
        spec = _BY_NAME.get(name)
        if spec is None:
            raise UsageError(f"flag provided but not defined: -{name}")
        if not has_value:
            if spec.kind is bool:
                value = "true"
            else:
                if i >= len(args):
                    raise UsageError(f"flag needs an argument: -{name}")
                value = args[i]
                i += 1
        converted = _convert(spec, value, f"flag -{name}")
        if spec.kind is list:
            if name not in given:
                values[name] = []
            values[name].append(converted)
        else:
            values[name] = converted
        given.add(name)
    parsed = ParsedFlags(values=values, given=given)
    if values["version"]:
        return parsed  # flanneld checks -version before reading the environment
    for spec in FLAGS:
        if spec.name in given or spec.name == "version":
            continue
        raw = environ.get(env_name(spec.name), "")
        if raw == "":
            continue
        converted = _convert(spec, raw, f"environment variable {env_name(spec.name)}")
        # FLANNELD_IFACE sets one entry; commas are not split (coreos/pkg flagutil).
        values[spec.name] = [converted] if spec.kind is list else converted
        given.add(spec.name)
        parsed.from_env.add(spec.name)
    return parsed
