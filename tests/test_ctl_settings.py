"""flannelctl reads flanneld's etcd settings where they live: FLANNELD_* and /etc/sysconfig/flanneld.

Pure parsing and precedence first (no root, no etcd), then `flannelctl leases` and `config get` as a user on
an RHEL-style host runs them: no flags at all, against a real etcd holding an /atomic.io/network network.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from flannelpy.cli.flannelctl import main
from flannelpy.cli.flannelctl._flanneld_settings import parse_environment_file, resolve

SYSCONFIG = """# Flanneld configuration options
FLANNEL_ETCD_ENDPOINTS="{endpoints}"
FLANNEL_ETCD_PREFIX="/atomic.io/network"
#FLANNEL_OPTIONS=""
"""
CONFIG = '{"Network":"172.18.0.0/16","Backend":{"Type":"vxlan"}}'
LEASE = '{"PublicIP":"192.0.2.1","BackendType":"vxlan","BackendData":{"VtepMAC":"02:00:00:00:00:01"}}'


def test_environment_file_syntax():
    text = ("# comment\n; also a comment\nA=1\nB=\"two words\"\nC='single $quoted'\n  D = spaced  \n"
            "E=\"esc \\\"q\\\"\"\nF=con\\\ntinued\nnot a line\nA=later\nexport G=g\n")
    assert parse_environment_file(text) == {"A": "later", "B": "two words", "C": "single $quoted", "D": "spaced",
                                            "E": 'esc "q"', "F": "continued", "G": "g"}


def test_precedence_defaults_file_environment():
    path = "/etc/sysconfig/flanneld"
    s = resolve({}, None, path)
    assert s.value("etcd-prefix") == "/coreos.com/network" and s.source("etcd-prefix") == "default"
    assert s.value("etcd-endpoints") == "http://127.0.0.1:4001,http://127.0.0.1:2379"

    text = SYSCONFIG.format(endpoints="http://10.0.0.10:2379") + \
        'FLANNEL_OPTIONS="-iface=eth1 -ip-masq -etcd-cafile=/etc/etcd/ca.pem --etcd-api v2"\n'
    s = resolve({}, text, path)
    assert s.value("etcd-endpoints") == "http://10.0.0.10:2379"
    assert s.source("etcd-endpoints") == f"{path} (FLANNEL_ETCD_ENDPOINTS)"
    assert s.value("etcd-prefix") == "/atomic.io/network" and s.source("etcd-prefix") == f"{path} (FLANNEL_ETCD_PREFIX)"
    assert s.value("etcd-cafile") == "/etc/etcd/ca.pem" and s.source("etcd-cafile") == f"{path} (FLANNEL_OPTIONS)"
    assert s.value("etcd-api") == "v2"
    assert s.warnings == []

    # this shell's FLANNELD_* beats the file; the file's other settings stay
    s = resolve({"FLANNELD_ETCD_PREFIX": "/mine"}, text, path)
    assert s.value("etcd-prefix") == "/mine" and s.source("etcd-prefix") == "FLANNELD_ETCD_PREFIX"
    assert s.value("etcd-endpoints") == "http://10.0.0.10:2379"


def test_older_names_and_flanneld_lines_in_the_file():
    s = resolve({}, "FLANNEL_ETCD=http://e:4001\nFLANNEL_ETCD_KEY=/old/network\nFLANNELD_ETCD_USERNAME=u\n", "F")
    assert s.value("etcd-endpoints") == "http://e:4001" and s.source("etcd-endpoints") == "F (FLANNEL_ETCD)"
    assert s.value("etcd-prefix") == "/old/network" and s.value("etcd-username") == "u"
    assert s.source("etcd-username") == "F (FLANNELD_ETCD_USERNAME)"


def test_a_broken_file_or_variable_is_a_warning_not_a_failure():
    s = resolve({}, 'FLANNEL_ETCD_ENDPOINTS=notaurl\nFLANNEL_ETCD_PREFIX=/p\n', "F")
    assert s.value("etcd-prefix") == "/coreos.com/network"  # flanneld would refuse the file: not used
    assert len(s.warnings) == 1 and "flanneld would refuse these settings" in s.warnings[0]
    s = resolve({}, 'FLANNEL_OPTIONS="-iface=\'eth1"\n', "F")
    assert "cannot be split into words" in s.warnings[0]
    s = resolve({"FLANNELD_ETCD_API": "v9"}, None, "F")
    assert s.value("etcd-api") == "auto" and "FLANNELD_ETCD_API" in s.warnings[0]


@pytest.fixture
def rhel_host(etcd, tmp_path, monkeypatch):
    """An etcd holding an /atomic.io/network network, and a sysconfig file pointing at it."""
    etcd.etcdctl("put", "/atomic.io/network/config", CONFIG)
    etcd.etcdctl("put", "/atomic.io/network/subnets/172.18.5.0-24", LEASE)
    path = tmp_path / "flanneld"
    path.write_text(SYSCONFIG.format(endpoints=etcd.endpoint))
    monkeypatch.setenv("FLANNELCTL_SYSCONFIG", str(path))
    for name in list(os.environ):
        if name.startswith("FLANNELD_"):
            monkeypatch.delenv(name)
    return etcd, path


def test_leases_and_config_need_no_flags_on_an_rhel_host(rhel_host, capsys):
    etcd, path = rhel_host
    assert main(["leases"]) == 0
    assert "172.18.5.0/24" in capsys.readouterr().out
    assert main(["config", "get"]) == 0
    assert capsys.readouterr().out.strip() == CONFIG
    # --help says where each default came from
    with pytest.raises(SystemExit):
        main(["leases", "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps long paths at their hyphens
    assert f"default/atomic.io/network,from{path}(FLANNEL_ETCD_PREFIX)" in text


def test_flags_beat_the_environment_which_beats_the_file(rhel_host, capsys, monkeypatch):
    etcd, _ = rhel_host
    etcd.etcdctl("put", "/env/network/config", '{"Network":"10.9.0.0/16"}')
    monkeypatch.setenv("FLANNELD_ETCD_PREFIX", "/env/network")
    assert main(["config", "get"]) == 0
    assert "10.9.0.0/16" in capsys.readouterr().out
    assert main(["config", "get", "--etcd-prefix", "/atomic.io/network"]) == 0
    assert "172.18.0.0/16" in capsys.readouterr().out


def test_unreachable_endpoint_from_the_file_is_named(tmp_path, monkeypatch, capsys):
    path = tmp_path / "flanneld"
    path.write_text(SYSCONFIG.format(endpoints="http://127.0.0.1:9"))
    monkeypatch.setenv("FLANNELCTL_SYSCONFIG", str(path))
    monkeypatch.delenv("FLANNELD_ETCD_ENDPOINTS", raising=False)
    assert main(["leases"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"endpoints from {path} (FLANNEL_ETCD_ENDPOINTS)" in err and "--etcd-endpoints" in err


def test_entry_point_reads_the_file_too(rhel_host):
    _, path = rhel_host
    r = subprocess.run([sys.executable, "-m", "flannelpy.cli.flannelctl", "leases", "--json"],
                       capture_output=True, text=True, timeout=60, env=dict(os.environ, FLANNELCTL_SYSCONFIG=str(path)))
    assert r.returncode == 0, r.stderr
    assert '"172.18.5.0/24"' in r.stdout
