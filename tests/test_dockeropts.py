"""mk-docker-opts.sh reproduction: flannel's own expected outputs (dist/mk_docker_opts_test.go)."""

import os
import subprocess
import sys

import pytest

from flannelpy.cli.flannelctl.docker_opts import run
from flannelpy.docker.opts import DockerOptsError, Options, parse_args, render, route_conflict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"

CASES = {
    (): 'DOCKER_OPT_BIP="--bip=10.1.74.1/24"\nDOCKER_OPT_IPMASQ="--ip-masq=true"\nDOCKER_OPT_MTU="--mtu=1472"\n'
    'DOCKER_OPTS=" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"\n',
    ("-i",): 'DOCKER_OPT_BIP="--bip=10.1.74.1/24"\nDOCKER_OPT_IPMASQ="--ip-masq=true"\nDOCKER_OPT_MTU="--mtu=1472"\n',
    ("-c",): 'DOCKER_OPTS=" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"\n',
    ("-k", "CUSTOM_KEY"): 'DOCKER_OPT_BIP="--bip=10.1.74.1/24"\nDOCKER_OPT_IPMASQ="--ip-masq=true"\nDOCKER_OPT_MTU="--mtu=1472"\n'
    'CUSTOM_KEY=" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"\n',
    ("-m",): 'DOCKER_OPT_BIP="--bip=10.1.74.1/24"\nDOCKER_OPT_MTU="--mtu=1472"\nDOCKER_OPTS=" --bip=10.1.74.1/24 --mtu=1472"\n',
}


@pytest.fixture
def files(tmp_path):
    env = tmp_path / "subnet.env"
    env.write_text(SAMPLE)
    return str(env), str(tmp_path / "docker_opts.env")


@pytest.mark.parametrize("flags", list(CASES))
def test_reference_examples_through_the_wrapper_script(files, flags):
    src, dst = files
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": REPO}  # no DOCKER_OPTS etc. inherited
    proc = subprocess.run(
        ["sh", os.path.join(REPO, "etc", "mk-docker-opts.sh"), "-f", src, "-d", dst, *flags],
        env=env, cwd=REPO, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert open(dst).read() == CASES[flags]


def test_ipmasq_true_disables_docker_masquerade(files):
    src, dst = files
    open(src, "w").write(SAMPLE.replace("IPMASQ=false", "IPMASQ=true"))
    assert run(["-f", src, "-d", dst, "-i"], environ={}) == 0
    assert 'DOCKER_OPT_IPMASQ="--ip-masq=false"\n' in open(dst).read()


def test_combined_starts_with_environment_value_of_key(files):
    src, dst = files
    assert run(["-f", src, "-d", dst, "-c", "-k", "DOCKER_NETWORK_OPTIONS"], environ={"DOCKER_NETWORK_OPTIONS": "--debug"}) == 0
    assert open(dst).read() == 'DOCKER_NETWORK_OPTIONS="--debug  --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"\n'


def test_environment_prefills_flannel_vars_and_extra_docker_opt_vars(tmp_path):
    dst = str(tmp_path / "out.env")
    environ = {"FLANNEL_SUBNET": "10.9.9.1/24", "DOCKER_OPT_AAA": "--x"}
    assert run(["-f", str(tmp_path / "missing.env"), "-d", dst], environ=environ) == 0
    assert open(dst).read() == 'DOCKER_OPT_AAA="--x"\nDOCKER_OPT_BIP="--bip=10.9.9.1/24"\nDOCKER_OPTS=" --x --bip=10.9.9.1/24"\n'


def test_bad_ipmasq_is_exit_1_and_nothing_written(files, capsys):
    src, dst = files
    open(src, "w").write(SAMPLE.replace("IPMASQ=false", "IPMASQ=yes"))
    assert run(["-f", src, "-d", dst], environ={}) == 1
    assert capsys.readouterr().err == "Invalid value of FLANNEL_IPMASQ: yes\n"
    assert not os.path.exists(dst)


@pytest.mark.parametrize("argv", [["-h"], ["-?"], ["-x"], ["-f"], ["-ic", "-q"]])
def test_usage_is_exit_1(argv, capsys, tmp_path):
    assert run(argv, environ={}) == 1
    assert "Generate Docker daemon options based on flannel env file" in capsys.readouterr().err


def test_getopts_parsing():
    assert parse_args(["-ic", "-fX", "-k", "K", "-m", "-d", "D"]) == Options("X", "D", True, True, "K", False)
    assert parse_args(["-i"]) == Options(indiv=True, combined=False)
    assert parse_args(["-c", "--", "-i"]) == Options(indiv=False, combined=True)  # stops at --
    assert parse_args(["operand", "-i"]) == Options()


def test_render_pure_without_file():
    assert render(Options(), {}, None) == 'DOCKER_OPTS=""\n'
    with pytest.raises(DockerOptsError):
        render(Options(), {}, {"FLANNEL_IPMASQ": "TRUE"})


def test_route_conflict():
    routes = "default via 192.168.1.1 dev eth0\n10.1.74.0/24 via 192.168.1.7 dev eth0\n10.1.0.0/16 dev flannel.1\n"
    assert route_conflict("10.1.74.1/24", routes) == (
        "Your routing table already contains the subnet: 10.1.74.0/24 via 192.168.1.7 dev eth0\n"
    )
    assert route_conflict("10.1.74.1/24", "10.1.74.0/24 dev docker0 proto kernel scope link\n") is None
    assert route_conflict("", routes) is None


def test_flannelctl_subcommand_passes_dash_options(files):
    src, dst = files
    proc = subprocess.run(
        [sys.executable, "-m", "flannelpy.cli.flannelctl", "docker-opts", "-f", src, "-d", dst, "-c"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "DOCKER_OPTS": ""},
    )
    assert proc.returncode == 0, proc.stderr
    assert open(dst).read() == CASES[("-c",)]
