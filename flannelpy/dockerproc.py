"""A real dockerd running inside a named network namespace, for tests and the lab.

Each instance has its own data-root, exec-root (hence its own containerd), socket and pidfile under
`workdir`, and, living in its own network namespace, its own docker0 and iptables rules.  Several can
run side by side, one per simulated host:

    with Dockerd("fpip-abc-h1", "/tmp/fpip-abc-h1", daemon_json_path) as d:
        d.import_busybox()
        d.run("c1", ["ping", "-c1", "10.1.74.1"])

Everything is stopped with SIGTERM (dockerd then stops its containers, containerd and mounts).
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


class Dockerd:
    def __init__(self, netns: str, workdir: str, daemon_json: str, *, extra_args: tuple[str, ...] = ()) -> None:
        self.netns = netns
        self.workdir = os.path.abspath(workdir)
        self.daemon_json = daemon_json
        self.extra_args = extra_args
        self.sock = os.path.join(self.workdir, "docker.sock")
        self.pidfile = os.path.join(self.workdir, "docker.pid")
        self.log_path = os.path.join(self.workdir, "dockerd.log")
        self.proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.sock}"

    def _ns(self, *args: str) -> list[str]:
        return ["nsenter", f"--net=/var/run/netns/{self.netns}", *args]

    def start(self, timeout: float = 60) -> "Dockerd":
        """Start dockerd and wait until it answers on its socket (raises with the log tail if not)."""
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
            # containerd namespace per daemon, in case a system containerd is shared
            f"--containerd-namespace={os.path.basename(self.workdir)}",
            f"--containerd-plugins-namespace={os.path.basename(self.workdir)}-plugins",
            *self.extra_args,
        )
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
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

    def import_busybox(self, tag: str = BUSYBOX_IMAGE) -> str:
        """Build a one-file image from the host's static busybox (no registry needed)."""
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
        subprocess.run(["umount", "-R", f"{self.workdir}/exec"], capture_output=True)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Dockerd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.remove()
