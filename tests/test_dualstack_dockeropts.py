"""mk-docker-opts.sh with a dual-stack subnet.env (issue #14), and the IPv6 Docker flags (pure, no root).

flannel's dist/mk-docker-opts.sh maps FLANNEL_SUBNET, FLANNEL_MTU and FLANNEL_IPMASQ only, at every
version up to HEAD: sourcing FLANNEL_IPV6_* changes nothing in what it writes.  So by default the
reproduction writes the same bytes for a dual-stack subnet.env as for the IPv4 lines alone.
"""

import pytest

from flannelpy.cli.flannelctl.docker_opts import run
from flannelpy.docker.opts import DockerOptsError, Options, ipv6_docker_opt, parse_args, render
from flannelpy.subnet.envfile import parse_env_file

V4_LINES = "FLANNEL_NETWORK=10.42.0.0/16\nFLANNEL_SUBNET=10.42.63.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
DUAL = ("FLANNEL_NETWORK=10.42.0.0/16\nFLANNEL_SUBNET=10.42.63.1/24\nFLANNEL_IPV6_NETWORK=fd42::/48\n"
        "FLANNEL_IPV6_SUBNET=fd42:0:0:1f::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")


@pytest.mark.parametrize("flags", [[], ["-i"], ["-c"], ["-m"], ["-k", "DOCKER_NETWORK_OPTIONS"]])
def test_dual_stack_env_gives_what_the_script_gives_byte_for_byte(flags):
    opts = parse_args(flags)
    assert not opts.ipv6
    assert render(opts, {}, parse_env_file(DUAL)) == render(opts, {}, parse_env_file(V4_LINES))


def test_dual_stack_env_through_flannelctl(tmp_path):
    src, dst = tmp_path / "subnet.env", tmp_path / "docker_opts.env"
    src.write_text(DUAL)
    assert run(["-f", str(src), "-d", str(dst)], environ={}) == 0
    assert dst.read_text() == ('DOCKER_OPT_BIP="--bip=10.42.63.1/24"\nDOCKER_OPT_IPMASQ="--ip-masq=false"\n'
                               'DOCKER_OPT_MTU="--mtu=1450"\nDOCKER_OPTS=" --bip=10.42.63.1/24 --ip-masq=false --mtu=1450"\n')


def test_ipv6_extension_adds_docker_opt_ipv6_in_name_order():
    text = render(Options(ipv6=True), {}, parse_env_file(DUAL))
    assert text == (
        'DOCKER_OPT_BIP="--bip=10.42.63.1/24"\n'
        'DOCKER_OPT_IPMASQ="--ip-masq=false"\n'
        'DOCKER_OPT_IPV6="--ipv6 --fixed-cidr-v6=fd42:0:0:1f::/64"\n'
        'DOCKER_OPT_MTU="--mtu=1450"\n'
        'DOCKER_OPTS=" --bip=10.42.63.1/24 --ip-masq=false --ipv6 --fixed-cidr-v6=fd42:0:0:1f::/64 --mtu=1450"\n'
    )
    # nothing to add without an IPv6 subnet
    assert render(Options(ipv6=True), {}, parse_env_file(V4_LINES)) == render(Options(), {}, parse_env_file(V4_LINES))


@pytest.mark.parametrize("value, opt", [
    ("fd42:0:0:1f::1/64", "--ipv6 --fixed-cidr-v6=fd42:0:0:1f::/64"),
    ("2001:cafe:42::1/64", "--ipv6 --fixed-cidr-v6=2001:cafe:42::/64"),
    ("fd00::41/122", "--ipv6 --fixed-cidr-v6=fd00::40/122"),
])
def test_fixed_cidr_v6_is_the_subnet_of_flannel_ipv6_subnet(value, opt):
    assert ipv6_docker_opt(value) == opt


@pytest.mark.parametrize("value", ["fd42:0:0:1f::1", "10.42.63.1/24", "banana", "fd42::1/129", "fd42::1/64 x"])
def test_bad_flannel_ipv6_subnet_is_named_in_one_line(value):
    with pytest.raises(DockerOptsError) as info:
        render(Options(ipv6=True), {}, {"FLANNEL_IPV6_SUBNET": value})
    assert str(info.value) == f"Invalid value of FLANNEL_IPV6_SUBNET: {value}\n"
