"""Dual-stack lease keys and values (issue #14), byte for byte with flanneld v0.20.2's (pure, no root).

The etcd stores use parse_subnet_key, which still refuses dual-stack keys: the running agent has no
IPv6 data plane yet.  parse_lease_key / lease_key and the value codec represent them fully.
"""

import json
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flannelpy.errors import LeaseValueError
from flannelpy.subnet.lease import (
    MAX_VALUE_BYTES,
    Lease,
    LeaseAttrs,
    ValueStyle,
    decode_attrs,
    encode_attrs,
    lease_key,
    parse_lease_key,
    parse_subnet_key,
)

# As measured in issue #14 (flanneld v0.20.2, vxlan, dual stack); the MAC stands for the elided one.
ISSUE_VALUE = ('{"PublicIP":"10.199.0.11","PublicIPv6":"fd99::11","BackendType":"vxlan",'
               '"BackendData":{"VNI":1,"VtepMAC":"0e:5a:1c:22:9b:01"},'
               '"BackendV6Data":{"VNI":1,"VtepMAC":"b2:33:4f:10:aa:02"}}')


def test_issue_key_round_trips():
    v4, v6 = IPv4Network("10.42.63.0/24"), IPv6Network("fd42:0:0:1f::/64")
    assert lease_key(v4, v6) == "10.42.63.0-24&fd42:0:0:1f::-64"
    assert lease_key(v4) == "10.42.63.0-24"
    assert parse_lease_key("/coreos.com/network/subnets/10.42.63.0-24&fd42:0:0:1f::-64") == (v4, v6)
    assert parse_lease_key("/p/subnets/10.42.63.0-24&fd42:0:0:1f::-64", "/p/subnets/") == (v4, v6)
    assert parse_lease_key("/p/subnets/10.42.63.0-24", "/p/subnets/") == (v4, None)
    assert Lease(v4, LeaseAttrs(IPv4Address("10.199.0.11")), ipv6_subnet=v6).key == "10.42.63.0-24&fd42:0:0:1f::-64"
    assert Lease(v4, LeaseAttrs(IPv4Address("10.199.0.11"))).key == "10.42.63.0-24"


def test_agent_path_still_refuses_dual_stack_keys():
    # What the etcd stores call: until the IPv6 data plane exists, a dual-stack lease is skipped.
    with pytest.raises(LeaseValueError, match="dual-stack"):
        parse_subnet_key("/p/subnets/10.42.63.0-24&fd42:0:0:1f::-64", "/p/subnets/")


@pytest.mark.parametrize("key, what", [
    ("10.42.63.0-24&FD42:0:0:1f::-64", "not of the form"),  # flanneld's regex takes lower case only
    ("10.42.63.0-24&fd42:0:0:001f::-64", "not spelt as flanneld spells it"),
    ("10.42.63.0-24&fd42:0000:0:1f::-64", "not spelt"),
    ("10.42.63.0-24&fd42::1f:0:0:0:0-64", "not spelt"),  # not the compressed form Go prints
    ("10.42.63.0-24&fd42:0:0:1f::-064", "not spelt"),
    ("10.42.63.0-24&fd42:0:0:1f::1-64", "has host bits set"),
    ("10.42.63.0-24&fd42:0:0:1f::-128", "above 127"),  # strconv.ParseUint(.., 10, 7)
    ("10.42.63.0-24&fd42:0:0:1f::-200", "above 127"),
    ("10.42.63.0-24&fd42:0:0:1f::", "not of the form"),
    ("10.42.63.0-24&", "not of the form"),
    ("10.42.63.0-24&&fd42::-64", "not of the form"),
    ("10.42.63.0-24&fd42:0:0:1f::-64&fd43::-64", "not of the form"),
    ("10.42.63.0-24&::ffff:a00:0-120", "reserved ::/8"),
    ("10.42.63.0-24&fd42:0:0:1f::-64\n", "not of the form"),
    ("10.42.63.0-24&fd42:0:0:1f::-\u0666\u0664", "not of the form"),  # Arabic-Indic digits
    ("010.42.63.0-24&fd42:0:0:1f::-64", "Leading zeros|not spelt"),
    ("0.0.0.0-0&fd42:0:0:1f::-64", "IPv6-only"),
    ("10.42.63.0-24&fd42:0:0:1f:0:0:0:0:0-64", "not of the form|Exactly 8|expected"),
])
def test_malformed_dual_keys_are_refused_by_name(key, what):
    with pytest.raises(LeaseValueError, match=what):
        parse_lease_key("/p/subnets/" + key, "/p/subnets/")


def test_dual_keys_must_sit_directly_under_the_prefix():
    for key in ("/p/subnets/x/10.42.63.0-24&fd42:0:0:1f::-64", "/q/subnets/10.42.63.0-24&fd42:0:0:1f::-64"):
        with pytest.raises(LeaseValueError, match="not directly under"):
            parse_lease_key(key, "/p/subnets/")


@given(st.integers(0, (1 << 24) - 1), st.integers(1, (1 << 48) - 1), st.sampled_from([64, 80, 96, 120, 126]))
def test_every_canonical_pair_round_trips(v4_index, v6_index, v6_len):
    v4 = IPv4Network((10 << 24 | v4_index << 8 & 0xFFFF00, 24))
    v6 = IPv6Network(((0xFD42 << 112) | (v6_index % (1 << (v6_len - 16))) << (128 - v6_len), v6_len))
    assert parse_lease_key(lease_key(v4, v6)) == (v4, v6)


def test_issue_value_round_trips_byte_for_byte():
    attrs = decode_attrs(ISSUE_VALUE)
    assert attrs.public_ipv6 == IPv6Address("fd99::11")
    assert attrs.vni == 1 and attrs.vtep_mac == "0e:5a:1c:22:9b:01"
    assert attrs.vni_v6 == 1 and attrs.vtep_mac_v6 == "b2:33:4f:10:aa:02"
    assert encode_attrs(attrs) == ISSUE_VALUE


def test_value_field_order_is_go_struct_order():
    attrs = LeaseAttrs(public_ip=IPv4Address("10.199.0.12"), backend_type="host-gw",
                       public_ipv6=IPv6Address("fd99::12"))
    assert encode_attrs(attrs) == '{"PublicIP":"10.199.0.12","PublicIPv6":"fd99::12","BackendType":"host-gw"}'
    # BackendV6Data has omitempty; PublicIPv6 does not.
    assert encode_attrs(LeaseAttrs(public_ip=IPv4Address("10.1.1.1"))) == '{"PublicIP":"10.1.1.1","PublicIPv6":null}'
    # Legacy (etcd v2) shape: a null PublicIPv6 is left out, a set one is written.
    assert encode_attrs(LeaseAttrs(public_ip=IPv4Address("10.1.1.1")), ValueStyle.LEGACY) == '{"PublicIP":"10.1.1.1"}'
    assert encode_attrs(attrs, ValueStyle.LEGACY) == \
        '{"PublicIP":"10.199.0.12","PublicIPv6":"fd99::12","BackendType":"host-gw"}'


def test_value_reading_is_as_liberal_as_go():
    odd = decode_attrs('{"publicip":"10.0.0.1","publicipv6":"FD99:0:0::11","backendtype":"VXLAN",'
                       '"backendv6data":{"vni":7,"vtepmac":"0E-5A-1C-22-9B-01","Extra":true}}')
    assert odd.public_ipv6 == IPv6Address("fd99::11") and odd.backend_type == "vxlan"
    assert odd.backend_v6_data == {"VNI": 7, "VtepMAC": "0e:5a:1c:22:9b:01", "Extra": True}
    assert encode_attrs(odd) == ('{"PublicIP":"10.0.0.1","PublicIPv6":"fd99::11","BackendType":"vxlan",'
                                 '"BackendV6Data":{"VNI":7,"VtepMAC":"0e:5a:1c:22:9b:01","Extra":true}}')
    assert decode_attrs('{"PublicIP":"10.0.0.1","PublicIPv6":null,"BackendV6Data":null}').backend_v6_data is None
    assert decode_attrs('{"PublicIP":"10.0.0.1","BackendV6Data":{}}').backend_v6_data is None


@pytest.mark.parametrize("raw, what", [
    ('{"PublicIP":"10.0.0.1","PublicIPv6":"fd99::zz"}', "PublicIPv6 'fd99::zz' is not an IPv6 address"),
    ('{"PublicIP":"10.0.0.1","PublicIPv6":"10.0.0.2"}', "PublicIPv6 '10.0.0.2' is not an IPv6 address"),
    ('{"PublicIP":"10.0.0.1","PublicIPv6":"::ffff:10.0.0.2"}', "IPv4-mapped"),
    ('{"PublicIP":"10.0.0.1","PublicIPv6":"fd99::11/64"}', "not an IPv6 address"),
    ('{"PublicIP":"10.0.0.1","PublicIPv6":["fd99::11"]}', "PublicIPv6 must be a string or null"),
    ('{"PublicIP":"10.0.0.1","BackendV6Data":[1]}', "BackendV6Data must be an object"),
    ('{"PublicIP":"10.0.0.1","BackendV6Data":"x"}', "BackendV6Data must be an object"),
    ('{"PublicIP":"10.0.0.1","BackendV6Data":{"VNI":16777216}}', "BackendV6Data.VNI 16777216 is not a VNI"),
    ('{"PublicIP":"10.0.0.1","BackendV6Data":{"VNI":true}}', "BackendV6Data.VNI"),
    ('{"PublicIP":"10.0.0.1","BackendV6Data":{"VtepMAC":"zz"}}', "BackendV6Data.VtepMAC 'zz' is not a MAC"),
    ('{"PublicIP":"10.0.0.1","BackendV6Data":{"VNI":1e400}}', "beyond any field's range|not valid JSON"),
    ('{"PublicIP":"10.0.0.1","BackendV6Data":' + "[" * 40 + "]" * 40 + "}", "nest|deep"),
    ('{"PublicIP":"10.0.0.1","BackendV6Data":{"Pad":"' + "x" * MAX_VALUE_BYTES + '"}}', "bytes"),
])
def test_bad_v6_values_name_the_problem(raw, what):
    with pytest.raises(LeaseValueError, match=what) as info:
        decode_attrs(raw, key="/p/subnets/10.42.63.0-24&fd42:0:0:1f::-64")
    assert "\n" not in str(info.value)


@given(st.dictionaries(st.sampled_from(["PublicIP", "PublicIPv6", "BackendType", "BackendData", "BackendV6Data"]),
                       st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                                    max_leaves=8)))
def test_any_value_decodes_or_is_refused_with_lease_value_error(doc):
    try:
        attrs = decode_attrs(json.dumps(doc))
    except LeaseValueError:
        return
    assert decode_attrs(encode_attrs(attrs)) == attrs  # what we accept, we write back readably
