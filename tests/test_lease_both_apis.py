"""The LeaseManager behaviours users depend on, run the same way over every store the agent can
use: v3 over etcd's JSON gateway, v3 over etcd's gRPC API, and v2.

Each test writes and deletes keys with etcdctl of the matching API, as an operator (or an old
flanneld node) would.
"""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network

import pytest
import trio

from flannelpy.backends.base import LeaseData
from flannelpy.config.network import parse_config
from flannelpy.etcd.select import make_store
from flannelpy.etcd.store import EtcdOptions
from flannelpy.subnet.lease import EventKind
from flannelpy.subnet.manager import LeaseManager

pytestmark = [pytest.mark.etcd, pytest.mark.parametrize("api", ["v3", "v3-grpc", "v2"])]

PREFIX = "/atomic.io/network"
CONFIG = parse_config('{"Network":"172.18.0.0/16","Backend":{"Type":"vxlan"}}')
DATA = LeaseData("vxlan", {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"})


def store(etcd, api):
    """api: "v3" (transport auto: the gateway, on this plain cluster), "v3-grpc", or "v2"."""
    name, _, transport = api.partition("-")
    s = make_store(EtcdOptions(endpoints=(etcd.endpoint,), prefix=PREFIX, transport=transport or "auto"), name)
    assert getattr(s, "transport", None) in (None, transport or "gateway")
    return s


def key(subnet: str) -> str:
    return f"{PREFIX}/subnets/{subnet.replace('/', '-')}"


def ctl_put(etcd, api, k, v):
    etcd.etcdctl("put", k, v) if api.startswith("v3") else etcd.etcdctl("set", k, v, api=2)


def ctl_del(etcd, api, k):
    etcd.etcdctl("del", k) if api.startswith("v3") else etcd.etcdctl("rm", k, api=2)


def manager(s, ip="192.168.64.3", previous=None, **kw) -> LeaseManager:
    return LeaseManager(s, CONFIG, IPv4Address(ip), DATA, previous, 3600, **kw)


async def test_reuse_by_public_ip_and_by_previous_subnet(etcd, api):
    s = store(etcd, api)
    try:
        first = await manager(s).acquire()
        again = await manager(s).acquire()  # same PublicIP: our own lease comes back
        assert again.subnet == first.subnet
        wanted = IPv4Network("172.18.77.0/24")
        other = await manager(s, ip="192.168.64.4", previous=wanted).acquire()
        assert other.subnet == wanted  # the subnet from the old subnet.env is reused when free
        leases, _ = await s.list_leases()
        assert {(str(x.subnet), str(x.attrs.public_ip)) for x in leases} == {
            (str(first.subnet), "192.168.64.3"), ("172.18.77.0/24", "192.168.64.4")}
    finally:
        await s.aclose()


async def test_ten_concurrent_acquirers(etcd, api):
    got: dict[int, IPv4Network] = {}

    async def one(i: int) -> None:
        s = store(etcd, api)
        try:
            # One seed for all: everyone aims at the same subnet, so the races are real.
            got[i] = (await manager(s, ip=f"192.168.1.{i + 1}", rng=random.Random(3)).acquire()).subnet
        finally:
            await s.aclose()

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(one, i)
    assert len(set(got.values())) == 10
    s = store(etcd, api)
    try:
        leases, _ = await s.list_leases()
    finally:
        await s.aclose()
    assert sorted(x.subnet for x in leases) == sorted(got.values())


async def test_deleted_own_lease_comes_back(etcd, api):
    s = store(etcd, api)
    try:
        mgr = manager(s)
        first = await mgr.acquire()
        async with trio.open_nursery() as nursery:
            await nursery.start(mgr.keep_lease)
            ctl_del(etcd, api, key(str(first.subnet)))
            with trio.fail_after(20):
                await mgr.changed.wait()
            nursery.cancel_scope.cancel()
        assert mgr.current.subnet == first.subnet and mgr.recreations == 1
        leases, _ = await s.list_leases()
        assert [str(x.subnet) for x in leases] == [str(first.subnet)]
    finally:
        await s.aclose()


async def test_peer_watch_survives_etcd_restart(etcd, api):
    send, recv = trio.open_memory_channel(100)

    async def apply(events):
        await send.send([(e.kind, str(e.lease.subnet)) for e in events])

    async def next_events():
        with trio.fail_after(30):
            return await recv.receive()

    ctl_put(etcd, api, key("172.18.1.0/24"), '{"PublicIP":"10.0.0.1","BackendType":"vxlan",'
            '"BackendData":{"VtepMAC":"02:00:00:00:00:01"}}')
    s = store(etcd, api)
    try:
        mgr = manager(s, previous=IPv4Network("172.18.2.0/24"))
        await mgr.acquire()
        async with trio.open_nursery() as nursery:
            await nursery.start(mgr.watch_peers, apply)
            assert await next_events() == [(EventKind.ADDED, "172.18.1.0/24")]
            etcd.restart()
            ctl_put(etcd, api, key("172.18.3.0/24"), '{"PublicIP":"10.0.0.3"}')
            assert await next_events() == [(EventKind.ADDED, "172.18.3.0/24")]
            ctl_del(etcd, api, key("172.18.1.0/24"))
            assert await next_events() == [(EventKind.REMOVED, "172.18.1.0/24")]
            nursery.cancel_scope.cancel()
    finally:
        await s.aclose()


async def test_a_start_lists_once_and_misses_nothing_after_that_listing(etcd, api):
    """issue #19: the peer watch starts from the listing acquire() planned from, at its revision:
    one listing per start, and what changes between the two (a peer joins, our own key is
    deleted) still arrives, by the watch."""
    send, recv = trio.open_memory_channel(100)

    async def apply(events):
        await send.send([(e.kind, str(e.lease.subnet)) for e in events])

    ctl_put(etcd, api, key("172.18.1.0/24"), '{"PublicIP":"10.0.0.1","BackendType":"vxlan",'
            '"BackendData":{"VtepMAC":"02:00:00:00:00:01"}}')
    s = store(etcd, api)
    listings = 0
    list_leases = s.list_leases

    async def counted(**kw):
        nonlocal listings
        listings += 1
        return await list_leases(**kw)

    s.list_leases = counted
    try:
        mgr = manager(s, previous=IPv4Network("172.18.2.0/24"))
        first = await mgr.acquire()
        assert listings == 1
        ctl_put(etcd, api, key("172.18.3.0/24"), '{"PublicIP":"10.0.0.3"}')
        ctl_del(etcd, api, key(str(first.subnet)))
        async with trio.open_nursery() as nursery:
            await nursery.start(mgr.watch_peers, apply)
            with trio.fail_after(30):
                assert await recv.receive() == [(EventKind.ADDED, "172.18.1.0/24")]
                assert await recv.receive() == [(EventKind.ADDED, "172.18.3.0/24")]
                while mgr.recreations == 0:
                    await mgr.changed.wait()
            nursery.cancel_scope.cancel()
        assert listings == 1 and mgr.current.subnet == first.subnet
        leases, _ = await list_leases()
        assert sorted(str(x.subnet) for x in leases) == ["172.18.1.0/24", "172.18.2.0/24", "172.18.3.0/24"]
    finally:
        await s.aclose()
