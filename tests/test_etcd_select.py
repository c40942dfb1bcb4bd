"""open_store / wait_for_config: which API "auto" picks, and what it says while waiting."""

from __future__ import annotations

import logging

import pytest
import trio
from etcd_server import EtcdServer, free_port

from flannelpy.errors import UsageError
from flannelpy.etcd import select
from flannelpy.etcd.select import create_command, open_store, wait_for_config
from flannelpy.etcd.store import EtcdOptions
from flannelpy.etcd.v2 import V2Store

PREFIX = "/atomic.io/network"
V3_CFG = '{"Network":"10.3.0.0/16","Backend":{"Type":"vxlan"}}'
V2_CFG = '{"Network":"10.2.0.0/16"}'
GUARD = 30  # hang guard only
LOG = logging.getLogger("test.select")


def opts(etcd: EtcdServer) -> EtcdOptions:
    return EtcdOptions(endpoints=(etcd.endpoint,), prefix=PREFIX)


def store_kind(store) -> str:
    return "v2" if isinstance(store, V2Store) else "v3"


async def _wait(options, api="auto"):
    with trio.fail_after(GUARD):
        store, text = await wait_for_config(options, api, log=LOG, retry_interval=0.05)
    await store.aclose()
    return store_kind(store), text


# --- pure ---------------------------------------------------------------------------------

def test_create_commands_name_prefix_and_endpoints():
    d = EtcdOptions(prefix=PREFIX)
    assert create_command(d, "v3") == \
        "etcdctl put /atomic.io/network/config '{\"Network\":\"10.5.0.0/16\",\"Backend\":{\"Type\":\"vxlan\"}}'"
    assert create_command(d, "v2").startswith("ETCDCTL_API=2 etcdctl mk /atomic.io/network/config '{")
    other = EtcdOptions(endpoints=("http://10.0.0.1:2379",))
    assert "--endpoints=http://10.0.0.1:2379 put /coreos.com/network/config" in create_command(other, "v3")


async def test_invalid_api_is_a_usage_error():
    with pytest.raises(UsageError, match='"v4"'):
        await open_store(EtcdOptions(), "v4")
    with pytest.raises(UsageError, match='"V3"'):
        await wait_for_config(EtcdOptions(), "V3", log=LOG)


# --- real etcd ----------------------------------------------------------------------------

async def test_auto_v3_only(etcd):
    etcd.etcdctl("put", f"{PREFIX}/config", V3_CFG)
    assert await _wait(opts(etcd)) == ("v3", V3_CFG)


async def test_auto_v2_only(etcd):
    etcd.etcdctl("mk", f"{PREFIX}/config", V2_CFG, api=2)
    assert await _wait(opts(etcd)) == ("v2", V2_CFG)
    s = await open_store(opts(etcd), "auto")
    assert store_kind(s) == "v2"
    await s.aclose()


async def test_auto_both_prefers_v3(etcd):
    etcd.etcdctl("put", f"{PREFIX}/config", V3_CFG)
    etcd.etcdctl("mk", f"{PREFIX}/config", V2_CFG, api=2)
    assert await _wait(opts(etcd)) == ("v3", V3_CFG)


async def test_auto_with_the_config_in_v3_never_asks_v2(etcd, monkeypatch):
    """The v3 answer decides when it holds the key: no v2 client is made and no v2 request sent
    (a start's round trip saved).  With v3's key missing, v2 is asked, as before."""
    made: list[str] = []
    real_make = select.make_store

    def counting_make(options, api):
        made.append(api)
        return real_make(options, api)

    monkeypatch.setattr(select, "make_store", counting_make)
    etcd.etcdctl("put", f"{PREFIX}/config", V3_CFG)
    etcd.etcdctl("mk", f"{PREFIX}/config", V2_CFG, api=2)
    assert await _wait(opts(etcd)) == ("v3", V3_CFG)
    assert made == ["v3"]
    etcd.etcdctl("del", f"{PREFIX}/config")
    made.clear()
    assert await _wait(opts(etcd)) == ("v2", V2_CFG)
    assert made == ["v3", "v2"]


async def test_explicit_api_reads_only_that_keyspace(etcd):
    etcd.etcdctl("put", f"{PREFIX}/config", V3_CFG)
    etcd.etcdctl("mk", f"{PREFIX}/config", V2_CFG, api=2)
    assert await _wait(opts(etcd), "v2") == ("v2", V2_CFG)
    assert await _wait(opts(etcd), "v3") == ("v3", V3_CFG)


class _CountingProbe:
    def __init__(self) -> None:
        self.calls = 0
        self.real = select.probe

    async def __call__(self, store, api):
        self.calls += 1
        return await self.real(store, api)


async def _wait_logging_once(options, api, caplog, monkeypatch, write):
    """Run wait_for_config until it has retried a few times, check its one warning, then write."""
    counter = _CountingProbe()
    monkeypatch.setattr(select, "probe", counter)
    result = {}

    async def waiter():
        store, text = await wait_for_config(options, api, log=LOG, retry_interval=0.02)
        result["kind"], result["text"] = store_kind(store), text
        await store.aclose()

    with caplog.at_level(logging.INFO, logger="test.select"), trio.fail_after(GUARD):
        async with trio.open_nursery() as n:
            n.start_soon(waiter)
            while counter.calls < 10:  # several full retry rounds
                await trio.sleep(0.02)
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1, warnings
            await trio.to_thread.run_sync(write)
    return warnings[0], result


async def test_auto_neither_waits_logs_once_then_finishes(etcd, caplog, monkeypatch):
    msg, result = await _wait_logging_once(
        opts(etcd), "auto", caplog, monkeypatch,
        lambda: etcd.etcdctl("mk", f"{PREFIX}/config", V2_CFG, api=2))
    assert f"v3: no key {PREFIX}/config" in msg and f"v2: no key {PREFIX}/config" in msg
    assert f"put {PREFIX}/config '" in msg
    assert f"ETCDCTL_API=2 etcdctl --endpoints={etcd.endpoint} mk {PREFIX}/config '" in msg
    assert result == {"kind": "v2", "text": V2_CFG}
    assert any("using etcd v2 API" in r.getMessage() for r in caplog.records)


async def test_auto_with_v2_disabled_says_so(caplog, monkeypatch):
    with EtcdServer(enable_v2=False) as server:
        msg, result = await _wait_logging_once(
            opts(server), "auto", caplog, monkeypatch,
            lambda: server.etcdctl("put", f"{PREFIX}/config", V3_CFG))
    assert "v2: API disabled (start etcd with --enable-v2=true)" in msg
    assert f"v3: no key {PREFIX}/config" in msg
    assert result == {"kind": "v3", "text": V3_CFG}


async def test_unreachable_logged_once_then_recovers(caplog, monkeypatch):
    server = EtcdServer()
    server.client_port = free_port()
    try:
        def start_and_write():
            server.start()
            server.etcdctl("put", f"{PREFIX}/config", V3_CFG)

        msg, result = await _wait_logging_once(opts(server), "auto", caplog, monkeypatch, start_and_write)
    finally:
        server.close()
    assert msg.startswith(f"cannot reach etcd at {server.endpoint}")
    assert result == {"kind": "v3", "text": V3_CFG}


# --- an etcd that fails or refuses us is never "config not found" ----------------------------------

def test_failure_message_names_the_failure_not_a_missing_key():
    o = EtcdOptions(endpoints=("https://10.0.0.10:2379",), prefix=PREFIX)
    tls = select.Probe("v3", None, "tls", "TLS handshake with https://10.0.0.10:2379 failed: x")
    err = select.Probe("v3", None, "error", "error reading /atomic.io/network/config: etcdserver: permission denied")
    missing = select.Probe("v2", None, "missing", "no key /atomic.io/network/config")
    down = select.Probe("v3", None, "unreachable", "unreachable (no etcd endpoint answered: refused)")
    same_tls = select.Probe("v2", None, "tls", tls.detail)
    for probes in ([tls, missing], [err, missing], [down, missing], [tls, same_tls]):
        text = select.waiting_message(o, probes, 1.0)
        assert "not found" not in text and "etcdctl" not in text, text
    assert select.failure_message(o, [tls, same_tls]) == \
        f"cannot read {PREFIX}/config from etcd: v3, v2: TLS handshake with https://10.0.0.10:2379 failed: x"
    assert select.failure_message(o, [err, missing]).endswith("v3: " + err.detail)
    assert select.failure_message(o, [down, down]).startswith("cannot reach etcd at https://10.0.0.10:2379")
    assert select.failure_message(o, [missing]) is None
    assert "Create it with" in select.waiting_message(o, [missing], 1.0)


async def test_wrong_password_is_reported_as_such(etcd, caplog):
    etcd.etcdctl("user", "add", "root:s3cret")
    etcd.etcdctl("auth", "enable")
    options = EtcdOptions(endpoints=(etcd.endpoint,), prefix=PREFIX, username="root", password="wrong")
    with caplog.at_level(logging.WARNING, logger="test.select"), trio.move_on_after(1.5):
        await wait_for_config(options, "auto", log=LOG, retry_interval=0.05)
    warnings = [r.getMessage() for r in caplog.records if r.name == "test.select"]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"cannot read {PREFIX}/config from etcd: v3: ")
    assert "authentication failed" in warnings[0] and "check -etcd-username and -etcd-password" in warnings[0]
    assert "not found" not in warnings[0]
