"""No Python traceback is reachable from `flanneld` or `flannelctl` with bad input or signals.

A catalogue of what a user gets wrong (bad flags and values, endpoints that are not URLs, unreachable or
wrong-protocol etcd, missing files, a broken /etc/sysconfig/flanneld) and of interrupts at several points
(SIGINT and SIGTERM while the command waits on an etcd that accepts connections but never answers, and
while flanneld starts for real in a lab namespace).  Every case must end without "Traceback" in its
output, with a non-zero exit for an error, and with the error on one line.

All traffic goes to loopback or into the test's own namespaces: the unreachable endpoints are closed or
silent ports on 127.0.0.1.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from typing import Iterator

import pytest

from test_lab_interrupts import signal_after

TIMEOUT = 90
CLOSED = "http://127.0.0.1:9"  # discard port: nothing listens there


@pytest.fixture(scope="module")
def silent_endpoint() -> Iterator[str]:
    """A loopback port that completes TCP handshakes (the kernel's backlog) but never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(128)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def plain_etcd() -> Iterator[object]:
    """A real etcd without the v2 API (etcd 3.4's default), on loopback."""
    from etcd_server import EtcdServer

    with EtcdServer(enable_v2=False) as server:
        yield server


def run(cmd: list[str], env: dict[str, str] | None = None, stdin: str = "") -> subprocess.CompletedProcess:
    environ = {**os.environ, "FLANNELCTL_SYSCONFIG": "", **(env or {})}  # this host's file stays out of it
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, input=stdin, env=environ)


def assert_clean_failure(r: subprocess.CompletedProcess, expect: str = "", argparse_usage: bool = False) -> None:
    output = r.stdout + r.stderr
    assert "Traceback" not in output, output
    assert r.returncode != 0, output
    lines = r.stderr.strip().splitlines()
    if argparse_usage:  # argparse: the usage line(s), then one "error:" line
        assert lines[-1].split(": error: ")[0].startswith(("flannelctl", "usage")), output
    else:
        assert len(lines) == 1, output
    assert expect in output, output


# --- flannelctl: bad flags and values ---------------------------------------------------------------

FLANNELCTL_USAGE = [
    ["nonexistent-command"],
    ["leases", "--bogus"],
    ["config"],
    ["config", "get", "--etcd-api", "v4"],
    ["config", "get", "--etcd-transport", "pigeon"],
    ["lab", "up", "--hosts", "many"],
    ["lab", "up", "--backend", "wireguard"],
    ["status", "--socket"],
]


@pytest.mark.parametrize("argv", FLANNELCTL_USAGE, ids=lambda a: " ".join(a))
def test_flannelctl_usage_errors(argv):
    assert_clean_failure(run(["flannelctl", *argv]), argparse_usage=True)


@pytest.mark.parametrize("endpoints,expect", [
    ("notaurl", "write it as http://notaurl"),
    ("127.0.0.1:2379", "write it as http://127.0.0.1:2379"),
    ("unix:///run/etcd.sock", "unix socket endpoints are not supported"),
    ("http://127.0.0.1:99999", "the port is not a number"),
    (",", "empty; give at least one"),
    (CLOSED, "is etcd running and listening there"),
    (CLOSED.replace("http", "https"), "is etcd running and listening there"),
])
@pytest.mark.parametrize("command", [["leases"], ["config", "get"], ["config", "validate"],
                                     ["config", "set", '{"Network":"10.5.0.0/16"}']], ids=" ".join)
def test_flannelctl_bad_or_unreachable_endpoints(command, endpoints, expect):
    assert_clean_failure(run(["flannelctl", *command, "--etcd-endpoints", endpoints]), expect)


def test_flannelctl_against_a_real_etcd_it_cannot_use(plain_etcd):
    https = plain_etcd.endpoint.replace("http://", "https://")
    assert_clean_failure(run(["flannelctl", "leases", "--etcd-endpoints", https]), "use http://")
    assert_clean_failure(run(["flannelctl", "leases", "--etcd-endpoints", https, "--etcd-cafile", "/nonexistent"]),
                         "-etcd-cafile=/nonexistent")
    assert_clean_failure(run(["flannelctl", "leases", "--etcd-endpoints", plain_etcd.endpoint, "--etcd-api", "v2"]),
                         "--enable-v2=true")
    assert_clean_failure(run(["flannelctl", "config", "get", "--etcd-endpoints", plain_etcd.endpoint,
                              "--etcd-api", "v2"]), "--enable-v2=true")
    assert_clean_failure(run(["flannelctl", "leases", "--etcd-endpoints", plain_etcd.endpoint,
                              "--etcd-prefix", "/nothing/here"]), "nothing under /nothing/here/")


@pytest.mark.parametrize("source,expect", [
    ("/nonexistent.json", "No such file or directory"),
    ("/", "Is a directory"),
    (sys.executable, "not UTF-8 text"),
    ("{not json", "not valid JSON"),
    ('{"Network":"10.5.0.0/16","SubnetLen":1e400}', "SubnetLen"),
    ('{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","VNI":NaN}}', "NaN"),
    ("[" * 100000 + "]" * 100000, "more than the limit"),
    ("[" * 10000 + "]" * 10000, "nest"),
])
def test_flannelctl_bad_configs(tmp_path, source, expect):
    if len(source) > 1000:  # one argument may not exceed 128 KiB: hand it over as a file
        (tmp_path / "big.json").write_text(source)
        source = str(tmp_path / "big.json")
    r = run(["flannelctl", "config", "validate", source])
    output = r.stdout + r.stderr
    assert "Traceback" not in output and r.returncode == 1, output
    assert expect in output, output


def test_flannelctl_other_bad_input(tmp_path, root):
    assert_clean_failure(run(["flannelctl", "status", "--url", "notaurl"]), "agent unreachable at notaurl")
    assert_clean_failure(run(["flannelctl", "status", "--socket", str(tmp_path / "none.sock")]), "is flanneld running")
    prefix = "fpt" + secrets.token_hex(2)
    for action in ("status", "down"):
        assert_clean_failure(run(["flannelctl", "lab", "--prefix", prefix, "--workdir", str(tmp_path / "w"), action]),
                             f"no lab {prefix!r}")
    assert_clean_failure(run(["flannelctl", "lab", "--prefix", prefix, "up", "--hosts", "0"]), "between 1 and 200")
    (tmp_path / "lab.json").write_text("{broken")
    assert_clean_failure(run(["flannelctl", "lab", "--prefix", prefix, "--workdir", str(tmp_path), "status"]),
                         "is unreadable")
    # mk-docker-opts.sh's own output, byte for byte: the error line, then the script's usage
    r = run(["flannelctl", "docker-opts", "-f"])
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.splitlines()[0] == "mk-docker-opts.sh: option requires an argument -- f"


def test_flannelctl_with_a_broken_sysconfig_warns_and_goes_on(tmp_path):
    bad = tmp_path / "flanneld"
    bad.write_text('FLANNEL_ETCD_ENDPOINTS="notaurl"\nFLANNEL_OPTIONS="-iface=\'eth1"\n')
    r = run(["flannelctl", "leases", "--etcd-endpoints", CLOSED], env={"FLANNELCTL_SYSCONFIG": str(bad)})
    assert "Traceback" not in r.stderr and r.returncode == 1
    assert "warning:" in r.stderr and "is etcd running" in r.stderr
    r = run(["flannelctl", "leases", "--help"], env={"FLANNELCTL_SYSCONFIG": str(tmp_path)})  # a directory
    assert r.returncode == 0 and "Traceback" not in r.stderr


# --- flanneld: bad flags and values -----------------------------------------------------------------

@pytest.mark.parametrize("argv,env,rc,expect", [
    (["-bogus"], {}, 2, "flag provided but not defined: -bogus"),
    (["-etcd-endpoints=notaurl"], {}, 2, "write it as http://notaurl"),
    ([], {"FLANNELD_ETCD_ENDPOINTS": "notaurl"}, 2, "environment variable FLANNELD_ETCD_ENDPOINTS"),
    (["-etcd-api=v4"], {}, 2, "must be v3, v2 or auto"),
    (["-etcd-transport=pigeon"], {}, 2, "-etcd-transport"),
    (["-log-format=xml"], {}, 2, "must be text, klog or json"),
    (["-ip-masq=maybe"], {}, 2, "invalid boolean value"),
    (["stray"], {}, 2, "unexpected argument 'stray'"),
    (["-subnet-lease-renew-margin=0"], {}, 1, "between 1 and 1439"),
    (["-healthz-port=70000"], {}, 1, "not a TCP port"),
    (["-kube-subnet-mgr"], {}, 1, "Kubernetes mode is not supported"),
])
def test_flanneld_bad_flags(argv, env, rc, expect):
    r = run(["flanneld", *argv], env=env)
    assert r.returncode == rc, r.stderr
    assert_clean_failure(r, expect)


# --- interrupts ---------------------------------------------------------------------------------------

DELAYS = [0.5, 1.0, 2.0, 4.0]
SIGNALS = pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])


@SIGNALS
@pytest.mark.parametrize("delay", DELAYS)
@pytest.mark.parametrize("command", [["leases"], ["config", "set", '{"Network":"10.5.0.0/16"}']],
                         ids=" ".join)
def test_flannelctl_interrupted_while_waiting_on_etcd(silent_endpoint, command, delay, sig):
    r, sent = signal_after(["flannelctl", *command, "--etcd-endpoints", silent_endpoint,
                            "--etcd-api", "v3"], delay, sig, timeout=TIMEOUT)
    output = r.stdout + r.stderr
    assert "Traceback" not in output, output
    if sent:
        assert r.returncode == 128 + sig, output
        assert r.stderr.strip().splitlines()[-1] == f"flannelctl: interrupted ({signal.Signals(sig).name})", output
    else:
        assert_clean_failure(r)  # etcd's silence ran out first: still one line


@pytest.mark.root
@SIGNALS
@pytest.mark.parametrize("delay", DELAYS)
def test_flanneld_interrupted_while_waiting_for_etcd(silent_endpoint, tmp_path, delay, sig):
    """In this namespace, harmlessly: with etcd silent the agent never gets past reading the config."""
    r, sent = signal_after(["flanneld", f"-etcd-endpoints={silent_endpoint}", "-etcd-api=v3", "-status-socket=",
                            f"-subnet-file={tmp_path}/subnet.env"], delay, sig, timeout=TIMEOUT)
    output = r.stdout + r.stderr
    assert "Traceback" not in output, output
    assert sent and r.returncode == 0, output  # a signal ends flanneld with 0, as flanneld
    last = r.stderr.strip().splitlines()[-1]
    assert signal.Signals(sig).name in last and ("interrupted" in last or "shutting down" in last), output


@pytest.mark.root
@pytest.mark.etcd
@pytest.mark.slow
def test_flanneld_interrupted_at_every_point_of_a_real_start(root):
    """The agent starting for real in a lab host (etcd, lease, vxlan device, subnet.env): a signal at
    any moment of it ends the process with exit 0 and no traceback."""
    from flannelpy.lab.netns_lab import Lab

    lab = Lab(prefix="fpt" + secrets.token_hex(2), hosts=1, backend="vxlan", with_containers=False)
    lab.build()
    try:
        host = lab.host(1)
        cmd = ["nsenter", f"--net=/var/run/netns/{host.netns}", *lab.agent_command(host)]
        seen = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            for delay in (0.3, 0.6, 0.9, 1.2, 1.5, 2.0, 3.0):
                r, sent = signal_after(cmd, delay, sig, timeout=TIMEOUT)
                output = r.stdout + r.stderr
                assert "Traceback" not in output, (delay, output)
                assert r.returncode == 0, (delay, output)
                seen.append("running" if "running: subnet" in output else "starting")
        assert "starting" in seen  # some signals did land during the start-up itself
    finally:
        lab.down()


@pytest.mark.parametrize("argv", [["--help"], ["docker-opts", "--help"], ["config", "validate", '{"Network":"10.1.0.0/16"}']],
                         ids=" ".join)
def test_flannelctl_reader_gone_away(argv):
    """`flannelctl ... | head -0`: the pipe is closed before we write; no error, no traceback."""
    r = subprocess.run(f"flannelctl {' '.join(repr(a) for a in argv)} | true", shell=True, capture_output=True,
                       text=True, timeout=TIMEOUT)
    assert r.stderr == "", r.stderr
