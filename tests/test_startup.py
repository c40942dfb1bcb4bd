"""Issue #12 part 5: a start that cannot succeed is refused before the lease, and a start that
fails after it undoes what it made.  Real flanneld, real etcd, namespaces of the lab.

Every case asserts exit code 1, exactly one error line and no traceback, no lease left in etcd
that this run created, no subnet.env, and no device this run created.  Read-only files and
directories are made with bind mounts inside a private mount namespace (`unshare --mount`), so
the machine's own mounts are never touched.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import time

import pytest

from flannelpy.agent import (
    SUBNET_ENV_CHECK_S,
    AgentOptions,
    backend_refusal,
    check_before_lease,
)
from flannelpy.config.flags import parse_flags
from flannelpy.docker.daemon_json import BACKUP_SUFFIX
from flannelpy.errors import FlannelError
from flannelpy.hostnet.interface import ExternalInterface
from flannelpy.lab.netns_lab import Lab, own_command

ERROR_LINE = re.compile(r"^(\S+Z )?E \S+: ", re.MULTILINE)


# --- pure decisions (no root) ----------------------------------------------------------------------


def _ext(ip: str, public: str) -> ExternalInterface:
    from ipaddress import IPv4Address

    return ExternalInterface("eth0", 2, IPv4Address(ip), IPv4Address(public), 1500)


def test_host_gw_refuses_a_public_ip_that_is_not_the_interface_address():
    why = backend_refusal("host-gw", _ext("10.250.0.11", "203.0.113.5"))
    assert why is not None and "203.0.113.5" in why and "10.250.0.11" in why and "NAT" in why
    assert backend_refusal("host-gw", _ext("10.250.0.11", "10.250.0.11")) is None
    # vxlan and udp encapsulate, so a public IP behind NAT is the user's business, as in flanneld
    assert backend_refusal("vxlan", _ext("10.250.0.11", "203.0.113.5")) is None
    assert backend_refusal("udp", _ext("10.250.0.11", "203.0.113.5")) is None


def _opts(tmp_path, *argv: str) -> AgentOptions:
    return AgentOptions.from_flags(parse_flags([f"-subnet-file={tmp_path}/run/subnet.env", *argv], {}))


def test_checks_before_the_lease_name_the_flag_and_the_file(tmp_path):
    check_before_lease(_opts(tmp_path))
    bad = tmp_path / "daemon.json"
    bad.write_text("{oops")
    with pytest.raises(FlannelError, match=rf"^-docker-daemon-json={bad}: not valid JSON at line 1 column 2"):
        check_before_lease(_opts(tmp_path, f"-docker-daemon-json={bad}"))
    (tmp_path / "file").write_text("")
    with pytest.raises(FlannelError, match=r"^-subnet-file=.*/file/subnet.env: cannot be written: "):
        check_before_lease(_opts(tmp_path, f"-subnet-file={tmp_path}/file/subnet.env"))
    assert sorted(os.listdir(tmp_path)) == ["daemon.json", "file"]  # checking made nothing


def test_missing_iptables_is_refused_before_the_lease_unless_no_rules_are_wanted(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(FlannelError, match="^iptables not found in PATH"):
        check_before_lease(_opts(tmp_path))
    check_before_lease(_opts(tmp_path, "-iptables-forward-rules=false"))


def test_status_socket_is_optional_only_when_not_given():
    assert AgentOptions.from_flags(parse_flags([], {})).status_socket_optional
    assert not AgentOptions.from_flags(parse_flags(["-status-socket=/run/x.sock"], {})).status_socket_optional
    assert not AgentOptions.from_flags(parse_flags([], {"FLANNELD_STATUS_SOCKET": "/run/x.sock"})).status_socket_optional


# --- on the lab -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lab():
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    lab = Lab(prefix=f"fpst{secrets.token_hex(2)}", hosts=2, backend="vxlan", with_containers=False)
    lab.workdir = f"/tmp/{lab.prefix}"  # short: unix socket paths are limited to 108 bytes
    try:
        lab.build()
        yield lab
    finally:
        lab.down()


class Run:
    """One flanneld start on a lab host, under its own etcd prefix and files."""

    def __init__(self, lab: Lab, host: int = 1, backend: str = "vxlan", network: str = "10.5.0.0/16",
                 vni: int = 1) -> None:
        self.lab = lab
        self.host = lab.host(host)
        self.tag = secrets.token_hex(3)
        self.prefix = f"/fpst-{self.tag}/network"
        self.dir = os.path.join(lab.workdir, f"run-{self.tag}")
        os.makedirs(self.dir)
        self.subnet_file = os.path.join(self.dir, "subnet.env")
        self.socket = os.path.join(self.dir, "s.sock")
        self.device = f"flannel.{vni}" if backend == "vxlan" else ""
        config = {"Network": network, "Backend": {"Type": backend, **({"VNI": vni} if backend == "vxlan" else {})}}
        lab.etcdctl("put", f"{self.prefix}/config", json.dumps(config))

    def argv(self, *flags: str, defaults: bool = True) -> list[str]:
        ours = [f"-subnet-file={self.subnet_file}", f"-status-socket={self.socket}"] if defaults else []
        return [own_command("flanneld"), f"-etcd-endpoints={self.lab.etcd_endpoint}", f"-etcd-prefix={self.prefix}",
                "-iface=eth0", *ours, *flags]

    def command(self, *flags: str, mounts: str = "", defaults: bool = True) -> list[str]:
        """nsenter into the host; with `mounts` (shell commands), inside a private mount namespace."""
        cmd = ["nsenter", f"--net=/var/run/netns/{self.host.netns}"]
        argv = self.argv(*flags, defaults=defaults)
        if mounts:
            return cmd + ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                          f"{mounts} && exec {shlex.join(argv)}"]
        return cmd + argv

    def run(self, *flags: str, mounts: str = "", defaults: bool = True, env: dict | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*flags, mounts=mounts, defaults=defaults), capture_output=True,
                              text=True, timeout=timeout, env=dict(os.environ, **(env or {})),
                              stdin=subprocess.DEVNULL)

    def start(self, *flags: str, mounts: str = "", defaults: bool = True) -> subprocess.Popen:
        self.log = os.path.join(self.dir, "flanneld.log")
        with open(self.log, "ab") as log:
            return subprocess.Popen(self.command(*flags, mounts=mounts, defaults=defaults), stdout=log, stderr=log,
                                    stdin=subprocess.DEVNULL, start_new_session=True)

    def leases(self) -> list[str]:
        out = self.lab.etcdctl("get", "--prefix", f"{self.prefix}/subnets/", "--keys-only").stdout
        return [line for line in out.split() if line]

    def has_device(self) -> bool:
        return bool(self.device) and subprocess.run(
            ["ip", "-n", self.host.netns, "link", "show", self.device], capture_output=True).returncode == 0

    def delete_device(self) -> None:
        if self.has_device():
            subprocess.run(["ip", "-n", self.host.netns, "link", "del", self.device], check=True)


def _wait_file(path: str, proc: subprocess.Popen, log: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"flanneld exited {proc.returncode}:\n{open(log).read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {path} after {timeout}s:\n{open(log).read()[-3000:]}")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def assert_refused(run: Run, proc: subprocess.CompletedProcess, *, message: str, before_lease: bool = True) -> str:
    """Exit 1, one error line naming the problem, no traceback, nothing left behind; and, for
    what can be checked up front, refused before a lease was even taken (not taken and undone)."""
    out = proc.stdout + proc.stderr
    if before_lease:
        assert "allocated lease" not in out and "acquired lease" not in out, out
    errors = ERROR_LINE.findall(out)
    assert proc.returncode == 1, out
    assert len(errors) == 1, out
    line = next(l for l in out.splitlines() if ERROR_LINE.match(l))
    assert message in line, out
    assert "Traceback" not in out, out
    assert run.leases() == [], out
    assert not os.path.exists(run.subnet_file), out
    assert not run.has_device(), out
    return line


@pytest.mark.root
@pytest.mark.etcd
def test_invalid_daemon_json_is_refused_before_the_lease(lab):
    run = Run(lab)
    dj = os.path.join(run.dir, "daemon.json")
    with open(dj, "w") as f:
        f.write('{"debug": true,}')
    assert_refused(run, run.run(f"-docker-daemon-json={dj}"),
                   message=f"-docker-daemon-json={dj}: not valid JSON at line 1 column 16")
    assert sorted(os.listdir(run.dir)) == ["daemon.json"]


@pytest.mark.root
@pytest.mark.etcd
def test_read_only_daemon_json_is_refused_and_leaves_no_backup(lab):
    run = Run(lab)
    dj = os.path.join(run.dir, "daemon.json")
    with open(dj, "w") as f:
        f.write('{"debug": true}')
    proc = run.run(f"-docker-daemon-json={dj}", mounts=f"mount --bind {dj} {dj} && mount -o remount,bind,ro {dj}")
    assert_refused(run, proc, message=f"-docker-daemon-json={dj}: cannot be updated: {dj} is a mount point")
    assert open(dj).read() == '{"debug": true}'
    assert not os.path.exists(dj + BACKUP_SUFFIX)


@pytest.mark.root
@pytest.mark.etcd
def test_symlinked_daemon_json_is_followed_and_stays_a_symlink(lab):
    run = Run(lab)
    os.makedirs(os.path.join(run.dir, "managed"))
    target = os.path.join(run.dir, "managed", "daemon.json")
    with open(target, "w") as f:
        f.write('{"log-driver": "journald"}')
    link = os.path.join(run.dir, "daemon.json")
    os.symlink(target, link)
    proc = run.start(f"-docker-daemon-json={link}")
    try:
        _wait_file(run.subnet_file, proc, run.log)
        assert _stop(proc) == 0
    finally:
        _stop(proc)
        run.delete_device()
    assert os.path.islink(link) and os.readlink(link) == target
    data = json.loads(open(target).read())
    assert data["log-driver"] == "journald" and data["bip"].endswith("/24") and data["mtu"] == 1450
    assert open(target + BACKUP_SUFFIX).read() == '{"log-driver": "journald"}'


@pytest.mark.root
@pytest.mark.etcd
def test_symlinked_daemon_json_into_a_read_only_directory_is_refused(lab):
    run = Run(lab)
    managed = os.path.join(run.dir, "managed")
    os.makedirs(managed)
    target = os.path.join(managed, "daemon.json")
    with open(target, "w") as f:
        f.write("{}")
    link = os.path.join(run.dir, "daemon.json")
    os.symlink(target, link)
    proc = run.run(f"-docker-daemon-json={link}",
                   mounts=f"mount --bind {managed} {managed} && mount -o remount,bind,ro {managed}")
    assert_refused(run, proc, message=f"-docker-daemon-json={link} (-> {target}): cannot be updated: "
                                      f"cannot create files in {managed}: Read-only file system")
    assert os.path.islink(link) and open(target).read() == "{}"
    assert sorted(os.listdir(managed)) == ["daemon.json"]


@pytest.mark.root
@pytest.mark.etcd
def test_unwritable_subnet_file_directory_is_refused_before_the_lease(lab):
    run = Run(lab)
    ro = os.path.join(run.dir, "ro")
    os.makedirs(ro)
    run.subnet_file = os.path.join(ro, "flannel", "subnet.env")
    proc = run.run(f"-subnet-file={run.subnet_file}", mounts=f"mount -t tmpfs -o ro,size=64k tmpfs {ro}")
    assert_refused(run, proc, message=f"-subnet-file={run.subnet_file}: cannot be written: "
                                      f"cannot create directory {ro}/flannel: Read-only file system")


@pytest.mark.root
@pytest.mark.etcd
def test_read_only_run_with_flanneld_defaults_is_refused_before_the_lease(lab):
    """/run read-only (a read-only tmpfs over it, in a private mount namespace) and flanneld's
    default -subnet-file and -status-socket: refused before anything is taken.  (The agent's
    /run/flannel/subnet.env could only have been written into that private tmpfs, which is gone
    with the namespace; assert_refused looks at the run's own directory.)"""
    run = Run(lab)
    proc = run.run(defaults=False, mounts="mount -t tmpfs -o ro,size=64k tmpfs /run")
    assert_refused(run, proc, message="-subnet-file=/run/flannel/subnet.env: cannot be written: "
                                      "cannot create directory /run/flannel: Read-only file system")


@pytest.mark.root
@pytest.mark.etcd
def test_status_socket_in_use_is_refused_before_the_lease(lab):
    run = Run(lab)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        other.bind(run.socket)
        other.listen()
        assert_refused(run, run.run(), message=f"status socket {run.socket}: another flanneld is serving on it")
    finally:
        other.close()


@pytest.mark.root
@pytest.mark.etcd
def test_host_gw_public_ip_not_on_the_interface_is_refused_before_the_lease(lab):
    run = Run(lab, backend="host-gw")
    proc = run.run("-public-ip=203.0.113.5")
    assert_refused(run, proc, message="host-gw backend: public IP 203.0.113.5 differs from interface eth0")


def _failing_restart_mounts() -> str:
    """A private writable /run that has /run/systemd/system, so -docker-restart calls systemctl,
    which fails here (no systemd as PID 1): a real failure after the lease, subnet.env and
    daemon.json were written."""
    return "mount -t tmpfs -o size=1m tmpfs /run && mkdir -p /run/systemd/system"


@pytest.mark.root
@pytest.mark.etcd
def test_failure_after_the_lease_undoes_lease_subnet_env_daemon_json_and_device(lab):
    run = Run(lab)
    dj = os.path.join(run.dir, "daemon.json")
    with open(dj, "w") as f:
        f.write('{"debug": true}')
    proc = run.run(f"-docker-daemon-json={dj}", "-docker-restart", mounts=_failing_restart_mounts())
    out = proc.stdout + proc.stderr
    assert "acquired lease" in out and "wrote " in out, out  # it did get that far
    assert_refused(run, proc, message="systemctl try-restart docker.service failed", before_lease=False)
    assert "deleted lease" in out, out
    assert open(dj).read() == '{"debug": true}'  # put back byte for byte
    assert sorted(os.listdir(run.dir)) == ["daemon.json"]  # no backup, no subnet.env


@pytest.mark.root
@pytest.mark.etcd
def test_failure_after_reusing_a_lease_keeps_that_lease_and_its_subnet_env(lab):
    run = Run(lab)
    proc = run.start()
    try:
        _wait_file(run.subnet_file, proc, run.log)
    finally:
        assert _stop(proc) == 0
    before_env = open(run.subnet_file).read()
    before_leases = run.leases()
    assert len(before_leases) == 1 and run.has_device()
    dj = os.path.join(run.dir, "daemon.json")
    try:
        proc = run.run(f"-docker-daemon-json={dj}", "-docker-restart", mounts=_failing_restart_mounts())
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1 and len(ERROR_LINE.findall(out)) == 1 and "Traceback" not in out, out
        assert "reusing lease" in out and "deleted lease" not in out, out
        assert run.leases() == before_leases  # a lease of an earlier run is not this run's to delete
        assert open(run.subnet_file).read() == before_env  # rewritten by this run, then put back
        assert run.has_device()  # made by the earlier run, kept
        assert not os.path.exists(dj)  # created by this run, removed
    finally:
        run.delete_device()


# --- a removed subnet.env comes back ----------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.etcd
def test_removed_or_altered_subnet_env_is_rewritten(lab):
    run = Run(lab)
    proc = run.start()
    try:
        _wait_file(run.subnet_file, proc, run.log)
        original = open(run.subnet_file, "rb").read()
        times = []
        for damage in ("remove", "alter", "remove"):
            if damage == "remove":
                os.unlink(run.subnet_file)
            else:
                with open(run.subnet_file, "w") as f:
                    f.write("FLANNEL_SUBNET=192.0.2.1/24\n")
            t0 = time.monotonic()
            deadline = t0 + SUBNET_ENV_CHECK_S + 3
            while True:
                try:
                    if open(run.subnet_file, "rb").read() == original:
                        break
                except FileNotFoundError:
                    pass
                assert time.monotonic() < deadline, open(run.log).read()[-2000:]
                assert proc.poll() is None, open(run.log).read()[-2000:]
                time.sleep(0.05)
            times.append(time.monotonic() - t0)
        print(f"FIGURE subnet.env rewritten after: {', '.join(f'{t:.2f}s' for t in times)} "
              f"(check period {SUBNET_ENV_CHECK_S}s)")
        assert open(run.log).read().count("was removed or altered; rewrote it") == 3
        assert os.stat(run.subnet_file).st_mode & 0o777 == 0o644
    finally:
        _stop(proc)
        run.delete_device()
