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
    assert f"lab {prefix}: backend vxlan" in text.stdout and "(running)" in text.stdout

    # Break host 2's overlay device: status --ping must notice and exit 1.
    subprocess.run(["ip", "-n", f"{prefix}-h2", "link", "set", "flannel.1", "down"], check=True)
    broken = flannelctl(*lab, "status", "--ping", "--json")
    assert broken.returncode == 1
    assert [p["ok"] for p in json.loads(broken.stdout)["pings"]] == [False, False]

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
