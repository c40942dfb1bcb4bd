"""Leases: the subnet keys and lease values flanneld keeps under <prefix>/subnets/.

Keys look like `10.5.52.0-24` (dual stack: `10.5.52.0-24&fc00::-64`).  Values are compact
JSON in Go's field order; readers accept every shape flanneld has written since v0.5.

Two key parsers: `parse_subnet_key` takes IPv4 keys only; `parse_lease_key` reads both kinds (with
`lease_key` writing them).  The etcd stores read keys with `parse_store_key`: in an IPv4-only network
(EnableIPv6 false) dual-stack keys are refused, as flanneld never writes them there and taken as IPv4
they would name the same subnet as the plain key; with EnableIPv6 both kinds are read.
"""

from __future__ import annotations

import json
import re
import sys
from enum import Enum
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, NamedTuple

from flannelpy.errors import LeaseValueError
from flannelpy.jsonlimits import JsonLimitError, has_out_of_range_number, load_json, shown

SUBNET_TTL = 24 * 3600  # flanneld's subnetTTL

# Limits on what etcd may hand us.  flanneld's values are about 150 bytes and two levels deep
# (BackendData inside the value); these leave room for every backend's BackendData and refuse
# what only an attacker writes (a 100,000-deep nesting, a megabyte of string).
MAX_KEY_BYTES = 512
MAX_VALUE_BYTES = 16 * 1024
MAX_VALUE_DEPTH = 16

# ASCII digits only (`\d` would also take other scripts' digits).  The optional `&<ipv6>-<len>` is
# what dual-stack flanneld writes; it is recognised only to refuse it with a clear message.
_KEY_RE = re.compile(r"([0-9]{1,3}(?:\.[0-9]{1,3}){3})-([0-9]{1,2})(&.*)?", re.ASCII | re.DOTALL)
# The IPv6 half of a dual-stack key as flanneld's regex takes it (`&([a-f\d:]+)-(\d+)`), ASCII only.
_V6_PART_RE = re.compile(r"([0-9a-f:]{2,39})-([0-9]{1,3})", re.ASCII)
# Go's ip.IP6 prints addresses in here as dotted quads (IPv4-mapped, -compatible), and no valid
# IPv6Network reaches into it: such a key is not one flanneld writes.
_RESERVED_V6 = IPv6Network("::/8")
# A dotted quad as ipaddress accepts it (ASCII digits, no leading zeros; each octet checked below
# to be <= 255).  The fast paths take only what matches and leave everything else, and so every
# error message, to ipaddress, which gives the same value for what matches, at a quarter the cost.
_QUAD_RE = re.compile(r"\.".join([r"(0|[1-9][0-9]{0,2})"] * 4), re.ASCII)
_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}([:-])(?:[0-9a-fA-F]{2}\1){4}[0-9a-fA-F]{2}$")


def _show(value: Any) -> str:
    """A decoded value for an error message, as Python writes it, cut short (values come from anyone)."""
    return repr(shown(value)) if isinstance(value, str) else shown(repr(value))


def _quad_int(text: str) -> int | None:
    """The address of a canonical dotted quad as an integer; None for anything else (ipaddress decides)."""
    m = _QUAD_RE.fullmatch(text)
    if m is None:
        return None
    a, b, c, d = map(int, m.groups())
    if a > 255 or b > 255 or c > 255 or d > 255:
        return None
    return (a << 24) | (b << 16) | (c << 8) | d


def subnet_key(subnet: IPv4Network) -> str:
    """`10.5.52.0/24` -> `10.5.52.0-24`."""
    return f"{subnet.network_address}-{subnet.prefixlen}"


def parse_subnet_key(key: str, prefix: str | None = None) -> IPv4Network:
    """The IPv4 subnet named by a lease key: `<prefix>10.5.52.0-24`, spelt exactly as flanneld spells it.

    Exactly one key may name a subnet, or two keys could take turns replacing (and, when deleted,
    removing) one peer's routes: so the name must be canonical (no `010.5.52.0-24`, no `-024`),
    and with `prefix` (the stores pass `<etcd-prefix>/subnets/`) the key must be that prefix and
    the name, nothing nested below it.  Dual-stack keys (`10.5.52.0-24&fc00::-64`) are refused:
    flannelpy runs only IPv4 networks, where flanneld never writes them, and taken as IPv4 they
    would name the same subnet as the plain key.
    """
    if len(key) > MAX_KEY_BYTES:
        raise LeaseValueError(f"lease key {shown(key)!r} is {len(key)} bytes long, more than {MAX_KEY_BYTES}")
    if prefix is not None:
        if not key.startswith(prefix) or "/" in key[len(prefix):]:
            raise LeaseValueError(f"lease key {key!r} is not directly under {prefix!r}")
        name = key[len(prefix):]
    else:
        name = key.rsplit("/", 1)[-1]
    m = _KEY_RE.fullmatch(name)
    if not m:
        raise LeaseValueError(f"lease key {key!r} is not of the form a.b.c.d-len")
    if m.group(3) is not None:
        raise LeaseValueError(f"lease key {key!r} is a dual-stack key, in a network without EnableIPv6")
    # Fast path: a canonical address and length with no host bits is a key spelt as subnet_key
    # spells it; anything else goes the long way, which names what is wrong.
    addr, plen_text = _quad_int(m.group(1)), m.group(2)
    if addr is not None and (plen_text[0] != "0" or plen_text == "0"):
        plen = int(plen_text)
        if plen <= 32 and not addr & (0xFFFFFFFF >> plen):
            return IPv4Network((addr, plen))
    return subnet_the_long_way(key, name, m.group(1), m.group(2))


def subnet_the_long_way(key: str, name: str, address: str, length: str) -> IPv4Network:
    """What ipaddress makes of a key's `address-length` name, refused unless spelt as subnet_key
    spells it; every refusal names what is wrong (parse_subnet_key's fast path agrees with it)."""
    try:
        net = IPv4Network(f"{address}/{length}")
    except ValueError as exc:
        raise LeaseValueError(f"lease key {key!r}: {exc}") from None
    if subnet_key(net) != name:
        raise LeaseValueError(f"lease key {key!r} is not spelt as flanneld spells it ({subnet_key(net)!r})")
    return net


def lease_key(subnet: IPv4Network, ipv6_subnet: IPv6Network | None = None) -> str:
    """flanneld's MakeSubnetKey: `10.42.63.0-24`, or `10.42.63.0-24&fd42:0:0:1f::-64` with an IPv6 subnet."""
    if ipv6_subnet is None:
        return subnet_key(subnet)
    return f"{subnet_key(subnet)}&{ipv6_subnet.network_address}-{ipv6_subnet.prefixlen}"


def parse_lease_key(key: str, prefix: str | None = None) -> tuple[IPv4Network, IPv6Network | None]:
    """The subnets a lease key names, dual-stack keys included: `10.42.63.0-24&fd42:0:0:1f::-64` ->
    (10.42.63.0/24, fd42:0:0:1f::/64); an IPv4 key gives (subnet, None).

    Spelling as in parse_subnet_key: exactly as lease_key writes it, so that one key names one pair.
    The `0.0.0.0-0&...` key flanneld v0.20.2 writes with EnableIPv4 false (every such host with
    PublicIP 0.0.0.0, so a second host takes the first one's lease; measured) is refused by name.
    """
    name = key if prefix is not None else key.rsplit("/", 1)[-1]
    v4_text, amp, v6_text = name.partition("&")
    if not amp:
        return parse_subnet_key(key, prefix), None
    subnet = parse_subnet_key(v4_text, prefix)
    if subnet.prefixlen == 0:
        raise LeaseValueError(f"lease key {shown(key)!r} names all of IPv4 (0.0.0.0-0): an IPv6-only lease "
                              "(EnableIPv4 false), which flannelpy does not run with etcd")
    m = _V6_PART_RE.fullmatch(v6_text)
    if not m:
        raise LeaseValueError(f"lease key {shown(key)!r}: the part after '&' is not of the form ipv6-len")
    try:
        plen = int(m.group(2))
        if plen > 127:  # flanneld reads the length with strconv.ParseUint(.., 10, 7)
            raise ValueError(f"IPv6 prefix length {plen} is above 127")
        ipv6_subnet = IPv6Network(f"{m.group(1)}/{plen}")
    except ValueError as exc:
        raise LeaseValueError(f"lease key {shown(key)!r}: {exc}") from None
    if ipv6_subnet.subnet_of(_RESERVED_V6):
        raise LeaseValueError(f"lease key {shown(key)!r}: {ipv6_subnet} is in the reserved ::/8")
    canonical = lease_key(subnet, ipv6_subnet)
    if (name if prefix is None else name[len(prefix):]) != canonical:
        raise LeaseValueError(f"lease key {shown(key)!r} is not spelt as flanneld spells it ({canonical!r})")
    return subnet, ipv6_subnet


def parse_store_key(key: str, prefix: str | None, dual_stack: bool) -> tuple[IPv4Network, IPv6Network | None]:
    """A key as a store reads it: `parse_lease_key` in a dual-stack network (EnableIPv6), else
    `parse_subnet_key` (a dual-stack key refused by name) with no IPv6 subnet."""
    if dual_stack:
        return parse_lease_key(key, prefix)
    return parse_subnet_key(key, prefix), None


def normalize_mac(text: str) -> str:
    """Lower-case colon form; accepts what Go's net.ParseMAC accepts for 48-bit MACs."""
    if not isinstance(text, str) or not _MAC_RE.match(text):
        raise LeaseValueError(f"VtepMAC {_show(text)} is not a MAC address")
    canon = text.replace("-", ":").lower()
    # The same object when already canonical: every holder of a peer's MAC (the lease value, its
    # FDB and ARP plans, admission's index) then shares one string instead of a copy each.
    return text if canon == text else canon


class ValueStyle(Enum):
    """How to spell a lease value: as flanneld >= v0.15 does, or as the etcd-v2 era did."""

    CURRENT = "current"  # {"PublicIP":..,"PublicIPv6":null,"BackendType":..,"BackendData":..}
    LEGACY = "legacy"  # {"PublicIP":..,"BackendType":..,"BackendData":..} (no PublicIPv6 while it is null)


class _Frozen:
    """An immutable slotted record, equal to another of its class when _compared() is.  Lease and
    LeaseAttrs, one of each per peer, are these rather than frozen dataclasses (~1 ms each to define
    at every start) or NamedTuples (16 bytes more per object)."""

    __slots__ = ()
    _fields: tuple[str, ...] = ()  # what equality, hash and repr look at, in order

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: cannot set {name}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: cannot delete {name}")

    def _compared(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._compared() == other._compared()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._compared())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in self._fields) + ")"


class LeaseAttrs(_Frozen):
    """A lease's value: who holds the subnet and what its backend says."""

    __slots__ = ("public_ip", "backend_type", "_data", "public_ipv6", "_data_v6")
    _fields = ("public_ip", "backend_type", "backend_data", "public_ipv6", "backend_v6_data")
    public_ip: IPv4Address
    backend_type: str  # "" for the udp backend, which never sets it
    public_ipv6: IPv6Address | None  # dual stack: the host's IPv6 underlay address

    def __init__(self, public_ip: IPv4Address, backend_type: str = "", backend_data: dict[str, Any] | None = None,
                 public_ipv6: IPv6Address | None = None, backend_v6_data: dict[str, Any] | None = None) -> None:
        _init = object.__setattr__
        _init(self, "public_ip", public_ip)
        _init(self, "backend_type", backend_type)
        _init(self, "_data", _compact(backend_data))
        _init(self, "public_ipv6", public_ipv6)
        _init(self, "_data_v6", _compact(backend_v6_data))

    @property
    def backend_data(self) -> dict[str, Any] | None:
        """BackendData as a dict in the order it is written (VNI before VtepMAC, like Go's struct)."""
        return _expand(self._data)

    @property
    def backend_v6_data(self) -> dict[str, Any] | None:
        """Dual stack: what the backend advertises for IPv6 (vxlan: the flannel-v6.<VNI> device's VNI and MAC)."""
        return _expand(self._data_v6)

    @property
    def vtep_mac(self) -> str | None:
        return _data_mac(self._data)

    @property
    def vni(self) -> int | None:
        return _data_vni(self._data)

    @property
    def vtep_mac_v6(self) -> str | None:
        return _data_mac(self._data_v6)

    @property
    def vni_v6(self) -> int | None:
        return _data_vni(self._data_v6)


# BackendData as a LeaseAttrs keeps it: vxlan's {"VNI": n, "VtepMAC": "..."}, one per peer, as the pair
# (n, mac) (a 56-byte tuple instead of a dict and its key table, ~176 bytes), and with VNI 1 (flanneld's
# default, so nearly every cluster's) as the MAC string alone; anything else as given.
_CompactData = str | tuple[int, str] | dict[str, Any] | None
_DEFAULT_VNI = 1


def _compact(data: dict[str, Any] | None) -> _CompactData:
    if data is not None and len(data) == 2:
        (k1, v1), (k2, v2) = data.items()
        if k1 == "VNI" and k2 == "VtepMAC" and type(v1) is int and type(v2) is str:
            return v2 if v1 == _DEFAULT_VNI else (v1, v2)
    return data


def _expand(data: _CompactData) -> dict[str, Any] | None:
    if type(data) is str:
        return {"VNI": _DEFAULT_VNI, "VtepMAC": data}
    if type(data) is tuple:
        return {"VNI": data[0], "VtepMAC": data[1]}
    return data  # type: ignore[return-value]


def _mac_field(data: _CompactData) -> Any:
    """The VtepMAC field of BackendData as held (any JSON value, None when absent), read from the
    compact forms without expanding them into a dict."""
    if type(data) is str:
        return data
    if type(data) is tuple:
        return data[1]
    return data.get("VtepMAC") if data else None  # type: ignore[union-attr]


def held_vtep_mac(attrs: LeaseAttrs, v6: bool = False) -> str | None:
    """BackendData's (v6: BackendV6Data's) VtepMAC as the lease holds it; None when absent or not
    a string.  (The codec normalised what it decoded; vtep_mac normalises again, for leases made
    in code.)"""
    mac = _mac_field(attrs._data_v6 if v6 else attrs._data)
    return mac if isinstance(mac, str) else None


def _data_mac(data: _CompactData) -> str | None:
    mac = _mac_field(data)
    return normalize_mac(mac) if mac is not None else None


def _data_vni(data: _CompactData) -> int | None:
    if type(data) is str:
        return _DEFAULT_VNI
    if type(data) is tuple:
        return data[0]
    vni = data.get("VNI") if data else None  # type: ignore[union-attr]
    return int(vni) if vni is not None else None


class LeaseData(NamedTuple):
    """What the backend puts in our lease value."""

    backend_type: str  # "" for udp, which never writes BackendType
    backend_data: dict[str, Any] | None
    backend_v6_data: dict[str, Any] | None = None  # dual stack: BackendV6Data


class Lease(_Frozen):
    """One lease, equal to another whatever their store_ref."""

    __slots__ = ("subnet", "attrs", "expiration", "store_ref", "ipv6_subnet")
    _fields = __slots__
    subnet: IPv4Network
    attrs: LeaseAttrs
    # Unix time the lease expires; None for a key with no TTL (a reservation).
    expiration: float | None
    # Store-specific handle: the etcd v3 lease ID or the v2 modifiedIndex (not compared).
    store_ref: int | None
    # Dual stack: the IPv6 subnet of a `10.42.63.0-24&fd42:0:0:1f::-64` key (parse_lease_key).
    ipv6_subnet: IPv6Network | None

    def __init__(self, subnet: IPv4Network, attrs: LeaseAttrs, expiration: float | None = None,
                 store_ref: int | None = None, ipv6_subnet: IPv6Network | None = None) -> None:
        _init = object.__setattr__
        _init(self, "subnet", subnet)
        _init(self, "attrs", attrs)
        _init(self, "expiration", expiration)
        _init(self, "store_ref", store_ref)
        _init(self, "ipv6_subnet", ipv6_subnet)

    def _compared(self) -> tuple[Any, ...]:
        return (self.subnet, self.attrs, self.expiration, self.ipv6_subnet)  # not store_ref

    @property
    def key(self) -> str:
        """The key name under <prefix>/subnets/ (flanneld's Lease.Key)."""
        return lease_key(self.subnet, self.ipv6_subnet)


class EventKind(Enum):
    ADDED = "added"
    REMOVED = "removed"


class LeaseEvent(NamedTuple):
    kind: EventKind
    lease: Lease


def encode_attrs(attrs: LeaseAttrs, style: ValueStyle = ValueStyle.CURRENT) -> str:
    """Compact JSON exactly as Go's json.Marshal(LeaseAttrs) writes it."""
    doc: dict[str, Any] = {"PublicIP": str(attrs.public_ip)}
    if style is ValueStyle.CURRENT or attrs.public_ipv6 is not None:
        # *ip.IP6 without omitempty: null when unset.  The v2-era flanneld that wrote dual stack
        # (v0.15-v0.17) had the field too, so only a null one is left out of the legacy shape.
        doc["PublicIPv6"] = str(attrs.public_ipv6) if attrs.public_ipv6 is not None else None
    if attrs.backend_type:
        doc["BackendType"] = attrs.backend_type
    if attrs.backend_data:
        doc["BackendData"] = attrs.backend_data
    if attrs.backend_v6_data:
        doc["BackendV6Data"] = attrs.backend_v6_data
    return json.dumps(doc, separators=(",", ":"))


# A value exactly as flanneld (and encode_attrs) writes it, in either shape, for the backends whose
# BackendData is nothing or vxlan's: compact, Go's field order, a lower-case MAC.  Such a value is
# read without json.loads, building the same LeaseAttrs the general path would (a test holds the
# two paths to that); anything else, spelt in any other way, takes the general path.
_WRITTEN_VALUE_RE = re.compile(
    r'\{"PublicIP":"([0-9.]{7,15})"(?:,"PublicIPv6":null)?(?:,"BackendType":"([a-z][a-z0-9-]{0,15})")?'
    r'(?:,"BackendData":\{"VNI":(0|[1-9][0-9]{0,7}),"VtepMAC":"([0-9a-f]{2}(?::[0-9a-f]{2}){5})"\})?\}', re.ASCII)
_VNI_LIMIT = 1 << 24
_WRITTEN_VALUE_MAX = 200  # the longest such value is ~150 characters


def _decode_written(raw: str | bytes) -> LeaseAttrs | None:
    """decode_attrs' result for a value spelt as flanneld writes it; None for any other spelling."""
    if len(raw) > _WRITTEN_VALUE_MAX:  # longer than any value of these shapes
        return None
    if type(raw) is bytes:
        try:
            raw = raw.decode("ascii")
        except UnicodeDecodeError:
            return None
    m = _WRITTEN_VALUE_RE.fullmatch(raw)  # type: ignore[arg-type]
    if m is None:
        return None
    ip, btype, vni_text, mac = m.groups()
    addr = _quad_int(ip)
    vni = int(vni_text) if vni_text is not None else None
    if addr is None or (vni is not None and vni >= _VNI_LIMIT):
        return None
    return LeaseAttrs(IPv4Address(addr), sys.intern(btype) if btype else "",
                      {"VNI": vni, "VtepMAC": mac} if vni is not None else None)


def decode_attrs(raw: str | bytes, key: str = "") -> LeaseAttrs:
    """Decode a lease value, old or new shape; LeaseValueError names what is wrong."""
    written = _decode_written(raw)
    return written if written is not None else _decode_general(raw, key)


def _decode_general(raw: str | bytes, key: str) -> LeaseAttrs:
    """decode_attrs for any value: parsed as JSON, every field checked."""
    where = f"lease value at {shown(key, MAX_KEY_BYTES)!r}" if key else "lease value"
    try:
        doc = load_json(raw, max_bytes=MAX_VALUE_BYTES, max_depth=MAX_VALUE_DEPTH)
    except JsonLimitError as exc:
        raise LeaseValueError(f"{where} {exc}") from None
    if not isinstance(doc, dict):
        raise LeaseValueError(f"{where} must be a JSON object")
    if has_out_of_range_number(doc):
        raise LeaseValueError(f"{where} holds a number beyond any field's range")
    # Go matches struct fields case-insensitively.
    folded = {k.lower(): v for k, v in doc.items()}
    ip = folded.get("publicip")
    if not isinstance(ip, str):
        raise LeaseValueError(f"{where}: PublicIP missing or not a string")
    addr = _quad_int(ip)
    if addr is not None:
        public_ip = IPv4Address(addr)
    else:
        try:
            public_ip = IPv4Address(ip)
        except ValueError:
            raise LeaseValueError(f"{where}: PublicIP {_show(ip)} is not an IPv4 address") from None
    btype = folded.get("backendtype") or ""
    if not isinstance(btype, str):
        raise LeaseValueError(f"{where}: BackendType must be a string")
    bdata = _decode_backend_data(folded.get("backenddata"), where, "BackendData")
    bdata_v6 = _decode_backend_data(folded.get("backendv6data"), where, "BackendV6Data")
    v6 = folded.get("publicipv6")
    if v6 is not None and not isinstance(v6, str):
        raise LeaseValueError(f"{where}: PublicIPv6 must be a string or null")
    public_ipv6 = None
    if v6 is not None:
        try:
            public_ipv6 = IPv6Address(v6)
        except ValueError:
            raise LeaseValueError(f"{where}: PublicIPv6 {_show(v6)} is not an IPv6 address") from None
        if public_ipv6.ipv4_mapped is not None:
            # Go's ip.IP6 would write it back as a dotted quad: not an address flanneld advertises.
            raise LeaseValueError(f"{where}: PublicIPv6 {_show(v6)} is an IPv4-mapped address")
    return LeaseAttrs(public_ip=public_ip, backend_type=sys.intern(btype.lower()), backend_data=bdata,
                      public_ipv6=public_ipv6, backend_v6_data=bdata_v6)


def _decode_backend_data(bdata: Any, where: str, name: str) -> dict[str, Any] | None:
    """BackendData or BackendV6Data: VNI and VtepMAC checked and canonicalised, the rest kept as written."""
    if bdata is not None and not isinstance(bdata, dict):
        raise LeaseValueError(f"{where}: {name} must be an object")
    if not bdata:
        return None
    canon: dict[str, Any] = {}
    for k, v in bdata.items():
        lk = k.lower()
        if lk == "vni":
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < (1 << 24):
                raise LeaseValueError(f"{where}: {name}.VNI {_show(v)} is not a VNI (0..16777215)")
            canon["VNI"] = v
        elif lk == "vtepmac":
            try:
                canon["VtepMAC"] = normalize_mac(v)
            except LeaseValueError as exc:
                # Name the key too: the log line is all an operator has to find the garbage.
                raise LeaseValueError(f"{where}: {name}.{exc}") from None
        else:
            canon[k] = v
    return canon
