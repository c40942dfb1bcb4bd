"""subnet.env with EnableIPv6 (issue #14): flanneld's WriteSubnetFile bytes and reading them back (no root)."""

from ipaddress import IPv4Network, IPv6Network

import pytest

from flannelpy.subnet.envfile import (
    PreviousEnv,
    SubnetEnv,
    read_previous,
    read_previous_env,
    render_subnet_env,
    subnet_env_matches,
    write_subnet_env,
)

ISSUE_ENV = SubnetEnv(network=IPv4Network("10.42.0.0/16"), subnet=IPv4Network("10.42.63.0/24"), mtu=1450,
                      ipmasq=True, ipv6_network=IPv6Network("fd42::/48"),
                      ipv6_subnet=IPv6Network("fd42:0:0:1f::/64"))


def test_issue_subnet_env_byte_for_byte():
    # flanneld v0.20.2 in issue #14: the IPv6 lines between FLANNEL_SUBNET and FLANNEL_MTU.
    assert render_subnet_env(ISSUE_ENV) == (
        "FLANNEL_NETWORK=10.42.0.0/16\n"
        "FLANNEL_SUBNET=10.42.63.1/24\n"
        "FLANNEL_IPV6_NETWORK=fd42::/48\n"
        "FLANNEL_IPV6_SUBNET=fd42:0:0:1f::1/64\n"
        "FLANNEL_MTU=1450\n"
        "FLANNEL_IPMASQ=true\n"
    )


def test_reference_example_and_other_lengths():
    env = SubnetEnv(network=IPv4Network("10.5.0.0/16"), subnet=IPv4Network("10.5.72.0/24"), mtu=1450, ipmasq=False,
                    ipv6_network=IPv6Network("2001:cafe:42::/56"), ipv6_subnet=IPv6Network("2001:cafe:42::/64"))
    lines = render_subnet_env(env).splitlines()
    assert lines[2:4] == ["FLANNEL_IPV6_NETWORK=2001:cafe:42::/56", "FLANNEL_IPV6_SUBNET=2001:cafe:42::1/64"]
    env = SubnetEnv(network=IPv4Network("10.5.0.0/16"), subnet=IPv4Network("10.5.72.0/24"), mtu=1450, ipmasq=False,
                    ipv6_network=IPv6Network("fd00::/120"), ipv6_subnet=IPv6Network("fd00::40/122"))
    assert render_subnet_env(env).splitlines()[3] == "FLANNEL_IPV6_SUBNET=fd00::41/122"


def test_v4_only_has_no_ipv6_lines():
    env = SubnetEnv(network=IPv4Network("10.42.0.0/16"), subnet=IPv4Network("10.42.63.0/24"), mtu=1450, ipmasq=True)
    assert "IPV6" not in render_subnet_env(env)


def test_ipv6_network_and_subnet_go_together():
    with pytest.raises(ValueError, match="both or neither"):
        SubnetEnv(network=IPv4Network("10.42.0.0/16"), subnet=IPv4Network("10.42.63.0/24"), mtu=1450, ipmasq=True,
                  ipv6_subnet=IPv6Network("fd42:0:0:1f::/64"))


def test_written_file_reads_back_as_the_previous_pair(tmp_path):
    path = str(tmp_path / "subnet.env")
    write_subnet_env(path, ISSUE_ENV)
    assert subnet_env_matches(path, ISSUE_ENV)
    assert read_previous_env(path) == PreviousEnv(IPv4Network("10.42.0.0/16"), IPv4Network("10.42.63.0/24"),
                                                  IPv6Network("fd42::/48"), IPv6Network("fd42:0:0:1f::/64"))
    assert read_previous(path) == (IPv4Network("10.42.0.0/16"), IPv4Network("10.42.63.0/24"))


@pytest.mark.parametrize("text, v6net, v6sub", [
    ("FLANNEL_IPV6_NETWORK=fd42::/48\nFLANNEL_IPV6_SUBNET=fd42:0:0:1f::1/64\n", "fd42::/48", "fd42:0:0:1f::/64"),
    ('export FLANNEL_IPV6_SUBNET="fd42:0:0:1f::1/64"  \n# comment\n', None, "fd42:0:0:1f::/64"),  # godotenv
    ("FLANNEL_IPV6_SUBNET=fd42:0:0:1f::1/64,fd43::1/64\n", None, None),  # multi-valued: ignored, as flanneld
    ("FLANNEL_IPV6_SUBNET=10.42.63.1/24\nFLANNEL_IPV6_NETWORK=banana\n", None, None),
    ("FLANNEL_IPV6_SUBNET=\n", None, None),
    ("FLANNEL_SUBNET=fd42:0:0:1f::1/64\n", None, None),  # an IPv6 value where IPv4 belongs is not taken
])
def test_read_previous_ipv6_values(tmp_path, text, v6net, v6sub):
    path = tmp_path / "subnet.env"
    path.write_text(text)
    prev = read_previous_env(str(path))
    assert prev.ipv6_network == (IPv6Network(v6net) if v6net else None)
    assert prev.ipv6_subnet == (IPv6Network(v6sub) if v6sub else None)
    assert prev.subnet is None


def test_absent_or_unreadable_file_is_no_previous(tmp_path):
    assert read_previous_env(str(tmp_path / "missing.env")) == PreviousEnv()
    assert read_previous_env(str(tmp_path)) == PreviousEnv()  # a directory: unreadable as a file
