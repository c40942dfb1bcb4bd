"""lease.py: keys and values exactly as flanneld writes and reads them (pure)."""

import json
import re
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flannelpy.errors import LeaseValueError
from flannelpy.subnet.lease import LeaseAttrs, ValueStyle, decode_attrs, encode_attrs, parse_subnet_key, subnet_key

HEAD_VXLAN = '{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}'


def test_keys():
    assert subnet_key(IPv4Network("10.5.52.0/24")) == "10.5.52.0-24"
    assert parse_subnet_key("/coreos.com/network/subnets/10.5.52.0-24") == IPv4Network("10.5.52.0/24")
    assert parse_subnet_key("/p/subnets/10.5.52.0-24", "/p/subnets/") == IPv4Network("10.5.52.0/24")
    for bad in ("10.5.52.0", "10.5.52.1-24", "10.5.52.0-33", "x-24", "10.5.52.0-24&FC00::-64",
                "10.5.52.0-24 ", "10.5.52.0-24\n", "010.5.52.0-24", "10.5.52.0-024", "\u0661\u0660.5.52.0-24"):
        with pytest.raises(LeaseValueError):
            parse_subnet_key(bad)


@pytest.mark.parametrize("key, what", [
    # Two keys naming one subnet would take turns replacing a peer's routes: only the canonical one counts.
    ("/p/subnets/evil/10.5.52.0-24", "not directly under"),
    ("/p/subnets/subnets/10.5.52.0-24", "not directly under"),
    ("/q/subnets/10.5.52.0-24", "not directly under"),
    ("/p/subnets/10.5.52.0-24&fc00::-64", "dual-stack"),
    ("/p/subnets/10.5.052.0-24", "Leading zeros"),
    ("/p/subnets/10.5.52.0-024", "not of the form|not spelt"),
    ("/p/subnets/" + "1" * 600, "bytes long"),
])
def test_only_one_key_names_a_subnet(key, what):
    with pytest.raises(LeaseValueError, match=what):
        parse_subnet_key(key, "/p/subnets/")


@pytest.mark.parametrize("raw", [
    HEAD_VXLAN,
    '{"PublicIP":"10.1.1.1","PublicIPv6":null}',  # udp at HEAD: no BackendType
    '{"PublicIP":"10.1.1.1","PublicIPv6":null,"BackendType":"host-gw"}',
    '{"PublicIP":"10.1.1.1","PublicIPv6":null,"BackendType":"wireguard","BackendData":{"PublicKey":"abc=","Port":51820}}',
])
def test_current_shapes_round_trip_byte_for_byte(raw):
    assert encode_attrs(decode_attrs(raw)) == raw


def test_old_shapes():
    old = decode_attrs('{"PublicIP":"10.240.0.2","BackendType":"vxlan","BackendData":{"VtepMAC":"EE:84:9F:F3:57:3E"}}')
    assert old.vtep_mac == "ee:84:9f:f3:57:3e" and old.vni is None and old.public_ipv6 is None
    assert encode_attrs(old, ValueStyle.LEGACY) == \
        '{"PublicIP":"10.240.0.2","BackendType":"vxlan","BackendData":{"VtepMAC":"ee:84:9f:f3:57:3e"}}'
    udp = decode_attrs('{"PublicIP":"10.10.10.15"}')
    assert udp.backend_type == "" and udp.backend_data is None
    assert encode_attrs(udp, ValueStyle.LEGACY) == '{"PublicIP":"10.10.10.15"}'
    # Go matches field names case-insensitively; a dashed MAC is what net.ParseMAC also takes.
    odd = decode_attrs('{"publicip":"10.0.0.1","backendtype":"vxlan","backenddata":{"vni":3,"vtepmac":"02-00-00-00-00-0A"}}')
    assert odd.vni == 3 and odd.vtep_mac == "02:00:00:00:00:0a"
    assert encode_attrs(odd) == '{"PublicIP":"10.0.0.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":3,"VtepMAC":"02:00:00:00:00:0a"}}'


@pytest.mark.parametrize("raw, what", [
    ("not json", "not valid JSON"),
    ("[]", "JSON object"),
    ("{}", "PublicIP missing"),
    ('{"PublicIP":"300.1.1.1"}', "not an IPv4"),
    ('{"PublicIP":"10.0.0.1","BackendData":[]}', "BackendData must be an object"),
    ('{"PublicIP":"10.0.0.1","BackendData":{"VNI":-1}}', "VNI"),
    ('{"PublicIP":"10.0.0.1","BackendData":{"VtepMAC":"zz"}}', "VtepMAC"),
    ('{"PublicIP":"10.0.0.1","PublicIPv6":5}', "PublicIPv6"),
    (b"\xff\xfe", "not valid JSON"),
])
def test_bad_values_name_the_problem(raw, what):
    with pytest.raises(LeaseValueError, match=what):
        decode_attrs(raw, key="/x/subnets/10.5.1.0-24")


macs = st.lists(st.integers(0, 255), min_size=6, max_size=6).map(lambda b: ":".join(f"{x:02x}" for x in b))


@given(
    ip=st.integers(0, 2**32 - 1).map(IPv4Address),
    btype=st.sampled_from(["", "vxlan", "host-gw"]),
    vni=st.one_of(st.none(), st.integers(0, 2**24 - 1)),
    mac=st.one_of(st.none(), macs),
    style=st.sampled_from(list(ValueStyle)),
)
def test_round_trip(ip, btype, vni, mac, style):
    data = {}
    if vni is not None:
        data["VNI"] = vni
    if mac is not None:
        data["VtepMAC"] = mac
    attrs = LeaseAttrs(ip, btype, data or None)
    assert decode_attrs(encode_attrs(attrs, style)) == attrs


HOSTILE_VALUES = [
    ("[" * 100_000 + "]" * 100_000, "200000 bytes long"),
    ('{"PublicIP":"10.0.0.1","x":' + "[" * 5000 + "]" * 5000 + "}", "nests 5001 levels"),
    ('{"PublicIP":"10.0.0.1","BackendData":{"VNI":1e400}}', "beyond any field's range"),
    ('{"PublicIP":"10.0.0.1","BackendData":{"VNI":' + "9" * 5000 + "}}", "beyond any field's range"),
    ('{"PublicIP":"10.0.0.1","BackendData":{"VNI":16777216}}', "not a VNI"),
    ('{"PublicIP":"10.0.0.1","BackendData":{"VNI":1.5}}', "not a VNI"),
    ('{"PublicIP":"10.0.0.1","BackendData":{"VNI":NaN}}', "NaN is not a JSON number"),
    ('{"PublicIP":"10.0.0.1","x":-Infinity}', "Infinity is not a JSON number"),
    ('{"PublicIP":"' + "A" * 100_000 + '"}', "bytes long"),
    ('{"PublicIP":"' + "A" * 10_000 + '"}', "is not an IPv4 address"),
    ('{"PublicIP":"10.0.0.1","BackendData":{"VtepMAC":"' + "f" * 10_000 + '"}}', "is not a MAC"),
    ("1e400", "JSON object"),
    ('"just a string"', "JSON object"),
    ("null", "JSON object"),
    ("", "not valid JSON"),
    (b"\xc3\x28", "not UTF-8"),
    ('{"PublicIP":"\u0661.0.0.1"}', "not an IPv4"),
]


@pytest.mark.parametrize("raw, what", HOSTILE_VALUES, ids=range(len(HOSTILE_VALUES)))
def test_hostile_values_are_refused_with_a_named_error(raw, what):
    with pytest.raises(LeaseValueError, match=what) as info:
        decode_attrs(raw, key="/x/subnets/10.5.1.0-24")
    assert len(str(info.value)) < 300  # one readable line, not the value echoed back


@given(st.one_of(st.text(max_size=300), st.binary(max_size=300),
                 st.recursive(st.one_of(st.none(), st.booleans(), st.floats(), st.integers(), st.text(max_size=20)),
                              lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                              max_leaves=30).map(lambda v: json.dumps(v))))
def test_no_value_raises_anything_but_lease_value_error(raw):
    try:
        decode_attrs(raw)
    except LeaseValueError:
        pass


def test_backend_data_is_kept_compactly_and_given_back_as_written():
    """A peer's vxlan BackendData is held as a (VNI, VtepMAC) pair rather than a dict (issue #19:
    memory per peer); what the attributes give back, compare and encode is unchanged."""
    usual = decode_attrs(b'{"PublicIP":"10.0.0.1","BackendType":"vxlan",'
                         b'"BackendData":{"VNI":1,"VtepMAC":"AA:bb:cc:dd:ee:ff"}}')
    reordered = decode_attrs(b'{"PublicIP":"10.0.0.1","BackendType":"vxlan",'
                             b'"BackendData":{"VtepMAC":"aa:bb:cc:dd:ee:ff","VNI":1}}')
    extra = decode_attrs(b'{"PublicIP":"10.0.0.1","BackendType":"vxlan",'
                         b'"BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff","Future":true}}')
    assert usual.backend_data == {"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:ff"}
    assert list(usual.backend_data) == ["VNI", "VtepMAC"] and list(reordered.backend_data) == ["VtepMAC", "VNI"]
    assert usual == reordered != extra  # dicts compare without their order, as before
    assert (usual.vni, usual.vtep_mac) == (reordered.vni, reordered.vtep_mac) == (extra.vni, extra.vtep_mac) \
        == (1, "aa:bb:cc:dd:ee:ff")
    # each encodes as it was written (Go's order for ours)
    assert encode_attrs(usual).endswith('"BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}')
    assert encode_attrs(reordered).endswith('"BackendData":{"VtepMAC":"aa:bb:cc:dd:ee:ff","VNI":1}}')
    assert '"Future":true' in encode_attrs(extra)
    # what is given back is a copy: changing it changes no lease
    got = usual.backend_data
    got["VNI"] = 99
    assert usual.vni == 1 and usual.backend_data["VNI"] == 1
    with pytest.raises(TypeError):  # unhashable, as a dict-holding value always was
        hash(usual)
    with pytest.raises(AttributeError):
        usual.backend_data = None  # type: ignore[misc]
    assert decode_attrs(b'{"PublicIP":"10.0.0.1"}').backend_data is None


@pytest.mark.parametrize("vni", [1, 0, 2, 4096, 16777215])
def test_compact_backend_data_keeps_every_vni(vni):
    """VNI 1 (the default) is held as the MAC alone, other VNIs as a pair: no VNI may read back as
    another, whether the lease was decoded or made in code."""
    raw = f'{{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{{"VNI":{vni},"VtepMAC":"aa:bb:cc:dd:ee:ff"}}}}'
    decoded = decode_attrs(raw.encode())
    made = LeaseAttrs(IPv4Address("10.0.0.1"), "vxlan", {"VNI": vni, "VtepMAC": "aa:bb:cc:dd:ee:ff"})
    for attrs in (decoded, made):
        assert attrs.vni == vni and attrs.vtep_mac == "aa:bb:cc:dd:ee:ff"
        assert attrs.backend_data == {"VNI": vni, "VtepMAC": "aa:bb:cc:dd:ee:ff"}
        assert type(attrs.backend_data["VNI"]) is int
        assert encode_attrs(attrs).endswith(f'"BackendData":{{"VNI":{vni},"VtepMAC":"aa:bb:cc:dd:ee:ff"}}}}')
    assert decoded == made
    assert made != LeaseAttrs(IPv4Address("10.0.0.1"), "vxlan", {"VNI": vni + 1, "VtepMAC": "aa:bb:cc:dd:ee:ff"})
    # a VNI of another JSON type is kept as given, not folded into the default
    odd = LeaseAttrs(IPv4Address("10.0.0.1"), "vxlan", {"VNI": True, "VtepMAC": "aa:bb:cc:dd:ee:ff"})
    assert odd.backend_data == {"VNI": True, "VtepMAC": "aa:bb:cc:dd:ee:ff"} and odd.backend_data["VNI"] is True


# The shapes flanneld writes are read without json.loads (lease._decode_written); whatever that
# path returns must be what the general path makes of the same bytes.
@given(
    ip=st.integers(0, 2**32 - 1).map(IPv4Address),
    btype=st.sampled_from(["", "vxlan", "host-gw", "alloc", "udp"]),
    vni=st.one_of(st.none(), st.integers(0, 2**24 - 1)),
    mac=st.one_of(st.none(), macs),
    style=st.sampled_from(list(ValueStyle)),
    as_bytes=st.booleans(),
)
def test_written_values_take_the_fast_path_to_the_same_attrs(ip, btype, vni, mac, style, as_bytes):
    from flannelpy.subnet.lease import _decode_general, _decode_written

    data = None if vni is None or mac is None else {"VNI": vni, "VtepMAC": mac}
    raw = encode_attrs(LeaseAttrs(ip, btype, data), style)
    raw = raw.encode() if as_bytes else raw
    fast = _decode_written(raw)
    assert fast is not None, raw
    assert fast == _decode_general(raw, "") and fast.backend_data == data
    assert fast.vtep_mac == (mac if data else None)


@pytest.mark.parametrize("raw", [
    '{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0A:00:00:00:00:01"}}',
    '{"PublicIP":"10.0.0.01","BackendType":"vxlan"}',
    '{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{"VNI":16777216,"VtepMAC":"0a:00:00:00:00:01"}}',
    '{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{"VNI":01,"VtepMAC":"0a:00:00:00:00:01"}}',
    '{"PublicIP":"10.0.0.1", "BackendType":"vxlan"}',
    '{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendType":"host-gw"}',
    '{"PublicIP":"10.0.0.1","PublicIPv6":"fd00::1","BackendType":"vxlan"}',
    '{"PublicIP":"10.0.0.1","BackendType":"VXLAN"}',
    '{"PublicIP":"10.0.0.1","BackendType":""}',
    b'{"PublicIP":"10.0.0.1","BackendType":"vxlan\xff"}',
    '{"PublicIP":"256.0.0.1"}',
    '{"PublicIP":"10.0.0.1","BackendType":"' + "v" * 300 + '"}',  # longer than any written value
    ('{"PublicIP":"10.0.0.1","BackendType":"' + "v" * 300 + '"}').encode(),
])
def test_other_spellings_take_the_general_path(raw):
    from flannelpy.subnet.lease import _decode_general, _decode_written

    assert _decode_written(raw) is None
    try:
        expected = _decode_general(raw, "")
    except LeaseValueError as exc:
        with pytest.raises(LeaseValueError, match=re.escape(str(exc))):
            decode_attrs(raw)
    else:
        assert decode_attrs(raw) == expected


@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_the_fast_path_never_disagrees_with_the_general_one(raw):
    from flannelpy.subnet.lease import _decode_general, _decode_written

    fast = _decode_written(raw)
    if fast is not None:
        assert fast == _decode_general(raw, "")
