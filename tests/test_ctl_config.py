"""flannelctl config get/set/validate against a real etcd, through v3 and v2."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from flannelpy.cli.flannelctl import main

PREFIX = "/coreos.com/network"
GOOD = '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","VNI":4}}'
# three independent problems: bad SubnetMin, bad SubnetMax, Backend without Type
BAD = '{"Network":"10.5.0.0/16","SubnetMin":"10.6.0.0","SubnetMax":"10.5.3.7","Backend":{"VNI":1}}'


def ep(etcd, *extra):
    return ["--etcd-endpoints", etcd.endpoint, *extra]


def v3_get(etcd, key=f"{PREFIX}/config"):
    return etcd.etcdctl("get", "--print-value-only", key).stdout.strip()


def v2_get(etcd, key=f"{PREFIX}/config"):
    r = etcd.etcdctl("get", key, api=2, check=False)
    return r.stdout.strip() if r.returncode == 0 else None


@pytest.mark.parametrize("api", ["v3", "v2"])
def test_set_then_get_and_validate(etcd, capsys, api):
    assert main(["config", "set", *ep(etcd, "--etcd-api", api), GOOD]) == 0
    out = capsys.readouterr().out
    assert f"etcd {api} API" in out and "Network 10.5.0.0/16" in out
    written = v3_get(etcd) if api == "v3" else v2_get(etcd)
    assert written == GOOD
    # the other keyspace is untouched
    assert (v2_get(etcd) if api == "v3" else v3_get(etcd)) in (None, "")

    assert main(["config", "get", *ep(etcd, "--etcd-api", api)]) == 0
    assert capsys.readouterr().out.strip() == GOOD
    # auto finds it wherever it is
    assert main(["config", "get", *ep(etcd)]) == 0
    assert capsys.readouterr().out.strip() == GOOD

    assert main(["config", "get", "--json", *ep(etcd, "--etcd-api", api)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["SubnetLen"] == 24 and doc["SubnetMin"] == "10.5.1.0" and doc["SubnetMax"] == "10.5.255.0"
    assert doc["Backend"] == {"Type": "vxlan", "VNI": 4}

    assert main(["config", "validate", *ep(etcd, "--etcd-api", api)]) == 0
    assert capsys.readouterr().out.strip() == (
        "valid: Network 10.5.0.0/16, SubnetLen 24, SubnetMin 10.5.1.0 .. SubnetMax 10.5.255.0 "
        "(255 subnets), backend vxlan")


@pytest.mark.parametrize("api", ["v3", "v2", "auto"])
def test_set_refuses_invalid_and_lists_every_problem(etcd, capsys, api):
    assert main(["config", "set", *ep(etcd, "--etcd-api", api), BAD]) == 1
    err = capsys.readouterr().err
    assert "3 problems" in err and "SubnetMin" in err and "SubnetMax" in err and "Backend.Type" in err
    assert "not written" in err
    assert v3_get(etcd) == "" and v2_get(etcd) is None


def test_set_from_stdin(etcd, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(GOOD + "\n"))
    assert main(["config", "set", *ep(etcd, "--etcd-api", "v2"), "-"]) == 0
    assert v2_get(etcd) == GOOD


def test_auto_set_writes_where_the_config_is(etcd, capsys):
    etcd.etcdctl("mk", f"{PREFIX}/config", '{"Network":"10.9.0.0/16"}', api=2)
    assert main(["config", "set", *ep(etcd), GOOD]) == 0
    assert v2_get(etcd) == GOOD and v3_get(etcd) == ""
    # nowhere yet: v3
    assert main(["config", "set", *ep(etcd, "--etcd-prefix", "/atomic.io/network"), GOOD]) == 0
    assert v3_get(etcd, "/atomic.io/network/config") == GOOD


def test_get_missing_names_both_apis_and_commands(etcd, capsys):
    assert main(["config", "get", *ep(etcd, "--etcd-prefix", "/x/net")]) == 1
    err = capsys.readouterr().err
    assert "v3: no key /x/net/config" in err and "v2: no key /x/net/config" in err
    assert "put /x/net/config '" in err and "ETCDCTL_API=2 etcdctl" in err and "mk /x/net/config '" in err


def test_validate_file_and_stdin(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.json"
    bad.write_text(BAD)
    assert main(["config", "validate", str(bad)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"{bad}: invalid config (3 problems):")
    assert out.count("\n  - ") == 3

    monkeypatch.setattr(sys, "stdin", io.StringIO('{"Network":"10.1.0.0/24"}'))
    assert main(["config", "validate", "-"]) == 0
    assert capsys.readouterr().out.strip() == (
        "valid: Network 10.1.0.0/24, SubnetLen 26, SubnetMin 10.1.0.64 .. SubnetMax 10.1.0.192 "
        "(3 subnets), backend udp (no Backend given: udp)")

    assert main(["config", "validate", str(tmp_path / "missing.json")]) == 1
    assert "missing.json" in capsys.readouterr().err


def test_invalid_in_etcd_is_reported(etcd, capsys):
    etcd.etcdctl("mk", f"{PREFIX}/config", "{not json", api=2)
    assert main(["config", "validate", *ep(etcd)]) == 1
    out = capsys.readouterr().out
    assert f"{PREFIX}/config (etcd v2): invalid config (1 problem)" in out and "not valid JSON" in out


def test_subprocess_entry_point(etcd):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo)
    r = subprocess.run([sys.executable, "-m", "flannelpy.cli.flannelctl", "config", "set", *ep(etcd), "-"],
                       input=GOOD, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "flannelpy.cli.flannelctl", "config", "get", "--etcd-api", "v4",
                        *ep(etcd)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "v4" in r.stderr


# --- issue 13: validation is the agent's, inline JSON, errors that say what is wrong ---------------------

@pytest.mark.parametrize("config,problem", [
    ('{"Network":"10.5.0.0/16","Backend":{"Type":"bogus"}}', "unknown backend type: 'bogus'"),
    ('{"Network":"10.5.0.0/16","Backend":{"Type":"wireguard"}}', "unknown backend type: 'wireguard'"),
    ('{"Network":"10.5.0.0/16","Backend":{"Type":"ipip"}}', "unknown backend type: 'ipip'"),
    ('{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","VNI":"x"}}', 'Backend.VNI: expected an integer, got "x"'),
    ('{"Network":"10.5.0.0/16","Backend":{"Type":"udp","Port":70000}}', "Backend.Port: 70000 is out of range"),
    ('{"Network":"10.5.0.0/16","Backend":{"Type":"udp","Port":"x"}}', 'Backend.Port: expected an integer, got "x"'),
])
def test_validate_refuses_what_every_agent_refuses(capsys, config, problem):
    """Inline JSON, as the README shows it; each of these was once reported `valid`."""
    assert main(["config", "validate", config]) == 1
    out = capsys.readouterr().out
    assert out.startswith("argument: invalid config (1 problem):") and problem in out


def test_validate_reports_every_problem_at_once_including_the_backend_type(capsys):
    assert main(["config", "validate", '{"Network":"10.5.0.0/16","SubnetLen":33,"Backend":{"Type":"ipip"}}']) == 1
    out = capsys.readouterr().out
    assert "(2 problems)" in out and "SubnetLen: 33" in out and "unknown backend type: 'ipip'" in out


def test_readme_validate_example_works(capsys):
    assert main(["config", "validate", '{"Network":"10.5.0.0/16","SubnetLen":33}']) == 1
    out = capsys.readouterr()
    assert out.out.startswith("argument: invalid config (1 problem):") and "SubnetLen" in out.out
    assert "No such file" not in out.err


def test_set_refuses_a_bogus_backend_and_writes_nothing(etcd, capsys):
    assert main(["config", "set", *ep(etcd), '{"Network":"10.5.0.0/16","Backend":{"Type":"bogus"}}']) == 1
    assert "unknown backend type: 'bogus'" in capsys.readouterr().err
    assert v3_get(etcd) == "" and v2_get(etcd) is None


def test_v2_against_an_etcd_without_v2_says_so(capsys):
    from etcd_server import EtcdServer

    with EtcdServer(enable_v2=False) as etcd:
        assert main(["config", "get", *ep(etcd, "--etcd-api", "v2")]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "does not serve the v2 API" in err and "--enable-v2=true" in err
        assert "no network config" not in err
        assert main(["config", "set", *ep(etcd, "--etcd-api", "v2"), GOOD]) == 1
        assert "--enable-v2=true" in capsys.readouterr().err
        # auto: v3 has no key, v2 is off; the hint offers only the command that can work
        assert main(["config", "get", *ep(etcd)]) == 1
        err = capsys.readouterr().err
        assert f"put {PREFIX}/config" in err and "ETCDCTL_API=2" not in err


@pytest.mark.parametrize("argv", [["config", "get"], ["config", "validate"], ["config", "set", GOOD]])
def test_unreachable_etcd_is_not_a_missing_config(capsys, argv):
    assert main([*argv, "--etcd-endpoints", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "no network config" not in err
    assert "127.0.0.1:9" in err and "is etcd running" in err and "--etcd-endpoints" in err


def test_bad_endpoint_is_a_usage_error_naming_the_fix(capsys):
    assert main(["config", "get", "--etcd-endpoints", "notaurl"]) == 2
    assert capsys.readouterr().err == (
        "flannelctl: --etcd-endpoints: 'notaurl' has no scheme; write it as http://notaurl (or https:// for TLS)\n")
