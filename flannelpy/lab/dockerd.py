"""A real dockerd running inside a named network namespace, for tests and the lab.

Each instance has its own data-root, exec-root (hence its own containerd), socket and pidfile under
`workdir`, and, living in its own network namespace, its own docker0 and iptables rules.  Several can
run side by side, one per simulated host:

    with Dockerd("fpip-abc-h1", "/tmp/fpip-abc-h1", daemon_json_path) as d:
        d.import_busybox()
        d.run("c1", ["ping", "-c1", "10.1.74.1"])

Everything is stopped with SIGTERM (dockerd then stops its containers, containerd and mounts).  A
daemon started by another process (the lab's `up` vs. `down`) is stopped by PID with `stop_dockerd`;
`leftover_pids` and `unmount_under` then catch what a killed daemon could leave behind.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import tarfile
import time

BUSYBOX = "/bin/busybox"  # Debian busybox-static: no shared libraries, so one file is an image
BUSYBOX_IMAGE = "fpip-busybox:latest"
BUSYBOX_LINKS = ("sh", "ping", "ip", "ifconfig", "route", "cat", "sleep", "wget", "nc", "hostname", "ls")


# What a dockerd spawns: its own containerd (under --exec-root) and one shim per container.
DOCKER_PROGRAMS = ("dockerd", "containerd", "containerd-shim-runc-v2", "containerd-shim")


class Dockerd:
    def __init__(self, netns: str, workdir: str, daemon_json: str, *, extra_args: tuple[str, ...] = (),
                 name: str = "") -> None:
        self.netns = netns
        self.workdir = os.path.abspath(workdir)
        self.daemon_json = daemon_json
        self.extra_args = extra_args
        # containerd namespace: unique per daemon, in case a system containerd is shared
        self.name = name or os.path.basename(self.workdir)
        self.sock = os.path.join(self.workdir, "docker.sock")
        self.pidfile = os.path.join(self.workdir, "docker.pid")
        self.log_path = os.path.join(self.workdir, "dockerd.log")
        self.proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.sock}"

    def _ns(self, *args: str) -> list[str]:
        return ["nsenter", f"--net=/var/run/netns/{self.netns}", *args]

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def start(self, timeout: float = 60) -> "Dockerd":
        """Start dockerd and wait until it answers on its socket (raises with the log tail if not)."""
        self.launch()
        return self.wait_ready(timeout)

    def launch(self) -> int:
        """Start dockerd without waiting (so several can boot in parallel); returns its PID.

        nsenter without --fork execs dockerd, so the PID is dockerd's own.
        """
        os.makedirs(self.workdir, exist_ok=True)
        subprocess.run(self._ns("ip", "link", "set", "lo", "up"), check=True)
        cmd = self._ns(
            "dockerd",
            f"--config-file={self.daemon_json}",
            f"--data-root={self.workdir}/data",
            f"--exec-root={self.workdir}/exec",
            "-H", self.host,
            f"--pidfile={self.pidfile}",
            "--iptables=true",
            f"--containerd-namespace={self.name}",
            f"--containerd-plugins-namespace={self.name}-plugins",
            *self.extra_args,
        )
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        return self.proc.pid

    def wait_ready(self, timeout: float = 60) -> "Dockerd":
        """Wait until the launched dockerd answers `docker version`; stop it and raise if it does not."""
        assert self.proc is not None, "launch() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd in {self.netns} exited ({self.proc.returncode}):\n{self.log_tail()}")
            if os.path.exists(self.sock) and self.docker("version", check=False).returncode == 0:
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"dockerd in {self.netns} did not come up in {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return "".join(fh.readlines()[-n:])
        except OSError:
            return ""

    def docker(self, *args: str, check: bool = True, input: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run the docker CLI against this daemon (the CLI itself needs no namespace)."""
        proc = subprocess.run(["docker", "-H", self.host, *args], input=input, capture_output=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
        return proc

    def import_busybox(self, tag: str = BUSYBOX_IMAGE, also: tuple[str, ...] = ("busybox:latest",)) -> str:
        """Build a one-file image from the host's static busybox (no registry needed).

        It is also tagged `busybox:latest` (this daemon's own data-root: no other Docker sees it), so
        that a user's `docker run busybox ...` against the lab's daemon finds it instead of pulling."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for d in ("bin", "tmp", "proc", "sys", "dev", "etc"):
                info = tarfile.TarInfo(d)
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            tar.add(os.path.realpath(BUSYBOX), arcname="bin/busybox")
            for name in BUSYBOX_LINKS:
                info = tarfile.TarInfo(f"bin/{name}")
                info.type, info.linkname = tarfile.SYMTYPE, "busybox"
                tar.addfile(info)
        self.docker("import", "-c", "ENV PATH=/bin", "-", tag, input=buf.getvalue())
        for other in also:
            self.docker("tag", tag, other)
        return tag

    def run(self, name: str, cmd: list[str], *, image: str = BUSYBOX_IMAGE, detach: bool = False,
            args: tuple[str, ...] = (), check: bool = True) -> subprocess.CompletedProcess:
        """`docker run --name NAME [args] IMAGE CMD`; removed on exit unless detached."""
        mode = ("-d",) if detach else ("--rm",)
        return self.docker("run", *mode, "--name", name, *args, image, *cmd, check=check)

    def exec(self, name: str, cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
        return self.docker("exec", name, *cmd, check=check)

    def container_ip(self, name: str) -> str:
        out = self.docker("inspect", "-f", "{{.NetworkSettings.IPAddress}}", name).stdout
        return out.decode().strip()

    def container_ip6(self, name: str) -> str:
        """The container's IPv6 address on docker0 ("" when Docker runs without IPv6)."""
        out = self.docker("inspect", "-f", "{{.NetworkSettings.GlobalIPv6Address}}", name).stdout
        return out.decode().strip()

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM and wait (dockerd stops containers, containerd and unmounts); SIGKILL if stuck."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group holds only this dockerd's children
                self.proc.wait()
        self.proc = None
        self._log.close()

    def remove(self) -> None:
        """Stop, then delete workdir (data-root included)."""
        self.stop()
        kill_leftovers(self.workdir)
        unmount_under(self.workdir)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Dockerd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.remove()


# --- clean-up usable from another process (lab down) ---------------------------------------------------


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(") ", 1)[1][0] != "Z"  # a zombie has exited already
    except (OSError, IndexError):
        return False


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return True
        except ChildProcessError:
            pass  # not our child: poll /proc instead
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def is_our_dockerd(pid: int, sock: str) -> bool:
    """True if `pid` is still the dockerd serving `sock` (guards against a recycled PID)."""
    argv = _cmdline(pid)
    return bool(argv) and os.path.basename(argv[0]) == "dockerd" and f"unix://{sock}" in argv


def stop_dockerd(pid: int, sock: str, timeout: float = 60) -> bool:
    """SIGTERM a dockerd we started (found by PID, checked against its socket) and wait for it.

    dockerd then stops its containers and containerd and unmounts its layers.  After `timeout` it
    is SIGKILLed.  Returns True when it exited on SIGTERM (or was already gone).
    """
    if not pid or not is_our_dockerd(pid, sock):
        return True
    _kill(pid, signal.SIGTERM)
    if _wait_gone(pid, timeout):
        return True
    _kill(pid, signal.SIGKILL)
    _wait_gone(pid, 10)
    return False


def leftover_pids(root: str) -> list[int]:
    """PIDs of dockerd/containerd/shims whose command line names a path under `root`.

    Normally empty; after a SIGKILLed dockerd its containerd and shims would otherwise live on.
    Matching on our own unique directory means only processes a daemon of ours started qualify.
    """
    root = os.path.abspath(root).rstrip("/") + "/"
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        argv = _cmdline(int(entry))
        if argv and os.path.basename(argv[0]) in DOCKER_PROGRAMS and any(root in a for a in argv):
            pids.append(int(entry))
    return pids


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(c) for c in fh.read().split()]
    except OSError:
        return []


def _descendants(pid: int) -> list[int]:
    out, todo = [], _children(pid)
    while todo:
        child = todo.pop()
        out.append(child)
        todo += _children(child)
    return out


def kill_leftovers(root: str, cgroup_root: str = "/sys/fs/cgroup") -> list[int]:
    """SIGKILL what a killed dockerd under `root` left running; returns the PIDs killed.

    A shim outlives its dockerd and containerd, and the container's processes are its children, so
    those go too (found before the shim dies and they are re-parented).  The containers' now-empty
    cgroups (Docker's default cgroupfs parent `docker/<id>`) are removed; rmdir fails on busy ones.
    """
    victims: list[int] = []
    ids: list[str] = []
    for pid in leftover_pids(root):
        argv = _cmdline(pid)
        if "-id" in argv[:-1]:
            ids.append(argv[argv.index("-id") + 1])
        victims += _descendants(pid) + [pid]
    for pid in victims:
        _kill(pid)
    for pid in victims:
        _wait_gone(pid, 10)
    for cid in ids:
        if not cid.isalnum():
            continue  # a container ID is hex; never build a path from anything else
        for path in [os.path.join(cgroup_root, "docker", cid),
                     *(os.path.join(cgroup_root, c, "docker", cid) for c in _listdir(cgroup_root))]:
            try:
                os.rmdir(path)
            except OSError:
                pass
    return victims


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def mounts_under(root: str) -> list[str]:
    """Mount points at or below `root`, in mount order (from /proc/self/mountinfo)."""
    root = os.path.abspath(root).rstrip("/")
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            # field 5 is the mount point, with space, tab, newline and backslash octal-escaped
            point = line.split()[4].encode().decode("unicode_escape")
            if point == root or point.startswith(root + "/"):
                found.append(point)
    return found


def unmount_under(root: str) -> list[str]:
    """Unmount everything below `root`, newest first (lazily if busy); returns what was mounted.

    Must run before deleting a data-root: rmtree through a live overlay or bind mount would
    delete inside it.
    """
    points = mounts_under(root)
    for point in reversed(points):
        if subprocess.run(["umount", point], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", point], capture_output=True)
    return points
