"""The network config rules of flanneld's ParseConfig/CheckNetworkConfig, one by one (no root)."""

from ipaddress import IPv4Address, IPv4Network

import pytest

from flannelpy.backends import backend_class
from flannelpy.config.network import parse_config, validate_config
from flannelpy.errors import ConfigError, FlannelError


def test_classic_config_defaults_to_udp():
    c = parse_config('{"Network":"172.18.0.0/16"}')
    assert c.network == IPv4Network("172.18.0.0/16")
    assert c.backend_type == "udp" and c.backend_defaulted
    assert c.subnet_len == 24
    assert c.subnet_min == IPv4Address("172.18.1.0")  # the first subnet is skipped
    assert c.subnet_max == IPv4Address("172.18.255.0")  # the last subnet


@pytest.mark.parametrize("network,subnet_len,smin,smax", [
    ("10.0.0.0/8", 24, "10.0.1.0", "10.255.255.0"),
    ("10.5.0.0/22", 24, "10.5.1.0", "10.5.3.0"),
    ("10.5.0.0/23", 25, "10.5.0.128", "10.5.1.128"),
    ("10.5.0.0/26", 28, "10.5.0.16", "10.5.0.48"),
    ("10.5.0.0/28", 30, "10.5.0.4", "10.5.0.12"),
])
def test_subnet_len_default_and_bounds(network, subnet_len, smin, smax):
    c = parse_config(f'{{"Network":"{network}","Backend":{{"Type":"vxlan"}}}}')
    assert (c.subnet_len, str(c.subnet_min), str(c.subnet_max)) == (subnet_len, smin, smax)


def test_network_is_masked_like_parsecidr():
    assert parse_config('{"Network":"10.1.1.0/16"}').network == IPv4Network("10.1.0.0/16")


def test_keys_are_case_insensitive_and_unknown_keys_ignored():
    c = parse_config('{"network":"10.5.0.0/16","Subnetlen":26,"SUBNETMIN":"10.5.1.0","Comment":"x",'
                     '"backend":{"type":"VXLAN","vni":7,"PORT":4789}}')
    assert c.subnet_len == 26 and c.subnet_min == IPv4Address("10.5.1.0")
    assert c.backend_type == "vxlan"  # lower-cased before lookup
    assert c.backend_option("VNI", int, 1) == 7
    assert c.backend_option("Port", int, 0) == 4789


def test_explicit_min_max():
    c = parse_config('{"Network":"10.5.0.0/16","SubnetMin":"10.5.10.0","SubnetMax":"10.5.20.0"}')
    assert (str(c.subnet_min), str(c.subnet_max)) == ("10.5.10.0", "10.5.20.0")
    assert c.contains_subnet(IPv4Network("10.5.15.0/24"))
    assert not c.contains_subnet(IPv4Network("10.5.21.0/24"))
    assert not c.contains_subnet(IPv4Network("10.5.15.0/25"))


@pytest.mark.parametrize("text,names", [
    ('not json', "not valid JSON"),
    ('[1,2]', "must be a JSON object, got array"),
    ('{}', "Network: missing"),
    ('{"Network":null}', "Network: missing"),
    ('{"Network":42}', "Network"),
    ('{"Network":"10.5.0.0"}', "has no prefix length"),
    ('{"Network":"10.5.0.300/16"}', "'10.5.0.300/16' is not a CIDR"),
    ('{"Network":"fd00::/48"}', "is not IPv4"),
    ('{"Network":"10.5.0.0/29"}', "too small. Minimum useful network prefix is /28"),
    ('{"Network":"10.5.0.0/16","SubnetLen":31}', "SubnetLen: 31 is too long"),
    ('{"Network":"10.5.0.0/16","SubnetLen":17}', "SubnetLen: /17 is too short"),
    ('{"Network":"10.5.0.0/16","SubnetLen":"24"}', "SubnetLen"),
    ('{"Network":"10.5.0.0/16","SubnetMin":"10.6.0.0"}', "SubnetMin: 10.6.0.0 is not in Network"),
    ('{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.7"}', "SubnetMin is not on a SubnetLen boundary: 10.5.1.7"),
    ('{"Network":"10.5.0.0/16","SubnetMax":"10.5.1.7"}', "SubnetMax is not on a SubnetLen boundary"),
    ('{"Network":"10.5.0.0/16","SubnetMin":"banana"}', "SubnetMin"),
    ('{"Network":"10.5.0.0/16","SubnetMin":"10.5.9.0","SubnetMax":"10.5.8.0"}', "SubnetMin: 10.5.9.0 is above"),
    ('{"Network":"10.5.0.0/16","Backend":"vxlan"}', "Backend: expected an object"),
    ('{"Network":"10.5.0.0/16","Backend":{}}', "Backend.Type: missing"),
    ('{"Network":"10.5.0.0/16","Backend":{"Type":7}}', "Type"),
    ('{"Network":"10.5.0.0/16","EnableIPv6":true}', "EnableIPv6"),
    ('{"Network":"10.5.0.0/16","EnableIPv4":false}', "EnableIPv4"),
])
def test_every_error_names_the_field(text, names):
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert names in str(info.value)


def test_validate_reports_every_problem():
    problems = validate_config('{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.7","SubnetMax":"10.9.0.0",'
                               '"Backend":{}}')
    text = "\n".join(map(str, problems))
    assert len(problems) == 3
    assert "SubnetMin" in text and "SubnetMax" in text and "Backend.Type" in text
    assert validate_config('{"Network":"10.5.0.0/16"}') == []


def test_unknown_backend_type_is_named():
    c = parse_config('{"Network":"10.5.0.0/16","Backend":{"Type":"geneve"}}')
    with pytest.raises(FlannelError, match="geneve"):
        backend_class(c.backend_type)


@pytest.mark.parametrize("name", ["a.b", "../vxlan", "vxlan.backend", "base", "repair", "", "udp\n"])
def test_a_type_that_is_no_backend_folder_is_named_not_imported(name):
    # The registry looks the type's folder up by name: a dotted or odd name must not reach the
    # import system as a module path (ModuleNotFoundError), nor a module that is no backend load.
    with pytest.raises(FlannelError, match="unknown backend type"):
        backend_class(name)


@pytest.mark.parametrize("name", ["vxlan", "udp", "host-gw", "alloc"])
def test_known_backends_are_registered(name):
    assert backend_class(name).name == name


def test_validate_refuses_what_the_agent_refuses():
    """`flannelctl config validate` runs the agent's own checks: the config, then the backend type."""
    from flannelpy.cli.flannelctl.config import check

    for text, message in [
        ('{"Network":"10.5.0.0/16","Backend":{"Type":"geneve"}}', "Backend.Type: unknown backend type: 'geneve'"),
        ('{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","VNI":1e400}}', "Backend.VNI: expected an integer, got 1e400"),
        ('{"Network":"10.5.0.0/16","SubnetLen":1e400}', "SubnetLen: expected a non-negative integer, got 1e400"),
        ('{"Network":"127.0.0.0/16"}', "Network: 127.0.0.0/16 overlaps loopback"),
    ]:
        cfg, problems = check(text)
        assert cfg is None and any(message in p for p in problems), (text, problems)
        with pytest.raises(FlannelError, match=message.replace(".", r"\.").replace("(", r"\(")):
            backend_class(parse_config(text).backend_type)
    cfg, problems = check('{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","VNI":4096,"MTU":9000}}')
    assert problems == [] and cfg.backend_option("VNI", int, 1) == 4096
