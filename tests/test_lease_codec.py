"""lease.py: keys and values exactly as flanneld writes and reads them (pure)."""

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
    assert parse_subnet_key("10.5.52.0-24&fc00::-64") == IPv4Network("10.5.52.0/24")  # dual stack
    for bad in ("10.5.52.0", "10.5.52.1-24", "10.5.52.0-33", "x-24", "10.5.52.0-24&FC00::-64"):
        with pytest.raises(LeaseValueError):
            parse_subnet_key(bad)


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
    vni=st.one_of(st.none(), st.integers(0, 2**24)),
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
