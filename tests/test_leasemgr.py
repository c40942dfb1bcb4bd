"""LeaseManager against a real etcd: acquisition order, races, renewal, own-key guard, peers."""

from __future__ import annotations

import json
import logging
import random
import time
from ipaddress import IPv4Address, IPv4Network

import pytest
import trio

from flannelpy.backends.base import LeaseData
from flannelpy.config.network import parse_config
from flannelpy.errors import OutOfSubnets
from flannelpy.etcd.store import EtcdOptions
from flannelpy.etcd.v3 import V3Store
from flannelpy.subnet.lease import SUBNET_TTL, EventKind, Lease, LeaseEvent
from flannelpy.subnet.manager import KEEP_SPARE_S, LeaseManager, LeaseTaken

pytestmark = pytest.mark.etcd

PREFIX = "/coreos.com/network"
CONFIG = parse_config('{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}')
DATA = LeaseData("vxlan", {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"})
ME = IPv4Address("192.168.64.3")
MY_VALUE = ('{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
            '"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}')


OUR_SUBNET = IPv4Network("10.5.200.0/24")  # for tests that then put peers' keys at fixed subnets


def key(subnet: str) -> str:
    return f"{PREFIX}/subnets/{subnet.replace('/', '-')}"


def store_for(etcd) -> V3Store:
    return V3Store(EtcdOptions(endpoints=(etcd.endpoint,), prefix=PREFIX), backoff_min_s=0.05)


def manager(store, **kw) -> LeaseManager:
    args = dict(public_ip=ME, lease_data=DATA, previous_subnet=None, renew_margin_s=3600)
    args.update(kw)
    return LeaseManager(store, CONFIG, args.pop("public_ip"), args.pop("lease_data"),
                        args.pop("previous_subnet"), args.pop("renew_margin_s"), **args)


def kv(etcd, k: str) -> dict | None:
    doc = json.loads(etcd.etcdctl("get", k, "-w", "json").stdout)
    return doc["kvs"][0] if doc.get("kvs") else None


def granted_ttl(etcd, lease_id: int) -> int:
    doc = json.loads(etcd.etcdctl("lease", "timetolive", format(lease_id, "x"), "-w", "json").stdout)
    return doc["granted-ttl"]


async def wait_change(mgr: LeaseManager):
    with trio.fail_after(30):  # hang guard only
        await mgr.changed.wait()
    return mgr.current


async def test_acquire_new_lease_shape(etcd):
    async with store_for(etcd) as store:
        lease = await manager(store, rng=random.Random(1)).acquire()
    assert CONFIG.contains_subnet(lease.subnet)
    got = kv(etcd, key(str(lease.subnet)))
    import base64
    assert base64.b64decode(got["value"]).decode() == MY_VALUE
    assert int(got["lease"]) == lease.store_ref and granted_ttl(etcd, lease.store_ref) == SUBNET_TTL


async def test_reuse_by_public_ip_renews_with_new_attrs(etcd):
    etcd.etcdctl("put", key("10.5.7.0/24"), '{"PublicIP":"192.168.64.3","BackendType":"vxlan",'
                 '"BackendData":{"VtepMAC":"aa:aa:aa:aa:aa:aa"}}', "--lease=" + grant(etcd, 600))
    async with store_for(etcd) as store:
        lease = await manager(store, previous_subnet=IPv4Network("10.5.9.0/24")).acquire()
    assert lease.subnet == IPv4Network("10.5.7.0/24")
    assert etcd.etcdctl("get", key("10.5.7.0/24"), "--print-value-only").stdout.strip() == MY_VALUE
    assert granted_ttl(etcd, int(kv(etcd, key("10.5.7.0/24"))["lease"])) == SUBNET_TTL


async def test_restart_keeps_an_unchanged_lease_without_writing(etcd, caplog):
    """issue #19: a restart whose lease etcd already holds exactly as it would write it reads the
    lease's time left and writes nothing (flanneld grants and puts again, waking every peer)."""
    caplog.set_level(logging.INFO, logger="flanneld.lease")
    async with store_for(etcd) as store:
        first = await manager(store).acquire()
        revision = int(json.loads(etcd.etcdctl("get", key(str(first.subnet)), "-w", "json").stdout)["header"]["revision"])
        puts, grants, ttls = (etcd_calls(etcd, m) for m in ("Put", "LeaseGrant", "LeaseTimeToLive"))
        again = await manager(store, previous_subnet=first.subnet).acquire()
    assert again.subnet == first.subnet and again.store_ref == first.store_ref
    assert again.expiration is not None and abs(again.expiration - first.expiration) < 5
    assert (etcd_calls(etcd, "Put"), etcd_calls(etcd, "LeaseGrant")) == (puts, grants)
    assert etcd_calls(etcd, "LeaseTimeToLive") == ttls + 1
    after = json.loads(etcd.etcdctl("get", key(str(first.subnet)), "-w", "json").stdout)
    assert int(after["header"]["revision"]) == revision  # nothing at all was written
    assert "nothing written" in caplog.text


@pytest.mark.parametrize("ttl", [SUBNET_TTL - 60, 3600 + 300])  # fresh enough; short of margin + KEEP_SPARE_S
async def test_restart_renews_an_unchanged_lease_only_when_its_ttl_is_short(etcd, ttl):
    etcd.etcdctl("put", key("10.5.7.0/24"), MY_VALUE, "--lease=" + grant(etcd, ttl))
    old_id = int(kv(etcd, key("10.5.7.0/24"))["lease"])
    async with store_for(etcd) as store:
        lease = await manager(store).acquire()  # margin 3600 s
    assert lease.subnet == IPv4Network("10.5.7.0/24")
    kept = ttl > 3600 + KEEP_SPARE_S
    assert (lease.store_ref == old_id) == kept
    assert int(kv(etcd, key("10.5.7.0/24"))["lease"]) == lease.store_ref
    assert granted_ttl(etcd, lease.store_ref) == (ttl if kept else SUBNET_TTL)
    assert lease.expiration is not None and abs(lease.expiration - (time.time() + (ttl if kept else SUBNET_TTL))) < 10


async def test_time_left_of_a_revoked_etcd_lease_is_none(etcd):
    """A lease gone between the listing and the read is renewed, not kept (time_left None)."""
    etcd.etcdctl("put", key("10.5.7.0/24"), MY_VALUE, "--lease=" + grant(etcd, 600))
    async with store_for(etcd) as store:
        (listed,), _ = await store.list_leases(expiry=False)
        assert await store.time_left(listed) == pytest.approx(600, abs=10)
        etcd.etcdctl("lease", "revoke", format(listed.store_ref, "x"))
        assert await store.time_left(listed) is None
        assert await manager(store)._kept_as_it_is(listed) is None


async def test_unchanged_reservation_is_kept_without_writing(etcd):
    etcd.etcdctl("put", key("10.5.8.0/24"), MY_VALUE)  # no TTL: a reservation, with our exact value
    revision = int(json.loads(etcd.etcdctl("get", key("10.5.8.0/24"), "-w", "json").stdout)["header"]["revision"])
    async with store_for(etcd) as store:
        lease = await manager(store).acquire()
    assert lease.subnet == IPv4Network("10.5.8.0/24") and lease.expiration is None
    after = json.loads(etcd.etcdctl("get", key("10.5.8.0/24"), "-w", "json").stdout)
    assert int(after["header"]["revision"]) == revision


async def test_reservation_stays_without_ttl(etcd):
    etcd.etcdctl("put", key("10.5.8.0/24"), '{"PublicIP":"192.168.64.3"}')
    async with store_for(etcd) as store:
        lease = await manager(store).acquire()
    assert lease.subnet == IPv4Network("10.5.8.0/24") and lease.expiration is None
    assert "lease" not in kv(etcd, key("10.5.8.0/24"))


async def test_incompatible_own_lease_deleted_then_previous_subnet_used(etcd):
    etcd.etcdctl("put", key("10.6.1.0/24"), '{"PublicIP":"192.168.64.3"}')  # outside Network now
    etcd.etcdctl("put", key("10.5.10.0/24"), '{"PublicIP":"10.0.0.99"}')  # someone else's
    async with store_for(etcd) as store:
        lease = await manager(store, previous_subnet=IPv4Network("10.5.11.0/24")).acquire()
        assert lease.subnet == IPv4Network("10.5.11.0/24")
        assert kv(etcd, key("10.6.1.0/24")) is None
        # A previous subnet somebody else holds is not taken over (flanneld HEAD).
        other = manager(store, public_ip=IPv4Address("10.0.0.50"), previous_subnet=IPv4Network("10.5.10.0/24"))
        lease2 = await other.acquire()
        assert lease2.subnet not in (IPv4Network("10.5.10.0/24"), IPv4Network("10.5.11.0/24"))


async def test_own_lease_deleted_at_acquire_is_no_peer_of_the_watch_that_follows(etcd):
    """The peer watch starts from acquire's listing: a lease of ours that acquire deleted (it no
    longer fits the config) is not in it, so it is neither applied nor refused as a peer."""
    etcd.etcdctl("put", key("10.6.1.0/24"), '{"PublicIP":"192.168.64.3"}')  # ours, outside Network now
    etcd.etcdctl("put", key("10.5.10.0/24"), '{"PublicIP":"10.0.0.99","PublicIPv6":null}')  # someone else's
    got: list = []

    async def apply(events):
        got.extend((e.kind, str(e.lease.subnet)) for e in events)

    refused: list = []
    async with store_for(etcd) as store:
        mgr = manager(store, previous_subnet=IPv4Network("10.5.11.0/24"),
                      on_admission=lambda step: refused.extend(str(r.subnet) for r in step.refused))
        await mgr.acquire()
        async with trio.open_nursery() as nursery:
            await nursery.start(mgr.watch_peers, apply)
            await trio.sleep(0.5)  # the deletion's own watch event, if it were a peer, lands here
            nursery.cancel_scope.cancel()
    assert got == [(EventKind.ADDED, "10.5.10.0/24")]
    assert refused == []  # not even refused (as outside Network) for a moment


async def test_ten_concurrent_acquirers_get_distinct_subnets(etcd):
    results = {}

    async def one(i: int) -> None:
        async with store_for(etcd) as store:
            # The same seed everywhere makes them all want the same subnet: races guaranteed.
            mgr = manager(store, public_ip=IPv4Address(f"192.168.1.{i + 1}"), rng=random.Random(7))
            results[i] = (await mgr.acquire()).subnet

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(one, i)
    assert len(set(results.values())) == 10
    listed = etcd.etcdctl("get", f"{PREFIX}/subnets/", "--prefix", "--keys-only").stdout.split()
    assert len(listed) == 10


async def test_out_of_subnets(etcd):
    small = parse_config('{"Network":"10.9.0.0/24","SubnetLen":26}')  # SubnetMin..Max: .64, .128, .192
    async with store_for(etcd) as store:
        for i in range(3):
            await LeaseManager(store, small, IPv4Address(f"10.0.0.{i + 1}"), DATA, None, 3600).acquire()
        with pytest.raises(OutOfSubnets):
            await LeaseManager(store, small, IPv4Address("10.0.0.9"), DATA, None, 3600).acquire()


async def test_renewal_extends_ttl(etcd):
    async with store_for(etcd) as store:
        # margin = TTL - 1 s: renewal is due one second after acquiring.
        mgr = manager(store, renew_margin_s=SUBNET_TTL - 1)
        first = await mgr.acquire()
        async with trio.open_nursery() as nursery:
            await nursery.start(mgr.keep_lease)
            renewed = await wait_change(mgr)
            nursery.cancel_scope.cancel()
    assert mgr.renewals >= 1
    assert renewed.store_ref != first.store_ref and renewed.expiration > first.expiration
    assert int(kv(etcd, key(str(first.subnet)))["lease"]) == renewed.store_ref
    assert granted_ttl(etcd, renewed.store_ref) == SUBNET_TTL


async def test_renewal_retries_while_etcd_is_down(etcd, caplog):
    caplog.set_level(logging.INFO)
    async with store_for(etcd) as store:
        mgr = manager(store, renew_margin_s=SUBNET_TTL - 1, retry_interval_s=0.2)
        first = await mgr.acquire()
        async with trio.open_nursery() as nursery:
            await nursery.start(mgr.keep_lease)
            etcd.stop()
            with trio.fail_after(30):
                while "Error renewing lease" not in caplog.text:
                    await trio.sleep(0.1)
            etcd.start()
            renewed = await wait_change(mgr)
            nursery.cancel_scope.cancel()
    assert renewed.store_ref != first.store_ref
    assert int(kv(etcd, key(str(first.subnet)))["lease"]) == renewed.store_ref


@pytest.mark.parametrize("how", ["delete", "revoke"])
async def test_own_key_gone_is_recreated_with_same_subnet(etcd, how):
    async with store_for(etcd) as store:
        mgr = manager(store)
        first = await mgr.acquire()
        async with trio.open_nursery() as nursery:
            await nursery.start(mgr.keep_lease)
            started = time.monotonic()
            if how == "delete":
                etcd.etcdctl("del", key(str(first.subnet)))
            else:  # what expiry looks like: the lease goes and takes the key with it
                etcd.etcdctl("lease", "revoke", format(first.store_ref, "x"))
            again = await wait_change(mgr)
            print(f"re-created after {time.monotonic() - started:.3f}s")
            nursery.cancel_scope.cancel()
    assert again.subnet == first.subnet and again.store_ref != first.store_ref
    assert mgr.recreations == 1
    got = kv(etcd, key(str(first.subnet)))
    assert got is not None and int(got["lease"]) == again.store_ref


async def test_own_key_taken_by_another_host_fails(etcd):
    async with store_for(etcd) as store:
        mgr = manager(store)
        first = await mgr.acquire()
        with pytest.raises(BaseExceptionGroup) as info:
            async with trio.open_nursery() as nursery:
                await nursery.start(mgr.keep_lease)
                etcd.etcdctl("put", key(str(first.subnet)), '{"PublicIP":"10.0.0.66","PublicIPv6":null}')
                with trio.fail_after(30):
                    await trio.sleep_forever()
    # keep_lease itself raises the plain error (not a group), so the agent sees its exit code.
    [exc] = info.value.exceptions
    assert isinstance(exc, LeaseTaken)
    assert str(exc) == f"lease for {first.subnet} was taken by 10.0.0.66"


async def test_watch_peers_snapshot_then_events_across_restart(etcd):
    etcd.etcdctl("put", key("10.5.1.0/24"), '{"PublicIP":"10.0.0.1","PublicIPv6":null,"BackendType":"vxlan",'
                 '"BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:01"}}')
    send, recv = trio.open_memory_channel(100)

    async def apply(events):
        await send.send(list(events))

    async def next_events():
        with trio.fail_after(30):
            return [(e.kind, str(e.lease.subnet), str(e.lease.attrs.public_ip)) for e in await recv.receive()]

    async with store_for(etcd) as store:
        mgr = manager(store, previous_subnet=IPv4Network("10.5.2.0/24"))
        await mgr.acquire()
        async with trio.open_nursery() as nursery:
            await nursery.start(mgr.watch_peers, apply)
            # Our own lease is never reported.
            assert await next_events() == [(EventKind.ADDED, "10.5.1.0/24", "10.0.0.1")]
            await mgr.store.renew_lease(mgr.current.subnet, mgr.attrs, SUBNET_TTL)
            etcd.restart()
            etcd.etcdctl("del", key("10.5.1.0/24"))
            # The removal carries the attrs we knew (the backend needs the MAC to tear down).
            assert await next_events() == [(EventKind.REMOVED, "10.5.1.0/24", "10.0.0.1")]
            etcd.etcdctl("put", key("10.5.3.0/24"), '{"PublicIP":"10.0.0.3","PublicIPv6":null}')
            assert await next_events() == [(EventKind.ADDED, "10.5.3.0/24", "10.0.0.3")]
            nursery.cancel_scope.cancel()


def grant(etcd, ttl: int) -> str:
    out = etcd.etcdctl("lease", "grant", str(ttl)).stdout  # "lease 694d... granted with TTL(600s)"
    return out.split()[1]


def put_peers(etcd, count: int) -> str:
    """Peers 10.5.1.0/24 .. 10.5.<count>.0/24 (PublicIP 10.0.0.N) on one 600 s etcd lease, its id."""
    lease_id = grant(etcd, 600)
    for i in range(1, count + 1):
        etcd.etcdctl("put", key(f"10.5.{i}.0/24"), f'{{"PublicIP":"10.0.0.{i}","PublicIPv6":null}}',
                     "--lease", lease_id)
    return lease_id


def etcd_calls(etcd, method: str) -> int:
    """How many times etcd served one gRPC method (the JSON gateway's calls land there too)."""
    import httpx

    total = 0
    for line in httpx.get(etcd.endpoint + "/metrics", timeout=5).text.splitlines():
        if line.startswith("grpc_server_handled_total{") and f'grpc_method="{method}"' in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


async def test_peers_listed_and_watched_once_without_a_ttl_call_each(etcd):
    """issue #19: the peer watcher also guards our key (one watch), the listing acquire() planned
    from is the peer watch's too (a start lists once), and no TimeToLive call is made per peer
    lease (flanneld's kvToIPLease makes one each)."""
    lease_id = put_peers(etcd, 20)
    got: list = []

    async def apply(events):
        got.extend(events)

    async with store_for(etcd) as store:
        mgr = manager(store, previous_subnet=OUR_SUBNET)  # not one of the peers' keys put below
        ttl0, watch0, range0 = (etcd_calls(etcd, m) for m in ("LeaseTimeToLive", "Watch", "Range"))
        first = await mgr.acquire()
        # A peer that comes between acquire's listing and the peer watch: the watch starts at that
        # listing's revision, so it is not missed.
        etcd.etcdctl("put", key("10.5.21.0/24"), '{"PublicIP":"10.0.0.21","PublicIPv6":null}',
                     "--lease", lease_id)
        async with trio.open_nursery() as nursery:
            await nursery.start(mgr.watch_peers, apply)
            await nursery.start(mgr.keep_lease)
            with trio.fail_after(30):
                while len(got) < 21:
                    await trio.sleep(0.02)
            assert len(got) == 21 and mgr.recreations == 0  # our own create came by the watch: no alarm
            etcd.etcdctl("put", key("10.5.99.0/24"), '{"PublicIP":"10.0.0.99","PublicIPv6":null}',
                         "--lease", lease_id)
            with trio.fail_after(30):
                while len(got) < 22:
                    await trio.sleep(0.02)
            # Our key deleted: re-created by the guard that rides on the peer watch.
            etcd.etcdctl("del", key(str(first.subnet)))
            again = await wait_change(mgr)
            assert again.subnet == first.subnet and mgr.recreations == 1
            # Renewed by someone with our IP: its real expiry is adopted (read for our key only).
            other = await store.renew_lease(first.subnet, mgr.attrs, 300)
            adopted = await wait_change(mgr)
            assert adopted.store_ref == other.store_ref
            assert adopted.expiration is not None and abs(adopted.expiration - (time.time() + 300)) < 10
            nursery.cancel_scope.cancel()
    assert etcd_calls(etcd, "LeaseTimeToLive") - ttl0 == 1  # the adoption only
    assert etcd_calls(etcd, "Range") - range0 == 2  # the one listing (acquire's) + that adoption's get
    # one watch stream in all (the gateway opens a gRPC Watch per stream; counted when it ends)
    assert etcd_calls(etcd, "Watch") - watch0 <= 1


async def test_the_start_listing_is_not_held_while_the_peer_watch_runs(etcd):
    """issue #19 (memory per peer): once applied, the start's listing (a list of every lease) and
    its events go; the tracker and admission hold what stays."""
    import gc

    put_peers(etcd, 30)
    got: list = []

    async def apply(events):
        got.append(len(events))

    async with store_for(etcd) as store:
        mgr = manager(store, previous_subnet=OUR_SUBNET)
        await mgr.acquire()
        async with trio.open_nursery() as nursery:
            await nursery.start(mgr.watch_peers, apply)
            assert got == [30]
            gc.collect()
            held = [o for o in gc.get_objects() if type(o) is list and len(o) >= 30
                    and sum(type(x) in (Lease, LeaseEvent) for x in o) >= 30]
            assert held == [], [type(o[0]).__name__ for o in held]
            nursery.cancel_scope.cancel()


async def test_peer_watch_guard_raises_when_another_host_takes_our_key(etcd):
    async def apply(events):
        pass

    async with store_for(etcd) as store:
        mgr = manager(store)
        first = await mgr.acquire()
        with pytest.raises(BaseExceptionGroup) as info:
            async with trio.open_nursery() as nursery:
                await nursery.start(mgr.watch_peers, apply)
                await nursery.start(mgr.keep_lease)
                etcd.etcdctl("put", key(str(first.subnet)), '{"PublicIP":"10.0.0.66","PublicIPv6":null}')
                with trio.fail_after(30):
                    await trio.sleep_forever()
    assert any(isinstance(e, LeaseTaken) for e in info.value.exceptions)


async def test_backlog_piled_up_during_apply_is_applied_by_net_effect(etcd):
    """issue #19: while the backend is busy the watch is read on; what piled up is applied at
    once, and a lease put and deleted meanwhile never reaches the backend."""
    calls: list[list[tuple[str, str]]] = []
    gate = trio.Event()

    async def apply(events):
        calls.append([(e.kind.value, str(e.lease.subnet)) for e in events])
        if len(calls) == 1:
            await gate.wait()  # the backend is slow on the first watched event (no peers listed)

    value = '{"PublicIP":"10.0.0.%d","PublicIPv6":null}'
    async with store_for(etcd) as store:
        # a random subnet could be one of the keys put below: that put would take our lease
        mgr = manager(store, previous_subnet=OUR_SUBNET)
        assert (await mgr.acquire()).subnet == OUR_SUBNET
        async with trio.open_nursery() as nursery:
            await nursery.start(mgr.watch_peers, apply)
            etcd.etcdctl("put", key("10.5.10.0/24"), value % 10)
            with trio.fail_after(30):
                while len(calls) < 1:
                    await trio.sleep(0.01)
            for i in range(11, 31):
                etcd.etcdctl("put", key(f"10.5.{i}.0/24"), value % i)
            for i in range(11, 30):
                etcd.etcdctl("del", key(f"10.5.{i}.0/24"))
            await trio.sleep(2.0)  # all of it read from the watch meanwhile (generous: a loaded box)
            gate.set()
            with trio.fail_after(30):
                while len(calls) < 2:
                    await trio.sleep(0.01)
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
    assert calls[0] == [("added", "10.5.10.0/24")]
    assert calls[1:] == [[("added", "10.5.30.0/24")]]


async def test_our_keys_renewal_seen_while_etcd_is_down_is_read_once_etcd_is_back(etcd):
    """A renewal of our key seen on the watch makes the guard read the key's expiry (one get); an etcd restart at
    that moment used to end the peer watch (and the agent) with StoreUnavailable.  It is retried now."""
    from flannelpy.etcd.store import EXPIRY_NOT_READ

    async with store_for(etcd) as store:
        mgr = manager(store, previous_subnet=OUR_SUBNET)
        mine = await mgr.acquire()
        seen = Lease(mine.subnet, mine.attrs, EXPIRY_NOT_READ, (mine.store_ref or 0) + 1)  # as the watch gives it
        etcd.stop()
        done = trio.Event()

        async def guard() -> None:
            await mgr._own_state(seen)
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(guard)
            await trio.sleep(0.5)
            assert not done.is_set()  # still waiting for etcd, not failed
            await trio.to_thread.run_sync(etcd.start)
            with trio.fail_after(30):
                await done.wait()
        assert mgr.current.subnet == OUR_SUBNET and mgr.current.expiration not in (None, EXPIRY_NOT_READ)
