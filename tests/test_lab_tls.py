"""The namespace lab with a TLS etcd (`Lab(etcd_tls=...)`, `flannelctl lab up --etcd-tls`).

etcd serves https with --client-cert-auth, certificates made by flannelpy.lab.pki with openssl.
"both": the server certificate carries serverAuth,clientAuth, so etcd's JSON gateway serves and the
agents stay on it; "server-only": serverAuth alone (the classic CoreOS/flannel guide's cluster), the
gateway cannot serve, and the agents' -etcd-transport auto must move to etcd's gRPC API.  Real etcd,
real flanneld, real pings; the pure parts (modes, extensions, status text) have fast tests of their own.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import stat
import subprocess
import tempfile
from typing import Iterator

import pytest

from flannelpy.lab.netns_lab import Lab, LabError, status_lines
from flannelpy.lab.pki import PkiError, check_mode, make_pki, server_extensions, server_usage

GRPC_LINE = "etcd v3 transport: gRPC, because etcd's JSON gateway at https://10.250.0.1:2379 cannot serve"
GATEWAY_LINE = "etcd v3 transport: JSON gateway (-etcd-transport=auto"


def namespaces(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return sorted(n for n in out.split() if n.startswith(prefix + "-"))


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] == "Z"
    except FileNotFoundError:
        return True


def flannelctl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["flannelctl", *args], capture_output=True, text=True, timeout=timeout)


# --- pure: modes, extensions, status text --------------------------------------------------------


def test_modes_and_server_extensions() -> None:
    assert check_mode("") == "" and check_mode("both") == "both" and check_mode("server-only") == "server-only"
    with pytest.raises(PkiError, match="'yes': must be both or server-only"):
        check_mode("yes")
    assert server_usage("both") == "serverAuth,clientAuth"
    assert server_usage("server-only") == "serverAuth"
    assert server_extensions(["10.250.0.1", "127.0.0.1"], "server-only") == \
        "subjectAltName=IP:10.250.0.1,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
    with pytest.raises(PkiError, match="plain http"):
        server_usage("")


def test_lab_refuses_an_unknown_tls_mode_before_making_anything() -> None:
    with pytest.raises(LabError, match="etcd TLS mode 'yes'"):
        Lab(prefix="fpmx" + secrets.token_hex(2), workdir="/nonexistent/fp-lab", etcd_tls="yes")
    assert not os.path.exists("/nonexistent/fp-lab")


def _status(tls: dict) -> dict:
    return {"prefix": "p", "backend": "vxlan", "backend_running": "vxlan", "etcd_prefix": "/coreos.com/network",
            "etcd": {"endpoint": "https://127.0.0.1:4000" if tls else "http://127.0.0.1:4000",
                     "endpoint_in_lab": "http://10.250.0.1:2379", "namespace": "p-ul", "pid": 1, "running": True,
                     "forwarder_pid": 2, "forwarder_running": True, **tls},
            "hosts": []}


def test_status_text_with_tls_names_the_certificates_and_the_transport() -> None:
    plain = status_lines(_status({}))
    assert plain[2:4] == ["  flannelctl leases --etcd-endpoints http://127.0.0.1:4000 --etcd-prefix /coreos.com/network",
                          "  etcdctl --endpoints=http://127.0.0.1:4000 get --prefix /coreos.com/network"]
    assert not any("TLS" in line for line in plain)
    files = {"cacert": "/w/pki/ca.crt", "cert": "/w/pki/client.crt", "key": "/w/pki/client.key"}
    only = status_lines(_status({"tls": "server-only", **files}))
    assert only[2] == ("  flannelctl leases --etcd-endpoints https://127.0.0.1:4000 --etcd-prefix /coreos.com/network "
                       "--etcd-cafile /w/pki/ca.crt --etcd-certfile /w/pki/client.crt --etcd-keyfile /w/pki/client.key")
    assert only[3] == ("  etcdctl --endpoints=https://127.0.0.1:4000 --cacert=/w/pki/ca.crt --cert=/w/pki/client.crt "
                       "--key=/w/pki/client.key get --prefix /coreos.com/network")
    assert only[4].startswith("etcd TLS: client certificates required; the server certificate has extendedKeyUsage "
                              "serverAuth only") and "gRPC" in only[4]
    both = status_lines(_status({"tls": "both", **files}))
    assert "serverAuth,clientAuth" in both[4] and "JSON gateway serves" in both[4]


# --- the certificates (openssl, no root) ---------------------------------------------------------


def _ext(cert: str) -> str:
    return subprocess.run(["openssl", "x509", "-in", cert, "-noout", "-ext", "extendedKeyUsage,subjectAltName"],
                          capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("mode, usage", [("both", "TLS Web Server Authentication, TLS Web Client Authentication"),
                                         ("server-only", "TLS Web Server Authentication\n")])
def test_make_pki_signs_server_and_client_certificates(tmp_path, mode: str, usage: str) -> None:
    if not shutil.which("openssl"):
        pytest.fail("openssl is not installed; .ci/setup installs it")
    files = make_pki(str(tmp_path / "pki"), ["10.250.0.1", "127.0.0.1"], mode)
    server = _ext(files.server_cert)
    assert usage in server and "IP Address:10.250.0.1, IP Address:127.0.0.1" in server
    assert "TLS Web Client Authentication" in _ext(files.client_cert)
    for cert in (files.server_cert, files.client_cert):
        ok = subprocess.run(["openssl", "verify", "-CAfile", files.ca, cert], capture_output=True, text=True)
        assert ok.returncode == 0, ok.stderr
    for key in (files.server_key, files.client_key):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(files.dir).st_mode) == 0o700


def test_make_pki_without_openssl_says_so(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without openssl, as on a machine lacking it
    with pytest.raises(PkiError, match="^openssl not found: .* install openssl$"):
        make_pki(str(tmp_path / "pki"), ["127.0.0.1"], "both")
    assert not os.path.exists(tmp_path / "pki")


# --- the lab -------------------------------------------------------------------------------------


@pytest.fixture
def names(root: None) -> Iterator[tuple[str, str]]:
    """(prefix, workdir) for one lab; whatever the test leaves behind is removed."""
    prefix = "fpm" + secrets.token_hex(2)
    workdir = tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp")  # short: the agents' unix sockets live in it
    yield prefix, workdir
    if os.path.exists(os.path.join(workdir, "lab.json")):
        Lab.load(prefix, workdir).down()
    for name in namespaces(prefix):
        subprocess.run(["ip", "netns", "del", name], check=False)
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.root
@pytest.mark.etcd
@pytest.mark.parametrize("mode", ["both", "server-only"])
def test_tls_lab_pings_across_hosts_on_the_transport_its_certificate_allows(names: tuple[str, str],
                                                                            mode: str) -> None:
    prefix, workdir = names
    lab = Lab(prefix=prefix, workdir=workdir, hosts=2, backend="vxlan", etcd_tls=mode)
    try:
        lab.up(wait=30)
        results = lab.wait_all_pings(30)
        assert all(results.values()), (results, lab.last_pings, [lab.tail_log(h.index) for h in lab.host_list])
        pids = [lab.etcd_pid, *(h.pid for h in lab.host_list)]
        for h in lab.host_list:
            log = open(h.log_file).read()
            assert "-etcd-endpoints=https://10.250.0.1:2379" in " ".join(lab.agent_command(h))
            if mode == "server-only":
                assert GRPC_LINE in log, log
            else:
                assert GATEWAY_LINE in log and "etcd v3 transport: gRPC" not in log, log
        # The lab's etcdctl helper speaks TLS with the client certificate ...
        assert lab.lease_value(1)["PublicIP"] == "10.250.0.11"
        keys = lab.etcdctl("get", "--prefix", "/coreos.com/network/subnets/", "--keys-only").stdout.split()
        assert sorted(keys) == sorted(lab.lease_key(h.index) for h in lab.host_list)
        # ... and etcd really asks for one: the same request without it is refused.
        pki = lab.pki
        bare = subprocess.run(["nsenter", f"--net=/var/run/netns/{lab.underlay_ns}", "etcdctl",
                               "--endpoints=https://10.250.0.1:2379", "--dial-timeout=2s", f"--cacert={pki.ca}",
                               "get", "/coreos.com/network/config"],
                              env=dict(os.environ, ETCDCTL_API="3"), capture_output=True, text=True, timeout=30)
        assert bare.returncode != 0, bare.stdout
    finally:
        removed = lab.down()
    assert sorted(removed) == sorted(lab.all_namespaces())
    assert namespaces(prefix) == []
    assert all(gone(pid) for pid in pids), pids
    assert not os.path.exists(os.path.join(workdir, "pki")) and not os.path.exists(workdir)


@pytest.mark.root
@pytest.mark.etcd
def test_cli_lab_up_with_server_only_tls_status_ping_down(names: tuple[str, str]) -> None:
    prefix, workdir = names
    lab = ["lab", "--prefix", prefix, "--workdir", workdir]
    up = flannelctl(*lab, "up", "--etcd-tls", "server-only", "--json")
    assert up.returncode == 0, up.stdout + up.stderr
    doc = json.loads(up.stdout)
    etcd = doc["etcd"]
    assert etcd["tls"] == "server-only" and etcd["endpoint"].startswith("https://127.0.0.1:")
    assert etcd["cacert"] == f"{workdir}/pki/ca.crt" and os.path.exists(etcd["cert"]) and os.path.exists(etcd["key"])
    assert doc["pings"] == [{"from": 1, "to": 2, "ok": True}, {"from": 2, "to": 1, "ok": True}]

    # lab.json carries the mode: status and down need no option again.
    status = flannelctl(*lab, "status", "--ping")
    assert status.returncode == 0, status.stdout + status.stderr
    lines = status.stdout.splitlines()
    assert "cross-host pings:" in lines and lines.count("  container on host 1 -> container on host 2: ok") == 1
    assert any(line.startswith("etcd TLS: client certificates required; the server certificate has extendedKeyUsage "
                               "serverAuth only") for line in lines)
    # The commands status offers work from this shell as printed.
    etcdctl = next(line for line in lines if line.startswith("  etcdctl "))
    got = subprocess.run(shlex.split(etcdctl) + ["--keys-only"], env=dict(os.environ, ETCDCTL_API="3"),
                         capture_output=True, text=True, timeout=30)
    assert got.returncode == 0 and "/coreos.com/network/config" in got.stdout, got.stderr
    leases_cmd = shlex.split(next(line for line in lines if line.startswith("  flannelctl leases ")))
    leases = subprocess.run(leases_cmd + ["--json"], capture_output=True, text=True, timeout=60)
    assert leases.returncode == 0, leases.stderr
    assert sorted(r["public_ip"] for r in json.loads(leases.stdout)) == ["10.250.0.11", "10.250.0.12"]
    for h in doc["hosts"]:
        assert GRPC_LINE in open(h["log"]).read()

    down = flannelctl(*lab, "down")
    assert down.returncode == 0, down.stderr
    assert down.stdout.strip() == f"lab {prefix} removed (5 namespaces)"
    assert namespaces(prefix) == []
    assert not os.path.exists(f"{workdir}/pki") and not os.path.exists(workdir)
    assert all(gone(pid) for pid in [etcd["pid"], etcd["forwarder_pid"], *(h["agent_pid"] for h in doc["hosts"])])


@pytest.mark.root
def test_cli_refuses_tls_where_it_cannot_work(names: tuple[str, str]) -> None:
    prefix, workdir = names
    lab = ["lab", "--prefix", prefix, "--workdir", workdir, "up"]
    machines = flannelctl(*lab, "--machines", "--etcd-tls", "both", timeout=30)
    assert machines.returncode != 0 and machines.stdout == ""
    assert machines.stderr.strip() == ("flannelctl: --etcd-tls: only the namespace and Docker labs run a TLS etcd "
                                       "(not --machines, whose provisioning is vagrant/'s, unchanged)")
    bad = flannelctl(*lab, "--etcd-tls", "yes", timeout=30)
    assert bad.returncode == 2 and "argument --etcd-tls: invalid choice: 'yes'" in bad.stderr
    for proc in (machines, bad):
        assert "Traceback" not in proc.stderr
    assert namespaces(prefix) == [] and os.listdir(workdir) == []


@pytest.mark.root
@pytest.mark.etcd
@pytest.mark.docker
@pytest.mark.slow
def test_cli_docker_lab_with_server_only_tls(names: tuple[str, str]) -> None:
    """The Docker lab inherits the TLS etcd: flanneld on gRPC writes daemon.json, containers ping."""
    prefix, workdir = names
    lab = ["lab", "--prefix", prefix, "--workdir", workdir]
    up = flannelctl(*lab, "up", "--docker", "--etcd-tls", "server-only", "--json", timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    doc = json.loads(up.stdout)
    assert doc["etcd"]["tls"] == "server-only" and [p["ok"] for p in doc["pings"]] == [True, True]
    assert all(h["docker"]["bip"] == h["subnet"] for h in doc["hosts"]), doc["hosts"]
    for h in doc["hosts"]:
        with open(h["log"]) as f:
            assert GRPC_LINE in f.read()
    down = flannelctl(*lab, "down", timeout=300)
    assert down.returncode == 0, down.stderr
    assert namespaces(prefix) == [] and not os.path.exists(workdir)
