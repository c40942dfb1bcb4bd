"""A booted systemd container (systemd-nspawn) as one lab machine, without a systemd on the host.

The host's PID 1 need not be systemd (machinectl then does not work), so `systemd-nspawn` runs as a process
the lab starts and tracks by PID, with `--register=no --keep-unit`, and commands enter the machine with
`nsenter -t <its PID 1> -a`. Each machine gets:

- its own network namespace, made by the lab beforehand (`--network-namespace-path`), as a VM has its NICs;
- an overlay over a cached root (`flannelpy.lab.rootfs`), so the cached root stays pristine and the machine's
  own changes (installed packages, /etc, the journal) survive a power cycle;
- /var/lib/docker and /var/lib/containerd bound from plain directories: overlay2 cannot stack on the overlay.

What dockerd needs inside such a machine (found by trying, systemd 252, kernel with cgroup v1 + v2 hybrid):

- cgroup v2 in the machine (`SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1`): under hybrid or legacy nspawn mounts the
  v1 controllers read-only and runc cannot create the containers' cgroups. nspawn must start in a cgroup of
  its own (made here, in the v2 hierarchy and the v1 name=systemd one): with `--keep-unit` the machine's
  cgroup tree is the one nspawn runs in, which would otherwise be the host's root cgroup.
- `SYSTEMD_NSPAWN_API_VFS_WRITABLE=network`: /proc/sys/net writable, or dockerd cannot set ip_forward
  (`--network-namespace-path` does not count as a private network for this).
- `--capability=all`: mounts, iptables, namespaces for the containers.
- `--system-call-filter="add_key keyctl bpf"`: nspawn's seccomp list refuses these; runc needs the session
  keyring (keyctl) and, on cgroup v2, a BPF device filter per container (bpf).
- nothing more: no --private-users (off by default), no Delegate= (that is for a host systemd's scope unit).
  /dev/net/tun is bound in too, for flanneld's udp backend.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field

from flannelpy.errors import FlannelError

from .dockerd import mounts_under, unmount_under

NSPAWN_RUNTIME_DIR = "/run/systemd/nspawn"
CGROUP_PARENT = "flannelpy-lab"
# A machine's commands run with a clean environment, as a provisioning shell or a login would.
MACHINE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
               "LANG": "C.UTF-8", "TERM": "dumb"}
NSPAWN_ENV = {"SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1", "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "network"}
SYSCALLS_FOR_DOCKER = ("add_key", "keyctl", "request_key", "bpf")


class MachineError(FlannelError):
    pass


# --- decisions -------------------------------------------------------------------------------------------


def nspawn_command(name: str, root: str, netns_path: str, binds: list[tuple[str, str, bool]]) -> list[str]:
    """systemd-nspawn's command line for one machine; binds are (host path, machine path, read-only)."""
    cmd = ["systemd-nspawn", "--boot", f"--directory={root}", f"--machine={name}", "--register=no",
           "--keep-unit", f"--network-namespace-path={netns_path}", "--console=read-only",
           "--capability=all", f"--system-call-filter={' '.join(SYSCALLS_FOR_DOCKER)}",
           "--bind=/dev/net/tun"]
    for host_path, machine_path, read_only in binds:
        cmd.append(f"--bind{'-ro' if read_only else ''}={host_path}:{machine_path}")
    return cmd


def cgroup_roots(mounts: list[tuple[str, str, str]]) -> list[str]:
    """Where a machine's own cgroup must be made: the v2 hierarchy and, on a hybrid or legacy host, v1's
    name=systemd (mounts are (fstype, mount point, options) from /proc/self/mounts)."""
    roots = []
    for fstype, point, options in mounts:
        if fstype == "cgroup2" and point.startswith("/sys/fs/cgroup"):
            roots.append(point)
        elif fstype == "cgroup" and "name=systemd" in options.split(","):
            roots.append(point)
    return roots


def leader_from_status(statuses: dict[int, str]) -> int:
    """The machine's PID 1 among nspawn's descendants: the one whose innermost namespace PID is 1."""
    for pid, status in sorted(statuses.items()):
        for line in status.splitlines():
            if line.startswith("NSpid:") and line.split()[-1] == "1" and len(line.split()) > 2:
                return pid
    return 0


# --- actions ---------------------------------------------------------------------------------------------


def mounts() -> list[tuple[str, str, str]]:
    with open("/proc/self/mounts") as f:
        return [(p[2], p[1], p[3]) for p in (line.split() for line in f) if len(p) >= 4]


def ensure_nspawn_runtime_dir() -> None:
    """nspawn refuses to work under a /run/systemd/nspawn that is on a disk file system ("Attempted to
    remove disk file system"), as /run is when the host is not booted by systemd: give it a tmpfs."""
    os.makedirs(NSPAWN_RUNTIME_DIR, exist_ok=True)
    if subprocess.run(["mountpoint", "-q", NSPAWN_RUNTIME_DIR]).returncode != 0:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", NSPAWN_RUNTIME_DIR], check=True)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


@dataclass
class Machine:
    """One machine: its name (also its netns and nspawn machine name), root overlay, and processes."""

    name: str
    hostname: str
    dir: str  # state: overlay upper/work/merged, docker data, console log
    lower: str  # the cached root
    netns: str
    binds: list[tuple[str, str, bool]] = field(default_factory=list)
    nspawn_pid: int = 0
    leader_pid: int = 0
    boots: int = 0

    def __post_init__(self) -> None:
        self.binds = [tuple(b) for b in self.binds]  # type: ignore[misc]  # lists after a JSON round trip
        self._proc: subprocess.Popen | None = None

    # --- paths ---

    @property
    def merged(self) -> str:
        return os.path.join(self.dir, "root")

    @property
    def console_log(self) -> str:
        return os.path.join(self.dir, "console.log")

    def cgroup_dirs(self) -> list[str]:
        return [os.path.join(r, CGROUP_PARENT, self.name) for r in cgroup_roots(mounts())]

    # --- life cycle ---

    def prepare(self) -> None:
        """The overlay over the cached root, the machine's hostname, its docker directories."""
        for sub in ("upper", "work", "root", "docker", "containerd"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        etc = os.path.join(self.dir, "upper", "etc")
        os.makedirs(etc, exist_ok=True)
        with open(os.path.join(etc, "hostname"), "w") as f:
            f.write(self.hostname + "\n")
        with open(os.path.join(etc, "hosts"), "w") as f:
            f.write(f"127.0.0.1\tlocalhost\n127.0.1.1\t{self.hostname}\n")
        self.binds = [(os.path.join(self.dir, "docker"), "/var/lib/docker", False),
                      (os.path.join(self.dir, "containerd"), "/var/lib/containerd", False), *self.binds]
        self.mount_root()

    def mount_root(self) -> None:
        if subprocess.run(["mountpoint", "-q", self.merged]).returncode == 0:
            return
        opts = (f"lowerdir={self.lower},upperdir={os.path.join(self.dir, 'upper')},"
                f"workdir={os.path.join(self.dir, 'work')}")
        proc = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, self.merged],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise MachineError(f"{self.name}: cannot mount its root overlay: {proc.stderr.strip()}")

    def boot(self, timeout: float = 90.0) -> None:
        """Start nspawn (in its own session and cgroup, so it outlives the caller) and wait until the
        machine's systemd has finished booting."""
        if self.nspawn_pid and alive(self.nspawn_pid):
            raise MachineError(f"{self.name} is already running (nspawn pid {self.nspawn_pid})")
        ensure_nspawn_runtime_dir()
        self.mount_root()
        dirs = self.cgroup_dirs()
        for d in dirs:
            os.makedirs(d, exist_ok=True)

        def enter_cgroup() -> None:  # runs in the child before exec: nspawn starts in the machine's cgroup
            for d in dirs:
                with open(os.path.join(d, "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))

        cmd = nspawn_command(self.name, self.merged, f"/var/run/netns/{self.netns}", self.binds)
        log = open(self.console_log, "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "SYSTEMD_"))}
        self._proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                      env={**env, **NSPAWN_ENV}, start_new_session=True, preexec_fn=enter_cgroup)
        log.close()
        self.nspawn_pid, self.leader_pid = self._proc.pid, 0
        self.boots += 1
        self.wait_booted(timeout)

    def find_leader(self) -> int:
        statuses: dict[int, str] = {}
        todo = _children(self.nspawn_pid)
        while todo:
            pid = todo.pop()
            try:
                with open(f"/proc/{pid}/status") as f:
                    statuses[pid] = f.read()
            except OSError:
                continue
            todo += _children(pid) if len(statuses) < 8 else []
        return leader_from_status(statuses)

    def wait_booted(self, timeout: float) -> str:
        """Wait for `systemctl is-system-running` to say running or degraded; returns which."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            if not alive(self.nspawn_pid):
                raise MachineError(f"{self.name}: systemd-nspawn exited; console:\n{self.console_tail()}")
            if not self.leader_pid:
                self.leader_pid = self.find_leader()
            if self.leader_pid:
                proc = self.run("systemctl", "is-system-running", check=False, timeout=10)
                state = proc.stdout.strip()
                if state in ("running", "degraded"):
                    return state
            time.sleep(0.3)
        raise MachineError(f"{self.name}: not booted after {timeout:.0f}s (state {state or 'unknown'}); "
                           f"console:\n{self.console_tail()}")

    def running(self) -> bool:
        return bool(self.nspawn_pid) and alive(self.nspawn_pid) and "systemd-nspawn" in " ".join(
            cmdline(self.nspawn_pid)[:1])

    def console_tail(self, lines: int = 25) -> str:
        try:
            with open(self.console_log, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no console log)"

    def run(self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a command inside the machine (all its namespaces, its root, a clean environment)."""
        if not self.leader_pid:
            raise MachineError(f"{self.name} is not running")
        cmd = ["nsenter", "-t", str(self.leader_pid), "-a", "env", "-i",
               *(f"{k}={v}" for k, v in {**MACHINE_ENV, **(env or {})}.items()), *args]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input,
                                  stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise MachineError(f"{self.name}: {shlex.join(args)} did not finish in {timeout:.0f}s") from None
        if check and proc.returncode != 0:
            raise MachineError(f"{self.name}: {shlex.join(args)} failed ({proc.returncode}):\n"
                               f"{(proc.stdout + proc.stderr).strip()[-3000:]}")
        return proc

    def sh(self, script: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.run("sh", "-c", script, check=check, timeout=timeout)

    def poweroff(self, timeout: float = 90.0) -> None:
        """`systemctl poweroff` inside and wait for nspawn to exit, as a VM powers off."""
        if not self.running():
            return
        self.run("systemctl", "poweroff", check=False, timeout=30)
        self._wait_exit(timeout)

    def _wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                break
            if self._proc is None and not alive(self.nspawn_pid):
                break
            time.sleep(0.2)
        else:
            return False
        self.nspawn_pid = self.leader_pid = 0
        self._proc = None
        return True

    def stop(self, timeout: float = 60.0) -> None:
        """Power off: SIGTERM to nspawn halts the machine's systemd cleanly; SIGKILL if that hangs."""
        if not self.running():
            self.nspawn_pid = self.leader_pid = 0
            return
        os.kill(self.nspawn_pid, signal.SIGTERM)
        if not self._wait_exit(timeout):
            os.killpg(self.nspawn_pid, signal.SIGKILL)  # its own session: nspawn and the machine
            self._wait_exit(10)

    def remove(self) -> None:
        """Stop, unmount, delete the machine's cgroups and its directory."""
        self.stop()
        unmount_under(self.dir)
        for d in self.cgroup_dirs():
            _rmdir_tree(d)
        if not mounts_under(self.dir):  # never delete through a mount
            subprocess.run(["rm", "-rf", "--one-file-system", self.dir], capture_output=True)


def _rmdir_tree(path: str) -> None:
    """Remove an (empty of processes) cgroup directory and its children, deepest first."""
    if not os.path.isdir(path):
        return
    for dirpath, dirnames, _ in sorted(os.walk(path), key=lambda w: -w[0].count("/")):
        try:
            os.rmdir(dirpath)
        except OSError:
            pass
    parent = os.path.dirname(path)
    try:
        os.rmdir(parent)  # the lab's parent cgroup, once no machine uses it
    except OSError:
        pass
