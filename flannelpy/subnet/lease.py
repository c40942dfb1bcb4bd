"""Leases: the subnet keys and lease values flanneld keeps under <prefix>/subnets/.

Keys look like `10.5.52.0-24` (dual stack: `10.5.52.0-24&fc00::-64`).  Values are compact
JSON in Go's field order; readers accept every shape flanneld has written since v0.5.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import Enum
from ipaddress import IPv4Address, IPv4Network
from typing import Any

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
_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}([:-])(?:[0-9a-fA-F]{2}\1){4}[0-9a-fA-F]{2}$")


def _show(value: Any) -> str:
    """A decoded value for an error message, as Python writes it, cut short (values come from anyone)."""
    return repr(shown(value)) if isinstance(value, str) else shown(repr(value))


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
        raise LeaseValueError(f"lease key {key!r} is a dual-stack key; flannelpy runs IPv4-only networks")
    try:
        net = IPv4Network(f"{m.group(1)}/{m.group(2)}")
    except ValueError as exc:
        raise LeaseValueError(f"lease key {key!r}: {exc}") from None
    if subnet_key(net) != name:
        raise LeaseValueError(f"lease key {key!r} is not spelt as flanneld spells it ({subnet_key(net)!r})")
    return net


def normalize_mac(text: str) -> str:
    """Lower-case colon form; accepts what Go's net.ParseMAC accepts for 48-bit MACs."""
    if not isinstance(text, str) or not _MAC_RE.match(text):
        raise LeaseValueError(f"VtepMAC {_show(text)} is not a MAC address")
    return text.replace("-", ":").lower()


class ValueStyle(Enum):
    """How to spell a lease value: as flanneld >= v0.15 does, or as the etcd-v2 era did."""

    CURRENT = "current"  # {"PublicIP":..,"PublicIPv6":null,"BackendType":..,"BackendData":..}
    LEGACY = "legacy"  # {"PublicIP":..,"BackendType":..,"BackendData":..} (no PublicIPv6)


@dataclass(frozen=True)
class LeaseAttrs:
    public_ip: IPv4Address
    backend_type: str = ""  # "" for the udp backend, which never sets it
    # BackendData as a dict in the order it is written (VNI before VtepMAC, like Go's struct).
    backend_data: dict[str, Any] | None = None
    public_ipv6: str | None = None

    @property
    def vtep_mac(self) -> str | None:
        if not self.backend_data:
            return None
        mac = self.backend_data.get("VtepMAC")
        return normalize_mac(mac) if mac is not None else None

    @property
    def vni(self) -> int | None:
        if not self.backend_data:
            return None
        vni = self.backend_data.get("VNI")
        return int(vni) if vni is not None else None


@dataclass(frozen=True)
class LeaseData:
    """What the backend puts in our lease value."""

    backend_type: str  # "" for udp, which never writes BackendType
    backend_data: dict[str, Any] | None


@dataclass(frozen=True)
class Lease:
    subnet: IPv4Network
    attrs: LeaseAttrs
    # Unix time the lease expires; None for a key with no TTL (a reservation).
    expiration: float | None = None
    # Store-specific handle: the etcd v3 lease ID or the v2 modifiedIndex.
    store_ref: int | None = field(default=None, compare=False)


class EventKind(Enum):
    ADDED = "added"
    REMOVED = "removed"


@dataclass(frozen=True)
class LeaseEvent:
    kind: EventKind
    lease: Lease


def encode_attrs(attrs: LeaseAttrs, style: ValueStyle = ValueStyle.CURRENT) -> str:
    """Compact JSON exactly as Go's json.Marshal(LeaseAttrs) writes it."""
    doc: dict[str, Any] = {"PublicIP": str(attrs.public_ip)}
    if style is ValueStyle.CURRENT:
        doc["PublicIPv6"] = attrs.public_ipv6
    if attrs.backend_type:
        doc["BackendType"] = attrs.backend_type
    if attrs.backend_data:
        doc["BackendData"] = attrs.backend_data
    return json.dumps(doc, separators=(",", ":"))


def decode_attrs(raw: str | bytes, key: str = "") -> LeaseAttrs:
    """Decode a lease value, old or new shape; LeaseValueError names what is wrong."""
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
    try:
        public_ip = IPv4Address(ip)
    except ValueError:
        raise LeaseValueError(f"{where}: PublicIP {_show(ip)} is not an IPv4 address") from None
    btype = folded.get("backendtype") or ""
    if not isinstance(btype, str):
        raise LeaseValueError(f"{where}: BackendType must be a string")
    bdata = folded.get("backenddata")
    if bdata is not None and not isinstance(bdata, dict):
        raise LeaseValueError(f"{where}: BackendData must be an object")
    if bdata:
        # Canonicalise the two fields we interpret, keep the rest as written.
        canon: dict[str, Any] = {}
        for k, v in bdata.items():
            lk = k.lower()
            if lk == "vni":
                if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < (1 << 24):
                    raise LeaseValueError(f"{where}: BackendData.VNI {_show(v)} is not a VNI (0..16777215)")
                canon["VNI"] = v
            elif lk == "vtepmac":
                try:
                    canon["VtepMAC"] = normalize_mac(v)
                except LeaseValueError as exc:
                    # Name the key too: the log line is all an operator has to find the garbage.
                    raise LeaseValueError(f"{where}: BackendData.{exc}") from None
            else:
                canon[k] = v
        bdata = canon
    v6 = folded.get("publicipv6")
    if v6 is not None and not isinstance(v6, str):
        raise LeaseValueError(f"{where}: PublicIPv6 must be a string or null")
    return LeaseAttrs(public_ip=public_ip, backend_type=btype.lower(), backend_data=bdata or None, public_ipv6=v6)
