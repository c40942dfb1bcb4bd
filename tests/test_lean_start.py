"""Issue #19 (start-up and idle memory): what flanneld's start does not need is not imported.

Each case runs in a fresh interpreter (this one has imported everything already) and checks
sys.modules, so a dependency pulled in again by an innocent-looking import shows up here, and
that what was left out still works when it is asked for.  Timings are bench/'s business.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_netlink_module_loads_neither_pyroute2s_init_nor_iproute():
    got = _run("""
        import json, sys
        from flannelpy.hostnet import netlink
        loaded = sorted(m for m in sys.modules if m.startswith("pyroute2"))
        err = netlink.NetlinkError(17)
        # pyroute2.netlink's __init__ (its message classes) has not run either
        netlink_init = "nlmsg" in vars(sys.modules["pyroute2.netlink"])
        print(json.dumps({"loaded": loaded, "code": err.code, "msg": str(err), "netlink_init": netlink_init}))
    """)
    assert got["netlink_init"] is False and "pyroute2.common" not in got["loaded"]
    assert "pyroute2.iproute.linux" not in got["loaded"]
    assert not [m for m in got["loaded"] if m.startswith(("pyroute2.ndb", "pyroute2.ipdb", "pyroute2.conntrack"))]
    assert got["code"] == 17 and "File exists" in got["msg"]


def test_iproute_is_loaded_on_first_use_without_the_rest_of_pyroute2():
    got = _run("""
        import json, sys
        from flannelpy.hostnet.netlink import IPRoute, NetlinkError
        with IPRoute() as ipr:
            names = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
            try:
                ipr.link("del", index=2 ** 31 - 1)
                code = 0
            except NetlinkError as exc:  # the class we re-export is the one pyroute2 raises
                code = exc.code
        print(json.dumps({"names": names, "code": code,
                          "ndb": "pyroute2.ndb" in sys.modules, "ipdb": "pyroute2.ipdb" in sys.modules}))
    """)
    assert "lo" in got["names"]
    assert got["code"] == 19  # ENODEV
    assert got["ndb"] is False and got["ipdb"] is False


def test_the_whole_pyroute2_package_is_still_there_for_whoever_asks():
    got = _run("""
        import json
        from flannelpy.hostnet.netlink import IPRoute, NetlinkError
        import pyroute2
        from pyroute2 import NDB, IPRoute as FullIPRoute
        from pyroute2.netlink.exceptions import NetlinkError as Original
        import pyroute2.netlink
        from pyroute2.netlink import nlmsg
        print(json.dumps({"same_iproute": FullIPRoute is IPRoute, "same_error": Original is NetlinkError,
                          "ndb": NDB.__name__, "version": pyroute2.__version__, "all": len(pyroute2.__all__),
                          "nlmsg": nlmsg.__name__, "same_nlmsg": nlmsg is pyroute2.netlink.nlmsg}))
    """)
    assert got["same_iproute"] and got["same_error"] and got["nlmsg"] == "nlmsg" and got["same_nlmsg"]
    assert got["ndb"] == "NDB" and got["version"] != "unknown" and got["all"] > 10


def test_a_backend_is_imported_alone():
    got = _run("""
        import json, sys
        from flannelpy.backends import backend_class
        cls = backend_class("host-gw")
        print(json.dumps({"name": cls.name, "backends": sorted({m.split(".")[2] for m in sys.modules
                                                               if m.startswith("flannelpy.backends.")})}))
    """)
    assert got["name"] == "host-gw"
    assert got["backends"] == ["base", "hostgw", "repair", "route_diff"]  # no other backend's folder


def test_etcd_clients_load_httpcore_without_http2_and_h2_stays_importable():
    got = _run("""
        import json, sys
        from flannelpy.etcd.select import make_store
        from flannelpy.etcd.store import EtcdOptions
        make_store(EtcdOptions(), "v2"), make_store(EtcdOptions(), "v3")
        before = sorted(m for m in sys.modules if m == "h2" or m.startswith("h2."))
        import h2.connection
        print(json.dumps({"httpcore": "httpcore" in sys.modules, "h2_before": before,
                          "h2_after": "h2.connection" in sys.modules}))
    """)
    assert got["httpcore"] is True
    assert got["h2_before"] == []
    assert got["h2_after"] is True


def test_metrics_load_prometheus_client_only_when_scraped():
    got = _run("""
        import json, sys
        from flannelpy.ops.health import route
        from flannelpy.ops.metrics import Metrics
        from flannelpy.ops.state import AgentState
        state = AgentState()
        m = Metrics(state)
        m.renewal(True); m.watch_reconnects.inc(); m.observe_events([1], 0.003)
        before = "prometheus_client" in sys.modules
        status, ctype, body = route("/metrics", state, m)
        print(json.dumps({"before": before, "after": "prometheus_client" in sys.modules, "status": status,
                          "ctype": ctype.decode(), "renewals": "flannel_lease_renewals_total 1.0" in body.decode()}))
    """)
    assert got["before"] is False and got["after"] is True
    assert got["status"] == 200 and got["ctype"].startswith("text/plain; version=") and got["renewals"]


def test_metrics_text_is_what_prometheus_clients_own_counter_and_histogram_write():
    """The plain counters and histogram render exactly as prometheus_client's Counter and
    Histogram would (less their `_created` timestamps)."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from flannelpy.ops.metrics import _PROGRAM_BUCKETS, Metrics

    ours = Metrics()
    ref = CollectorRegistry()
    counters = {c.name: Counter(c.name, c.documentation, registry=ref) for c in ours.counters()}
    hist = Histogram(ours.event_to_programmed.name, ours.event_to_programmed.documentation,
                     buckets=_PROGRAM_BUCKETS, registry=ref)
    for ok in (True, False, True):
        ours.renewal(ok)
        counters["flannel_lease_renewals" if ok else "flannel_lease_renewal_failures"].inc()
    ours.watch_resyncs.inc(2)
    counters["flannel_watch_resyncs"].inc(2)
    for seconds in (0.0001, 0.0005, 0.003, 0.2, 1.0, 11.0):  # on a bound, between, beyond the last
        ours.observe_events(["e1", "e2"], seconds)
        hist.observe(seconds)
        hist.observe(seconds)
    want = [line for line in generate_latest(ref).decode().splitlines() if "_created" not in line]
    got = ours.render().decode().splitlines()
    assert got[:len(want)] == want


def test_health_server_loads_hypercorn_at_its_first_client(tmp_path):
    got = _run(f"""
        import json, sys
        import httpx, trio
        from flannelpy.ops.health import serve_health
        from flannelpy.ops.metrics import Metrics
        from flannelpy.ops.state import AgentState

        async def main():
            out = {{}}
            async with trio.open_nursery() as nursery:
                after = trio.Event()
                ends = await nursery.start(lambda task_status: serve_health(
                    AgentState(), Metrics(), "127.0.0.1", 0, "{tmp_path}/s.sock", after=after, task_status=task_status))
                after.set()
                await trio.sleep(0.2)  # the server task runs on to its wait
                out["before"] = "hypercorn" in sys.modules
                async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=ends.unix)) as client:
                    r = await client.get("http://flanneld/healthz")
                    out["unix"] = [r.status_code, r.text]
                    r = await client.get("http://flanneld/readyz")
                    out["again"] = [r.status_code, r.text]
                out["after"] = "hypercorn" in sys.modules
                nursery.cancel_scope.cancel()
            print(json.dumps(out))

        trio.run(main)
    """)
    assert got["before"] is False
    assert got["unix"] == [200, "flanneld is running"]
    assert got["again"] == [503, "flanneld is not ready yet"]
    assert got["after"] is True


def _log_until(path: str, offset: int, wanted: str, timeout: float = 60.0) -> str:
    """The agent's log from `offset` on, once it contains `wanted` (the agent writes it; we wait
    for that line, not for a time)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        with open(path, errors="replace") as f:
            f.seek(offset)
            text = f.read()
        if wanted in text or time.monotonic() > deadline:
            assert wanted in text, f"no {wanted!r} in the agent's log:\n{text[-3000:]}"
            return text
        time.sleep(0.05)


def test_a_vxlan_agent_never_loads_iproute_neither_creating_its_device_nor_finding_it():
    """The vxlan backend reads and changes the kernel through hostnet.rtnl only: the first start
    creates flannel.1 (device, MAC, address) and a restart finds it in place, and neither loads
    pyroute2's IPRoute (~75 ms and ~6 MiB of RSS for as long as the agent runs)."""
    import os
    import secrets

    import pytest

    from flannelpy.lab.netns_lab import Lab

    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    lab = Lab(prefix=f"fpls{secrets.token_hex(2)}", hosts=2, backend="vxlan", with_containers=False)
    lab.workdir = f"/tmp/{lab.prefix}"  # short: unix socket paths are limited to 108 bytes
    checked = "flannel.1: first kernel check with the whole peer set"
    loaded = "loading pyroute2's IPRoute"
    try:
        lab.up()  # both agents started at once: host 1 may have synced before host 2's lease existed
        log = lab.host(1).log_file
        first = _log_until(log, 0, checked)
        assert "created device flannel.1" in first
        assert loaded not in first, first
        mac = lab.ip_json(1, "link", "show", "flannel.1")[0]["address"]
        assert f"mac {mac})" in first  # the MAC it was created with is the one it has
        offset = os.path.getsize(log)
        lab.stop_agent(1)
        lab.start_agent(1)
        again = _log_until(log, offset, checked)  # now host 2's lease is in etcd before the start
        assert f"{checked}: 1 peers, nothing to repair" in again
        assert "reusing device flannel.1" in again
        assert loaded not in again, again
        # and the data plane it made is the one it wants: flanneld's device, our subnet's base
        # address on it, host 2's subnet routed onto it
        from ipaddress import IPv4Interface

        link = lab.ip_json(1, "-d", "link", "show", "flannel.1")[0]
        info = link["linkinfo"]["info_data"]
        assert link["linkinfo"]["info_kind"] == "vxlan" and info["id"] == 1 and info["port"] == 8472
        assert info["learning"] is False and link["mtu"] == lab.ip_json(1, "link", "show", "eth0")[0]["mtu"] - 50
        assert "UP" in link["flags"]
        own = IPv4Interface(lab.wait_subnet_env(1)["FLANNEL_SUBNET"]).network
        addrs = [(a["local"], a["prefixlen"]) for a in lab.ip_json(1, "-4", "addr", "show", "flannel.1")[0]["addr_info"]]
        assert addrs == [(str(own.network_address), 32)]
        peer = IPv4Interface(lab.wait_subnet_env(2)["FLANNEL_SUBNET"]).network
        routes = lab.ip_json(1, "route", "show", "dev", "flannel.1")
        assert str(peer) in [r["dst"] for r in routes], routes
    finally:
        lab.down()


def test_the_agents_imports_are_frozen_out_of_the_collectors_walks():
    """flanneld imports trio and the agent with the cyclic collector off, then freezes what they
    made (it lives as long as the process), so full collections during a large start do not walk
    it again and again; the collector itself is back on."""
    got = _run("""
        import gc, json
        from flannelpy.cli.flanneld import load_agent
        before = gc.get_freeze_count()
        trio, options, run_agent = load_agent()
        print(json.dumps({"before": before, "after": gc.get_freeze_count(), "enabled": gc.isenabled(),
                          "run_agent": run_agent.__module__, "trio": trio.__name__}))
    """)
    assert got["before"] == 0 and got["after"] > 10000
    assert got["enabled"] is True
    assert (got["run_agent"], got["trio"]) == ("flannelpy.agent", "trio")


def test_a_v3_iptables_start_loads_neither_the_v2_client_nor_the_nftables_code():
    """What a v3 cluster's iptables-mode start imports (the agent, the v3 store, the iptables
    manager and its check for tables nftables mode left) leaves out the etcd v2 client and the
    nftables rule code; each still loads when asked for (v2, or a table of ours to remove)."""
    got = _run("""
        import json, sys
        from flannelpy.cli.flanneld import load_agent
        load_agent()
        from flannelpy.etcd.select import make_store
        from flannelpy.etcd.store import EtcdOptions
        from flannelpy.hostnet import iptables
        from flannelpy.hostnet.nft_tables import listed_tables, tables_to_switch_off
        from ipaddress import IPv4Network
        make_store(EtcdOptions(), "v3")
        nothing = tables_to_switch_off(IPv4Network("10.5.0.0/16")) & listed_tables("table ip nat\\n")
        watched = ("flannelpy.etcd.v2", "flannelpy.hostnet.nftables", "flannelpy.hostnet.nftables_rules")
        before = {m: m in sys.modules for m in watched}
        v2 = type(make_store(EtcdOptions(), "v2")).__module__
        from flannelpy.hostnet.nftables import NftablesManager
        print(json.dumps({"before": before, "nothing": sorted(nothing), "v2": v2,
                          "after": {m: m in sys.modules for m in watched}}))
    """)
    assert got["before"] == {"flannelpy.etcd.v2": False, "flannelpy.hostnet.nftables": False,
                             "flannelpy.hostnet.nftables_rules": False}
    assert got["nothing"] == []
    assert got["v2"] == "flannelpy.etcd.v2" and all(got["after"].values())
