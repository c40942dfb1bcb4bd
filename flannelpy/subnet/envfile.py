"""subnet.env: what flanneld writes for Docker and mk-docker-opts.sh, byte for byte."""

from __future__ import annotations

import re
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network
from typing import Any, NamedTuple

from flannelpy.errors import FlannelError
from flannelpy.fileutil import atomic_write, replace_problem


class _SubnetEnvFields(NamedTuple):
    network: IPv4Network
    subnet: IPv4Network  # the lease; FLANNEL_SUBNET is its first address
    mtu: int
    ipmasq: bool
    # With EnableIPv6: IPv6Network and our IPv6 subnet (FLANNEL_IPV6_SUBNET is its first address).
    ipv6_network: IPv6Network | None = None
    ipv6_subnet: IPv6Network | None = None


class SubnetEnv(_SubnetEnvFields):
    """What subnet.env says.  A record rather than a dataclass: it is defined at every start."""

    __slots__ = ()

    def __new__(cls, *args: Any, **kwargs: Any) -> SubnetEnv:
        self = super().__new__(cls, *args, **kwargs)
        if (self.ipv6_network is None) != (self.ipv6_subnet is None):
            raise ValueError("SubnetEnv: ipv6_network and ipv6_subnet go together (both or neither)")
        return self


def render_subnet_env(env: SubnetEnv) -> str:
    """flanneld's WriteSubnetFile: the IPv6 lines, when EnableIPv6, between FLANNEL_SUBNET and FLANNEL_MTU."""
    first = IPv4Interface((int(env.subnet.network_address) + 1, env.subnet.prefixlen))
    v6 = ""
    if env.ipv6_network is not None and env.ipv6_subnet is not None:
        first6 = IPv6Interface((int(env.ipv6_subnet.network_address) + 1, env.ipv6_subnet.prefixlen))
        v6 = f"FLANNEL_IPV6_NETWORK={env.ipv6_network}\nFLANNEL_IPV6_SUBNET={first6}\n"
    return (
        f"FLANNEL_NETWORK={env.network}\n"
        f"FLANNEL_SUBNET={first}\n"
        f"{v6}"
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


class PreviousEnv(NamedTuple):
    """What an old subnet.env says, each entry None when absent or unusable."""

    network: IPv4Network | None = None
    subnet: IPv4Network | None = None
    ipv6_network: IPv6Network | None = None
    ipv6_subnet: IPv6Network | None = None


def read_previous_env(path: str) -> PreviousEnv:
    """FLANNEL_NETWORK, FLANNEL_SUBNET, FLANNEL_IPV6_NETWORK and FLANNEL_IPV6_SUBNET (as networks) from
    an old subnet.env, as flanneld reads them for the previous subnet and the rule clean-up."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            values = parse_env_file(fh.read())
    except OSError:
        return PreviousEnv()

    def net(key: str, kind: type[IPv4Interface] | type[IPv6Interface]):
        raw = values.get(key, "")
        if not raw or "," in raw:  # flanneld ignores multi-valued entries
            return None
        try:
            return kind(raw).network
        except ValueError:
            return None

    return PreviousEnv(net("FLANNEL_NETWORK", IPv4Interface), net("FLANNEL_SUBNET", IPv4Interface),
                       net("FLANNEL_IPV6_NETWORK", IPv6Interface), net("FLANNEL_IPV6_SUBNET", IPv6Interface))


def read_previous(path: str) -> tuple[IPv4Network | None, IPv4Network | None]:
    """(FLANNEL_NETWORK, FLANNEL_SUBNET as a network) from an old subnet.env, if usable."""
    prev = read_previous_env(path)
    return prev.network, prev.subnet
