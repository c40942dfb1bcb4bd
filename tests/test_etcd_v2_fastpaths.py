"""The v2 listing's fast paths (issue #19) give what the long ways gave: the same leases, the same
values, the same errors.  Pure checks against the reference code they replace.  (A start lists
once: see test_leasemgr's hand-over of acquire's listing to the peer watch.)"""

from __future__ import annotations

import json
import random
import time
from calendar import timegm
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannelpy.errors import LeaseValueError
from flannelpy.etcd.v2 import _utc_seconds, parse_expiration
from flannelpy.jsonlimits import (
    JsonLimitError,
    OutOfRangeNumber,
    _float,
    _int,
    _refuse_constant,
    has_out_of_range_number,
    load_json,
    nesting_depth,
    shown,
    text_within_size,
)
from flannelpy.subnet.lease import (
    LeaseAttrs,
    decode_attrs,
    parse_subnet_key,
    subnet_the_long_way,
)

PREFIX = "/coreos.com/network"
GUARD = 30  # against a hung test only


def _outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # noqa: BLE001 - the type and text are what is compared
        return ("error", type(exc), str(exc))


# --- keys and addresses ----------------------------------------------------------------------

def _reference_key(key: str, prefix: str | None = None) -> IPv4Network:
    """parse_subnet_key's long way (ipaddress, then the canonical spelling), as it was."""
    import re
    name = key[len(prefix):] if prefix is not None else key.rsplit("/", 1)[-1]
    m = re.fullmatch(r"([0-9]{1,3}(?:\.[0-9]{1,3}){3})-([0-9]{1,2})", name, re.ASCII)
    if not m:
        raise LeaseValueError(f"lease key {key!r} is not of the form a.b.c.d-len")
    return subnet_the_long_way(key, name, m.group(1), m.group(2))


def test_key_fast_path_agrees_with_ipaddress():
    rng = random.Random(19)
    octets = ["0", "1", "9", "10", "99", "100", "199", "200", "249", "250", "255", "256", "299", "999", "00", "01",
              "010", "007"]
    lengths = ["0", "1", "8", "9", "16", "23", "24", "30", "31", "32", "33", "99", "00", "08", "024"]
    names = {"0.0.0.0-0", "255.255.255.255-32", "10.5.52.0-24", "10.5.52.1-24", "10.5.52.0-23", "128.0.0.0-1"}
    for _ in range(4000):
        names.add(".".join(rng.choice(octets) for _ in range(4)) + "-" + rng.choice(lengths))
    for name in sorted(names):
        for key, prefix in ((name, None), (f"{PREFIX}/subnets/{name}", f"{PREFIX}/subnets/")):
            got, want = _outcome(parse_subnet_key, key, prefix), _outcome(_reference_key, key, prefix)
            assert got == want, key
            if got[0] == "ok":
                assert str(got[1]) == str(want[1]) and got[1].prefixlen == want[1].prefixlen


@pytest.mark.parametrize("ip", ["10.0.0.1", "0.0.0.0", "255.255.255.255", "010.0.0.1", "10.0.0.256", "10.0.0",
                                "10.0.0.1 ", "1.2.3.4.5", "١٠.0.0.1", "10.0.0.01", "", "::1"])
def test_public_ip_fast_path_agrees_with_ipaddress(ip):
    raw = json.dumps({"PublicIP": ip})
    got = _outcome(decode_attrs, raw, "k")
    try:
        want = ("ok", LeaseAttrs(public_ip=IPv4Address(ip)))
    except ValueError:
        want = ("error", LeaseValueError, f"lease value at 'k': PublicIP {ip!r} is not an IPv4 address")
    assert got == want


# --- expiration ------------------------------------------------------------------------------

def test_expiration_seconds_agree_with_strptime():
    rng = random.Random(19)
    years = [0, 1, 2, 4, 100, 1900, 1969, 1970, 2000, 2024, 2026, 2100, 9999]
    for _ in range(30000):
        year = rng.choice(years + [rng.randint(0, 9999)])
        month, day, hour, minute, second = (rng.randint(0, 13), rng.randint(0, 32), rng.randint(0, 25),
                                            rng.randint(0, 61), rng.randint(0, 62))
        text = f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}"
        want = _outcome(lambda t: timegm(time.strptime(t, "%Y-%m-%dT%H:%M:%S")), text)
        assert _outcome(_utc_seconds, text) == want, text


def test_expiration_as_etcd_writes_it():
    assert parse_expiration("2026-12-01T02:25:01.123456789Z") == pytest.approx(
        timegm((2026, 12, 1, 2, 25, 1)) + 0.123456789)
    assert parse_expiration("2024-02-29T23:59:59-01:30") == timegm((2024, 3, 1, 1, 29, 59))
    with pytest.raises(ValueError, match="day is out of range"):
        parse_expiration("2023-02-29T00:00:00Z")  # as strptime said it


# --- JSON within limits ----------------------------------------------------------------------

def _reference_load(text, *, max_bytes: int, max_depth: int):
    """load_json as it was: a full nesting scan and json.loads with every hook, each call."""
    text = text_within_size(text, max_bytes)
    depth = nesting_depth(text)
    if depth > max_depth:
        raise JsonLimitError(f"nests {depth} levels deep, more than the limit of {max_depth}")
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_float, parse_int=_int)
    except JsonLimitError:
        raise
    except json.JSONDecodeError as exc:
        raise JsonLimitError(f"is not valid JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise JsonLimitError(f"is not valid JSON: {type(exc).__name__}: {shown(str(exc))}") from None


JSON_CORPUS = [
    '{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}',
    "[" * 4 + "]" * 4, "[" * 5 + "]" * 5, "[" * 6 + "]" * 6, "[" * 40 + "]" * 40, "[" * 5000,
    '{"a":"' + "[" * 30 + '"}', '["{{{{{{{{", {"b": [[1]]}]',
    '{"n":123456789012345678901}', '{"n":12345678901234567890}', '{"n":-123456789012345678901}',
    '{"s":"123456789012345678901234","n":5}', '{"n":' + "9" * 5000 + "}", '{"n":1e400}', '{"n":-1e400}',
    '{"n":1.5}', '{"n":NaN}', '{"n":Infinity}', '{"n":-Infinity}', "\ufeff{}", '{"a":1} x', "", "  ", "nul",
    '{"a":"\\ud800"}', "[1,2,3,true,false,null]", '"just a string"', "7", '{"VNI":1e2}',
]


@pytest.mark.parametrize("text", JSON_CORPUS)
@pytest.mark.parametrize("as_bytes", [False, True])
def test_load_json_agrees_with_the_long_way(text, as_bytes):
    raw = text.encode() if as_bytes else text
    got = _outcome(lambda t: load_json(t, max_bytes=16 * 1024, max_depth=5), raw)
    want = _outcome(lambda t: _reference_load(t, max_bytes=16 * 1024, max_depth=5), raw)
    assert repr(got) == repr(want)  # repr: OutOfRangeNumber (infinite) is never == itself as a float nan would


def test_out_of_range_numbers_are_found_at_any_depth():
    deep = load_json('{"a":[1,{"b":[true,null,"x",2.5,{"c":1e999}]}]}', max_bytes=1000, max_depth=16)
    assert has_out_of_range_number(deep)
    assert has_out_of_range_number(load_json("[" * 10 + "1" * 30 + "]" * 10, max_bytes=1000, max_depth=16))
    assert has_out_of_range_number(OutOfRangeNumber("1e999"))
    assert not has_out_of_range_number(load_json('{"a":[1,{"b":[true,null,"x",2.5,{"c":1e99}]}]}',
                                                 max_bytes=1000, max_depth=16))
    assert not has_out_of_range_number(load_json('{"a":"' + "1" * 30 + '"}', max_bytes=1000, max_depth=16))


# --- the listing read one node at a time (v2 has no paging) ------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from flannelpy.etcd.v2 import listing_nodes  # noqa: E402

_NODE = st.fixed_dictionaries(
    {"key": st.text(max_size=40), "value": st.text(max_size=60), "modifiedIndex": st.integers(0, 2**53),
     "createdIndex": st.integers(0, 2**53)},
    optional={"expiration": st.text(max_size=30), "ttl": st.integers(-5, 10**6), "dir": st.booleans(),
              "nodes": st.lists(st.fixed_dictionaries({"key": st.text(max_size=10)}), max_size=2)})


@settings(max_examples=300, deadline=None)
@given(st.lists(_NODE, max_size=12), st.sampled_from([None, 0, 2]), st.booleans(), st.booleans())
def test_listing_nodes_are_json_loads_nodes(nodes, indent, ascii_only, nodes_first):
    """Whatever the spacing, escapes, member order and node shapes, the nodes are json.loads'."""
    inner = {"nodes": nodes, "key": "/coreos.com/network/subnets", "dir": True} if nodes_first else \
        {"key": "/coreos.com/network/subnets", "dir": True, "nodes": nodes, "modifiedIndex": 7}
    text = json.dumps({"action": "get", "node": inner}, indent=indent, ensure_ascii=ascii_only)
    assert list(listing_nodes(text)) == json.loads(text)["node"]["nodes"]


@pytest.mark.parametrize("text, nodes", [
    ('{"action":"get","node":{"key":"/a/subnets","dir":true}}', []),  # an empty directory has no nodes
    ('{"action":"get","node":{"key":"/a/subnets","dir":true,"nodes":[]}}', []),
    ('{"action":"get","node":{"key":"/a/subnets","dir":true,"nodes":null}}', []),
    ('  {"node" : { "nodes" : [ {"key":"x"} , 7 , "s" ] } }  ', [{"key": "x"}, 7, "s"]),  # not every node is an object
])
def test_listing_nodes_of_odd_but_valid_answers(text, nodes):
    assert list(listing_nodes(text)) == nodes


@pytest.mark.parametrize("text", [
    '{"errorCode":100,"message":"Key not found","cause":"/a/subnets","index":3}',  # no node: parsed whole
    '{"action":"get","node":{"nodes":{"key":"x"}}}',  # nodes not an array
    '{"action":"get","node":{"nodes":[{"key":"x"} {"key":"y"}]}}',  # no comma
    '{"action":"get","node":{"nodes":[{"key":"x"},',  # cut short
    '{"action":"get","node":[]}',
    '[]',
    '',
    'garbage',
])
def test_listing_nodes_refuses_what_it_cannot_follow(text):
    with pytest.raises(ValueError):
        list(listing_nodes(text))
