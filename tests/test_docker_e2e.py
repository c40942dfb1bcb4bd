"""Docker end to end: flanneld -> daemon.json -> a real dockerd per host -> containers ping across hosts.

The DockerLab runs etcd, two hosts with flanneld and a private dockerd each; what is checked is what a
Docker host needs from flannel: docker0 on the leased bip, container MTU = FLANNEL_MTU, other
daemon.json keys kept, and traffic crossing hosts although Docker's FORWARD policy is DROP.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil

import pytest

from flannelpy.lab.docker_lab import DockerLab
from flannelpy.lab.dockerd import leftover_pids, mounts_under
from flannelpy.lab.netns_lab import run
from flannelpy.subnet.envfile import parse_env_file

pytestmark = [pytest.mark.docker, pytest.mark.root, pytest.mark.slow]

# Written before flanneld starts; flanneld must add bip/mtu and keep these, in this order.
PRE_DAEMON_JSON = {"log-level": "warn", "ip-masq": False}
EXPECTED_MTU = {"vxlan": 1450, "udp": 1472}  # underlay veth MTU 1500 minus the encapsulation


@pytest.fixture(params=["vxlan", "udp"])
def docker_lab(request, root):
    for tool in ("dockerd", "docker", "containerd", "runc"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (apt-get install docker.io); .ci/setup installs it")
    lab = DockerLab(prefix=f"fpd{secrets.token_hex(2)}", hosts=2, backend=request.param,
                    daemon_json=dict(PRE_DAEMON_JSON))
    try:
        lab.up()
        yield lab
    finally:
        lab.down()
        # Nothing of ours may outlive `down`: namespaces, daemons/shims, mounts, files.
        existing = run("ip", "netns", "list").stdout
        assert not [n for n in lab.all_namespaces() + [f"{lab.prefix}-c1", f"{lab.prefix}-c2"] if n in existing]
        assert leftover_pids(lab.workdir) == []
        assert mounts_under(lab.workdir) == []
        assert not os.path.exists(lab.workdir)


def test_docker_hosts_use_the_lease_and_containers_talk_across_hosts(docker_lab: DockerLab):
    lab = docker_lab
    for host in lab.host_list:
        with open(host.subnet_file) as f:
            env = parse_env_file(f.read())
        bip, mtu = env["FLANNEL_SUBNET"], int(env["FLANNEL_MTU"])
        assert mtu == EXPECTED_MTU[lab.backend]

        # daemon.json: lease added, the keys that were there before kept first and unchanged
        with open(lab.daemon_json_path(host)) as f:
            doc = json.load(f)
        assert doc == {**PRE_DAEMON_JSON, "bip": bip, "mtu": mtu}
        assert list(doc) == [*PRE_DAEMON_JSON, "bip", "mtu"]
        with open(lab.daemon_json_path(host) + ".flannel-backup") as f:
            assert json.load(f) == PRE_DAEMON_JSON  # proves the file existed before flanneld wrote it

        # dockerd read it: docker0 carries the leased bip, the container's eth0 the flannel MTU
        addr = run("ip", "-4", "-o", "addr", "show", "docker0", netns=host.netns).stdout
        assert f"inet {bip} " in addr
        d = lab.dockerd(host)
        name = lab.container_name(host)
        assert d.exec(name, ["cat", "/sys/class/net/eth0/mtu"]).stdout.decode().strip() == str(mtu)
        assert host.container_ip.rsplit(".", 1)[0] == bip.rsplit(".", 1)[0]

        # Docker's hardened FORWARD policy is in force, so only flanneld's FLANNEL-FWD lets peers in
        forward = run("iptables", "-w", "-S", "FORWARD", netns=host.netns).stdout.splitlines()
        assert forward[0] == "-P FORWARD DROP"
        assert any("-j FLANNEL-FWD" in rule for rule in forward)
        # "ip-masq": false was honoured: only flanneld masquerades, so pod-to-pod keeps its source
        nat = run("iptables", "-w", "-t", "nat", "-S", "POSTROUTING", netns=host.netns).stdout
        assert "MASQUERADE" not in nat and "-j FLANNEL-POSTRTG" in nat
        # no -c<N> namespace was made: the container is Docker's
        assert host.container_ns not in run("ip", "netns", "list").stdout

    results = lab.wait_all_pings(timeout=30)
    assert results == {(1, 2): True, (2, 1): True}


def test_cli_lab_docker_down_cleans_up_even_after_dockerd_was_killed(root):
    """`flannelctl lab up --docker` then `lab down` from another process, with host 1's dockerd SIGKILLed
    first: its shim and container would outlive it, so down must find them (and its mounts) itself."""
    import signal
    import subprocess
    import sys

    if shutil.which("dockerd") is None:
        pytest.fail("dockerd is not installed (apt-get install docker.io); .ci/setup installs it")
    prefix = f"fpd{secrets.token_hex(2)}"
    ctl = [sys.executable, "-m", "flannelpy.cli.flannelctl", "lab", "--prefix", prefix]
    workdir = os.path.join("/run/flannelpy-lab", prefix)
    try:
        up = subprocess.run([*ctl, "up", "--docker", "--json"], capture_output=True, text=True, timeout=180)
        assert up.returncode == 0, up.stderr
        doc = json.loads(up.stdout)
        assert [p["ok"] for p in doc["pings"]] == [True, True]
        assert all(h["docker"]["running"] and h["container_ip"] for h in doc["hosts"])
        lab = DockerLab.load(prefix)
        ids = [lab.dockerd(h).docker("inspect", "-f", "{{.Id}}", lab.container_name(h)).stdout.decode().strip()
               for h in lab.host_list]

        os.kill(doc["hosts"][0]["docker"]["pid"], signal.SIGKILL)
        assert leftover_pids(workdir)  # containerd/shims still there

        down = subprocess.run([*ctl, "down"], capture_output=True, text=True, timeout=180)
        assert down.returncode == 0, down.stderr
        assert f"{prefix}-" not in run("ip", "netns", "list").stdout
        assert leftover_pids(workdir) == []
        assert mounts_under(workdir) == []
        assert not os.path.exists(workdir)
        # the containers' own processes and cgroups went too (found by container ID in /proc/*/cgroup)
        assert all(len(cid) == 64 for cid in ids)
        for entry in glob.glob("/proc/[0-9]*"):
            try:
                with open(f"{entry}/cgroup") as f:
                    cgroups = f.read()
                with open(f"{entry}/stat") as f:
                    state = f.read().rsplit(") ", 1)[1][0]
            except OSError:
                continue  # exited meanwhile
            # a zombie has exited and only waits for init to reap it (slow here, PID 1 is no shell)
            assert state == "Z" or not any(cid in cgroups for cid in ids), entry
        for cid in ids:
            assert glob.glob(f"/sys/fs/cgroup/*/docker/{cid}") + glob.glob(f"/sys/fs/cgroup/docker/{cid}") == []
    finally:
        if os.path.exists(os.path.join(workdir, "lab.json")):
            DockerLab.load(prefix).down()
