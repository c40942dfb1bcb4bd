"""flanneld's command line: Go flag syntax, FLANNELD_* fallback, usage errors (no root)."""

import re

import pytest

from flannelpy.agent import AgentOptions
from flannelpy.cli.flanneld import main as flanneld_main
from flannelpy.config.flags import FLAGS, HelpRequested, env_name, parse_flags, split_endpoints
from flannelpy.errors import FlannelError, UsageError


def parse(*argv, env=None):
    return parse_flags(list(argv), env or {})


def test_defaults_match_flanneld():
    f = parse()
    assert f["etcd-endpoints"] == "http://127.0.0.1:4001,http://127.0.0.1:2379"
    assert f["etcd-prefix"] == "/coreos.com/network"
    assert f["subnet-file"] == "/run/flannel/subnet.env"
    assert f["subnet-lease-renew-margin"] == 60
    assert f["iptables-resync"] == 5
    assert f["iptables-forward-rules"] is True
    assert f["ip-masq"] is False
    assert f["healthz-ip"] == "0.0.0.0"
    assert f["healthz-port"] == 0
    assert f["iface"] == [] and f["iface-regex"] == []
    assert f["etcd-api"] == "auto"
    assert f["docker-daemon-json"] == ""


@pytest.mark.parametrize("argv", [
    ["-etcd-prefix=/atomic.io/network"],
    ["--etcd-prefix=/atomic.io/network"],
    ["-etcd-prefix", "/atomic.io/network"],
    ["--etcd-prefix", "/atomic.io/network"],
])
def test_both_dash_styles_and_both_value_styles(argv):
    assert parse(*argv)["etcd-prefix"] == "/atomic.io/network"


def test_booleans():
    assert parse("-ip-masq")["ip-masq"] is True
    assert parse("--ip-masq=true")["ip-masq"] is True
    assert parse("-iptables-forward-rules=false")["iptables-forward-rules"] is False
    assert parse("-iptables-forward-rules=0")["iptables-forward-rules"] is False
    # Go: a boolean never takes the next word, so "false" here is a stray argument.
    with pytest.raises(UsageError, match="unexpected argument 'false'"):
        parse("-ip-masq", "false")
    with pytest.raises(UsageError, match='invalid boolean value "yes" for flag -ip-masq'):
        parse("-ip-masq=yes")


def test_repeatable_iface_keeps_order():
    f = parse("-iface=eth1", "--iface", "10.0.0.5", "-iface-regex=^en")
    assert f["iface"] == ["eth1", "10.0.0.5"]
    assert f["iface-regex"] == ["^en"]


def test_ints_and_bad_int():
    assert parse("-v=2")["v"] == 2
    assert parse("-healthz-port", "8471")["healthz-port"] == 8471
    with pytest.raises(UsageError, match='invalid value "abc" for flag -subnet-lease-renew-margin'):
        parse("-subnet-lease-renew-margin=abc")


def test_env_fallback_only_when_not_on_command_line():
    env = {"FLANNELD_ETCD_PREFIX": "/atomic.io/network", "FLANNELD_IP_MASQ": "true",
           "FLANNELD_IFACE": "eth1,eth2", "FLANNELD_SUBNET_FILE": "", "FLANNELD_HEALTHZ_PORT": "8471"}
    f = parse("-etcd-prefix=/cli", env=env)
    assert f["etcd-prefix"] == "/cli"  # command line wins
    assert f["ip-masq"] is True
    assert f["iface"] == ["eth1,eth2"]  # one entry, commas not split (coreos/pkg flagutil)
    assert f["subnet-file"] == "/run/flannel/subnet.env"  # empty env values are ignored
    assert f["healthz-port"] == 8471
    assert f.from_env == {"ip-masq", "iface", "healthz-port"}


def test_env_names():
    assert env_name("etcd-endpoints") == "FLANNELD_ETCD_ENDPOINTS"
    assert env_name("subnet-lease-renew-margin") == "FLANNELD_SUBNET_LEASE_RENEW_MARGIN"
    assert all(env_name(s.name).startswith("FLANNELD_") for s in FLAGS)


def test_bad_env_value_names_the_variable():
    with pytest.raises(UsageError, match="environment variable FLANNELD_IP_MASQ"):
        parse(env={"FLANNELD_IP_MASQ": "maybe"})


def test_version_is_checked_before_env():
    f = parse("-version", env={"FLANNELD_IP_MASQ": "maybe"})
    assert f["version"] is True


@pytest.mark.parametrize("argv,message", [
    (["-no-such-flag"], "flag provided but not defined: -no-such-flag"),
    (["-etcd-prefix"], "flag needs an argument: -etcd-prefix"),
    (["stray"], "unexpected argument 'stray'"),
    (["---ip-masq"], "bad flag syntax: ---ip-masq"),
    (["-=x"], "bad flag syntax: -=x"),
])
def test_usage_errors(argv, message):
    with pytest.raises(UsageError, match=message):
        parse(*argv)


def test_help():
    with pytest.raises(HelpRequested):
        parse("-h")
    with pytest.raises(HelpRequested):
        parse("--help")


def test_inactive_flags_are_accepted_and_reported():
    f = parse("-kube-api-url=https://k8s:6443", "-ip-blackhole-route")
    warnings = f.inactive_in_use()
    assert any("-kube-api-url" in w and "no effect" in w for w in warnings)
    assert any("-ip-blackhole-route" in w for w in warnings)
    assert parse().inactive_in_use() == []
    # -public-ipv6 works since dual stack (issue #14): not reported
    assert parse("-public-ipv6=fd00::1").inactive_in_use() == []


@pytest.mark.parametrize("argv,message", [
    (["-subnet-lease-renew-margin=0"], "between 1 and 1439"),
    (["-subnet-lease-renew-margin=1440"], "between 1 and 1439"),
    (["-iptables-resync=0"], "at least 1 second"),
    (["-healthz-port=70000"], "not a TCP port"),
    (["-etcd-api=v4"], "-etcd-api"),
    (["-etcd-endpoints=,"], "-etcd-endpoints"),
    (["-kube-subnet-mgr"], "Kubernetes"),
])
def test_option_checks(argv, message):
    with pytest.raises(FlannelError, match=message):
        AgentOptions.from_flags(parse(*argv))


def test_options_from_flags():
    opts = AgentOptions.from_flags(parse("-etcd-endpoints=http://a:2379, http://b:2379", "-ip-masq",
                                         "-ip-masq-fully-random-disable"))
    assert opts.etcd.endpoints == ("http://a:2379", "http://b:2379")
    assert opts.ip_masq and not opts.ip_masq_random_fully
    assert opts.renew_margin_min == 60


def test_main_exit_codes(capsys):
    assert flanneld_main(["-no-such-flag"]) == 2
    err = capsys.readouterr().err
    # one line naming the flag and where the list is, not 60 lines of usage
    assert err == "flanneld: flag provided but not defined: -no-such-flag (flanneld -help lists every flag)\n"
    assert flanneld_main(["-version"]) == 0
    assert capsys.readouterr().err.strip()  # version on stderr, as flanneld
    assert flanneld_main(["-subnet-lease-renew-margin=5000"]) == 1


def test_unexpected_errors_are_described_in_one_line_from_inside_groups():
    from flannelpy.cli.flanneld import describe_unexpected

    inner = OSError(30, "Read-only file system")
    group = BaseExceptionGroup("tasks", [ExceptionGroup("nested", [inner])])
    assert describe_unexpected(group) == "OSError: [Errno 30] Read-only file system"
    assert describe_unexpected(ValueError("two\nlines")) == "ValueError: two lines"
    assert describe_unexpected(RuntimeError()) == "RuntimeError"


@pytest.mark.parametrize("value,reason", [
    ("notaurl", "'notaurl' has no scheme; write it as http://notaurl"),
    ("127.0.0.1:2379", "write it as http://127.0.0.1:2379"),
    ("unix:///run/etcd.sock", "unix socket endpoints are not supported"),
    ("ftp://etcd:2379", "scheme 'ftp' is not supported"),
    ("http://", "has no host"),
    ("http://etcd:99999", "the port is not a number between 1 and 65535"),
    ("http://etcd:x", "the port is not a number"),
    ("http://good:2379,notaurl", "'notaurl' has no scheme"),
    (" , ", "empty; give at least one"),
])
def test_bad_etcd_endpoints_are_refused_when_parsed(value, reason):
    """flanneld -etcd-endpoints=notaurl used to retry forever; now the flag itself is refused."""
    with pytest.raises(UsageError, match=f'invalid value ".*" for flag -etcd-endpoints: .*{re.escape(reason)}'):
        parse(f"-etcd-endpoints={value}")
    with pytest.raises(UsageError, match="for environment variable FLANNELD_ETCD_ENDPOINTS"):
        parse(env={"FLANNELD_ETCD_ENDPOINTS": value})


def test_good_etcd_endpoints():
    f = parse("-etcd-endpoints=https://10.0.0.1:2379, http://[fd00::1]:2379,http://etcd.example")
    assert split_endpoints(f["etcd-endpoints"]) == ("https://10.0.0.1:2379", "http://[fd00::1]:2379",
                                                    "http://etcd.example")


def test_etcd_api_and_log_format_are_checked_when_parsed():
    with pytest.raises(UsageError, match='invalid value "v4" for flag -etcd-api: must be v3, v2 or auto'):
        parse("-etcd-api=v4")
    assert parse("-log-format=klog")["log-format"] == "klog"
    assert parse(env={"FLANNELD_LOG_FORMAT": "json"})["log-format"] == "json"
    assert parse()["log-format"] == "text"
    with pytest.raises(UsageError, match="must be text, klog or json"):
        parse("-log-format=xml")


def test_kube_subnet_mgr_is_refused_once_without_a_warning_first(capsys):
    f = parse("-kube-subnet-mgr", "-kube-api-url=https://k8s:6443")
    assert len(f.refusals()) == 1 and "Kubernetes mode is not supported" in f.refusals()[0]
    assert all("-kube-subnet-mgr" not in w for w in f.inactive_in_use())
    assert flanneld_main(["-kube-subnet-mgr", "-kube-api-url=https://k8s:6443"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line: no "accepted but has no effect" warning before it
    assert err.startswith("flanneld: -kube-subnet-mgr: Kubernetes mode is not supported")
    assert "without -kube-subnet-mgr, with -etcd-endpoints" in err  # and the fix
    assert parse("-kube-subnet-mgr=false").refusals() == []


def test_main_refuses_a_bad_endpoint_in_one_line(capsys):
    assert flanneld_main(["-etcd-endpoints=notaurl"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "write it as http://notaurl" in err
