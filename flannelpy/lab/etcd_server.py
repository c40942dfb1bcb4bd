"""A real etcd process for the lab and the tests: free ports, its own data dir.

By default it listens on 127.0.0.1 in this namespace; the lab runs it inside its underlay
namespace (`netns`) on the bridge address so that agents in host namespaces reach it.  With `tls`
(flannelpy.lab.pki) it serves https only and asks every client for a certificate (--client-cert-auth).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time

import httpx

from .pki import PkiFiles


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdServer:
    """One etcd member on 127.0.0.1 with the v2 API enabled (etcd 3.4 turns it off by default)."""

    def __init__(self, data_dir: str | None = None, name: str = "fptest", enable_v2: bool = True,
                 *, listen_ip: str = "127.0.0.1", netns: str | None = None,
                 client_port: int | None = None, peer_port: int | None = None,
                 tls: PkiFiles | None = None) -> None:
        self.name = name
        self.listen_ip = listen_ip
        self.netns = netns
        self.enable_v2 = enable_v2  # False: etcd 3.4's default, the v2 keys API answers 404
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="flannelpy-etcd-")
        # In a fresh namespace every port is free; free_port() probes this namespace.
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.proc: subprocess.Popen | None = None
        self.tls = tls

    def tls_args(self) -> list[str]:
        """etcd's own TLS flags: https for clients, each of which must present a certificate of our CA."""
        t = self.tls
        return ["--cert-file", t.server_cert, "--key-file", t.server_key, "--client-cert-auth",
                "--trusted-ca-file", t.ca] if t else []

    def etcdctl_tls_args(self, api: int = 3) -> list[str]:
        """etcdctl's TLS flags (v2's etcdctl spells them differently)."""
        t = self.tls
        if t is None:
            return []
        if api == 2:
            return [f"--ca-file={t.ca}", f"--cert-file={t.client_cert}", f"--key-file={t.client_key}"]
        return [f"--cacert={t.ca}", f"--cert={t.client_cert}", f"--key={t.client_key}"]

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.listen_ip}:{self.client_port}"

    def _prefix(self) -> list[str]:
        return ["nsenter", f"--net=/var/run/netns/{self.netns}"] if self.netns else []

    def start(self, timeout: float = 20.0) -> None:
        self.launch()
        self.wait_healthy(timeout)

    def launch(self) -> int:
        """Start etcd without waiting for it (the lab records the PID before the wait); returns the PID."""
        binary = shutil.which("etcd") or "/usr/bin/etcd"
        peer = f"http://{self.listen_ip}:{self.peer_port}"
        cmd = [
            *self._prefix(),
            binary,
            "--name", self.name,
            "--data-dir", os.path.join(self.data_dir, "data"),
            "--listen-client-urls", self.endpoint,
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}",
            f"--enable-v2={'true' if self.enable_v2 else 'false'}",
            "--log-level", "warn",
            *self.tls_args(),
        ]
        log = open(os.path.join(self.data_dir, "etcd.log"), "ab")
        # Own session: a lab outlives `flannelctl lab up`, and ^C in a terminal must not reach etcd.
        try:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        return self.proc.pid

    def wait_healthy(self, timeout: float = 20.0) -> None:
        """Wait until etcd answers; RuntimeError naming its log if it exits or stays silent."""
        assert self.proc is not None, "launch() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}; see {self.data_dir}/etcd.log")
            if self.healthy():
                return
            time.sleep(0.1)
        raise RuntimeError(f"etcd did not become healthy in {timeout}s; see {self.data_dir}/etcd.log")

    def healthy(self) -> bool:
        if self.netns:
            r = self.etcdctl("endpoint", "health", check=False)
            return r.returncode == 0
        try:
            r = httpx.get(f"{self.endpoint}/health", timeout=1, verify=self.ssl_context() if self.tls else True)
            return r.status_code == 200 and r.json().get("health") == "true"
        except (httpx.HTTPError, ValueError):
            return False

    def ssl_context(self) -> ssl.SSLContext:
        """A client's TLS context for this etcd: our CA, our client certificate."""
        assert self.tls is not None
        ctx = ssl.create_default_context(cafile=self.tls.ca)
        ctx.load_cert_chain(self.tls.client_cert, self.tls.client_key)
        return ctx

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def etcdctl(self, *args: str, api: int = 3, check: bool = True) -> subprocess.CompletedProcess:
        env = dict(os.environ, ETCDCTL_API=str(api))
        return subprocess.run(
            [*self._prefix(), "etcdctl", f"--endpoints={self.endpoint}",
             *(["--dial-timeout=2s"] if api == 3 else []), *self.etcdctl_tls_args(api), *args],
            env=env, capture_output=True, text=True, check=check, timeout=30
        )

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "EtcdServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
