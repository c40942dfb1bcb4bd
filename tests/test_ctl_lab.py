"""`flannelctl lab up|status|down` as a user runs them: separate processes, exit codes, JSON.

The lab outlives `lab up` (agents and etcd run in their own sessions), so `status` and
`down` work from other processes through <workdir>/lab.json.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import tempfile
from typing import Iterator

import pytest

from flannelpy.lab.netns_lab import Lab


def flannelctl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["flannelctl", *args], capture_output=True, text=True, timeout=timeout)


def namespaces(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return sorted(n for n in out.split() if n.startswith(prefix + "-"))


@pytest.fixture
def lab_names(root: None) -> Iterator[tuple[str, str]]:
    """(prefix, workdir) for one CLI lab; whatever the test leaves behind is removed."""
    prefix = "fpm" + secrets.token_hex(2)
    workdir = tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp")
    yield prefix, workdir
    if os.path.exists(os.path.join(workdir, "lab.json")):
        Lab.load(prefix, workdir).down()
    for name in namespaces(prefix):
        subprocess.run(["ip", "netns", "del", name], check=False)
    assert not namespaces(prefix)


@pytest.mark.root
@pytest.mark.etcd
def test_lab_up_status_down(lab_names: tuple[str, str]) -> None:
    prefix, workdir = lab_names
    lab = ["lab", "--prefix", prefix, "--workdir", workdir]

    up = flannelctl(*lab, "up", "--hosts", "2", "--json")
    assert up.returncode == 0, up.stderr
    doc = json.loads(up.stdout)
    assert doc["prefix"] == prefix and doc["backend"] == "vxlan" and doc["etcd"]["running"] is True
    assert [h["namespace"] for h in doc["hosts"]] == [f"{prefix}-h1", f"{prefix}-h2"]
    assert all(h["agent_running"] and h["subnet"] and h["mtu"] == 1450 for h in doc["hosts"])
    assert doc["pings"] == [{"from": 1, "to": 2, "ok": True}, {"from": 2, "to": 1, "ok": True}]
    assert namespaces(prefix) == sorted([f"{prefix}-ul", f"{prefix}-h1", f"{prefix}-c1", f"{prefix}-h2",
                                         f"{prefix}-c2"])

    # A second `up` on the same lab is refused, and does not harm the running one.
    again = flannelctl(*lab, "up", "--hosts", "2")
    assert again.returncode != 0 and "already exists" in again.stderr

    status = flannelctl(*lab, "status", "--ping", "--json")
    assert status.returncode == 0, status.stderr
    st = json.loads(status.stdout)
    assert [p["ok"] for p in st["pings"]] == [True, True]
    assert [h["subnet"] for h in st["hosts"]] == [h["subnet"] for h in doc["hosts"]]

    text = flannelctl(*lab, "status")
    assert text.returncode == 0
    assert f"lab {prefix}: backend vxlan, 2 hosts" in text.stdout and "running in netns" in text.stdout

    # etcd is reachable from this shell, on loopback, with the command status prints; nothing offered
    # for use from here names a lab address (10.250.0.1 would leave the machine through the default route).
    endpoint = doc["etcd"]["endpoint"]
    assert endpoint.startswith("http://127.0.0.1:")
    offered = [line for line in text.stdout.splitlines() if line.startswith(("etcd:", "  flannelctl", "  etcdctl"))]
    assert len(offered) == 3 and all("10.250." not in line for line in offered) and endpoint in offered[0]
    leases = flannelctl("leases", "--etcd-endpoints", endpoint, "--json")
    assert leases.returncode == 0, leases.stderr
    assert sorted(r["public_ip"] for r in json.loads(leases.stdout)) == ["10.250.0.11", "10.250.0.12"]

    # Break container 2's link (the agents repair their own devices within a second, so break what
    # they do not own): status --ping must notice, exit 1, and say what it tried.
    subprocess.run(["ip", "-n", f"{prefix}-c2", "link", "set", "eth0", "down"], check=True)
    broken = flannelctl(*lab, "status", "--ping", "--json")
    assert broken.returncode == 1
    assert [p["ok"] for p in json.loads(broken.stdout)["pings"]] == [False, False]
    broken = flannelctl(*lab, "status", "--ping")
    assert broken.returncode == 1
    pings = broken.stdout.split("cross-host pings:\n", 1)[1].splitlines()
    c2 = doc["hosts"][1]["container_ip"]
    assert pings[0].startswith("  container on host 1 -> container on host 2: FAILED (tried `busybox ping -c 1 -W 2 "
                               f"{c2} in netns {prefix}-c1`: ") and "100% packet loss" in pings[0], pings
    assert "FAILED (tried" in pings[1] and "Network is unreachable" in pings[1], pings

    down = flannelctl(*lab, "down")
    assert down.returncode == 0, down.stderr
    assert down.stdout.strip() == f"lab {prefix} removed (5 namespaces)"
    assert namespaces(prefix) == []
    assert not os.path.exists(workdir)
    for pid in [doc["etcd"]["pid"], *(h["agent_pid"] for h in doc["hosts"])]:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(") ")[1][0] == "Z"


def test_lab_status_of_missing_lab_fails_clearly() -> None:
    prefix = "fpm" + secrets.token_hex(2)
    workdir = os.path.join(tempfile.gettempdir(), f"{prefix}-missing")
    proc = flannelctl("lab", "--prefix", prefix, "--workdir", workdir, "status", timeout=30)
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert proc.stderr.strip() == (f"flannelctl: no lab {prefix!r} ({workdir}/lab.json not found); "
                                   f"start one with `flannelctl lab up`")
    assert "Traceback" not in proc.stderr


@pytest.mark.root
@pytest.mark.etcd
def test_one_host_lab_without_backend(lab_names: tuple[str, str]) -> None:
    """--backend none is the udp the agents run; one host has nothing to ping; hints name the prefix."""
    prefix, workdir = lab_names
    up = flannelctl("lab", "--prefix", prefix, "--workdir", workdir, "up", "--hosts", "1", "--backend", "none")
    assert up.returncode == 0, up.stderr
    assert f"starting lab {prefix}: etcd + 1 hosts, backend udp (no Backend in config) ..." in up.stdout
    assert f"lab {prefix}: backend udp (no Backend in config), 1 host" in up.stdout
    assert "cross-host pings: none (a 1-host lab has no pair of hosts; use --hosts 2 or more)" in up.stdout
    last = up.stdout.splitlines()[-1]
    assert last == (f"no pairs to ping; `flannelctl lab --prefix {prefix} --workdir {workdir} status --ping` to "
                    f"re-test, `flannelctl lab --prefix {prefix} --workdir {workdir} down` to remove the lab")
    status = flannelctl("lab", "--prefix", prefix, "--workdir", workdir, "status", "--ping")
    assert status.returncode == 0 and "cross-host pings: none" in status.stdout
    down = flannelctl("lab", "--prefix", prefix, "--workdir", workdir, "down")
    assert down.returncode == 0 and namespaces(prefix) == []


def test_status_text_offers_only_loopback_or_nsenter():
    """Pure: without the forwarder (the tests' labs) etcd is offered through nsenter, never bare."""
    from flannelpy.lab.netns_lab import status_lines

    st = {"prefix": "p", "backend": "vxlan", "backend_running": "vxlan", "etcd_prefix": "/coreos.com/network",
          "etcd": {"endpoint": "", "endpoint_in_lab": "http://10.250.0.1:2379", "namespace": "p-ul", "pid": 1,
                   "running": True},
          "hosts": []}
    lines = status_lines(st)
    assert lines[1] == "etcd: running in netns p-ul, reached from this shell with"
    assert lines[2] == "  nsenter --net=/var/run/netns/p-ul etcdctl --endpoints=http://10.250.0.1:2379 get --prefix " \
                       "/coreos.com/network"


@pytest.mark.root
@pytest.mark.etcd
@pytest.mark.docker
@pytest.mark.slow
def test_docker_lab_prints_docker_lines_and_its_commands_work_offline(lab_names: tuple[str, str]) -> None:
    """`lab up --docker` says what Docker does here, and the `docker run busybox` it suggests runs the
    lab's own image (tagged busybox:latest in each lab daemon) instead of trying to pull."""
    prefix, workdir = lab_names
    up = flannelctl("lab", "--prefix", prefix, "--workdir", workdir, "up", "--docker", timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    lines = up.stdout.splitlines()
    assert any(line.startswith("docker: one dockerd per host; flanneld writes bip and mtu") for line in lines)
    hosts = [line for line in lines if line.startswith("  host ")]
    assert len(hosts) == 2 and all("docker0 bip 10.5." in h and "mtu 1450" in h for h in hosts)
    run_line = next(line for line in lines if "run --rm busybox ping" in line).split()
    exec_line = next(line for line in lines if line.startswith("  try: docker")).split()[1:]
    for cmd in (run_line, exec_line):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "1 packets received" in r.stdout, (cmd, r.stdout, r.stderr)
        assert "Unable to find image" not in r.stderr and "pull" not in r.stderr.lower()
    down = flannelctl("lab", "--prefix", prefix, "--workdir", workdir, "down", timeout=300)
    assert down.returncode == 0, down.stderr
    assert namespaces(prefix) == []
