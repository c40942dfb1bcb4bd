"""The network config JSON at <prefix>/config, parsed and checked as flanneld does.

Go's encoding/json matches keys case-insensitively and ignores unknown keys; real configs
rely on both (e.g. Magnum writes "Subnetlen").  Every error names the field and the value.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from types import MappingProxyType
from typing import Any, NamedTuple

from flannelpy.errors import ConfigError
from flannelpy.jsonlimits import JsonLimitError, load_json, show_value, shown

# The config is a few hundred bytes; these refuse only what no one writes by hand.
MAX_CONFIG_BYTES = 64 * 1024
MAX_CONFIG_DEPTH = 32

# Ranges no overlay Network may touch: routing any part of them through flannel breaks the host
# itself (loopback, "this network"), its neighbours (link-local) or multicast/broadcast delivery.
_FORBIDDEN_RANGES = (
    (IPv4Network("0.0.0.0/8"), "\"this network\" (0.0.0.0/8)"),
    (IPv4Network("127.0.0.0/8"), "loopback (127.0.0.0/8)"),
    (IPv4Network("169.254.0.0/16"), "link-local (169.254.0.0/16)"),
    (IPv4Network("224.0.0.0/4"), "multicast (224.0.0.0/4)"),
    (IPv4Network("240.0.0.0/4"), "reserved, with the broadcast address (240.0.0.0/4)"),
)

# The same for IPv6Network.  ::/8 is reserved by the IETF and holds the unspecified address, loopback
# and the IPv4-mapped and -compatible forms, which Go and glibc print as dotted quads, so a lease key,
# an ip6tables rule or a route for them would not be spelt as flanneld spells it either.
_FORBIDDEN_RANGES_V6 = (
    (IPv6Network("::1/128"), "loopback (::1/128)"),
    (IPv6Network("::/8"), "the reserved block with the unspecified and IPv4-mapped addresses (::/8)"),
    (IPv6Network("fe80::/10"), "link-local (fe80::/10)"),
    (IPv6Network("ff00::/8"), "multicast (ff00::/8)"),
)

# Backend options with a fixed type and range, checked with the config so that `flannelctl config
# validate` reports what the agent refuses.  name -> (kind, lowest, highest); bools have no range.
_BACKEND_OPTIONS: dict[str, dict[str, tuple[type, int, int]]] = {
    "vxlan": {
        "VNI": (int, 0, (1 << 24) - 1),
        "Port": (int, 0, 65535),  # 0: the kernel's default, 8472
        # The outer packet size; 0 means the interface's MTU.  The device gets MTU - 50, which must
        # stay an IPv4 MTU (>= 68); whether the interface can carry it is checked against the host.
        "MTU": (int, 0, 65535),
        "GBP": (bool, 0, 0),
        "Learning": (bool, 0, 0),
        "DirectRouting": (bool, 0, 0),
    },
    "udp": {"Port": (int, 1, 65535)},
}
_VXLAN_MIN_MTU = 68 + 50

# Field name -> canonical spelling, for case-insensitive lookup.
_FIELDS = {
    name.lower(): name
    for name in (
        "EnableIPv4",
        "EnableIPv6",
        "EnableNFTables",
        "Network",
        "SubnetLen",
        "SubnetMin",
        "SubnetMax",
        "IPv6Network",
        "IPv6SubnetLen",
        "IPv6SubnetMin",
        "IPv6SubnetMax",
        "Backend",
    )
}


class NetworkConfig(NamedTuple):  # a record, not a dataclass: defined at every start (~0.1 ms, not ~1.7)
    network: IPv4Network
    subnet_len: int
    subnet_min: IPv4Address
    subnet_max: IPv4Address
    backend_type: str
    # The Backend object as given, with its original key spelling; backends read it
    # through backend_option() so that its keys are case-insensitive too.
    backend: Mapping[str, Any] = MappingProxyType({})
    enable_ipv6: bool = False
    enable_nftables: bool = False
    backend_defaulted: bool = False  # True when the config had no Backend (means udp)
    enable_ipv4: bool = True
    # Set when enable_ipv6: the IPv6 side of a dual-stack network, with flanneld's defaults applied.
    ipv6_network: IPv6Network | None = None
    ipv6_subnet_len: int = 0
    ipv6_subnet_min: IPv6Address | None = None
    ipv6_subnet_max: IPv6Address | None = None

    @property
    def subnet_size(self) -> int:
        return 1 << (32 - self.subnet_len)

    @property
    def ipv6_subnet_size(self) -> int:
        return 1 << (128 - self.ipv6_subnet_len)

    def contains_ipv6_subnet(self, subnet: IPv6Network | None) -> bool:
        """flanneld's isIPv6SubnetConfigCompat: without EnableIPv6 only "no IPv6 subnet" fits (so a
        dual-stack lease is not reused by a v4-only config); with it, a subnet of IPv6SubnetLen between
        IPv6SubnetMin and IPv6SubnetMax."""
        if not self.enable_ipv6:
            return subnet is None
        return (
            subnet is not None
            and self.ipv6_subnet_min is not None
            and self.ipv6_subnet_max is not None
            and subnet.prefixlen == self.ipv6_subnet_len
            and self.ipv6_subnet_min <= subnet.network_address <= self.ipv6_subnet_max
        )

    def contains_subnet(self, subnet: IPv4Network) -> bool:
        """True when `subnet` is one this config could hand out (flanneld's 'compatible')."""
        return (
            subnet.prefixlen == self.subnet_len
            and self.subnet_min <= subnet.network_address <= self.subnet_max
        )

    def backend_option(self, name: str, kind: type, default: Any) -> Any:
        return backend_option(self.backend, name, kind, default)


def _go_type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def backend_option(backend: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    """Read Backend.<name> case-insensitively, checking its JSON type.

    `kind` is int, bool or str.  A JSON null counts as absent, as in Go.
    """
    wanted = name.lower()
    for key, value in backend.items():
        if key.lower() != wanted:
            continue
        if value is None:
            return default
        if kind is int:
            if not _is_integer(value):
                raise ConfigError(f"Backend.{name}: expected an integer, got {show_value(value)}")
            return int(value)
        if kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"Backend.{name}: expected true or false, got {show_value(value)}")
            return value
        if kind is str:
            if not isinstance(value, str):
                raise ConfigError(f"Backend.{name}: expected a string, got {show_value(value)}")
            return value
        raise TypeError(kind)
    return default


def _is_integer(value: Any) -> bool:
    """A JSON number with an integral, finite value (Go unmarshals 24.0 into an int, not 1e400 or NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or (math.isfinite(value) and value == int(value))


def _fold_keys(obj: dict[str, Any], where: str) -> dict[str, Any]:
    """Map known fields to their canonical names; later duplicates win, as in Go."""
    folded: dict[str, Any] = {}
    for key, value in obj.items():
        canonical = _FIELDS.get(key.lower())
        if canonical is not None:
            folded[canonical] = value
    return folded


def _want(folded: dict[str, Any], name: str, pytype: type | tuple[type, ...]) -> Any:
    value = folded.get(name)
    if value is None:
        return None
    if pytype is int:
        if not _is_integer(value) or value < 0:
            raise ConfigError(f"{name}: expected a non-negative integer, got {show_value(value)}")
        return int(value)
    if pytype is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {show_value(value)}")
        return value
    if not isinstance(value, pytype):
        raise ConfigError(
            f"{name}: expected a {_go_type_name(pytype())}, got {_go_type_name(value)} {show_value(value)}"
        )
    return value


def _parse_ipv4(name: str, text: str) -> IPv4Address:
    try:
        return IPv4Address(text)
    except ValueError:
        raise ConfigError(f"{name}: {shown(text)!r} is not an IPv4 address") from None


def parse_config(text: str | bytes) -> NetworkConfig:
    """Parse and check a network config; raise ConfigError naming the first problem."""
    problems = check_config(text)
    if isinstance(problems, NetworkConfig):
        return problems
    raise problems[0]


def validate_config(text: str | bytes) -> list[ConfigError]:
    """Every problem in a config (empty when it is valid), for `flannelctl config validate`."""
    result = check_config(text, collect=True)
    return [] if isinstance(result, NetworkConfig) else result


# What the agent says while it has no IPv6 data plane (devices, routes, ip6tables): the IPv6 fields are
# still checked in full, so a config is judged by every rule at once, but running it is refused.
# Backends with an IPv6 data plane (EnableIPv6).  flanneld's udp backend has none either: it would
# lease an IPv6 subnet and carry no IPv6 traffic.
IPV6_BACKENDS = ("vxlan", "host-gw")


def check_config(text: str | bytes, collect: bool = False) -> NetworkConfig | list[ConfigError]:
    """Parse a config.  With collect=False the first error is raised; with collect=True
    every independent error is returned as a list (checks that depend on an invalid
    field are skipped)."""
    errors: list[ConfigError] = []

    def fail(err: ConfigError) -> None:
        if not collect:
            raise err
        errors.append(err)

    try:
        obj = load_json(text, max_bytes=MAX_CONFIG_BYTES, max_depth=MAX_CONFIG_DEPTH)
    except JsonLimitError as exc:
        fail(ConfigError(f"config {exc}"))
        return errors
    if not isinstance(obj, dict):
        fail(ConfigError(f"config must be a JSON object, got {_go_type_name(obj)}"))
        return errors
    folded = _fold_keys(obj, "config")

    def field_value(name: str, pytype: type) -> Any:
        try:
            return _want(folded, name, pytype)
        except ConfigError as err:
            fail(err)
            return None

    enable_ipv4 = field_value("EnableIPv4", bool)
    enable_ipv6 = bool(field_value("EnableIPv6", bool))
    enable_nft = bool(field_value("EnableNFTables", bool))
    if enable_ipv4 is False and not enable_ipv6:
        fail(ConfigError("EnableIPv4: false with EnableIPv6 false (or absent) leaves no network to run; "
                         "remove EnableIPv4 or set it to true"))
    elif enable_ipv4 is False:
        # Measured with the real flanneld v0.20.2 in etcd mode (namespace lab, two hosts): each writes its
        # lease as `0.0.0.0-0&<IPv6 subnet>` with PublicIP 0.0.0.0, so the second host finds "its" lease
        # by that PublicIP and takes the first one's subnet.  IPv6-only works only in Kubernetes mode.
        fail(ConfigError("EnableIPv4: false (IPv6-only) is not supported with etcd, by flanneld either: "
                         "flanneld v0.20.2 leases every such host under 0.0.0.0-0 with PublicIP 0.0.0.0, so a "
                         "second host takes the first one's subnet; set EnableIPv4 to true and give a Network"))

    network: IPv4Network | None = None
    raw_network = field_value("Network", str)
    if raw_network is None:
        if "Network" not in folded or folded.get("Network") is None:
            fail(ConfigError("Network: missing; please define a correct Network parameter, e.g. \"10.5.0.0/16\""))
    else:
        try:
            iface = ipaddress.ip_interface(raw_network)
        except ValueError:
            fail(ConfigError(f"Network: {shown(raw_network)!r} is not a CIDR such as \"10.5.0.0/16\""))
        else:
            if iface.version != 4:
                fail(ConfigError(f"Network: {raw_network!r} is not IPv4; put IPv6 ranges in IPv6Network"))
            elif "/" not in raw_network:
                fail(ConfigError(f"Network: {raw_network!r} has no prefix length, e.g. \"10.5.0.0/16\""))
            elif (clash := forbidden_overlap(iface.network)) is not None:
                fail(ConfigError(f"Network: {iface.network} overlaps {clash}; "
                                 "choose a private range such as \"10.5.0.0/16\""))
            else:
                network = iface.network  # masked, as net.ParseCIDR does

    subnet_len = field_value("SubnetLen", int) or 0  # Go's zero value means "not set"
    raw_min = field_value("SubnetMin", str)
    raw_max = field_value("SubnetMax", str)

    backend_type = "udp"
    backend: dict[str, Any] = {}
    backend_defaulted = False
    raw_backend = folded.get("Backend")
    if raw_backend is None:
        backend_defaulted = True
    elif not isinstance(raw_backend, dict):
        fail(ConfigError(f"Backend: expected an object such as {{\"Type\": \"vxlan\"}}, got {show_value(raw_backend)}"))
    else:
        backend = raw_backend
        try:
            raw_type = backend_option(backend, "Type", str, "")
        except ConfigError as err:
            fail(err)
            raw_type = None
        if raw_type is not None:
            backend_type = raw_type.lower()
            if not backend_type:
                fail(ConfigError("Backend.Type: missing; unknown backend type: \"\" (e.g. \"vxlan\", \"udp\", \"host-gw\")"))
            for err in backend_option_errors(backend_type, backend):
                fail(err)
    if enable_ipv6 and backend_type not in IPV6_BACKENDS:
        fail(ConfigError(f"EnableIPv6 with the {backend_type or 'udp'} backend: it has no IPv6 data plane (nor has "
                         f"flanneld's); use {' or '.join(IPV6_BACKENDS)}, or set EnableIPv6 to false"))

    subnet_min = subnet_max = None
    if network is not None:
        prefix = network.prefixlen
        if subnet_len == 0:
            if prefix <= 22:
                subnet_len = 24
            elif prefix > 28:
                fail(ConfigError(f"Network: {network} is too small. Minimum useful network prefix is /28"))
                subnet_len = 0
            else:
                subnet_len = prefix + 2
        else:
            if subnet_len > 30:
                fail(ConfigError(f"SubnetLen: {subnet_len} is too long; SubnetLen must be less than /31"))
                subnet_len = 0
            elif subnet_len < prefix + 2:
                fail(ConfigError(
                    f"SubnetLen: /{subnet_len} is too short for Network {network}; "
                    f"network must be able to accommodate at least four subnets (SubnetLen >= {prefix + 2})"
                ))
                subnet_len = 0
        if subnet_len:
            size = 1 << (32 - subnet_len)
            first = network.network_address + size
            last = IPv4Address(int(network.broadcast_address) + 1 - size)
            subnet_min = _bound("SubnetMin", raw_min, first, network, subnet_len, fail)
            subnet_max = _bound("SubnetMax", raw_max, last, network, subnet_len, fail)
            if subnet_min is not None and subnet_max is not None and subnet_min > subnet_max:
                fail(ConfigError(f"SubnetMin: {subnet_min} is above SubnetMax {subnet_max}"))

    ipv6 = _check_ipv6(folded, enable_ipv6, field_value, fail)

    if errors or network is None or subnet_min is None or subnet_max is None:
        return errors
    if enable_ipv6 and ipv6 is None:
        return errors
    return NetworkConfig(
        network=network,
        subnet_len=subnet_len,
        subnet_min=subnet_min,
        subnet_max=subnet_max,
        backend_type=backend_type,
        backend=backend,
        enable_ipv6=enable_ipv6,
        enable_nftables=enable_nft,
        backend_defaulted=backend_defaulted,
        **(ipv6 or {}),
    )


def _check_ipv6(folded: dict[str, Any], enable_ipv6: bool, field_value, fail) -> dict[str, Any] | None:
    """The IPv6 side of the config as NetworkConfig fields, or None when disabled or invalid.

    As in flanneld, the fields are decoded whatever EnableIPv6 says (Go's json.Unmarshal fails on an
    IPv6Network that is no CIDR at all, or an IPv6SubnetMin that is no address), but checked against
    each other (CheckNetworkConfig) only when EnableIPv6 is true.
    """
    raw_network = field_value("IPv6Network", str)
    subnet_len = field_value("IPv6SubnetLen", int) or 0  # Go's zero value means "not set"
    raw_min = field_value("IPv6SubnetMin", str)
    raw_max = field_value("IPv6SubnetMax", str)
    parsed_network = None
    if raw_network is not None:
        try:
            parsed_network = ipaddress.ip_interface(raw_network)
        except ValueError:
            fail(ConfigError(f"IPv6Network: {shown(raw_network)!r} is not a CIDR such as \"fd42::/48\""))
            return None
    bounds: dict[str, IPv6Address | None] = {}
    for name, raw in (("IPv6SubnetMin", raw_min), ("IPv6SubnetMax", raw_max)):
        bounds[name] = None
        if raw is None:
            continue
        try:
            bounds[name] = IPv6Address(raw)
        except ValueError:
            fail(ConfigError(f"{name}: {shown(raw)!r} is not an IPv6 address"))
            return None
    if not enable_ipv6:
        return None

    if parsed_network is None:
        fail(ConfigError("IPv6Network: missing; please define a correct IPv6Network parameter, e.g. \"fd42::/48\""))
        return None
    if parsed_network.version != 6:
        fail(ConfigError(f"IPv6Network: {raw_network!r} is not IPv6; put IPv4 ranges in Network"))
        return None
    if "/" not in raw_network:
        fail(ConfigError(f"IPv6Network: {raw_network!r} has no prefix length, e.g. \"fd42::/48\""))
        return None
    network = parsed_network.network  # masked, as net.ParseCIDR does
    clash = forbidden_overlap(network)
    if clash is not None:
        fail(ConfigError(f"IPv6Network: {network} overlaps {clash}; "
                         "choose a unique local range such as \"fd42::/48\""))
        return None

    prefix = network.prefixlen
    if subnet_len == 0:
        if prefix > 124:
            fail(ConfigError(f"IPv6Network: {network} is too small. Minimum useful network prefix is /124"))
            return None
        subnet_len = 64 if prefix <= 62 else prefix + 2
    elif subnet_len > 126:
        fail(ConfigError(f"IPv6SubnetLen: {subnet_len} is too long; SubnetLen must be less than /127"))
        return None
    elif subnet_len < prefix + 2:
        fail(ConfigError(
            f"IPv6SubnetLen: /{subnet_len} is too short for IPv6Network {network}; "
            f"network must be able to accommodate at least four subnets (IPv6SubnetLen >= {prefix + 2})"
        ))
        return None
    size = 1 << (128 - subnet_len)
    # flanneld skips the first subnet (its base would be the Network's own address) and ends at the last.
    defaults = {
        "IPv6SubnetMin": network.network_address + size,
        "IPv6SubnetMax": IPv6Address(int(network.broadcast_address) + 1 - size),
    }
    chosen: dict[str, IPv6Address] = {}
    for name in ("IPv6SubnetMin", "IPv6SubnetMax"):
        addr = bounds[name]
        if addr is None:
            chosen[name] = defaults[name]
        elif addr not in network:
            fail(ConfigError(f"{name}: {addr} is not in IPv6Network {network} "
                             f"({name} is not in the range of the IPv6Network)"))
        elif int(addr) % size:
            fail(ConfigError(f"{name}: {name} is not on a SubnetLen boundary: {addr} (IPv6SubnetLen /{subnet_len})"))
        else:
            chosen[name] = addr
    if len(chosen) < 2:
        return None
    if chosen["IPv6SubnetMin"] > chosen["IPv6SubnetMax"]:
        fail(ConfigError(f"IPv6SubnetMin: {chosen['IPv6SubnetMin']} is above IPv6SubnetMax {chosen['IPv6SubnetMax']}"))
        return None
    return {
        "ipv6_network": network,
        "ipv6_subnet_len": subnet_len,
        "ipv6_subnet_min": chosen["IPv6SubnetMin"],
        "ipv6_subnet_max": chosen["IPv6SubnetMax"],
    }


def forbidden_overlap(network: IPv4Network | IPv6Network) -> str | None:
    """The special range `network` overlaps (described), or None for a usable overlay Network."""
    for special, what in (_FORBIDDEN_RANGES if network.version == 4 else _FORBIDDEN_RANGES_V6):
        if network.overlaps(special):
            return what
    return None


def backend_option_errors(backend_type: str, backend: dict[str, Any]) -> list[ConfigError]:
    """Every Backend.* option of a known backend with a wrong type or out of its range."""
    errors: list[ConfigError] = []
    for name, (kind, low, high) in _BACKEND_OPTIONS.get(backend_type, {}).items():
        try:
            value = backend_option(backend, name, kind, None)
        except ConfigError as err:
            errors.append(err)
            continue
        if value is None or kind is bool:
            continue
        if not low <= value <= high:
            errors.append(ConfigError(f"Backend.{name}: {value} is out of range ({low}..{high})"))
        elif backend_type == "vxlan" and name == "MTU" and 0 < value < _VXLAN_MIN_MTU:
            errors.append(ConfigError(f"Backend.MTU: {value} leaves {value - 50} for the vxlan device; "
                                      f"need at least {_VXLAN_MIN_MTU} (or 0 for the interface's MTU)"))
    return errors


def _bound(name, raw, default, network, subnet_len, fail) -> IPv4Address | None:
    if raw is None:
        return default
    try:
        addr = _parse_ipv4(name, raw)
    except ConfigError as err:
        fail(err)
        return None
    if addr not in network:
        fail(ConfigError(f"{name}: {addr} is not in Network {network}"))
        return None
    if int(addr) % (1 << (32 - subnet_len)):
        fail(ConfigError(f"{name}: {name} is not on a SubnetLen boundary: {addr} (SubnetLen /{subnet_len})"))
        return None
    return addr
