"""Issue #18: etcd v3 over gRPC where the JSON gateway cannot serve, and named TLS/auth errors.

The cluster of the issue, made here with openssl: etcd with --client-cert-auth and a server
certificate whose extendedKeyUsage is serverAuth only. Its JSON gateway answers every /v3 request
with HTTP 503 (gRPC code 14), because it presents that server certificate to etcd itself; the
store must move to etcd's gRPC API there, and stay on the gateway, without loading grpcio, on a
cluster whose server certificate carries both usages.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import time

import httpx
import pytest
import trio
from etcd_tls import BOTH_USAGES, SERVER_ONLY, TLSEtcd, client_flags, client_options, make_pki

from flannelpy.errors import UsageError
from flannelpy.etcd.certfacts import CertFacts, parse_pem
from flannelpy.etcd.diagnose import TLS, UNREACHABLE, TLSSetup, advice_for_etcd_error, describe_connect_failure
from flannelpy.etcd.select import wait_for_config
from flannelpy.etcd.store import EtcdOptions, StoreUnavailable, tls_context
from flannelpy.etcd.transport_choice import (
    GATEWAY,
    GRPC,
    after_gateway_failure,
    check_transport,
    gateway_cannot_serve,
    initial_transport,
)
from flannelpy.etcd.v3 import GatewayCannotServe, V3Store

PREFIX = "/fpgrpc/network"
CONFIG = '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}'
EP = "https://10.0.0.10:2379"


# --- the transport decision (pure) ------------------------------------------------------------------

@pytest.mark.parametrize("scheme,status,code,message,expected", [
    ("https", 503, 14, "write tcp 127.0.0.1:38304->127.0.0.1:2379: write: broken pipe", True),
    ("https", 503, 14, "read tcp 127.0.0.1:1->127.0.0.1:2: read: connection reset by peer", True),
    ("https", 503, 14, "use of closed network connection", True),
    ("https", 503, 14, "connection closed", True),
    ("https", 503, 14, "etcdserver: no leader", False),  # etcd's own answer: busy, not broken
    ("https", 503, 14, "etcdserver: request timed out", False),
    ("http", 503, 14, "write: broken pipe", False),  # no TLS: not the certificate-usage problem
    ("https", 500, 14, "write: broken pipe", False),
    ("https", 503, 2, "write: broken pipe", False),
    ("https", 503, None, "Service Unavailable", False),
])
def test_gateway_cannot_serve_signature(scheme, status, code, message, expected):
    assert gateway_cannot_serve(scheme, status, code, message) is expected


def test_transport_decisions():
    assert initial_transport("auto").transport == GATEWAY
    assert initial_transport("gateway").transport == GATEWAY
    assert initial_transport("grpc").transport == GRPC
    assert "JSON gateway" in initial_transport("auto").message
    with pytest.raises(UsageError, match='"http" for -etcd-transport'):
        check_transport("http")
    with pytest.raises(UsageError, match="-etcd-transport"):
        EtcdOptions(transport="GRPC")

    moved = after_gateway_failure("auto", EP, "write: broken pipe", True)
    assert moved.transport == GRPC
    assert moved.message.startswith("etcd v3 transport: gRPC, because etcd's JSON gateway at "
                                    f"{EP} cannot serve: write: broken pipe")
    assert "\n" not in moved.message
    pinned = after_gateway_failure("gateway", EP, "write: broken pipe", True)
    assert pinned.transport is None
    assert "extendedKeyUsage=serverAuth,clientAuth" in pinned.message and "-etcd-transport=auto" in pinned.message
    missing = after_gateway_failure("auto", EP, "write: broken pipe", "No module named 'grpc'")
    assert missing.transport is None and "grpcio" in missing.message and "No module named 'grpc'" in missing.message


# --- naming failures (pure) ---------------------------------------------------------------------------

NOW = 1_800_000_000.0
GOOD_CLIENT = CertFacts(NOW - 86400, NOW + 86400, frozenset({"clientAuth"}))
WITH_CERT = TLSSetup(cafile="/etc/ca.crt", certfile="/etc/client.crt", client_cert=GOOD_CLIENT)


def _name(text: str, tls: TLSSetup = WITH_CERT, endpoint: str = EP):
    return describe_connect_failure(endpoint, text, tls, now=NOW)


def test_server_certificate_failures_are_named():
    # As httpx (under trio) and gRPC core word them.
    for text in ("ConnectError: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local "
                 "issuer certificate (_ssl.c:992)",
                 "UNAVAILABLE: failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.10:2379: Tls "
                 "handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:"
                 "OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate"):
        f = _name(text)
        assert f.kind == TLS
        assert "server certificate is not signed by -etcd-cafile=/etc/ca.crt" in f.text
    f = _name("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: IP address mismatch, certificate is "
              "not valid for '10.0.0.10'. (_ssl.c:992)")
    assert "does not name 10.0.0.10 in its subjectAltName" in f.text
    f = _name("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: certificate has expired")
    assert "server certificate has expired" in f.text


def test_refused_client_certificate_is_named_from_the_certificate():
    alert = "ReadError: [SSL: SSLV3_ALERT_BAD_CERTIFICATE] sslv3 alert bad certificate (_ssl.c:2580)"
    grpc_text = "UNAVAILABLE: failed to connect to all addresses; last error: UNAVAILABLE: ipv4:10.0.0.10:2379: " \
                "Unwrap failed (TSI_DATA_CORRUPTED)"
    expired = TLSSetup(certfile="/etc/c.crt", client_cert=CertFacts(NOW - 10 * 86400, NOW - 86400, None))
    server_only = TLSSetup(certfile="/etc/s.crt", client_cert=CertFacts(0, NOW + 1, frozenset({"serverAuth"})))
    for text in (alert, grpc_text):
        assert "it expired on 2027-01-14" in _name(text, expired).text
        assert "extendedKeyUsage (serverAuth) does not allow client authentication" in _name(text, server_only).text
        assert "give -etcd-certfile and -etcd-keyfile" in _name(text, TLSSetup()).text
        assert "not signed by a CA in etcd's --trusted-ca-file" in _name(text, WITH_CERT).text
        assert _name(text).kind == TLS
    # Under trio the alert is often lost to the reset that follows it: only the certificate can tell.
    assert "it expired on" in _name("ReadError", expired).text and _name("ReadError", expired).kind == TLS
    assert _name("ReadError", TLSSetup()).kind == TLS
    assert _name("ReadError", WITH_CERT).kind == UNREACHABLE  # might as well be a restart
    assert _name("ReadError", endpoint="http://10.0.0.10:2379").kind == UNREACHABLE


def test_unreachable_is_not_tls():
    f = _name("ConnectError: [Errno 111] Connection refused", endpoint="http://10.0.0.10:2379")
    assert f.kind == UNREACHABLE and "connection refused" in f.text
    assert _name("UNAVAILABLE: failed to connect to all addresses; Connection refused").kind == UNREACHABLE


def test_advice_for_etcd_errors():
    assert "check -etcd-username and -etcd-password" in advice_for_etcd_error(
        "etcdserver: authentication failed, invalid user ID or password")
    advice = advice_for_etcd_error("etcdserver: permission denied", prefix="/atomic.io/network", username="fl")
    assert "readwrite /atomic.io/network/" in advice and "user grant-role fl" in advice
    assert "give -etcd-username" in advice_for_etcd_error("etcdserver: user name is empty")
    assert advice_for_etcd_error("etcdserver: no leader") == ""


def test_certificate_facts_from_openssl(tmp_path):
    make_pki(str(tmp_path), server_usage=SERVER_ONLY)
    read = lambda name: parse_pem((tmp_path / f"{name}.crt").read_bytes())  # noqa: E731
    server, client, expired, ca = read("server"), read("client"), read("expired"), read("ca")
    assert server.extended_key_usage == frozenset({"serverAuth"}) and not server.allows("clientAuth")
    assert client.allows("clientAuth") and not client.allows("serverAuth")
    assert ca.extended_key_usage is None and ca.allows("clientAuth")  # no extension: any usage
    assert time.gmtime(expired.not_after)[:3] == (2020, 1, 2)
    assert abs(client.not_after - client.not_before - 2 * 86400) < 5


def test_grpc_messages_map_to_the_gateway_json():
    from google.protobuf import json_format

    from flannelpy.etcd.grpc_schema import MESSAGES

    b64 = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
    txn = {"compare": [{"key": b64("/k"), "result": "EQUAL", "target": "VERSION", "version": "0"}],
           "success": [{"request_put": {"key": b64("/k"), "value": b64("v"), "lease": "7587"}}],
           "failure": [{"request_range": {"key": b64("/k")}}]}
    wire = json_format.ParseDict(txn, MESSAGES["TxnRequest"]()).SerializeToString()
    # compare: key (field 3) then the oneof version (field 4) present although 0 — "create if absent"
    assert bytes.fromhex("1a022f6b2000") in wire
    back = json_format.MessageToDict(MESSAGES["TxnRequest"].FromString(wire), preserving_proto_field_name=True)
    assert back["compare"] == [{"key": b64("/k"), "version": "0"}]  # EQUAL/VERSION are the zero values


# --- a real TLS etcd -----------------------------------------------------------------------------------

def _cluster(tmp_path_factory, usage: str):
    d = str(tmp_path_factory.mktemp("pki"))
    make_pki(d, server_usage=usage)
    server = TLSEtcd(d).start()
    server.etcdctl("put", f"{PREFIX}/config", CONFIG)
    return server


@pytest.fixture(scope="module")
def server_only_etcd(tmp_path_factory):
    server = _cluster(tmp_path_factory, SERVER_ONLY)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def both_usages_etcd(tmp_path_factory):
    server = _cluster(tmp_path_factory, BOTH_USAGES)
    try:
        yield server
    finally:
        server.stop()


def _flannelctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flannelpy.cli.flannelctl", *args], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


# What a flannelctl process loaded: run it in a fresh interpreter and report.
_PROBE = """
import json, sys
from flannelpy.cli.flannelctl import main
rc = main(sys.argv[1:])
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS"))
print(json.dumps({"rc": rc, "grpc": "grpc" in sys.modules, "rss_kib": rss}), file=sys.stderr)
"""


def _flannelctl_loaded(*args: str) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    return proc, json.loads(proc.stderr.strip().splitlines()[-1])


@pytest.mark.etcd
def test_the_gateway_really_cannot_serve_there(server_only_etcd):
    # The premise, so this file fails if etcd ever fixes its gateway: 503, code 14, while etcdctl works.
    d = server_only_etcd.d
    r = httpx.post(f"{server_only_etcd.endpoint}/v3/kv/range", json={"key": base64.b64encode(b"/x").decode()},
                   verify=tls_context(client_options(server_only_etcd.endpoint, d)), timeout=5)
    assert r.status_code == 503 and r.json()["code"] == 14
    assert server_only_etcd.etcdctl("get", f"{PREFIX}/config", "--print-value-only").stdout.strip() == CONFIG


@pytest.mark.etcd
async def test_store_moves_to_grpc_once_and_says_why(server_only_etcd, caplog):
    opts = client_options(server_only_etcd.endpoint, server_only_etcd.d, prefix=PREFIX)
    with caplog.at_level(logging.INFO, logger="flanneld.etcd"):
        async with V3Store(opts) as store:
            assert store.transport == GATEWAY
            assert await store.get_config() == CONFIG
            assert store.transport == GRPC
            leases, rev = await store.list_leases()
            assert leases == [] and rev > 0
    lines = [r.getMessage() for r in caplog.records if "etcd v3 transport" in r.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"etcd v3 transport: gRPC, because etcd's JSON gateway at {server_only_etcd.endpoint} "
                               "cannot serve: ")


@pytest.mark.etcd
async def test_gateway_pinned_says_what_to_do(server_only_etcd):
    opts = client_options(server_only_etcd.endpoint, server_only_etcd.d, prefix=PREFIX, transport="gateway")
    async with V3Store(opts) as store:
        with pytest.raises(GatewayCannotServe) as info:
            await store.get_config()
    text = str(info.value)
    assert "cannot serve" in text and "extendedKeyUsage=serverAuth,clientAuth" in text
    assert "-etcd-transport=auto" in text and "\n" not in text


@pytest.mark.etcd
def test_flannelctl_config_and_leases_over_grpc(server_only_etcd):
    ep, d = server_only_etcd.endpoint, server_only_etcd.d
    conn = [f"--etcd-endpoints={ep}", f"--etcd-prefix={PREFIX}-ctl", *client_flags(d, dash="--")]
    new = '{"Network":"10.7.0.0/16","Backend":{"Type":"host-gw"}}'
    r = _flannelctl("config", "set", *conn, new)
    assert r.returncode == 0, r.stderr
    assert "etcd v3 API" in r.stdout
    assert server_only_etcd.etcdctl("get", f"{PREFIX}-ctl/config", "--print-value-only").stdout.strip() == new
    r = _flannelctl("config", "get", *conn)
    assert (r.returncode, r.stdout.strip()) == (0, new), r.stderr
    lease = '{"PublicIP":"10.0.0.7","PublicIPv6":null,"BackendType":"host-gw"}'
    server_only_etcd.etcdctl("put", f"{PREFIX}-ctl/subnets/10.7.3.0-24", lease)
    proc, loaded = _flannelctl_loaded("leases", "--json", *conn)
    assert loaded["rc"] == 0 and loaded["grpc"], proc.stderr
    rows = json.loads(proc.stdout)
    assert [(r["subnet"], r["public_ip"], r["backend"]) for r in rows] == [("10.7.3.0/24", "10.0.0.7", "host-gw")]


@pytest.mark.etcd
def test_both_usages_stay_on_the_gateway_without_grpcio(both_usages_etcd):
    ep, d = both_usages_etcd.endpoint, both_usages_etcd.d
    both_usages_etcd.etcdctl("put", f"{PREFIX}/subnets/10.5.9.0-24", '{"PublicIP":"10.0.0.9","PublicIPv6":null}')
    conn = [f"--etcd-endpoints={ep}", f"--etcd-prefix={PREFIX}", *client_flags(d, dash="--")]
    proc, loaded = _flannelctl_loaded("leases", "--json", *conn)
    assert loaded["rc"] == 0 and not loaded["grpc"], proc.stderr
    assert [r["subnet"] for r in json.loads(proc.stdout)] == ["10.5.9.0/24"]
    # The same cluster forced onto gRPC: the reads agree, and that process did load grpcio.
    proc2, loaded2 = _flannelctl_loaded("leases", "--json", "--etcd-transport=grpc", *conn)
    assert loaded2["grpc"] and json.loads(proc2.stdout) == json.loads(proc.stdout)
    # grpcio's cost, measured in the same run (README: "Libraries, and why").
    assert loaded2["rss_kib"] - loaded["rss_kib"] > 5 * 1024


# Wrong CA, expired and missing client certificates, and a server certificate used as client one:
# each a named one-line error from flannelctl, on either transport.
BAD_TLS = {
    "wrong-ca": (dict(cafile="other-ca.crt"), "server certificate is not signed by -etcd-cafile="),
    "expired": (dict(cert="expired"), "it expired on 2020-01-02"),
    "missing": (dict(cert=None), "client certificate"),
    "server-cert-as-client": (dict(cert="server"), "does not allow client authentication"),
}


@pytest.mark.etcd
@pytest.mark.parametrize("transport", ["auto", "grpc"])
@pytest.mark.parametrize("case", sorted(BAD_TLS))
def test_bad_tls_setups_give_one_named_line(server_only_etcd, case, transport):
    kw, expected = BAD_TLS[case]
    d = server_only_etcd.d
    r = _flannelctl("config", "get", f"--etcd-endpoints={server_only_etcd.endpoint}", f"--etcd-prefix={PREFIX}",
                    f"--etcd-transport={transport}", *client_flags(d, dash="--", **kw))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"flannelctl: cannot read {PREFIX}/config from etcd: "), lines[0]
    assert expected in lines[0], lines[0]
    if case == "missing":
        assert "-etcd-certfile and -etcd-keyfile" in lines[0]
    assert "not found" not in lines[0] and "etcdctl put" not in lines[0]


@pytest.mark.etcd
async def test_agent_waits_with_the_named_tls_error_not_config_not_found(server_only_etcd, caplog):
    opts = client_options(server_only_etcd.endpoint, server_only_etcd.d, cert="expired", prefix=PREFIX)
    log = logging.getLogger("test.grpc.wait")
    with caplog.at_level(logging.WARNING, logger="test.grpc.wait"):
        with trio.move_on_after(1.5):
            await wait_for_config(opts, "auto", log=log, retry_interval=0.1)
    warnings = [r.getMessage() for r in caplog.records if r.name == "test.grpc.wait"]
    assert len(warnings) == 1, warnings  # said once, not on every retry
    assert warnings[0].startswith(f"cannot read {PREFIX}/config from etcd: ")
    assert "it expired on 2020-01-02" in warnings[0] and "not found" not in warnings[0]


@pytest.mark.etcd
async def test_store_unavailable_names_tls(server_only_etcd):
    opts = client_options(server_only_etcd.endpoint, server_only_etcd.d, cafile="other-ca.crt", prefix=PREFIX,
                          transport="grpc")
    async with V3Store(opts) as store:
        with pytest.raises(StoreUnavailable) as info:
            await store.list_leases()
    assert info.value.kind == TLS and "not signed by -etcd-cafile=" in str(info.value)


def test_grpcio_is_not_imported_by_the_agent_modules():
    # The modules every agent start imports leave grpcio out until a store needs it.
    code = ("import sys, flannelpy.agent, flannelpy.etcd.select, flannelpy.etcd.v3, flannelpy.etcd.gateway; "
            "print('grpc' in sys.modules, 'google.protobuf' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ)).stdout.split()
    assert out == ["False", "False"]


# --- real flanneld agents on the namespace lab ------------------------------------------------------

def _maps_grpc(pid: int) -> bool:
    """Whether grpcio's extension module is mapped into the process."""
    with open(f"/proc/{pid}/maps") as f:
        return "cygrpc" in f.read()


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.root
@pytest.mark.etcd
def test_agents_on_the_lab_with_tls_etcd(tmp_path_factory):
    """Two flanneld on the serverAuth-only cluster (gRPC) see each other; one on the both-usages
    cluster stays on the gateway and never maps grpcio."""
    import secrets

    from flannelpy.lab.netns_lab import ETCD_IP, Lab

    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    lab = Lab(prefix=f"fpgr{secrets.token_hex(2)}", hosts=2, backend="vxlan", with_containers=False)
    lab.workdir = f"/tmp/{lab.prefix}"
    servers: list[TLSEtcd] = []
    try:
        lab.build()
        for usage, port in ((SERVER_ONLY, 2479), (BOTH_USAGES, 2579)):
            d = str(tmp_path_factory.mktemp("labpki"))
            make_pki(d, server_ip=ETCD_IP, server_usage=usage)
            servers.append(TLSEtcd(d, ip=ETCD_IP, netns=lab.underlay_ns, port=port).start())
            servers[-1].etcdctl("put", "/coreos.com/network/config", CONFIG)
        server_only, both = servers

        lab.agent_flags = [f"-etcd-endpoints={server_only.endpoint}", *client_flags(server_only.d)]
        for i in (1, 2):
            lab.start_agent(i)
        envs = {i: lab.wait_subnet_env(i, timeout=60) for i in (1, 2)}
        assert envs[1]["FLANNEL_SUBNET"] != envs[2]["FLANNEL_SUBNET"]
        keys = server_only.etcdctl("get", "--prefix", "/coreos.com/network/subnets/", "--keys-only").stdout.split()
        assert len(keys) == 2, keys
        # Each agent programmed the other's subnet (the watch over gRPC works).
        deadline = time.monotonic() + 30
        for me, peer in ((1, 2), (2, 1)):
            peer_net = str(lab.host(peer).subnet).replace(".1/", ".0/")
            while not any(r.get("dst") == peer_net and r.get("dev") == "flannel.1" for r in lab.ip_json(me, "route")):
                assert time.monotonic() < deadline, (lab.ip_json(me, "route"), lab.tail_log(me))
                time.sleep(0.1)
        log1 = open(lab.host(1).log_file).read()
        assert log1.count("etcd v3 transport: gRPC, because etcd's JSON gateway at") == 1, log1
        assert _maps_grpc(lab.host(1).pid)
        grpc_rss = _rss_mib(lab.host(1).pid)
        # flannelctl through the same selection code reads what the agents wrote.
        r = subprocess.run(["nsenter", f"--net=/var/run/netns/{lab.underlay_ns}", sys.executable, "-m",
                            "flannelpy.cli.flannelctl", "leases", "--json", f"--etcd-endpoints={server_only.endpoint}",
                            *client_flags(server_only.d, dash="--")], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert sorted(row["subnet"] for row in json.loads(r.stdout)) == sorted(
            str(lab.host(i).subnet).replace(".1/", ".0/") for i in (1, 2))
        for i in (1, 2):
            assert lab.stop_agent(i) == 0

        # The both-usages cluster: the gateway serves, grpcio is never loaded.
        os.remove(lab.host(1).subnet_file)
        lab.agent_flags = [f"-etcd-endpoints={both.endpoint}", *client_flags(both.d)]
        lab.start_agent(1)
        lab.wait_subnet_env(1, timeout=60)
        assert both.etcdctl("get", "--prefix", "/coreos.com/network/subnets/", "--keys-only").stdout.split()
        time.sleep(1)  # past start-up: the watch runs
        assert not _maps_grpc(lab.host(1).pid)
        gateway_rss = _rss_mib(lab.host(1).pid)
        log1 = open(lab.host(1).log_file).read().split("etcd v3 transport: gRPC")[-1]
        assert "etcd v3 transport: JSON gateway (-etcd-transport=auto" in log1
        print(f"agent RSS: {grpc_rss:.1f} MiB over gRPC, {gateway_rss:.1f} MiB over the gateway")
        assert lab.stop_agent(1) == 0
    finally:
        for server in servers:
            server.stop()
        lab.down()
