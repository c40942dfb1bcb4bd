"""subnet.env: what flanneld writes for Docker and mk-docker-opts.sh, byte for byte."""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network

from flannelpy.errors import FlannelError
from flannelpy.fileutil import atomic_write, replace_problem


@dataclass(frozen=True)
class SubnetEnv:
    network: IPv4Network
    subnet: IPv4Network  # the lease; FLANNEL_SUBNET is its first address
    mtu: int
    ipmasq: bool


def render_subnet_env(env: SubnetEnv) -> str:
    first = IPv4Interface((int(env.subnet.network_address) + 1, env.subnet.prefixlen))
    return (
        f"FLANNEL_NETWORK={env.network}\n"
        f"FLANNEL_SUBNET={first}\n"
        f"FLANNEL_MTU={env.mtu}\n"
        f"FLANNEL_IPMASQ={'true' if env.ipmasq else 'false'}\n"
    )


def check_subnet_file(path: str) -> None:
    """FlannelError unless write_subnet_env(path) can succeed now (its directory exists or can be
    made, and is writable); checked before the lease is taken.  Changes nothing."""
    problem = replace_problem(path)
    if problem is not None:
        raise FlannelError(f"-subnet-file={path}: cannot be written: {problem}")


def write_subnet_env(path: str, env: SubnetEnv) -> None:
    """Atomic (temp file + rename), mode 0644, directory 0755, as flanneld >= v0.28.8."""
    try:
        atomic_write(path, render_subnet_env(env).encode(), mode=0o644, dir_mode=0o755)
    except OSError as exc:
        raise FlannelError(f"-subnet-file={path}: cannot be written: {exc.strerror or exc}") from None


def subnet_env_matches(path: str, env: SubnetEnv) -> bool:
    """Whether the file holds exactly what write_subnet_env(path, env) writes (False when absent)."""
    try:
        with open(path, "rb") as fh:
            return fh.read() == render_subnet_env(env).encode()
    except OSError:
        return False


_LINE_RE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")


def parse_env_file(text: str) -> dict[str, str]:
    """Read a KEY=VALUE file the way godotenv does: comments, quotes and `export` allowed."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _LINE_RE.match(line)
        if not m:
            continue
        key, value = m.groups()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        else:
            value = value.split(" #", 1)[0].strip()
        values[key] = value
    return values


def read_previous(path: str) -> tuple[IPv4Network | None, IPv4Network | None]:
    """(FLANNEL_NETWORK, FLANNEL_SUBNET as a network) from an old subnet.env, if usable."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            values = parse_env_file(fh.read())
    except FileNotFoundError:
        return None, None
    except OSError:
        return None, None

    def net(key: str) -> IPv4Network | None:
        raw = values.get(key, "")
        if not raw or "," in raw:  # flanneld ignores multi-valued entries
            return None
        try:
            return IPv4Interface(raw).network
        except ValueError:
            return None

    return net("FLANNEL_NETWORK"), net("FLANNEL_SUBNET")
