"""Certificates made with openssl, and a real etcd serving TLS with --client-cert-auth, for the tests.

make_pki writes a CA, a server certificate for one IP (its extendedKeyUsage chosen by the test:
"serverAuth" alone is the classic CoreOS/flannel guide's cluster, whose JSON gateway cannot
serve), a client certificate, an expired client certificate, and an unrelated second CA.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass

import pytest
from etcd_server import free_port

from flannelpy.etcd.store import EtcdOptions

BOTH_USAGES = "serverAuth,clientAuth"
SERVER_ONLY = "serverAuth"


def _openssl(*args: str, cwd: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def make_pki(d: str, *, server_ip: str = "127.0.0.1", server_usage: str = BOTH_USAGES) -> None:
    if not shutil.which("openssl"):
        pytest.fail("openssl is not installed; .ci/setup installs it")
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=fptest-{ca}",
                 "-keyout", f"{ca}.key", "-out", f"{ca}.crt", cwd=d)
    _write(os.path.join(d, "server.ext"), f"subjectAltName=IP:{server_ip}\nextendedKeyUsage={server_usage}\n")
    _write(os.path.join(d, "client.ext"), "extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=fptest-{name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=d)
    # The expired one: `openssl ca` is the only OpenSSL 3.0 command that sets dates in the past.
    _write(os.path.join(d, "index.txt"), "")
    _write(os.path.join(d, "ca.cnf"), "[ca]\ndefault_ca = fp\n[fp]\ndatabase = index.txt\nnew_certs_dir = .\n"
                                      "serial = ca.srl\ndefault_md = sha256\npolicy = any\nunique_subject = no\n"
                                      "[any]\ncommonName = supplied\n")
    _openssl("ca", "-batch", "-config", "ca.cnf", "-cert", "ca.crt", "-keyfile", "ca.key", "-notext",
             "-startdate", "20200101000000Z", "-enddate", "20200102000000Z", "-in", "client.csr",
             "-extfile", "client.ext", "-out", "expired.crt", cwd=d)


def client_options(endpoint: str, d: str, *, cafile: str = "ca.crt", cert: str | None = "client",
                   **kw) -> EtcdOptions:
    """Options with the client certificate `cert` ("client", "expired", "server" or None)."""
    return EtcdOptions(endpoints=(endpoint,), cafile=f"{d}/{cafile}",
                       certfile=f"{d}/{cert}.crt" if cert else "",
                       keyfile=f"{d}/{'client' if cert == 'expired' else cert}.key" if cert else "", **kw)


def client_flags(d: str, *, cafile: str = "ca.crt", cert: str | None = "client", dash: str = "-") -> list[str]:
    """The same as command-line flags: dash "-" for flanneld, "--" for flannelctl."""
    flags = [f"{dash}etcd-cafile={d}/{cafile}"]
    if cert:
        key = "client" if cert == "expired" else cert
        flags += [f"{dash}etcd-certfile={d}/{cert}.crt", f"{dash}etcd-keyfile={d}/{key}.key"]
    return flags


@dataclass
class TLSEtcd:
    """etcd serving https with --client-cert-auth and --trusted-ca-file; optionally in a namespace."""

    d: str
    ip: str = "127.0.0.1"
    netns: str | None = None
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"https://{self.ip}:{self.port}"

    def _ns(self) -> list[str]:
        return ["nsenter", f"--net=/var/run/netns/{self.netns}"] if self.netns else []

    def start(self) -> "TLSEtcd":
        self.port = self.port or free_port()
        peer = free_port()
        d = self.d
        cmd = [*self._ns(), "etcd", "--name", "fptls", "--data-dir", os.path.join(d, "data"),
               "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
               "--listen-peer-urls", f"http://127.0.0.1:{peer}",
               "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
               "--initial-cluster", f"fptls=http://127.0.0.1:{peer}",
               "--enable-v2=true", "--log-level", "warn",
               "--cert-file", f"{d}/server.crt", "--key-file", f"{d}/server.key",
               "--client-cert-auth", "--trusted-ca-file", f"{d}/ca.crt"]
        with open(os.path.join(d, "etcd.log"), "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + 20
        while self.etcdctl("endpoint", "health", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(open(os.path.join(d, "etcd.log")).read()[-3000:])
            time.sleep(0.1)
        return self

    def etcdctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        d = self.d
        return subprocess.run([*self._ns(), "etcdctl", f"--endpoints={self.endpoint}", "--dial-timeout=2s",
                               f"--cacert={d}/ca.crt", f"--cert={d}/client.crt", f"--key={d}/client.key", *args],
                              env=dict(os.environ, ETCDCTL_API="3"), capture_output=True, text=True,
                              check=check, timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
