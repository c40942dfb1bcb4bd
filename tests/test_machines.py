"""The shipped units, sysconfig, install and Vagrant provisioning, run under a real systemd.

One systemd machines lab (`flannelpy.lab.machines`) for the whole module: an etcd machine and two Docker host
machines booted with systemd-nspawn, provisioned by vagrant/provision-etcd.sh and provision-host.sh (which run
etc/install.sh), each host with flanneld.service, docker.io after it through the drop-in, and a busybox
container. The tests then do to these hosts what an operator does with systemctl, in file order.

The first part needs no root: the pure decisions of the lab (nspawn's command line, cgroup placement, which
process is the machine's PID 1, cache keys).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import subprocess
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from flannelpy.lab import rootfs
from flannelpy.lab.machines import CONTAINER, ETCD_IP, MachineLab
from flannelpy.lab.nspawn import Machine, cgroup_roots, leader_from_status, nspawn_command

REPO = Path(__file__).resolve().parent.parent

# --- pure decisions (no root) ----------------------------------------------------------------------------


def test_nspawn_command_has_what_docker_needs():
    cmd = nspawn_command("fp-host1", "/m/root", "/var/run/netns/fp-host1", [("/w", "/wheelhouse", True)])
    assert cmd[:2] == ["systemd-nspawn", "--boot"]
    assert "--register=no" in cmd and "--keep-unit" in cmd and "--capability=all" in cmd
    assert "--network-namespace-path=/var/run/netns/fp-host1" in cmd
    filt = next(a for a in cmd if a.startswith("--system-call-filter="))
    assert set(filt.split("=", 1)[1].split()) >= {"keyctl", "add_key", "bpf"}
    assert "--bind-ro=/w:/wheelhouse" in cmd


def test_cgroup_roots_hybrid_and_unified():
    hybrid = [("tmpfs", "/sys/fs/cgroup", "rw"), ("cgroup", "/sys/fs/cgroup/memory", "rw,memory"),
              ("cgroup", "/sys/fs/cgroup/systemd", "rw,name=systemd"), ("cgroup2", "/sys/fs/cgroup/unified", "rw")]
    assert cgroup_roots(hybrid) == ["/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified"]
    assert cgroup_roots([("cgroup2", "/sys/fs/cgroup", "rw,nsdelegate")]) == ["/sys/fs/cgroup"]
    assert cgroup_roots([("cgroup2", "/tmp/elsewhere", "rw")]) == []


def test_leader_is_the_pid_that_is_1_inside():
    statuses = {10: "Name:\tsystemd-nspawn\nNSpid:\t10\n", 11: "Name:\tsystemd\nNSpid:\t11\t1\n",
                12: "Name:\tjournald\nNSpid:\t12\t25\n"}
    assert leader_from_status(statuses) == 11
    assert leader_from_status({10: "NSpid:\t10\n"}) == 0


def test_root_cache_key_follows_the_package_list():
    a = rootfs.RootSpec("host", ("systemd", "docker.io"))
    assert a.key == rootfs.RootSpec("host", ("docker.io", "systemd", "systemd")).key  # order, repeats
    assert a.key != rootfs.RootSpec("host", ("systemd", "docker.io", "iptables")).key
    assert a.key != rootfs.RootSpec("host", ("systemd", "docker.io"), suite="trixie").key
    assert a.mmdebstrap_command("/x") == ["mmdebstrap", "--variant=minbase", "--include=systemd,docker.io",
                                          "bookworm", "/x"]
    # What the provisioning scripts install must already be in the roots (the machines have no network).
    for pkg in ("docker.io", "iptables", "iproute2", "python3-venv"):
        assert pkg in rootfs.HOST_PACKAGES and pkg in (REPO / "vagrant/provision-host.sh").read_text()
    for pkg in ("etcd-server", "etcd-client"):
        assert pkg in rootfs.ETCD_PACKAGES and pkg in (REPO / "vagrant/provision-etcd.sh").read_text()


def test_wheelhouse_holds_dependencies_and_build_backend():
    reqs = rootfs.wheelhouse_requirements((REPO / "pyproject.toml").read_text())
    assert any(r.startswith("trio") for r in reqs) and any(r.startswith("setuptools") for r in reqs)
    assert rootfs.wheelhouse_key(reqs) != rootfs.wheelhouse_key(reqs, python="3.12")


def test_machine_state_survives_json():
    m = Machine(name="fp-host1", hostname="host1", dir="/d", lower="/l", netns="fp-host1",
                binds=[("/a", "/b", True)], nspawn_pid=5, boots=2)
    again = Machine(**json.loads(json.dumps(asdict(m))))
    assert again == m and again.binds == [("/a", "/b", True)]


# --- the lab ----------------------------------------------------------------------------------------------

root = pytest.mark.root
slow = pytest.mark.slow


def nsenter_ok() -> str:
    """Why the machines lab cannot run here, or '' (only kernel limits are reasons to skip)."""
    with open("/proc/self/mounts") as f:
        if not any(line.split()[2] == "cgroup2" for line in f):
            return "no cgroup v2 hierarchy mounted: systemd and Docker in the machines need one"
    return ""


@pytest.fixture(scope="module")
def lab():
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces and systemd-nspawn")
    why = nsenter_ok()
    if why:
        pytest.skip(why)
    for tool in ("systemd-nspawn", "mmdebstrap"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            pytest.fail(f"{tool} is not installed (.ci/setup installs systemd-container and mmdebstrap)")
    lab = MachineLab(prefix="fps" + secrets.token_hex(2), hosts=2)
    lab.progress = lambda msg: print(msg, flush=True)
    start = time.monotonic()
    lab.up()
    results = lab.wait_all_pings()
    print(f"machines lab up in {time.monotonic() - start:.0f}s: {lab.timings}")
    try:
        assert all(results.values()), results
        yield lab
    finally:
        if MachineLab.exists(lab.prefix):
            lab.down()
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert lab.prefix not in left


def show(m: Machine, unit: str, *props: str) -> dict[str, str]:
    out = m.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def wait_active(m: Machine, unit: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = m.run("systemctl", "is-active", unit, check=False).stdout.strip()
        if state == "active":
            return
        time.sleep(0.2)
    raise AssertionError(f"{m.hostname}: {unit} is {state!r} after {timeout}s:\n"
                         + m.run("systemctl", "status", unit, "--no-pager", check=False).stdout)


def wait_status_text(m: Machine, unit: str, pattern: str, timeout: float = 30) -> str:
    """`systemctl status unit` once its text matches pattern (the reason of a failure, say)."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = m.run("systemctl", "status", unit, "--no-pager", "--lines=20", check=False).stdout
        if re.search(pattern, text):
            return text
        time.sleep(0.5)
    raise AssertionError(f"{m.hostname}: `systemctl status {unit}` never matched {pattern!r}:\n{text}")


def container_state(m: Machine) -> str:
    return m.run("docker", "inspect", "-f", "{{.State.StartedAt}} {{.State.Pid}}", CONTAINER).stdout.strip()


def docker0(m: Machine) -> tuple[str, int]:
    link = json.loads(m.run("ip", "-j", "-4", "addr", "show", "docker0").stdout)[0]
    addr = link["addr_info"][0]
    return f"{addr['local']}/{addr['prefixlen']}", link["mtu"]


class Pinger:
    """`ping -c N -i 0.1` from one host's container to another's, in the background; counts replies."""

    def __init__(self, lab: MachineLab, src: Machine, dst: Machine, count: int) -> None:
        ip = lab.container_ips[dst.name]
        self.count = count
        self.result: subprocess.CompletedProcess | None = None
        self.thread = threading.Thread(target=lambda: setattr(self, "result", src.run(
            "docker", "exec", CONTAINER, "ping", "-c", str(count), "-i", "0.1", "-W", "1", ip,
            check=False, timeout=count * 0.1 + 60)))
        self.thread.start()

    def received(self) -> tuple[int, int]:
        self.thread.join()
        assert self.result is not None
        m = re.search(r"(\d+) packets transmitted, (\d+) packets received", self.result.stdout)
        assert m, self.result.stdout + self.result.stderr
        return int(m.group(1)), int(m.group(2))


@root
@slow
def test_hosts_run_the_shipped_files_installed_by_install_sh(lab: MachineLab):
    for m in lab.host_machines():
        # etc/install.sh: a venv made with Debian's own python3, commands where the units call them
        assert m.run("readlink", "/usr/bin/flanneld").stdout.strip() == "/opt/flannelpy/bin/flanneld"
        assert "home = /usr/bin" in m.run("cat", "/opt/flannelpy/pyvenv.cfg").stdout
        # the installed unit files are the tree's, and flanneld is enabled as the Vagrant provisioning does
        for shipped, installed in (("systemd/flanneld.service", "/usr/lib/systemd/system/flanneld.service"),
                                   ("systemd/docker.service.d/flannel.conf",
                                    "/usr/lib/systemd/system/docker.service.d/flannel.conf"),
                                   ("systemd/flanneld-start", "/usr/bin/flanneld-start")):
            assert m.run("cat", installed).stdout == (REPO / shipped).read_text(), installed
        assert m.run("systemctl", "is-enabled", "flanneld").stdout.strip() == "enabled"
        # the shipped sysconfig, edited by provision-host.sh: the private interface, never the NAT one
        sysconfig = m.run("cat", "/etc/sysconfig/flanneld").stdout
        assert 'FLANNEL_ETCD_PREFIX="/atomic.io/network"' in sysconfig
        assert f'FLANNEL_ETCD_ENDPOINTS="http://{ETCD_IP}:2379"' in sysconfig
        assert "-iface=eth1" in sysconfig
        # Docker runs on the lease: docker0 has the bip and MTU flanneld wrote
        env = lab.subnet_env(m)
        assert docker0(m) == (env["FLANNEL_SUBNET"], int(env["FLANNEL_MTU"])) and env["FLANNEL_MTU"] == "1450"
        dj = json.loads(m.run("cat", "/etc/docker/daemon.json").stdout)
        assert dj == {"ip-masq": False, "bip": env["FLANNEL_SUBNET"], "mtu": 1450}
        # Docker started after flanneld was active
        f, d = show(m, "flanneld", "ActiveEnterTimestampMonotonic"), show(m, "docker", "ActiveEnterTimestampMonotonic")
        assert int(d["ActiveEnterTimestampMonotonic"]) > int(f["ActiveEnterTimestampMonotonic"])
    # the config was written the classic way: v2 keys API (etcdctl mk), not visible to v3
    e = lab.etcd
    v2 = e.sh("ETCDCTL_API=2 etcdctl get /atomic.io/network/config").stdout
    assert json.loads(v2)["Network"] == "10.5.0.0/16"
    assert e.sh("ETCDCTL_API=3 etcdctl get /atomic.io/network/config").stdout == ""


@root
@slow
def test_status_text_and_journal(lab: MachineLab):
    for m in lab.host_machines():
        subnet = lab.subnet_env(m)["FLANNEL_SUBNET"]
        net = str(ipaddress.ip_interface(subnet).network)
        props = show(m, "flanneld", "StatusText", "Type", "NotifyAccess")
        assert props["StatusText"] == f"leased {net}, backend vxlan"
        assert props["Type"] == "notify"
        log = m.run("journalctl", "-u", "flanneld", "--no-pager", "-o", "cat").stdout
        assert f"acquired lease {net}" in log and "wrote /run/flannel/subnet.env" in log
        assert "peer " in log  # the other host, programmed
        assert m.run("journalctl", "-t", "flanneld", "--no-pager", "-n", "1", "-q").stdout.strip()


@root
@slow
def test_restarting_flanneld_drops_no_pings_and_leaves_docker_alone(lab: MachineLab):
    h1, h2 = lab.host(1), lab.host(2)
    docker_pids = {m.name: show(m, "docker", "MainPID")["MainPID"] for m in (h1, h2)}
    containers = {m.name: container_state(m) for m in (h1, h2)}
    pinger = Pinger(lab, h1, h2, count=150)  # 15 s
    time.sleep(1)
    for m in (h2, h1):
        before = show(m, "flanneld", "MainPID")["MainPID"]
        m.run("systemctl", "restart", "flanneld")
        assert show(m, "flanneld", "MainPID")["MainPID"] != before
    sent, got = pinger.received()
    assert (sent, got) == (150, 150)
    for m in (h1, h2):
        assert show(m, "docker", "MainPID")["MainPID"] == docker_pids[m.name], "docker was restarted"
        assert container_state(m) == containers[m.name], "the container was restarted"


@root
@slow
def test_restarting_docker_keeps_bip_and_mtu(lab: MachineLab):
    h1 = lab.host(1)
    env = lab.subnet_env(h1)
    h1.run("systemctl", "restart", "docker")
    assert docker0(h1) == (env["FLANNEL_SUBNET"], int(env["FLANNEL_MTU"]))
    lab.refresh_container_ip(h1)
    assert lab.container_ips[h1.name].startswith(env["FLANNEL_SUBNET"].rsplit(".", 1)[0] + ".")
    mtu = h1.run("docker", "exec", CONTAINER, "cat", "/sys/class/net/eth0/mtu").stdout.strip()
    assert mtu == env["FLANNEL_MTU"]
    assert all(lab.wait_all_pings(30).values())


@root
@slow
def test_start_is_active_only_after_ready_and_subnet_env(lab: MachineLab):
    """With etcd out of reach flanneld cannot lease: the unit stays `activating`, without subnet.env, and
    `systemctl status` says why; once etcd answers it turns active with subnet.env already written."""
    h2 = lab.host(2)
    h2.run("systemctl", "stop", "flanneld")
    h2.run("rm", "-f", "/run/flannel/subnet.env", "/run/flannel/docker")
    subprocess.run(["ip", "-n", lab.underlay_ns, "link", "set", "host2", "down"], check=True)
    try:
        h2.run("systemctl", "start", "--no-block", "flanneld")
        text = wait_status_text(h2, "flanneld", r"cannot reach etcd at http://172\.28\.128\.10:2379")
        assert "activating (start)" in text
        for _ in range(10):  # and it stays so: no READY=1 without a lease
            assert h2.run("systemctl", "is-active", "flanneld", check=False).stdout.strip() == "activating"
            assert not h2.run("test", "-e", "/run/flannel/subnet.env", check=False).returncode == 0
            time.sleep(0.2)
    finally:
        subprocess.run(["ip", "-n", lab.underlay_ns, "link", "set", "host2", "up"], check=True)
    wait_active(h2, "flanneld")
    props = show(h2, "flanneld", "ActiveEnterTimestamp", "StatusText")
    assert props["StatusText"].startswith("leased ")
    written = float(h2.run("stat", "-c", "%Y", "/run/flannel/subnet.env").stdout)
    active = float(h2.run("date", "-d", props["ActiveEnterTimestamp"], "+%s").stdout)
    assert written <= active + 1  # seconds resolution of the timestamp text
    assert "DOCKER_NETWORK_OPTIONS" in h2.run("cat", "/run/flannel/docker").stdout  # ExecStartPost ran
    assert all(lab.wait_all_pings(30).values())


@root
@slow
def test_stop_exits_0_and_leaves_docker_running(lab: MachineLab):
    h1 = lab.host(1)
    h1.run("systemctl", "stop", "flanneld")
    props = show(h1, "flanneld", "Result", "ExecMainCode", "ExecMainStatus", "ActiveState")
    assert props == {"Result": "success", "ExecMainCode": "1", "ExecMainStatus": "0", "ActiveState": "inactive"}
    assert h1.run("systemctl", "is-active", "docker", check=False).stdout.strip() == "active"
    assert all(lab.wait_all_pings(10).values())  # the data plane outlives the agent
    # Starting Docker starts flanneld first (Wants= and After= in the drop-in)
    h1.run("systemctl", "restart", "docker")
    f, d = show(h1, "flanneld", "ActiveEnterTimestampMonotonic"), show(h1, "docker", "ActiveEnterTimestampMonotonic")
    assert 0 < int(f["ActiveEnterTimestampMonotonic"]) < int(d["ActiveEnterTimestampMonotonic"])
    lab.refresh_container_ip(h1)
    assert all(lab.wait_all_pings(30).values())


BAD_CONFIG_REASON = "Network: '10.5.0.0/33' is not a CIDR"


def set_prefix(m: Machine, prefix: str) -> None:
    m.run("sed", "-i", f's|^FLANNEL_ETCD_PREFIX=.*|FLANNEL_ETCD_PREFIX="{prefix}"|', "/etc/sysconfig/flanneld")


@root
@slow
def test_bad_config_fails_the_start_visibly_and_docker_waits(lab: MachineLab):
    h2 = lab.host(2)
    lab.etcd.sh("""ETCDCTL_API=2 etcdctl set /fpbad/network/config '{"Network":"10.5.0.0/33"}'""")
    set_prefix(h2, "/fpbad/network")
    try:
        since = h2.run("date", "+%s").stdout.strip()
        r = h2.run("systemctl", "restart", "flanneld", check=False)
        assert r.returncode != 0 and "flanneld.service failed" in r.stderr
        # Docker is not started while flanneld cannot be, and its status says why
        assert h2.run("systemctl", "restart", "docker", check=False).returncode != 0
        wait_status_text(h2, "docker", "flanneld.service is not active")
        # five attempts (RestartSec=2s, StartLimitBurst=5), then the unit gives up and stays failed
        wait_status_text(h2, "flanneld", r"Active: failed \(Result: exit-code\)", timeout=90)
        log = h2.run("journalctl", "-u", "flanneld", "--since", f"@{since}", "--no-pager").stdout
        # each attempt logged its reason under flanneld's name; systemd gave up (Docker's pull counts too)
        assert len(re.findall(r"flanneld\[\d+\]: E flanneld: " + re.escape(BAD_CONFIG_REASON), log)) >= 2, log
        assert "Start request repeated too quickly" in log
    finally:
        set_prefix(h2, "/atomic.io/network")
    h2.run("systemctl", "reset-failed", "flanneld", "docker", check=False)
    h2.run("systemctl", "start", "docker")  # and flanneld before it
    assert h2.run("systemctl", "is-active", "flanneld").stdout.strip() == "active"
    lab.refresh_container_ip(h2)
    assert all(lab.wait_all_pings(30).values())


@root
@slow
def test_bad_config_reason_is_the_status_line(lab: MachineLab):
    """`systemctl status flanneld` after a failed start says why (STATUS=failed: <reason>), since its log
    excerpt hides a failed attempt's lines once the unit restarts. systemd empties the status line each time
    it starts the unit again, so the reason shows between attempts and, for good, once systemd gives up;
    during an attempt the line says what it waits for."""
    h2 = lab.host(2)
    # this test's own config (the bad one) and a prefix with none: it must not depend on an earlier test
    lab.etcd.sh("""ETCDCTL_API=2 etcdctl set /fpbad/network/config '{"Network":"10.5.0.0/33"}'""")
    lab.etcd.sh("ETCDCTL_API=2 etcdctl rm --recursive /fpnone >/dev/null 2>&1 || true")
    try:
        set_prefix(h2, "/fpnone/network")
        h2.run("systemctl", "restart", "--no-block", "flanneld")
        wait_status_text(h2, "flanneld", r'Active: activating \(start\)[\s\S]*Status: "reading the network config at '
                         r"/fpnone/network/config \(retrying while etcd or the key is missing\)")
        h2.run("systemctl", "stop", "flanneld")
        h2.run("systemctl", "reset-failed", "flanneld")  # a fresh start-limit count for the failing starts

        set_prefix(h2, "/fpbad/network")
        r = h2.run("systemctl", "restart", "flanneld", check=False)
        assert r.returncode != 0 and "flanneld.service failed" in r.stderr
        reason_line = 'Status: "failed: ' + BAD_CONFIG_REASON
        # between attempts (RestartSec=2s) the status line is the attempt's reason
        wait_status_text(h2, "flanneld", r"Active: activating \(auto-restart\)[\s\S]*" + re.escape(reason_line))
        # once systemd gives up it stays there, where an operator looks first
        text = wait_status_text(h2, "flanneld", r"Active: failed \(Result: exit-code\)", timeout=90)
        assert reason_line in text, text
        status = show(h2, "flanneld", "StatusText")["StatusText"]
        assert status.startswith("failed: " + BAD_CONFIG_REASON), (
            status, h2.run("journalctl", "-u", "flanneld", "-n", "30", "--no-pager", check=False).stdout)
    finally:
        set_prefix(h2, "/atomic.io/network")
        h2.run("systemctl", "reset-failed", "flanneld", check=False)
        h2.run("systemctl", "restart", "flanneld")
    assert show(h2, "flanneld", "StatusText")["StatusText"].startswith("leased ")


def vtep_mac(m: Machine) -> str:
    return json.loads(m.run("ip", "-j", "link", "show", "flannel.1").stdout)[0]["address"]


@root
@slow
def test_reboot_keeps_the_subnet_and_containers_reach_each_other_again(lab: MachineLab):
    h2 = lab.host(2)
    subnet = lab.subnet_env(h2)["FLANNEL_SUBNET"]
    start = time.monotonic()
    lab.reboot(h2)  # poweroff; the netns and flannel.1 go; boot: only the NICs are back
    wait_active(h2, "flanneld")
    wait_active(h2, "docker")
    assert lab.subnet_env(h2)["FLANNEL_SUBNET"] == subnet
    assert docker0(h2)[0] == subnet
    lab.refresh_container_ip(h2)  # restarted by Docker (--restart=always)
    assert all(lab.wait_all_pings(60).values())
    print(f"reboot to pings in {time.monotonic() - start:.0f}s")
    # peers follow the VTEP MAC the rebooted host advertises
    mac = vtep_mac(h2)
    fdb = lab.host(1).run("bridge", "fdb", "show", "dev", "flannel.1").stdout
    assert f"{mac} dst 172.28.128.12" in fdb


@root
@slow
def test_reboot_keeps_the_vtep_mac(lab: MachineLab):
    h1 = lab.host(1)
    mac = vtep_mac(h1)
    lab.reboot(h1)
    wait_active(h1, "flanneld")
    lab.refresh_container_ip(h1)
    assert all(lab.wait_all_pings(60).values())
    assert vtep_mac(h1) == mac


@root
@slow
def test_uninstall_then_provision_again(lab: MachineLab):
    """etc/install.sh --uninstall leaves nothing behind (no dangling enablement links) but the edited
    sysconfig; provisioning again, as `vagrant provision` does, brings the host back on its old subnet."""
    h2 = lab.host(2)
    subnet = lab.subnet_env(h2)["FLANNEL_SUBNET"]
    r = h2.run("sh", "/flannelpy/etc/install.sh", "--uninstall")
    assert "kept /etc/sysconfig/flanneld (edited" in r.stdout and "removed flannelpy" in r.stdout
    for path in ("/opt/flannelpy", "/usr/bin/flanneld", "/usr/bin/flannelctl", "/usr/bin/flanneld-start",
                 "/usr/lib/systemd/system/flanneld.service", "/usr/lib/systemd/system/docker.service.d",
                 "/usr/lib/tmpfiles.d/flannel.conf", "/usr/libexec/flannel"):
        assert h2.run("test", "-e", path, check=False).returncode != 0, path
    assert h2.run("find", "/etc/systemd/system", "-name", "flanneld*").stdout == ""
    assert h2.run("systemctl", "is-active", "flanneld", check=False).stdout.strip() == "inactive"
    assert h2.run("systemctl", "is-active", "docker", check=False).stdout.strip() == "active"
    lab.provision(h2, "provision-host.sh", ETCD_IP, "172.28.128.12")
    assert lab.subnet_env(h2)["FLANNEL_SUBNET"] == subnet
    lab.refresh_container_ip(h2)
    assert all(lab.wait_all_pings(30).values())


@root
@slow
def test_cli_status_and_down(lab: MachineLab):
    r = subprocess.run(["flannelctl", "lab", "--prefix", lab.prefix, "status", "--ping", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [m["machine"] for m in doc["machines"]] == ["etcd", "host1", "host2"]
    assert all(m["running"] for m in doc["machines"])
    assert doc["machines"][1]["units"] == {"flanneld": "active", "docker": "active"}
    assert all(p["ok"] for p in doc["pings"])
    pids = [m.nspawn_pid for m in lab.machines]
    r = subprocess.run(["flannelctl", "lab", "--prefix", lab.prefix, "down"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert lab.prefix not in left
    assert not os.path.exists(lab.workdir)
    assert not any(os.path.exists(f"/proc/{p}") and "nspawn" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")
                   for p in pids)
    with open("/proc/self/mountinfo") as f:
        assert lab.workdir not in f.read()
    assert not any(Path(r_).joinpath("flannelpy-lab", lab.etcd.name).exists() for r_ in ("/sys/fs/cgroup/unified",
                                                                                        "/sys/fs/cgroup/systemd",
                                                                                        "/sys/fs/cgroup"))


# --- the Vagrantfile itself, with Vagrant's docker provider ------------------------------------------------

VAGRANT_PING = """set -e
d=$(mktemp -d); mkdir -p "$d/bin"; cp /bin/busybox "$d/bin/"
for n in sh ping sleep; do ln -s busybox "$d/bin/$n"; done
sudo tar -C "$d" -c . | sudo docker import -c "ENV PATH=/bin" - busybox >/dev/null
"""


@root
@slow
def test_vagrant_up_with_the_docker_provider():
    """`vagrant up --provider=docker` from vagrant/Vagrantfile, unchanged: Vagrant's own SSH, rsync synced
    folder and shell provisioners, against a dockerd of its own in a namespace (so is Vagrant, whose SSH
    goes to the containers' addresses); then the README's cross-host ping."""
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces and dockerd")
    for tool in ("vagrant", "dockerd", "mmdebstrap"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            pytest.fail(f"{tool} is not installed (.ci/setup installs vagrant, docker.io and mmdebstrap)")
    from flannelpy.lab.dockerd import Dockerd
    from flannelpy.lab.machines import project_dir

    ns = "fpv" + secrets.token_hex(2)
    work = f"/var/lib/flannelpy-lab/{ns}"
    os.makedirs(work)
    with open(f"{work}/daemon.json", "w") as f:
        f.write("{}\n")
    subprocess.run(["ip", "netns", "add", ns], check=True)
    dockerd = Dockerd(ns, f"{work}/d", f"{work}/daemon.json", name=ns)
    wheels = rootfs.ensure_wheelhouse(project_dir(), print)
    env = {"PATH": os.environ["PATH"], "HOME": f"{work}/home", "VAGRANT_HOME": f"{work}/home/.vagrant.d",
           "VAGRANT_DOTFILE_PATH": f"{work}/dot", "VAGRANT_CHECKPOINT_DISABLE": "1", "DOCKER_HOST": dockerd.host,
           "FLANNELPY_WHEELHOUSE": wheels, "LANG": "C.UTF-8"}

    def vagrant(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", f"--net=/var/run/netns/{ns}", "vagrant", *args], cwd=REPO / "vagrant",
                              env=env, capture_output=True, text=True, timeout=timeout)

    try:
        dockerd.start()
        start = time.monotonic()
        image = subprocess.run(["sh", str(REPO / "vagrant/docker-image.sh")], env={**env, "HOME": "/root"},
                               capture_output=True, text=True, timeout=1200)
        assert image.returncode == 0, image.stdout[-2000:] + image.stderr[-2000:]
        print(f"docker-image.sh: {time.monotonic() - start:.0f}s")
        start = time.monotonic()
        up = vagrant("up", "--provider=docker", "--no-parallel")
        assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-2000:]
        print(f"vagrant up --provider=docker: {time.monotonic() - start:.0f}s")
        assert "etcd on 172.28.128.10:2379 (v2 enabled)" in up.stdout
        assert "host1: flanneld on eth1: subnet 10.5." in up.stdout and "host2: flanneld on eth1" in up.stdout
        state = vagrant("ssh", "host1", "-c", "systemctl is-active flanneld docker; cat /run/flannel/subnet.env")
        assert state.stdout.split()[:2] == ["active", "active"], state.stdout + state.stderr
        for host in ("host1", "host2"):
            r = vagrant("ssh", host, "-c", VAGRANT_PING)
            assert r.returncode == 0, r.stderr
        # vagrant/README.md's recipe
        r = vagrant("ssh", "host2", "-c", 'sudo docker run -d --rm --name fpop busybox sleep 3600 >/dev/null; '
                                          'sudo docker inspect -f "{{.NetworkSettings.IPAddress}}" fpop')
        h2 = r.stdout.strip()
        assert h2.startswith("10.5."), r.stdout + r.stderr
        r = vagrant("ssh", "host1", "-c", f"sudo docker run --rm busybox ping -c 3 {h2}")
        assert "3 packets transmitted, 3 packets received" in r.stdout, r.stdout + r.stderr
        destroy = vagrant("destroy", "-f")
        assert destroy.returncode == 0, destroy.stderr
    finally:
        if dockerd.proc is not None:
            vagrant("destroy", "-f")
            dockerd.remove()
        subprocess.run(["ip", "netns", "del", ns], check=False)
        subprocess.run(["rm", "-rf", "--one-file-system", work], check=False)
