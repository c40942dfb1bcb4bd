"""V3Store against a real etcd: the exact keys/values/leases flanneld writes, and the watch.

Every test runs over both v3 transports: etcd's JSON gateway and its gRPC API.
"""

from __future__ import annotations

import json
import time
from ipaddress import IPv4Address, IPv4Network

import pytest
import trio
from etcd_server import free_port

from flannelpy.etcd.store import EtcdOptions, StoreUnavailable
from flannelpy.etcd import v3 as v3_module
from flannelpy.etcd.v3 import EtcdError, V3Store, prefix_range_end
from flannelpy.subnet.lease import EventKind, LeaseAttrs
from flannelpy.subnet.tracker import LeaseTracker

pytestmark = pytest.mark.etcd

PREFIX = "/coreos.com/network"
VX = LeaseAttrs(IPv4Address("192.168.64.3"), "vxlan", {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"})
VX_JSON = '{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}'
NET = IPv4Network("10.5.52.0/24")
KEY = f"{PREFIX}/subnets/10.5.52.0-24"


@pytest.fixture(params=["gateway", "grpc"])
def transport(request) -> str:
    return request.param


def opts(etcd, transport: str, **kw) -> EtcdOptions:
    return EtcdOptions(endpoints=(etcd.endpoint,), prefix=PREFIX, transport=transport, **kw)


def get_value(etcd, key: str) -> str | None:
    out = etcd.etcdctl("get", key, "--print-value-only").stdout
    return out[:-1] if out else None


def key_lease(etcd, key: str) -> int:
    doc = json.loads(etcd.etcdctl("get", key, "-w", "json").stdout)
    return int(doc["kvs"][0].get("lease", 0))


def lease_ttl(etcd, lease_id: int) -> tuple[int, int]:
    doc = json.loads(etcd.etcdctl("lease", "timetolive", format(lease_id, "x"), "-w", "json").stdout)
    return doc["ttl"], doc["granted-ttl"]


def test_prefix_range_end():
    assert prefix_range_end("/a/subnets/") == b"/a/subnets0"
    assert prefix_range_end(b"a\xff") == b"b"  # 0xff carries into the previous byte
    assert prefix_range_end(b"\xff\xff") == b"\0"  # etcd's "to the end of the keyspace"


async def test_create_shape_and_lease(etcd, transport):
    async with V3Store(opts(etcd, transport)) as store:
        lease = await store.create_lease(NET, VX, 86400)
        assert lease is not None and lease.subnet == NET and lease.store_ref
        assert store.transport == transport
        assert get_value(etcd, KEY) == VX_JSON
        assert key_lease(etcd, KEY) == lease.store_ref
        ttl, granted = lease_ttl(etcd, lease.store_ref)
        assert granted == 86400 and 86000 < ttl <= 86400

        other = LeaseAttrs(IPv4Address("192.168.64.4"), "vxlan", {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:45"})
        assert await store.create_lease(NET, other, 86400) is None
        assert get_value(etcd, KEY) == VX_JSON
        # The lease granted for the lost txn was revoked: only ours is left.
        leases = etcd.etcdctl("lease", "list").stdout
        assert "found 1 leases" in leases


async def test_create_again_with_same_value_is_a_win(etcd, transport):
    # A retried create (request timed out after etcd applied it) must not look like a lost race.
    async with V3Store(opts(etcd, transport)) as store:
        first = await store.create_lease(NET, VX, 86400)
        again = await store.create_lease(NET, VX, 86400)
        assert again is not None and again.store_ref == first.store_ref


async def test_renew_grants_new_lease_and_ttl0_has_none(etcd, transport):
    async with V3Store(opts(etcd, transport)) as store:
        first = await store.create_lease(NET, VX, 86400)
        renewed = await store.renew_lease(NET, VX, 86400)
        assert renewed.store_ref != first.store_ref
        assert key_lease(etcd, KEY) == renewed.store_ref
        assert renewed.expiration >= first.expiration
        res = await store.renew_lease(NET, VX, 0)
        assert res.expiration is None and res.store_ref is None
        assert key_lease(etcd, KEY) == 0
        assert get_value(etcd, KEY) == VX_JSON


async def test_time_left_reads_the_etcd_lease_and_is_none_once_it_is_gone(etcd, transport):
    async with V3Store(opts(etcd, transport)) as store:
        created = await store.create_lease(NET, VX, 600)
        (listed,), _ = await store.list_leases(expiry=False)
        assert listed.store_ref == created.store_ref
        assert 590 <= await store.time_left(listed) <= 600
        reserved = await store.renew_lease(NET, VX, 0)
        assert await store.time_left(reserved) is None  # no etcd lease: nothing to read
        etcd.etcdctl("lease", "revoke", format(created.store_ref, "x"))
        assert await store.time_left(listed) is None


async def test_list_decodes_old_shapes_and_skips_garbage(etcd, transport):
    etcd.etcdctl("put", f"{PREFIX}/subnets/10.5.1.0-24",
                 '{"PublicIP":"10.240.0.2","BackendType":"vxlan","BackendData":{"VtepMAC":"EE:84:9F:F3:57:3E"}}')
    etcd.etcdctl("put", f"{PREFIX}/subnets/10.5.2.0-24", '{"PublicIP":"10.10.10.15"}')
    etcd.etcdctl("put", f"{PREFIX}/subnets/10.5.3.0-24", "not json")
    etcd.etcdctl("put", f"{PREFIX}/subnets/bogus-key", '{"PublicIP":"10.10.10.16"}')
    etcd.etcdctl("put", f"{PREFIX}/config", '{"Network":"10.5.0.0/16"}')
    etcd.etcdctl("put", f"{PREFIX}/subnetsX/10.5.4.0-24", '{"PublicIP":"10.10.10.17"}')  # outside the prefix
    async with V3Store(opts(etcd, transport)) as store:
        created = await store.create_lease(NET, VX, 86400)
        leases, rev = await store.list_leases()
        assert rev > 0
        by_net = {lease.subnet: lease for lease in leases}
        assert set(by_net) == {IPv4Network("10.5.1.0/24"), IPv4Network("10.5.2.0/24"), NET}
        old_vx = by_net[IPv4Network("10.5.1.0/24")]
        assert old_vx.attrs.vtep_mac == "ee:84:9f:f3:57:3e" and old_vx.attrs.vni is None
        assert old_vx.expiration is None  # no etcd lease: a reservation
        udp = by_net[IPv4Network("10.5.2.0/24")]
        assert udp.attrs.backend_type == "" and udp.attrs.public_ip == IPv4Address("10.10.10.15")
        mine = by_net[NET]
        assert mine.attrs == VX and mine.store_ref == created.store_ref
        assert abs(mine.expiration - (time.time() + 86400)) < 5


async def test_list_in_pages_is_one_consistent_listing(etcd, transport, monkeypatch):
    """issue #19: a listing reads LIST_PAGE keys per request, every page at the first page's
    revision, so a put landing between pages is not half in it; garbage is skipped in any page."""
    monkeypatch.setattr(v3_module, "LIST_PAGE", 3)
    for i in range(1, 11):
        etcd.etcdctl("put", f"{PREFIX}/subnets/10.5.{i}.0-24", f'{{"PublicIP":"10.0.0.{i}","PublicIPv6":null}}')
    etcd.etcdctl("put", f"{PREFIX}/subnets/10.5.5.128-25", "not json")
    async with V3Store(opts(etcd, transport)) as store:
        ranges = []
        post = store._post

        async def spy(path, body, **kw):
            doc = await post(path, body, **kw)
            if path == "/v3/kv/range":
                ranges.append(body)
                if len(ranges) == 1:  # between the first page and the second
                    etcd.etcdctl("put", f"{PREFIX}/subnets/10.5.99.0-24", '{"PublicIP":"10.0.0.99","PublicIPv6":null}')
            return doc

        store._post = spy
        leases, rev = await store.list_leases(expiry=False)
        assert sorted(str(x.subnet) for x in leases) == sorted(f"10.5.{i}.0/24" for i in range(1, 11))
        assert len(ranges) == 4 and all(r["limit"] == "3" for r in ranges)
        assert "revision" not in ranges[0] and {r["revision"] for r in ranges[1:]} == {str(rev)}
        store._post = post
        again, rev2 = await store.list_leases(expiry=False)
        assert rev2 > rev and len(again) == 11


async def test_list_whose_revision_is_compacted_between_pages_starts_over(etcd, transport, monkeypatch):
    monkeypatch.setattr(v3_module, "LIST_PAGE", 2)
    for i in range(1, 6):
        etcd.etcdctl("put", f"{PREFIX}/subnets/10.5.{i}.0-24", f'{{"PublicIP":"10.0.0.{i}","PublicIPv6":null}}')
    async with V3Store(opts(etcd, transport)) as store:
        post, firsts = store._post, []

        async def spy(path, body, **kw):
            doc = await post(path, body, **kw)
            if path == "/v3/kv/range" and "revision" not in body:
                firsts.append(body)
                if len(firsts) == 1:
                    etcd.etcdctl("del", f"{PREFIX}/subnets/10.5.5.0-24")
                    head = json.loads(etcd.etcdctl("get", "x", "-w", "json").stdout)["header"]["revision"]
                    etcd.etcdctl("compact", str(head))
            return doc

        store._post = spy
        leases, rev = await store.list_leases(expiry=False)
        assert len(firsts) == 2  # the first listing's second page was refused: a new listing
        assert sorted(str(x.subnet) for x in leases) == [f"10.5.{i}.0/24" for i in range(1, 5)]


async def test_delete_and_config(etcd, transport):
    async with V3Store(opts(etcd, transport)) as store:
        assert await store.get_config() is None
        await store.put_config('{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}')
        assert await store.get_config() == '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}'
        assert get_value(etcd, f"{PREFIX}/config") == '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}'
        await store.create_lease(NET, VX, 86400)
        await store.delete_lease(NET)
        assert get_value(etcd, KEY) is None


async def test_prefix_without_leading_slash(etcd, transport):
    async with V3Store(EtcdOptions(endpoints=(etcd.endpoint,), prefix="atomic.io/network/", transport=transport)) as store:
        await store.create_lease(NET, VX, 0)
    assert get_value(etcd, "atomic.io/network/subnets/10.5.52.0-24") == VX_JSON


async def test_failover_dead_endpoint_first(etcd, transport):
    dead = f"http://127.0.0.1:{free_port()}"
    async with V3Store(EtcdOptions(endpoints=(dead, etcd.endpoint), prefix=PREFIX, transport=transport)) as store:
        assert await store.create_lease(NET, VX, 86400) is not None
        assert store._good == 1  # remembered, so the dead one is not tried first again
        leases, _ = await store.list_leases()
        assert [lease.subnet for lease in leases] == [NET]


async def test_no_endpoint_answers(transport):
    dead = tuple(f"http://127.0.0.1:{free_port()}" for _ in range(2))
    async with V3Store(EtcdOptions(endpoints=dead, prefix=PREFIX, request_timeout=1, transport=transport)) as store:
        with pytest.raises(StoreUnavailable):
            await store.list_leases()


async def test_auth_token_and_reauth_after_restart(etcd, transport):
    etcd.etcdctl("user", "add", "root:s3cret")
    etcd.etcdctl("auth", "enable")
    async with V3Store(opts(etcd, transport, username="root", password="s3cret")) as store:
        assert await store.create_lease(NET, VX, 86400) is not None
        token = store._token
        # Simple tokens do not survive a restart: the next request is rejected and re-authenticated.
        etcd.restart()
        leases, _ = await store.list_leases()
        assert [lease.subnet for lease in leases] == [NET]
        assert store._token and store._token != token
    async with V3Store(opts(etcd, transport, username="root", password="wrong")) as store:
        with pytest.raises(EtcdError, match="authentication failed.*; check -etcd-username and -etcd-password"):
            await store.list_leases()


async def test_permission_denied_says_what_to_grant(etcd, transport):
    etcd.etcdctl("user", "add", "root:s3cret")
    etcd.etcdctl("user", "add", "fl:pw")  # no role: may read nothing
    etcd.etcdctl("auth", "enable")
    async with V3Store(opts(etcd, transport, username="fl", password="pw")) as store:
        with pytest.raises(EtcdError) as info:
            await store.get_config()
    assert "permission denied" in str(info.value)
    assert f"readwrite {PREFIX}/" in str(info.value) and "user grant-role fl" in str(info.value)


class Collector:
    def __init__(self) -> None:
        self.batches = []
        self._send, self._recv = trio.open_memory_channel(100)

    async def run(self, store, rev, *, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        async for batch in store.watch_leases(rev):
            self.batches.append(batch)
            await self._send.send(batch)

    async def next(self):
        with trio.fail_after(30):  # a hang guard, not a timing assertion
            return await self._recv.receive()


async def test_watch_events(etcd, transport):
    async with V3Store(opts(etcd, transport)) as store:
        _, rev = await store.list_leases()
        c = Collector()
        async with trio.open_nursery() as nursery:
            await nursery.start(c.run, store, rev)
            await store.create_lease(NET, VX, 86400)
            b = await c.next()
            assert [(e.kind, e.lease.subnet, e.lease.attrs) for e in b.events] == [(EventKind.ADDED, NET, VX)]
            assert b.events[0].lease.expiration is not None
            etcd.etcdctl("put", f"{PREFIX}/subnets/10.5.9.0-24", "garbage")
            b = await c.next()
            assert b.skipped == (f"{PREFIX}/subnets/10.5.9.0-24",) and not b.events
            await store.delete_lease(NET)
            b = await c.next()
            assert [(e.kind, e.lease.subnet) for e in b.events] == [(EventKind.REMOVED, NET)]
            nursery.cancel_scope.cancel()


async def test_watch_resumes_across_restart(etcd, transport):
    async with V3Store(opts(etcd, transport), backoff_min_s=0.05) as store:
        _, rev = await store.list_leases()
        c = Collector()
        async with trio.open_nursery() as nursery:
            await nursery.start(c.run, store, rev)
            await store.create_lease(NET, VX, 86400)
            assert (await c.next()).events[0].kind is EventKind.ADDED
            # These calls block the trio loop, so the watcher cannot reconnect before the
            # put: it must resume from its last revision to see it.
            etcd.restart()
            etcd.etcdctl("put", f"{PREFIX}/subnets/10.5.53.0-24", '{"PublicIP":"10.0.0.9","PublicIPv6":null}')
            etcd.etcdctl("del", KEY)
            seen = []
            while len(seen) < 2:
                seen.extend((e.kind, e.lease.subnet) for e in (await c.next()).events)
            assert seen == [(EventKind.ADDED, IPv4Network("10.5.53.0/24")), (EventKind.REMOVED, NET)]
            nursery.cancel_scope.cancel()


async def test_watch_relists_after_compaction(etcd, transport):
    peer_a = f"{PREFIX}/subnets/10.5.1.0-24"
    peer_b = f"{PREFIX}/subnets/10.5.2.0-24"
    etcd.etcdctl("put", peer_a, '{"PublicIP":"10.0.0.1","PublicIPv6":null,"BackendType":"host-gw"}')
    async with V3Store(opts(etcd, transport), backoff_min_s=0.05) as store:
        leases, rev = await store.list_leases()
        tracker = LeaseTracker(own_subnet=None)
        assert [e.kind for e in tracker.reset(leases)] == [EventKind.ADDED]
        c = Collector()
        async with trio.open_nursery() as nursery:
            await nursery.start(c.run, store, rev)
            etcd.etcdctl("put", f"{PREFIX}/subnets/10.5.3.0-24", '{"PublicIP":"10.0.0.3","PublicIPv6":null}')
            tracker.update(await c.next())
            # While the watcher is cut off: peer A goes, B arrives, the history is compacted.
            etcd.stop()
            etcd.start()
            etcd.etcdctl("del", peer_a)
            etcd.etcdctl("put", peer_b, '{"PublicIP":"10.0.0.2","PublicIPv6":null,"BackendType":"host-gw"}')
            head = json.loads(etcd.etcdctl("get", "x", "-w", "json").stdout)["header"]["revision"]
            etcd.etcdctl("compact", str(head))
            b = await c.next()
            assert b.snapshot is not None and b.revision >= head
            events = tracker.update(b)
            assert sorted((e.kind.value, str(e.lease.subnet)) for e in events) == [
                ("added", "10.5.2.0/24"), ("removed", "10.5.1.0/24")]
            # ...and the watch carries on from the re-listed revision.
            etcd.etcdctl("del", f"{PREFIX}/subnets/10.5.3.0-24")
            b = await c.next()
            assert [(e.kind, str(e.lease.subnet)) for e in b.events] == [(EventKind.REMOVED, "10.5.3.0/24")]
            nursery.cancel_scope.cancel()
