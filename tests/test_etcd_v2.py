"""V2Store against a real etcd (v2 keys API enabled), plus its pure decoders."""

from __future__ import annotations

import calendar
import time
from ipaddress import IPv4Address, IPv4Network

import httpx
import pytest
import trio
from etcd_server import EtcdServer, free_port

from flannelpy.etcd.store import EtcdOptions, StoreUnavailable
from flannelpy.etcd.v2 import UNKNOWN_ATTRS, V2APIDisabled, V2Store, event_from_response, parse_expiration
from flannelpy.errors import LeaseValueError
from flannelpy.subnet.lease import SUBNET_TTL, EventKind, LeaseAttrs

PREFIX = "/coreos.com/network"
NET1 = IPv4Network("10.5.1.0/24")
NET2 = IPv4Network("10.5.2.0/24")
VX = LeaseAttrs(IPv4Address("10.0.0.1"), "vxlan", {"VtepMAC": "ee:84:9f:f3:57:3e"})
VX_VNI = LeaseAttrs(IPv4Address("10.0.0.2"), "vxlan", {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"})
UDP = LeaseAttrs(IPv4Address("10.10.10.15"))

# Guards against a hung test only; nothing asserts on elapsed time.
GUARD = 30


def store_for(etcd: EtcdServer, **kw) -> V2Store:
    return V2Store(EtcdOptions(endpoints=(etcd.endpoint,), **kw))


def v2_node(etcd: EtcdServer, key: str) -> dict:
    r = httpx.get(f"{etcd.endpoint}/v2/keys{key}")
    r.raise_for_status()
    return r.json()["node"]


# --- pure ---------------------------------------------------------------------------------

def test_parse_expiration_nanoseconds_and_offsets():
    base = calendar.timegm((2024, 1, 2, 3, 4, 5))
    assert parse_expiration("2024-01-02T03:04:05.123456789Z") == pytest.approx(base + 0.123456789)
    assert parse_expiration("2024-01-02T04:04:05+01:00") == base
    assert parse_expiration(None) is None
    with pytest.raises(Exception, match="RFC 3339"):
        parse_expiration("yesterday")
    # What a broken or hostile server may send instead of a string: a named refusal, which the
    # listing skips like any undecodable lease (not a TypeError out of the listing).
    for bad in (5, 0, [], {"a": 1}, True, "x" * 10_000):
        with pytest.raises(LeaseValueError, match="is not an RFC 3339 time") as info:
            parse_expiration(bad)
        assert len(str(info.value)) < 300


def test_a_node_with_a_garbage_expiration_is_a_named_refusal():
    from flannelpy.etcd.store import EXPIRY_NOT_READ
    from flannelpy.etcd.v2 import node_to_lease

    node = {"key": f"{PREFIX}/subnets/10.5.1.0-24", "value": '{"PublicIP":"10.0.0.1"}', "expiration": 5}
    with pytest.raises(LeaseValueError, match="expiration 5 is not an RFC 3339 time"):
        node_to_lease(node, f"{PREFIX}/subnets/")
    # Not read at all without expiry (a peer's): only whether the key has one.
    assert node_to_lease(node, f"{PREFIX}/subnets/", expiry=False).expiration == EXPIRY_NOT_READ


def test_event_actions_map_to_added_and_removed():
    value = '{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{"VtepMAC":"EE:84:9F:F3:57:3E"}}'
    for action in ("set", "create", "update", "compareAndSwap"):
        ev = event_from_response({"action": action, "node": {
            "key": f"{PREFIX}/subnets/10.5.1.0-24", "value": value, "modifiedIndex": 9}})
        assert ev.kind is EventKind.ADDED and ev.lease.subnet == NET1 and ev.lease.attrs == VX
    for action in ("delete", "expire", "compareAndDelete"):
        ev = event_from_response({"action": action, "node": {"key": f"{PREFIX}/subnets/10.5.1.0-24"},
                                  "prevNode": {"key": f"{PREFIX}/subnets/10.5.1.0-24", "value": value}})
        assert ev.kind is EventKind.REMOVED and ev.lease.subnet == NET1 and ev.lease.attrs == VX
    ev = event_from_response({"action": "expire", "node": {"key": f"{PREFIX}/subnets/10.5.1.0-24"}})
    assert ev.kind is EventKind.REMOVED and ev.lease.attrs == UNKNOWN_ATTRS


# --- real etcd ----------------------------------------------------------------------------

async def test_create_writes_flanneld_v010_values_with_24h_ttl(etcd):
    async with store_for(etcd) as s:
        lease = await s.create_lease(NET1, VX, SUBNET_TTL)
        await s.create_lease(NET2, UDP, SUBNET_TTL)
    key1, key2 = f"{PREFIX}/subnets/10.5.1.0-24", f"{PREFIX}/subnets/10.5.2.0-24"
    # byte-for-byte what flanneld v0.10 (etcd v2) wrote for vxlan and udp
    assert etcd.etcdctl("get", key1, api=2).stdout.strip() == \
        '{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{"VtepMAC":"ee:84:9f:f3:57:3e"}}'
    assert etcd.etcdctl("get", key2, api=2).stdout.strip() == '{"PublicIP":"10.10.10.15"}'
    node = v2_node(etcd, key1)
    assert SUBNET_TTL - 60 < node["ttl"] <= SUBNET_TTL
    assert lease is not None and lease.subnet == NET1 and lease.attrs == VX
    assert lease.expiration == pytest.approx(time.time() + SUBNET_TTL, abs=60)
    assert lease.store_ref == node["modifiedIndex"]


async def test_vni_written_after_vtepmac_free_fields_kept(etcd):
    async with store_for(etcd) as s:
        await s.create_lease(NET1, VX_VNI, SUBNET_TTL)
        got = await s.get_lease(NET1)
    assert etcd.etcdctl("get", f"{PREFIX}/subnets/10.5.1.0-24", api=2).stdout.strip() == \
        '{"PublicIP":"10.0.0.2","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}'
    assert got is not None and got.attrs == VX_VNI


async def test_create_race_exactly_one_wins(etcd):
    results = []
    async with store_for(etcd) as a, store_for(etcd) as b:
        async def create(store, attrs):
            results.append(await store.create_lease(NET1, attrs, SUBNET_TTL))

        async with trio.open_nursery() as n:
            n.start_soon(create, a, VX)
            n.start_soon(create, b, VX_VNI)
        winners = [r for r in results if r is not None]
        assert len(results) == 2 and len(winners) == 1
        stored = await a.get_lease(NET1)
    assert stored is not None and stored.attrs == winners[0].attrs


async def test_renew_sets_ttl_and_ttl0_clears_it(etcd):
    key = f"{PREFIX}/subnets/10.5.1.0-24"
    async with store_for(etcd) as s:
        await s.create_lease(NET1, VX, 300)
        assert v2_node(etcd, key)["ttl"] <= 300
        renewed = await s.renew_lease(NET1, VX_VNI, SUBNET_TTL)
        node = v2_node(etcd, key)
        assert node["ttl"] > 300 and renewed.attrs == VX_VNI
        assert renewed.expiration == pytest.approx(time.time() + SUBNET_TTL, abs=60)
        # a reservation: renewing with ttl=0 leaves (or makes) the key permanent
        reserved = await s.renew_lease(NET1, VX_VNI, 0)
        node = v2_node(etcd, key)
        assert "ttl" not in node and "expiration" not in node
        assert reserved.expiration is None
        (listed,), _ = await s.list_leases()
        assert listed.expiration is None


async def test_a_listing_without_expiry_leaves_each_expiration_unparsed(etcd):
    """What the agent asks for (peers' expiries are never used): a key with a TTL lists as
    EXPIRY_NOT_READ, a reservation as None; a watch event likewise."""
    from flannelpy.etcd.store import EXPIRY_NOT_READ

    async with store_for(etcd) as s:
        await s.create_lease(NET1, VX, 300)
        await s.create_lease(NET2, UDP, 0)
        leases, index = await s.list_leases(expiry=False)
        assert {lease.subnet: lease.expiration for lease in leases} == {NET1: EXPIRY_NOT_READ, NET2: None}
        timed = {lease.subnet: lease.expiration for lease in (await s.list_leases())[0]}
        assert timed[NET1] == pytest.approx(time.time() + 300, abs=30) and timed[NET2] is None
        watch = s.watch_leases(index, expiry=False)
        await s.renew_lease(NET2, UDP, 600)
        with trio.fail_after(10):
            batch = await watch.__anext__()
        await watch.aclose()
    (event,) = batch.events
    assert event.lease.subnet == NET2 and event.lease.expiration == EXPIRY_NOT_READ


async def test_list_reads_every_shape_and_skips_garbage(etcd):
    sub = f"{PREFIX}/subnets"
    etcd.etcdctl("mk", f"{sub}/10.5.1.0-24",
                 '{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{"VtepMAC":"EE-84-9F-F3-57-3E"}}', api=2)
    etcd.etcdctl("mk", f"{sub}/10.5.2.0-24", '{"PublicIP":"10.10.10.15","PublicIPv6":null}', api=2)
    etcd.etcdctl("mk", f"{sub}/10.5.3.0-24", "not json", api=2)
    etcd.etcdctl("mk", f"{sub}/bogus", '{"PublicIP":"10.0.0.9"}', api=2)
    async with store_for(etcd) as s:
        leases, index = await s.list_leases()
        r = httpx.get(f"{etcd.endpoint}/v2/keys/")
    assert sorted(((lease.subnet, lease.attrs) for lease in leases), key=lambda t: t[0]) == [(NET1, VX), (NET2, UDP)]
    assert all(lease.expiration is None for lease in leases)
    assert index == int(r.headers["X-Etcd-Index"])


async def test_list_without_subnets_dir_is_empty_with_index(etcd):
    async with store_for(etcd) as s:
        leases, index = await s.list_leases()
    assert leases == [] and index > 0


async def test_config_written_with_etcdctl_v2_mk_is_read(etcd):
    text = '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}'
    async with store_for(etcd) as s:
        assert await s.get_config() is None
        etcd.etcdctl("mk", f"{PREFIX}/config", text, api=2)
        assert await s.get_config() == text
    # and what we write, v2 etcdctl reads
    async with store_for(etcd, prefix="/atomic.io/network") as s:
        await s.put_config(text)
    assert etcd.etcdctl("get", "/atomic.io/network/config", api=2).stdout.strip() == text


async def test_delete_is_idempotent(etcd):
    async with store_for(etcd) as s:
        await s.create_lease(NET1, VX, SUBNET_TTL)
        await s.delete_lease(NET1)
        await s.delete_lease(NET1)
        assert await s.get_lease(NET1) is None


async def _next_event(it):
    with trio.fail_after(GUARD):
        while True:
            batch = await it.__anext__()
            if batch.events:
                return batch


async def test_watch_added_deleted_and_expired(etcd):
    async with store_for(etcd) as s, store_for(etcd) as writer:
        _, index = await s.list_leases()
        it = s.watch_leases(index).__aiter__()
        await writer.create_lease(NET1, VX, SUBNET_TTL)
        batch = await _next_event(it)
        (ev,) = batch.events
        assert ev.kind is EventKind.ADDED and ev.lease.subnet == NET1 and ev.lease.attrs == VX
        assert batch.revision == ev.lease.store_ref

        await writer.delete_lease(NET1)
        (ev,) = (await _next_event(it)).events
        assert ev.kind is EventKind.REMOVED and ev.lease.subnet == NET1 and ev.lease.attrs == VX

        await writer.create_lease(NET2, UDP, 1)  # expires by itself
        (ev,) = (await _next_event(it)).events
        assert ev.kind is EventKind.ADDED and ev.lease.subnet == NET2
        (ev,) = (await _next_event(it)).events
        assert ev.kind is EventKind.REMOVED and ev.lease.subnet == NET2 and ev.lease.attrs == UDP
        await it.aclose()


async def test_watch_skips_undecodable_values(etcd):
    async with store_for(etcd) as s:
        _, index = await s.list_leases()
        it = s.watch_leases(index).__aiter__()
        etcd.etcdctl("set", f"{PREFIX}/subnets/10.5.9.0-24", "{broken", api=2)
        await s.create_lease(NET1, VX, SUBNET_TTL)
        with trio.fail_after(GUARD):
            first = await it.__anext__()
        assert first.events == () and first.skipped == (f"{PREFIX}/subnets/10.5.9.0-24",)
        (ev,) = (await _next_event(it)).events
        assert ev.lease.subnet == NET1
        await it.aclose()


async def test_watch_survives_etcd_restart(etcd):
    async with store_for(etcd) as s:
        await s.create_lease(NET1, VX, SUBNET_TTL)
        _, index = await s.list_leases()
        got = []

        async def watch():
            async for batch in s.watch_leases(index):
                got.extend(batch.events)
                if any(e.lease.subnet == NET2 for e in batch.events):
                    return

        with trio.fail_after(GUARD):
            async with trio.open_nursery() as n:
                n.start_soon(watch)
                await trio.sleep(0.2)  # let the long poll be in flight when etcd goes away
                await trio.to_thread.run_sync(etcd.restart)
                async with store_for(etcd) as writer:
                    await writer.create_lease(NET2, UDP, SUBNET_TTL)
        assert [(e.kind, e.lease.subnet) for e in got] == [(EventKind.ADDED, NET2)]


async def test_watch_index_cleared_relists_as_snapshot(etcd):
    async with store_for(etcd) as s:
        await s.create_lease(NET1, VX, SUBNET_TTL)
        _, index = await s.list_leases()
        # changes after `index`: NET1 goes, NET2 comes, then > 1000 unrelated writes push
        # them out of etcd's v2 event history, so waitIndex=index+1 answers 401
        await s.delete_lease(NET1)
        await s.create_lease(NET2, UDP, SUBNET_TTL)
        async with httpx.AsyncClient() as c:
            for i in range(1010):
                r = await c.put(f"{etcd.endpoint}/v2/keys/other/noise", data={"value": str(i)})
                r.raise_for_status()
        it = s.watch_leases(index).__aiter__()
        with trio.fail_after(GUARD):
            batch = await it.__anext__()
        assert batch.snapshot is not None and batch.events == ()
        assert [(lease.subnet, lease.attrs) for lease in batch.snapshot] == [(NET2, UDP)]
        assert batch.revision > index + 1000
        # and it resumes from the re-list's index
        await s.create_lease(NET1, VX, SUBNET_TTL)
        (ev,) = (await _next_event(it)).events
        assert ev.kind is EventKind.ADDED and ev.lease.subnet == NET1
        await it.aclose()


async def test_failover_to_next_endpoint(etcd):
    dead = f"http://127.0.0.1:{free_port()}"
    async with V2Store(EtcdOptions(endpoints=(dead, etcd.endpoint))) as s:
        assert await s.create_lease(NET1, VX, SUBNET_TTL) is not None
        assert (await s.get_lease(NET1)).attrs == VX
    async with V2Store(EtcdOptions(endpoints=(dead,), request_timeout=2)) as s:
        with pytest.raises(StoreUnavailable, match="no etcd endpoint answered"):
            await s.get_config()


async def test_basic_auth_is_sent(etcd):
    # etcd v2 auth: create root, enable auth, then only authenticated writes succeed
    etcd.etcdctl("user", "add", "root:rootpw", api=2)
    etcd.etcdctl("auth", "enable", api=2)
    etcd.etcdctl("--username", "root:rootpw", "role", "revoke", "guest", "--path", "/*", "--readwrite", api=2)
    async with store_for(etcd) as anon:
        with pytest.raises(Exception, match="(?i)insufficient|unauthorized|credentials"):
            await anon.create_lease(NET1, VX, SUBNET_TTL)
    async with store_for(etcd, username="root", password="rootpw") as s:
        assert await s.create_lease(NET1, VX, SUBNET_TTL) is not None


async def test_v2_disabled_is_reported():
    with EtcdServer(enable_v2=False) as server:
        async with store_for(server) as s:
            with pytest.raises(V2APIDisabled, match="--enable-v2=true"):
                await s.get_config()


async def test_watch_far_behind_catches_up_with_one_relist(etcd):
    """issue #19: v2 returns one event per long poll; a watch 200 events behind re-lists once
    (a snapshot, applied by its net effect) instead of 200 round trips."""
    async with store_for(etcd) as s, store_for(etcd) as writer:
        _, index = await s.list_leases()
        for i in range(100):
            net = IPv4Network(f"10.5.{100 + i}.0/24")
            await writer.create_lease(net, VX, SUBNET_TTL)
            if i < 99:
                await writer.delete_lease(net)
        it = s.watch_leases(index).__aiter__()
        with trio.fail_after(GUARD):
            batch = await it.__anext__()
        assert batch.snapshot is not None
        assert [lease.subnet for lease in batch.snapshot] == [IPv4Network("10.5.199.0/24")]
        # then live again: the next change is an event
        await writer.create_lease(NET1, VX, SUBNET_TTL)
        (ev,) = (await _next_event(it)).events
        assert ev.kind is EventKind.ADDED and ev.lease.subnet == NET1
        await it.aclose()
