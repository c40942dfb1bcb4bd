"""The lab's certificates for a TLS etcd (`flannelctl lab up --etcd-tls`), made with the `openssl` CLI.

One CA signs a server certificate for etcd (SANs: the lab's etcd address and 127.0.0.1, where the
host-side forwarder serves it) and one client certificate that the agents, etcdctl and flannelctl
present (etcd runs with --client-cert-auth).  The server certificate's extendedKeyUsage is the point
of the two modes:

    both         serverAuth,clientAuth: etcd's JSON gateway can dial etcd's own gRPC port with it
    server-only  serverAuth: the classic CoreOS/flannel guide's cluster, whose gateway cannot serve;
                 flanneld's `-etcd-transport auto` moves to etcd's gRPC API

Deciding (which files, which extensions) is pure; make_pki runs openssl.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from flannelpy.errors import FlannelError

TLS_MODES = ("both", "server-only")  # and "" for plain http
_USAGE = {"both": "serverAuth,clientAuth", "server-only": "serverAuth"}
DAYS = 365  # a lab may stay up for a while; nothing outside the lab trusts this CA


class PkiError(FlannelError):
    pass


@dataclass(frozen=True)
class PkiFiles:
    """Where the lab's certificates are: the CA, etcd's server pair, the clients' pair."""

    dir: str

    @property
    def ca(self) -> str:
        return os.path.join(self.dir, "ca.crt")

    @property
    def server_cert(self) -> str:
        return os.path.join(self.dir, "server.crt")

    @property
    def server_key(self) -> str:
        return os.path.join(self.dir, "server.key")

    @property
    def client_cert(self) -> str:
        return os.path.join(self.dir, "client.crt")

    @property
    def client_key(self) -> str:
        return os.path.join(self.dir, "client.key")


def check_mode(mode: str) -> str:
    """The mode, or PkiError naming the bad value."""
    if mode not in ("", *TLS_MODES):
        raise PkiError(f"etcd TLS mode {mode!r}: must be {' or '.join(TLS_MODES)} (or empty for plain http)")
    return mode


def server_usage(mode: str) -> str:
    """The server certificate's extendedKeyUsage for a mode."""
    if not check_mode(mode):
        raise PkiError("plain http has no server certificate")
    return _USAGE[mode]


def server_extensions(ips: list[str], mode: str) -> str:
    """openssl -extfile text for etcd's certificate: its IP SANs and the mode's usage."""
    sans = ",".join(f"IP:{ip}" for ip in ips)
    return f"subjectAltName={sans}\nextendedKeyUsage={server_usage(mode)}\n"


CLIENT_EXTENSIONS = "extendedKeyUsage=clientAuth\n"


def _openssl(*args: str, cwd: str) -> None:
    try:
        proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise PkiError("openssl not found: the lab makes its etcd certificates with it; install openssl") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise PkiError(f"openssl {args[0]} failed in {cwd}: {last}")


def make_pki(directory: str, server_ips: list[str], mode: str) -> PkiFiles:
    """Write a CA, etcd's server certificate (for server_ips, usage by mode) and a client certificate
    into `directory` (made 0700; keys 0600).  EC P-256 keys: quick to make, and etcd, Go and grpcio take them."""
    server_usage(mode)  # a bad mode fails before anything is written
    if shutil.which("openssl") is None:
        raise PkiError("openssl not found: the lab makes its etcd certificates with it; install openssl")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    files = PkiFiles(directory)
    newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *newkey, "-days", str(DAYS), "-subj", "/CN=flannelpy-lab-ca",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=directory)
    for name, ext in (("server", server_extensions(server_ips, mode)), ("client", CLIENT_EXTENSIONS)):
        with open(os.path.join(directory, f"{name}.ext"), "w") as f:
            f.write(ext)
        _openssl("req", *newkey, "-subj", f"/CN=flannelpy-lab-{name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=directory)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", str(DAYS), "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=directory)
    for key in ("ca.key", "server.key", "client.key"):
        os.chmod(os.path.join(directory, key), 0o600)
    return files
