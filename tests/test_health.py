"""healthz/readyz/metrics/status over real HTTP (loopback TCP and the unix socket)."""

import os
import stat
from ipaddress import IPv4Address, IPv4Network

import httpx
import trio
from etcd_server import free_port
from prometheus_client.parser import text_string_to_metric_families

from flannelpy.ops.health import serve_health
from flannelpy.ops.metrics import Metrics
from flannelpy.ops.state import AgentState
from flannelpy.subnet.admission import Admission, AdmissionRules
from flannelpy.subnet.lease import EventKind, Lease, LeaseAttrs, LeaseEvent


class _Vxlan:
    name = "udp"

    def accepts(self, lease):
        return lease.attrs.backend_type == "vxlan"

    def counters(self):
        return {"tx_packets": 5, "tx_bytes": 500, "rx_dropped_unknown_source": 2, "tx_no_route": 1}


def _peer(n, btype="vxlan"):
    data = {"VNI": 1, "VtepMAC": f"02:00:00:00:00:0{n}"} if btype == "vxlan" else None
    return Lease(IPv4Network(f"10.5.{n}.0/24"), LeaseAttrs(IPv4Address(f"192.0.2.{n}"), btype, data), 2e9)


async def test_http_endpoints_and_unix_socket(tmp_path):
    state, metrics = AgentState(), Metrics()
    port = free_port()
    sock_path = str(tmp_path / "fpop.sock")
    async with trio.open_nursery() as nursery:
        ends = await nursery.start(serve_health, state, metrics, "127.0.0.1", port, sock_path)
        assert ends.tcp == ("127.0.0.1", port) and ends.unix == sock_path
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            r = await c.get("/healthz")
            assert (r.status_code, r.text) == (200, "flanneld is running")
            r = await c.get("/readyz")
            assert (r.status_code, r.text) == (503, "flanneld is not ready yet")
            state.ready = True
            r = await c.get("/readyz")
            assert (r.status_code, r.text) == (200, "flanneld is ready")
            assert (await c.get("/nope")).status_code == 404
            admission = Admission(AdmissionRules(network=IPv4Network("10.5.0.0/16")))
            state.accepted_count = lambda: len(admission.accepted)
            events = admission.apply([LeaseEvent(EventKind.ADDED, _peer(1)),
                                      LeaseEvent(EventKind.ADDED, _peer(2, "host-gw"))]).events
            assert len(events) == 2
            backend = _Vxlan()
            state.record_events(events, backend)
            metrics.observe_events(events, 0.002, backend)
            metrics.renewal(ok=False)
            r = await c.get("/metrics")
            assert r.headers["content-type"].startswith("text/plain; version=")
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for fam in text_string_to_metric_families(r.text) for s in fam.samples}
            assert samples[("flannel_peers_known", ())] == 2
            assert samples[("flannel_peers_programmed", ())] == 1
            assert samples[("flannel_ready", ())] == 1
            assert samples[("flannel_lease_renewal_failures_total", ())] == 1
            assert samples[("flannel_event_programming_seconds_count", ())] == 2
            assert samples[("flannel_backend_packets_total", (("backend", "udp"), ("direction", "tx")))] == 5
            assert samples[("flannel_backend_drops_total",
                            (("backend", "udp"), ("direction", "rx"), ("reason", "unknown_source")))] == 2
        transport = httpx.AsyncHTTPTransport(uds=sock_path)
        async with httpx.AsyncClient(transport=transport, base_url="http://flanneld") as c:
            doc = (await c.get("/status")).json()
            assert doc["ready"] is True and doc["leases_seen"] == 2 and doc["peers_programmed"] == 1
            assert doc["last_event"].startswith("peer 10.5.2.0/24")
        nursery.cancel_scope.cancel()
    assert not os.path.exists(sock_path)


async def test_port_zero_serves_only_unix_socket(tmp_path):
    sock_path = str(tmp_path / "fpop2.sock")
    async with trio.open_nursery() as nursery:
        ends = await nursery.start(serve_health, AgentState(), Metrics(), "127.0.0.1", 0, sock_path)
        assert ends.tcp is None
        async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=sock_path), base_url="http://x") as c:
            assert (await c.get("/readyz")).status_code == 503
        nursery.cancel_scope.cancel()


def test_two_metrics_do_not_share_a_registry():
    a, b = Metrics(), Metrics()
    a.renewal(ok=True)
    assert b"flannel_lease_renewals_total 1.0" in a.render()
    assert b"flannel_lease_renewals_total 0.0" in b.render()


async def test_flannelctl_status_exit_codes(tmp_path, capsys):
    from flannelpy.cli.flannelctl import main

    sock_path = str(tmp_path / "fpop3.sock")
    assert await trio.to_thread.run_sync(main, ["status", "--socket", sock_path]) == 1
    assert "unreachable" in capsys.readouterr().err
    state = AgentState()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_health, state, Metrics(), "127.0.0.1", 0, sock_path)
        assert await trio.to_thread.run_sync(main, ["status", "--socket", sock_path]) == 1
        assert "not ready" in capsys.readouterr().err
        state.ready, state.subnet = True, "10.5.7.0/24"
        assert await trio.to_thread.run_sync(main, ["status", "--socket", sock_path]) == 0
        assert "10.5.7.0/24" in capsys.readouterr().out
        nursery.cancel_scope.cancel()
