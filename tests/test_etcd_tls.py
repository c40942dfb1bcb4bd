"""etcd over TLS with a CA and a client certificate, as -etcd-cafile/-etcd-certfile/-etcd-keyfile set up.

A real etcd runs with --client-cert-auth; every store (v3 over the gateway or gRPC, v2) must connect
with the right files, fail without the client certificate, and name the flag when a file cannot be
read. The cluster whose gateway cannot serve (serverAuth-only server certificate) is in
test_etcd_grpc.py.
"""

import os
import shutil
import subprocess
import time

import httpx
import pytest
from etcd_server import free_port

from flannelpy.errors import FlannelError
from flannelpy.etcd.store import EtcdOptions, StoreUnavailable, tls_context
from flannelpy.etcd.v2 import V2Store
from flannelpy.etcd.v3 import V3Store


def _openssl(*args: str, cwd: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: str) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA.

    The server certificate also carries clientAuth: etcd 3.4's JSON gateway dials etcd's own
    gRPC port with it, and with --client-cert-auth that dial is refused otherwise (HTTP 503).
    """
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=fptest-ca",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=d)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n"),
                      ("client", "extendedKeyUsage=clientAuth\n")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=fptest-{name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        with open(os.path.join(d, f"{name}.ext"), "w") as f:
            f.write(ext)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=d)


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory):
    if not shutil.which("openssl"):
        pytest.fail("openssl is not installed; .ci/setup installs it")
    d = str(tmp_path_factory.mktemp("pki"))
    make_pki(d)
    port, peer = free_port(), free_port()
    endpoint = f"https://127.0.0.1:{port}"
    ctx = tls_context(EtcdOptions(cafile=f"{d}/ca.crt", certfile=f"{d}/client.crt", keyfile=f"{d}/client.key"))
    cmd = ["etcd", "--name", "fptls", "--data-dir", os.path.join(d, "data"),
           "--listen-client-urls", endpoint, "--advertise-client-urls", endpoint,
           "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls",
           f"http://127.0.0.1:{peer}", "--initial-cluster", f"fptls=http://127.0.0.1:{peer}",
           "--enable-v2=true", "--log-level", "warn",
           "--cert-file", f"{d}/server.crt", "--key-file", f"{d}/server.key",
           "--client-cert-auth", "--trusted-ca-file", f"{d}/ca.crt"]
    log = open(os.path.join(d, "etcd.log"), "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                r = httpx.get(f"{endpoint}/health", verify=ctx, timeout=1)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, open(os.path.join(d, "etcd.log")).read()
            time.sleep(0.1)
        yield endpoint, d
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


@pytest.mark.etcd
@pytest.mark.parametrize("store_class,transport", [(V3Store, "gateway"), (V3Store, "grpc"), (V2Store, "auto")],
                         ids=["v3", "v3-grpc", "v2"])
async def test_client_certificate_connects(tls_etcd, store_class, transport):
    endpoint, d = tls_etcd
    opts = EtcdOptions(endpoints=(endpoint,), prefix=f"/tls-{store_class.__name__}",
                       cafile=f"{d}/ca.crt", certfile=f"{d}/client.crt", keyfile=f"{d}/client.key",
                       transport=transport)
    store = store_class(opts)
    try:
        assert await store.get_config() is None
        leases, _ = await store.list_leases()
        assert leases == []
        assert getattr(store, "transport", transport) == transport  # this cluster's gateway works: no move
    finally:
        await store.aclose()


@pytest.mark.etcd
async def test_without_client_certificate_is_refused(tls_etcd):
    endpoint, d = tls_etcd
    store = V3Store(EtcdOptions(endpoints=(endpoint,), cafile=f"{d}/ca.crt"))
    try:
        with pytest.raises(StoreUnavailable, match="client certificate.*-etcd-certfile and -etcd-keyfile"):
            await store.get_config()
    finally:
        await store.aclose()


def test_unreadable_files_name_the_flag(tmp_path):
    with pytest.raises(FlannelError, match=f"-etcd-cafile={tmp_path}/nope.crt"):
        tls_context(EtcdOptions(cafile=f"{tmp_path}/nope.crt"))
    with pytest.raises(FlannelError, match="-etcd-certfile=.*cannot load the client certificate"):
        tls_context(EtcdOptions(certfile=f"{tmp_path}/c.crt", keyfile=f"{tmp_path}/c.key"))
    assert tls_context(EtcdOptions()) is True


def test_plain_http_endpoints_build_no_ssl_context():
    """issue #19: httpx builds its default SSL context (the CA bundle, 50-200 ms) for verify=True
    even when no endpoint uses TLS; plain http:// endpoints get verify=False, https:// keep it."""
    from flannelpy.etcd.store import httpx_verify

    assert httpx_verify(EtcdOptions(endpoints=("http://127.0.0.1:2379", "HTTP://10.0.0.1:2379"))) is False
    assert httpx_verify(EtcdOptions(endpoints=("http://127.0.0.1:2379", "https://10.0.0.1:2379"))) is True
    with pytest.raises(FlannelError, match="-etcd-cafile"):  # a TLS flag is always honoured
        httpx_verify(EtcdOptions(endpoints=("http://127.0.0.1:2379",), cafile="/nonexistent/ca.crt"))
