"""Where flanneld's etcd settings live on a host, read the way the agent reads them (pure).

flanneld.service runs `flanneld-start $FLANNEL_OPTIONS` with EnvironmentFile=/etc/sysconfig/flanneld, and
flanneld-start turns FLANNEL_ETCD_ENDPOINTS and FLANNEL_ETCD_PREFIX (or the older FLANNEL_ETCD and
FLANNEL_ETCD_KEY) into -etcd-endpoints and -etcd-prefix.  So flannelctl takes, for each etcd setting,
the first of:

  1. its own command-line flag (--etcd-prefix ...)
  2. FLANNELD_<FLAG> in flannelctl's own environment (what this shell asks for)
  3. /etc/sysconfig/flanneld: the -etcd-* flags the unit would pass (FLANNEL_ETCD_ENDPOINTS,
     FLANNEL_ETCD_PREFIX, FLANNEL_OPTIONS), then FLANNELD_* lines in the file (the unit exports them)
  4. flanneld's defaults

The file's flags are parsed by flanneld's own parser (flannelpy.config.flags), so flannelctl and the agent
can never read them differently.  Nothing here raises: a setting that cannot be read becomes a warning,
because `flannelctl --help` and `docker-opts` must work on a host with a broken file.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Mapping

from flannelpy.config.flags import FLAGS, env_name, parse_flags
from flannelpy.errors import UsageError

SYSCONFIG = "/etc/sysconfig/flanneld"
SYSCONFIG_ENV = "FLANNELCTL_SYSCONFIG"  # another file, or empty for none (tests, other distributions)

# flanneld's flags that say how to reach etcd; flannelctl has one option for each
ETCD_FLAGS = ("etcd-endpoints", "etcd-prefix", "etcd-keyfile", "etcd-certfile", "etcd-cafile",
              "etcd-username", "etcd-password", "etcd-api", "etcd-transport")

_DEFAULTS = {spec.name: spec.default for spec in FLAGS if spec.name in ETCD_FLAGS}


@dataclass(frozen=True)
class Setting:
    value: str
    source: str  # "default", "FLANNELD_ETCD_PREFIX", "/etc/sysconfig/flanneld (FLANNEL_ETCD_PREFIX)", ...


@dataclass
class FlanneldSettings:
    settings: dict[str, Setting]
    warnings: list[str] = field(default_factory=list)

    def value(self, flag: str) -> str:
        return self.settings[flag].value

    def source(self, flag: str) -> str:
        return self.settings[flag].source


def parse_environment_file(text: str) -> dict[str, str]:
    """systemd EnvironmentFile syntax: KEY=value, KEY="value" or KEY='value', # and ; comments,
    a trailing backslash continues the line; later assignments win."""
    out: dict[str, str] = {}
    logical: list[str] = []
    lines: list[str] = []
    for raw in text.splitlines():
        if raw.endswith("\\") and not raw.lstrip().startswith(("#", ";")):
            logical.append(raw[:-1])
            continue
        logical.append(raw)
        lines.append("".join(logical))
        logical = []
    if logical:
        lines.append("".join(logical))
    for line in lines:
        line = line.strip()
        if not line or line.startswith(("#", ";")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip()
        if key.startswith("export "):
            key = key[len("export "):].strip()
        if not key.replace("_", "").isalnum():
            continue
        out[key] = _unquote(value.strip())
    return out


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        inner = value[1:-1]
        return inner.replace('\\"', '"').replace("\\\\", "\\") if value[0] == '"' else inner
    return value


def from_file(variables: Mapping[str, str], path: str) -> tuple[dict[str, Setting], list[str]]:
    """The etcd settings the unit would start flanneld with, from the file's variables."""
    found: dict[str, Setting] = {}
    warnings: list[str] = []
    argv: list[str] = []
    origin: dict[str, str] = {}
    for flag, names in (("etcd-endpoints", ("FLANNEL_ETCD_ENDPOINTS", "FLANNEL_ETCD")),
                        ("etcd-prefix", ("FLANNEL_ETCD_PREFIX", "FLANNEL_ETCD_KEY"))):
        name = next((n for n in names if variables.get(n)), None)
        if name is not None:
            argv.append(f"-{flag}={variables[name]}")
            origin[flag] = f"{path} ({name})"
    options = variables.get("FLANNEL_OPTIONS", "")
    try:
        extra = shlex.split(options)
    except ValueError as err:
        warnings.append(f"{path}: FLANNEL_OPTIONS cannot be split into words ({err}); ignoring it")
        extra = []
    file_env = {k: v for k, v in variables.items() if k.startswith("FLANNELD_")}
    try:
        parsed = parse_flags(argv + extra, file_env)
    except UsageError as err:
        warnings.append(f"{path}: flanneld would refuse these settings ({err}); ignoring the file")
        return {}, warnings
    for flag in ETCD_FLAGS:
        if flag not in parsed.given:
            continue
        if flag in parsed.from_env:
            source = f"{path} ({env_name(flag)})"
        else:
            source = origin.get(flag, f"{path} (FLANNEL_OPTIONS)")
        found[flag] = Setting(str(parsed[flag]), source)
    return found, warnings


def from_environment(environ: Mapping[str, str]) -> tuple[dict[str, Setting], list[str]]:
    """FLANNELD_<FLAG> variables of this process, checked by flanneld's parser."""
    found: dict[str, Setting] = {}
    warnings: list[str] = []
    for flag in ETCD_FLAGS:
        name = env_name(flag)
        raw = environ.get(name, "")
        if not raw:
            continue
        try:
            parse_flags([], {name: raw})
        except UsageError as err:
            warnings.append(f"{err}; ignoring it")
            continue
        found[flag] = Setting(raw, name)
    return found, warnings


def resolve(environ: Mapping[str, str], file_text: str | None, path: str) -> FlanneldSettings:
    """Defaults < the file < this environment (command-line flags are applied by the caller)."""
    settings = {flag: Setting(str(default), "default") for flag, default in _DEFAULTS.items()}
    warnings: list[str] = []
    if file_text is not None:
        found, warned = from_file(parse_environment_file(file_text), path)
        settings.update(found)
        warnings += warned
    found, warned = from_environment(environ)
    settings.update(found)
    warnings += warned
    return FlanneldSettings(settings, warnings)
