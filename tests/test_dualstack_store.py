"""Dual-stack leases (EnableIPv6, issue #14) through the real stores and the LeaseManager, over every
store the agent can use: v3 over the JSON gateway, v3 over gRPC, and v2.

The key is flanneld's `10.42.63.0-24&fd42:0:0:1f::-64` and the value its JSON with PublicIPv6 and
BackendV6Data; keys and values are read back with etcdctl, as an operator (or a flanneld node) sees them.
"""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
import trio

from flannelpy.config.network import parse_config
from flannelpy.etcd.select import make_store
from flannelpy.etcd.store import EtcdOptions
from flannelpy.subnet.lease import EventKind, LeaseData
from flannelpy.subnet.manager import LeaseManager

pytestmark = [pytest.mark.etcd, pytest.mark.parametrize("api", ["v3", "v3-grpc", "v2"])]

PREFIX = "/coreos.com/network"
CONFIG = parse_config('{"Network":"10.42.0.0/16","EnableIPv6":true,"IPv6Network":"fd42::/48",'
                      '"Backend":{"Type":"vxlan"}}')
DATA = LeaseData("vxlan", {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"}, {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:66"})
PAIR = (IPv4Network("10.42.63.0/24"), IPv6Network("fd42:0:0:1f::/64"))
KEY = f"{PREFIX}/subnets/10.42.63.0-24&fd42:0:0:1f::-64"
VALUE = ('{"PublicIP":"10.199.0.11","PublicIPv6":"fd99::11","BackendType":"vxlan",'
         '"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"},"BackendV6Data":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:66"}}')


def store(etcd, api, dual_stack=True):
    name, _, transport = api.partition("-")
    s = make_store(EtcdOptions(endpoints=(etcd.endpoint,), prefix=PREFIX, transport=transport or "auto"), name)
    s.dual_stack = dual_stack
    return s


def ctl_get(etcd, api, key: str) -> str | None:
    if api.startswith("v3"):
        out = etcd.etcdctl("get", key, "--print-value-only").stdout.strip()
        return out or None
    proc = etcd.etcdctl("get", key, api=2, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def ctl_keys(etcd, api) -> list[str]:
    if api.startswith("v3"):
        return etcd.etcdctl("get", f"{PREFIX}/subnets/", "--prefix", "--keys-only").stdout.split()
    proc = etcd.etcdctl("ls", f"{PREFIX}/subnets", api=2, check=False)
    return proc.stdout.split() if proc.returncode == 0 else []


def ctl_put(etcd, api, key, value):
    etcd.etcdctl("put", key, value) if api.startswith("v3") else etcd.etcdctl("set", key, value, api=2)


def ctl_del(etcd, api, key):
    etcd.etcdctl("del", key) if api.startswith("v3") else etcd.etcdctl("rm", key, api=2)


def manager(s, previous=None, previous6=None, ip="10.199.0.11", ip6="fd99::11") -> LeaseManager:
    return LeaseManager(s, CONFIG, IPv4Address(ip), DATA, previous, 3600, public_ipv6=IPv6Address(ip6),
                        previous_ipv6_subnet=previous6)


async def test_acquire_writes_flanneld_key_and_value_reuse_and_release(etcd, api):
    s = store(etcd, api)
    try:
        mgr = manager(s, *PAIR)  # the previous subnet.env's pair, reused as a pair
        lease = await mgr.acquire()
        assert (lease.subnet, lease.ipv6_subnet) == PAIR and lease.key == KEY.rsplit("/", 1)[1]
        assert ctl_keys(etcd, api) == [KEY]
        assert ctl_get(etcd, api, KEY) == VALUE  # byte for byte as flanneld v0.20.2 writes it
        listed, _ = await s.list_leases()
        assert [(x.subnet, x.ipv6_subnet, x.attrs.public_ipv6) for x in listed] == [
            (*PAIR, IPv6Address("fd99::11"))]
        # A restart finds its lease by PublicIP and renews it under the same dual key.
        again = await manager(s).acquire()
        assert (again.subnet, again.ipv6_subnet) == PAIR and ctl_keys(etcd, api) == [KEY]
        renewed = await s.renew_lease(*PAIR[:1], mgr.attrs, 3600, PAIR[1])
        assert renewed.key == lease.key and ctl_keys(etcd, api) == [KEY]
        assert await mgr.release()  # created by this run: deleted, dual key and all
        assert ctl_keys(etcd, api) == []
    finally:
        await s.aclose()


async def test_switching_ipv6_on_replaces_the_ipv4_only_lease(etcd, api):
    ctl_put(etcd, api, f"{PREFIX}/subnets/10.42.63.0-24",
            '{"PublicIP":"10.199.0.11","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,'
            '"VtepMAC":"c6:d2:32:6f:8f:44"}}')
    s = store(etcd, api)
    try:
        lease = await manager(s).acquire()
        assert lease.ipv6_subnet is not None and lease.ipv6_subnet.subnet_of(IPv6Network("fd42::/48"))
        assert ctl_keys(etcd, api) == [f"{PREFIX}/subnets/{lease.key}"]  # the IPv4-only key was deleted
    finally:
        await s.aclose()


async def test_deleted_dual_key_comes_back_the_same(etcd, api):
    s = store(etcd, api)
    try:
        mgr = manager(s, *PAIR)
        await mgr.acquire()
        async with trio.open_nursery() as nursery:
            await nursery.start(mgr.keep_lease)
            # The IPv4-only spelling of our subnet is another key: not ours, nothing happens.
            ctl_put(etcd, api, f"{PREFIX}/subnets/10.42.63.0-24", '{"PublicIP":"10.199.0.66"}')
            ctl_del(etcd, api, f"{PREFIX}/subnets/10.42.63.0-24")
            ctl_del(etcd, api, KEY)
            with trio.fail_after(20):
                await mgr.changed.wait()
            nursery.cancel_scope.cancel()
        assert mgr.recreations == 1 and (mgr.current.subnet, mgr.current.ipv6_subnet) == PAIR
        assert ctl_get(etcd, api, KEY) == VALUE
    finally:
        await s.aclose()


async def test_peer_watch_sees_dual_keys_and_an_ipv4_only_store_skips_them(etcd, api):
    peer_key = f"{PREFIX}/subnets/10.42.7.0-24&fd42:0:0:7::-64"
    peer = VALUE.replace("10.199.0.11", "10.199.0.12").replace("fd99::11", "fd99::12").replace(
        "8f:44", "8f:45").replace("8f:66", "8f:67")
    ctl_put(etcd, api, peer_key, peer)
    send, recv = trio.open_memory_channel(100)

    async def apply(events):
        await send.send([(e.kind, e.lease.key, str(e.lease.attrs.public_ipv6)) for e in events])

    s = store(etcd, api)
    plain = store(etcd, api, dual_stack=False)
    try:
        mgr = manager(s, *PAIR)
        await mgr.acquire()
        async with trio.open_nursery() as nursery:
            await nursery.start(mgr.watch_peers, apply)
            with trio.fail_after(20):
                assert await recv.receive() == [(EventKind.ADDED, "10.42.7.0-24&fd42:0:0:7::-64", "fd99::12")]
                ctl_del(etcd, api, peer_key)
                assert await recv.receive() == [(EventKind.REMOVED, "10.42.7.0-24&fd42:0:0:7::-64", "fd99::12")]
            nursery.cancel_scope.cancel()
        # In an IPv4-only network the same keys are skipped (flanneld never writes them there).
        ctl_put(etcd, api, peer_key, peer)
        listed, _ = await plain.list_leases()
        assert listed == []
    finally:
        await s.aclose()
        await plain.aclose()
