"""The IPv6 half of the network config (issue #14): flanneld's CheckNetworkConfig rules for
EnableIPv6, IPv6Network, IPv6SubnetLen, IPv6SubnetMin/Max, and the agent's refusal until the
IPv6 data plane exists (pure, no root)."""

import json
from ipaddress import IPv6Address, IPv6Network

import pytest

from flannelpy.config.network import parse_config, validate_config
from flannelpy.errors import ConfigError


def dual(**fields) -> str:
    doc = {"Network": "10.42.0.0/16", "EnableIPv6": True, "IPv6Network": "fd42::/48", "Backend": {"Type": "vxlan"}}
    doc.update(fields)
    return json.dumps({k: v for k, v in doc.items() if v is not DROP})


DROP = object()


def test_issue_config_defaults_as_flanneld_computes_them():
    # The config measured with flanneld v0.20.2 in issue #14: keys like 10.42.63.0-24&fd42:0:0:1f::-64.
    c = parse_config(dual())
    assert c.enable_ipv4 and c.enable_ipv6
    assert c.ipv6_network == IPv6Network("fd42::/48")
    assert c.ipv6_subnet_len == 64
    assert c.ipv6_subnet_min == IPv6Address("fd42:0:0:1::")  # the first subnet is skipped
    assert c.ipv6_subnet_max == IPv6Address("fd42:0:0:ffff::")  # the last subnet
    assert c.ipv6_subnet_size == 1 << 64
    assert c.contains_ipv6_subnet(IPv6Network("fd42:0:0:1f::/64"))
    assert not c.contains_ipv6_subnet(IPv6Network("fd42::/64"))  # below IPv6SubnetMin
    assert not c.contains_ipv6_subnet(IPv6Network("fd42:0:0:1f::/80"))  # wrong length
    assert not c.contains_ipv6_subnet(None)  # a v4-only lease does not fit a dual-stack config


@pytest.mark.parametrize("network, subnet_len, smin, smax", [
    ("fd42::/48", 64, "fd42:0:0:1::", "fd42:0:0:ffff::"),
    ("fd00::/62", 64, "fd00:0:0:1::", "fd00:0:0:3::"),
    ("fd00::/63", 65, "fd00::8000:0:0:0", "fd00:0:0:1:8000::"),
    ("fd00::/120", 122, "fd00::40", "fd00::c0"),
    ("fd00::/124", 126, "fd00::4", "fd00::c"),
    ("fd42:1:2:3::/48", 64, "fd42:1:2:1::", "fd42:1:2:ffff::"),  # masked like net.ParseCIDR
])
def test_ipv6_subnet_len_default_and_bounds(network, subnet_len, smin, smax):
    c = parse_config(dual(IPv6Network=network))
    assert (c.ipv6_subnet_len, str(c.ipv6_subnet_min), str(c.ipv6_subnet_max)) == (subnet_len, smin, smax)


def test_explicit_ipv6_fields_case_insensitive():
    c = parse_config(json.dumps({"network": "10.42.0.0/16", "enableipv6": True, "ipv6network": "fd42::/48",
                                 "IPV6SUBNETLEN": 80, "ipv6subnetmin": "fd42:0:0:2::", "Ipv6SubnetMax": "fd42:0:0:3::",
                                 "backend": {"type": "vxlan"}}))
    assert c.ipv6_subnet_len == 80
    assert (str(c.ipv6_subnet_min), str(c.ipv6_subnet_max)) == ("fd42:0:0:2::", "fd42:0:0:3::")
    assert c.contains_ipv6_subnet(IPv6Network("fd42:0:0:2:1::/80"))
    assert not c.contains_ipv6_subnet(IPv6Network("fd42:0:0:3:1::/80"))


def test_v4_only_config_has_no_ipv6_side_and_fits_only_v4_only_leases():
    c = parse_config('{"Network":"10.42.0.0/16","IPv6Network":"fd42::/48","IPv6SubnetLen":200}')
    assert not c.enable_ipv6 and c.ipv6_network is None  # unchecked when EnableIPv6 is off, as in flanneld
    assert c.contains_ipv6_subnet(None)
    assert not c.contains_ipv6_subnet(IPv6Network("fd42:0:0:1f::/64"))


@pytest.mark.parametrize("fields, message", [
    ({"IPv6Network": DROP}, "IPv6Network: missing; please define a correct IPv6Network parameter"),
    ({"IPv6Network": None}, "IPv6Network: missing"),
    ({"IPv6Network": "10.0.0.0/8"}, "IPv6Network: '10.0.0.0/8' is not IPv6"),
    ({"IPv6Network": "fd42::"}, "IPv6Network: 'fd42::' has no prefix length"),
    ({"IPv6Network": "fd42::/129"}, "IPv6Network: 'fd42::/129' is not a CIDR"),
    ({"IPv6Network": "banana"}, "IPv6Network: 'banana' is not a CIDR"),
    ({"IPv6Network": 48}, "IPv6Network: expected a string, got number"),
    ({"IPv6Network": "fd42::/125"}, "IPv6Network: fd42::/125 is too small. Minimum useful network prefix is /124"),
    # ranges no overlay may take
    ({"IPv6Network": "::/0"}, "IPv6Network: ::/0 overlaps loopback (::1/128)"),
    ({"IPv6Network": "::1/128"}, "overlaps loopback"),
    ({"IPv6Network": "::ffff:0:0/96"}, "overlaps the reserved block"),
    ({"IPv6Network": "fe80::/10"}, "IPv6Network: fe80::/10 overlaps link-local (fe80::/10)"),
    ({"IPv6Network": "fe80:0:0:1::/64"}, "overlaps link-local"),
    ({"IPv6Network": "ff00::/8"}, "IPv6Network: ff00::/8 overlaps multicast (ff00::/8)"),
    ({"IPv6Network": "ff02::/16"}, "overlaps multicast"),
    ({"IPv6Network": "fc00::/6"}, "overlaps link-local"),  # reaches fe80::/10
    # IPv6SubnetLen
    ({"IPv6SubnetLen": 127}, "IPv6SubnetLen: 127 is too long; SubnetLen must be less than /127"),
    ({"IPv6SubnetLen": 49}, "IPv6SubnetLen: /49 is too short for IPv6Network fd42::/48; network must be able "
                            "to accommodate at least four subnets (IPv6SubnetLen >= 50)"),
    ({"IPv6SubnetLen": -1}, "IPv6SubnetLen: expected a non-negative integer, got -1"),
    ({"IPv6SubnetLen": "64"}, "IPv6SubnetLen: expected a non-negative integer"),
    ({"IPv6SubnetLen": 64.5}, "IPv6SubnetLen: expected a non-negative integer, got 64.5"),
    # IPv6SubnetMin / IPv6SubnetMax
    ({"IPv6SubnetMin": "fd43::"}, "IPv6SubnetMin: fd43:: is not in IPv6Network fd42::/48"),
    ({"IPv6SubnetMax": "fd41:ffff:ffff:ffff::"}, "IPv6SubnetMax: fd41:ffff:ffff:ffff:: is not in IPv6Network"),
    ({"IPv6SubnetMin": "fd42:0:0:1::1"}, "IPv6SubnetMin: IPv6SubnetMin is not on a SubnetLen boundary: fd42:0:0:1::1"),
    ({"IPv6SubnetMax": "fd42:0:0:2:8000::"}, "IPv6SubnetMax is not on a SubnetLen boundary: fd42:0:0:2:8000::"),
    ({"IPv6SubnetMin": "10.0.0.1"}, "IPv6SubnetMin: '10.0.0.1' is not an IPv6 address"),
    ({"IPv6SubnetMax": ["fd42::"]}, "IPv6SubnetMax: expected a string, got array"),
    ({"IPv6SubnetMin": "fd42:0:0:9::", "IPv6SubnetMax": "fd42:0:0:8::"},
     "IPv6SubnetMin: fd42:0:0:9:: is above IPv6SubnetMax fd42:0:0:8::"),
    # IPv4 switched off
    ({"EnableIPv4": False}, "EnableIPv4: false (IPv6-only) is not supported with etcd, by flanneld either"),
    ({"EnableIPv4": False, "EnableIPv6": False}, "EnableIPv4: false with EnableIPv6 false"),
    ({"EnableIPv4": False, "EnableIPv6": DROP}, "EnableIPv4: false with EnableIPv6 false"),
])
def test_every_ipv6_error_names_the_field(fields, message):
    with pytest.raises(ConfigError) as info:
        parse_config(dual(**fields))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("fields, message", [
    # Go's json.Unmarshal refuses these whatever EnableIPv6 says (IP6Net/IP6 UnmarshalJSON).
    ({"IPv6Network": "banana"}, "IPv6Network: 'banana' is not a CIDR"),
    ({"IPv6SubnetMin": "banana"}, "IPv6SubnetMin: 'banana' is not an IPv6 address"),
    ({"IPv6SubnetLen": "64"}, "IPv6SubnetLen: expected a non-negative integer"),
])
def test_undecodable_ipv6_fields_are_refused_even_when_disabled(fields, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(dual(EnableIPv6=DROP, **fields))


UDP_REFUSAL = "EnableIPv6 with the udp backend: it has no IPv6 data plane (nor has flanneld's); use vxlan or host-gw"


@pytest.mark.parametrize("backend", [DROP, {"Type": "udp"}, {"Type": "UDP", "Port": 8285}])
def test_enable_ipv6_with_udp_is_refused_in_one_line(backend):
    # flanneld's udp backend has no IPv6 data plane either; no Backend at all means udp.
    with pytest.raises(ConfigError) as info:
        parse_config(dual(Backend=backend))
    assert str(info.value).startswith(UDP_REFUSAL)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("backend", ["vxlan", "host-gw"])
def test_enable_ipv6_runs_with_vxlan_and_host_gw(backend):
    assert parse_config(dual(Backend={"Type": backend})).enable_ipv6


def test_validate_reports_ipv6_problems_beside_the_others():
    problems = [str(p) for p in validate_config(dual(IPv6SubnetLen=127, SubnetLen=31, Backend={"Type": "udp"}))]
    assert any(p.startswith(UDP_REFUSAL) for p in problems)
    assert any(p.startswith("IPv6SubnetLen: 127 is too long") for p in problems)
    assert any(p.startswith("SubnetLen: 31 is too long") for p in problems)
    assert validate_config(dual()) == []


def test_ctl_config_validate_accepts_what_the_agent_runs_and_refuses_what_it_refuses():
    from flannelpy.cli.flannelctl.config import check

    cfg, problems = check(dual())
    assert cfg is not None and cfg.enable_ipv6 and problems == []
    cfg, problems = check(dual(IPv6Network="fe80::/64", Backend={"Type": "udp"}))
    assert cfg is None and any(p.startswith(UDP_REFUSAL) for p in problems)
    assert any("link-local" in p for p in problems)