"""host-gw and alloc backends: pure route decisions, and real routes in a namespace."""

from __future__ import annotations

import json
import logging
import os
from ipaddress import IPv4Address, IPv4Network

import pytest
import trio
from udp_driver import sh

from flannelpy.backends.alloc.backend import AllocBackend
from flannelpy.backends.base import ExternalInterface
from flannelpy.backends.hostgw.backend import HostGwBackend
from flannelpy.backends.hostgw.plan import Route, missing_routes
from flannelpy.config.network import parse_config
from flannelpy.errors import FlannelError
from flannelpy.hostnet.netlink import NetlinkThread
from flannelpy.subnet.lease import EventKind, Lease, LeaseAttrs, LeaseEvent

CONFIG = parse_config(json.dumps({"Network": "10.60.0.0/16", "Backend": {"Type": "host-gw"}}))
N1, N2 = IPv4Network("10.60.1.0/24"), IPv4Network("10.60.2.0/24")
GW1, GW2 = IPv4Address("192.168.78.2"), IPv4Address("192.168.78.3")


def test_missing_routes() -> None:
    want = [Route(N1, GW1, 5), Route(N2, GW2, 5)]
    assert missing_routes(want, [Route(N1, GW1, 5)]) == [Route(N2, GW2, 5)]
    assert missing_routes(want, [Route(N1, GW2, 5), Route(N2, GW2, 5)]) == [Route(N1, GW1, 5)]
    assert missing_routes(want, want) == []


async def test_mtu_lease_data_and_nat_refusal() -> None:
    ext = ExternalInterface("eth0", 2, IPv4Address("10.0.0.5"), IPv4Address("10.0.0.5"), 9000)
    nat = ExternalInterface("eth0", 2, IPv4Address("10.0.0.5"), IPv4Address("203.0.113.7"), 9000)
    hg = HostGwBackend(ext, CONFIG, NetlinkThread())
    assert hg.mtu() == 9000
    data = await hg.prepare()
    assert (data.backend_type, data.backend_data) == ("host-gw", None)
    own = Lease(N1, LeaseAttrs(IPv4Address("10.0.0.5"), "host-gw"))
    await hg.start(own)  # same address: fine
    with pytest.raises(FlannelError, match="203.0.113.7.*NAT"):
        await HostGwBackend(nat, CONFIG, NetlinkThread()).start(own)
    alloc = AllocBackend(ext, CONFIG, NetlinkThread())
    assert alloc.mtu() == 9000
    assert await alloc.prepare() == type(data)("alloc", None)


def _routes(ns: str) -> dict[str, tuple[str | None, str]]:
    out = json.loads(sh("ip", "-n", ns, "-j", "route", "show").stdout)
    return {r["dst"]: (r.get("gateway"), r["dev"]) for r in out}


def _lease(net: IPv4Network, gw: IPv4Address, btype: str = "host-gw") -> Lease:
    return Lease(net, LeaseAttrs(gw, btype))


async def test_routes_appear_replace_disappear_and_come_back(root) -> None:
    ns = f"fpud-{os.urandom(3).hex()}-hg"
    nl = None
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "add", "fpudhg0", "type", "veth", "peer", "name", "fpudhg1")
        sh("ip", "-n", ns, "addr", "add", "192.168.78.1/24", "dev", "fpudhg0")
        for dev in ("fpudhg0", "fpudhg1", "lo"):
            sh("ip", "-n", ns, "link", "set", dev, "up")
        index = json.loads(sh("ip", "-n", ns, "-j", "link", "show", "fpudhg0").stdout)[0]["ifindex"]
        ext = ExternalInterface("fpudhg0", index, IPv4Address("192.168.78.1"), IPv4Address("192.168.78.1"), 1500)
        nl = NetlinkThread(netns=ns)
        hg = HostGwBackend(ext, CONFIG, nl, check_interval=0.2)
        await hg.start(_lease(IPv4Network("10.60.9.0/24"), ext.ip))

        # A conflicting route to N1 exists before the lease arrives: it is replaced.
        sh("ip", "-n", ns, "route", "add", str(N1), "dev", "fpudhg1")
        await hg.apply([
            LeaseEvent(EventKind.ADDED, _lease(N1, GW1)),
            LeaseEvent(EventKind.ADDED, _lease(N2, GW2)),
            LeaseEvent(EventKind.ADDED, _lease(IPv4Network("10.60.3.0/24"), GW2, "vxlan")),  # ignored
        ])
        routes = _routes(ns)
        assert routes[str(N1)] == (str(GW1), "fpudhg0")
        assert routes[str(N2)] == (str(GW2), "fpudhg0")
        assert "10.60.3.0/24" not in routes
        # The same lease again changes nothing; a new PublicIP replaces the route.
        await hg.apply([LeaseEvent(EventKind.ADDED, _lease(N2, GW2))])
        await hg.apply([LeaseEvent(EventKind.ADDED, _lease(N2, GW1))])
        assert _routes(ns)[str(N2)] == (str(GW1), "fpudhg0")

        # The checker puts back a route someone deleted.
        async with trio.open_nursery() as nursery:
            await nursery.start(hg.run)
            sh("ip", "-n", ns, "route", "del", str(N1))
            assert str(N1) not in _routes(ns)
            with trio.fail_after(30):  # generous bound: a hang fails instead of blocking CI
                while str(N1) not in _routes(ns):
                    await trio.sleep(0.05)
            assert _routes(ns)[str(N1)] == (str(GW1), "fpudhg0")
            nursery.cancel_scope.cancel()

        await hg.apply([LeaseEvent(EventKind.REMOVED, _lease(N1, GW1))])
        assert str(N1) not in _routes(ns)
        assert (await hg.reconcile_once()).added == []  # a removed lease is not re-added
        assert str(N1) not in _routes(ns)
        # Removing a route that is already gone is not an error.
        sh("ip", "-n", ns, "route", "del", str(N2))
        await hg.apply([LeaseEvent(EventKind.REMOVED, _lease(N2, GW1))])
        await hg.close()
    finally:
        if nl is not None:
            nl.stop()
        sh("ip", "netns", "del", ns, check=False)


async def test_unreachable_peer_is_logged_retried_and_never_raised(root, caplog) -> None:
    """Issue #12: a lease whose PublicIP is off our segment made every host-gw agent crash
    (NetlinkError 101).  Now: that peer alone is not programmed, /readyz says why, the others
    work, and the route appears once the address becomes reachable."""
    ns = f"fpud-{os.urandom(3).hex()}-hu"
    nl = None
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "add", "fpudhg0", "type", "veth", "peer", "name", "fpudhg1")
        sh("ip", "-n", ns, "addr", "add", "192.168.78.1/24", "dev", "fpudhg0")
        for dev in ("fpudhg0", "fpudhg1", "lo"):
            sh("ip", "-n", ns, "link", "set", dev, "up")
        index = json.loads(sh("ip", "-n", ns, "-j", "link", "show", "fpudhg0").stdout)[0]["ifindex"]
        ext = ExternalInterface("fpudhg0", index, IPv4Address("192.168.78.1"), IPv4Address("192.168.78.1"), 1500)
        nl = NetlinkThread(netns=ns)
        hg = HostGwBackend(ext, CONFIG, nl, check_interval=30)
        far = _lease(IPv4Network("10.60.7.0/24"), IPv4Address("198.51.100.7"))
        with caplog.at_level(logging.ERROR, logger="flannelpy.backends.hostgw.backend"):
            await hg.apply([LeaseEvent(EventKind.ADDED, far), LeaseEvent(EventKind.ADDED, _lease(N1, GW1))])
            assert (await hg.reconcile_once()).failures  # retried: still failing, not logged again
        assert caplog.text.count("10.60.7.0/24") == 1 and "Network is unreachable" in caplog.text
        assert hg.programmed_count() == 1
        assert hg.data_plane_problems() == [
            "1 peer route failed: 10.60.7.0/24: via 198.51.100.7: Network is unreachable"]
        assert _routes(ns)[str(N1)] == (str(GW1), "fpudhg0") and "10.60.7.0/24" not in _routes(ns)
        # The address becomes reachable: the next pass programs it.
        sh("ip", "-n", ns, "route", "add", "198.51.100.0/24", "dev", "fpudhg0")
        report = await hg.reconcile_once()
        assert report.failures == {} and hg.data_plane_problems() == [] and hg.programmed_count() == 2
        assert _routes(ns)["10.60.7.0/24"] == ("198.51.100.7", "fpudhg0")
        # Removing the lease removes its route; removing an unknown one is quiet.
        await hg.apply([LeaseEvent(EventKind.REMOVED, far)])
        assert "10.60.7.0/24" not in _routes(ns) and hg.programmed_count() == 1
    finally:
        if nl is not None:
            nl.stop()
        sh("ip", "netns", "del", ns, check=False)


async def test_reconcile_removes_only_our_unexplained_routes(root) -> None:
    ns = f"fpud-{os.urandom(3).hex()}-hr"
    nl = None
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "add", "fpudhg0", "type", "veth", "peer", "name", "fpudhg1")
        sh("ip", "-n", ns, "addr", "add", "192.168.78.1/24", "dev", "fpudhg0")
        for dev in ("fpudhg0", "fpudhg1", "lo"):
            sh("ip", "-n", ns, "link", "set", dev, "up")
        index = json.loads(sh("ip", "-n", ns, "-j", "link", "show", "fpudhg0").stdout)[0]["ifindex"]
        ext = ExternalInterface("fpudhg0", index, IPv4Address("192.168.78.1"), IPv4Address("192.168.78.1"), 1500)
        nl = NetlinkThread(netns=ns)
        hg = HostGwBackend(ext, CONFIG, nl, check_interval=30)
        # Left from an earlier run (ours: proto 70) and made by others (proto boot/static, or outside Network).
        sh("ip", "-n", ns, "route", "add", "10.60.5.0/24", "via", "192.168.78.5", "proto", "70")
        sh("ip", "-n", ns, "route", "add", "10.60.6.0/24", "via", "192.168.78.6")
        sh("ip", "-n", ns, "route", "add", "10.60.8.0/24", "via", "192.168.78.8", "proto", "static")
        sh("ip", "-n", ns, "route", "add", "172.29.0.0/24", "via", "192.168.78.9", "proto", "70")
        await hg.apply([LeaseEvent(EventKind.ADDED, _lease(N1, GW1))])
        before = await hg.reconcile_once()  # not synced yet: nothing is removed
        assert before.removed == [] and "10.60.5.0/24" in _routes(ns)
        hg.peers_synced()
        report = await hg.reconcile_once()
        assert report.removed == ["route 10.60.5.0/24 via 192.168.78.5"]
        routes = _routes(ns)
        assert {"10.60.6.0/24", "10.60.8.0/24", "172.29.0.0/24", str(N1)} <= set(routes)
        assert "10.60.5.0/24" not in routes
        assert (await hg.reconcile_once()).changed is False
        assert hg.repair_counters() == {"route_removed": 1}
    finally:
        if nl is not None:
            nl.stop()
        sh("ip", "netns", "del", ns, check=False)


async def test_event_path_repairs_foreign_changes_and_ignores_our_own(root) -> None:
    ns = f"fpud-{os.urandom(3).hex()}-he"
    nl = None
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "add", "fpudhg0", "type", "veth", "peer", "name", "fpudhg1")
        sh("ip", "-n", ns, "addr", "add", "192.168.78.1/24", "dev", "fpudhg0")
        for dev in ("fpudhg0", "fpudhg1", "lo"):
            sh("ip", "-n", ns, "link", "set", dev, "up")
        index = json.loads(sh("ip", "-n", ns, "-j", "link", "show", "fpudhg0").stdout)[0]["ifindex"]
        ext = ExternalInterface("fpudhg0", index, IPv4Address("192.168.78.1"), IPv4Address("192.168.78.1"), 1500)
        nl = NetlinkThread(netns=ns)
        hg = HostGwBackend(ext, CONFIG, nl, check_interval=3600)  # only the event path can repair
        async with trio.open_nursery() as nursery:
            await nursery.start(hg.run)
            with trio.fail_after(5):
                while not hg.loop.monitoring:
                    await trio.sleep(0.01)
            await hg.apply([LeaseEvent(EventKind.ADDED, _lease(IPv4Network(f"10.60.{n}.0/24"),
                                                               IPv4Address(f"192.168.78.{n}")))
                            for n in range(10, 60)])
            await hg.apply([LeaseEvent(EventKind.REMOVED, _lease(IPv4Network("10.60.59.0/24"),
                                                                 IPv4Address("192.168.78.59")))])
            await trio.sleep(0.5)
            assert hg.loop.passes == 0, "our own programming woke the repair loop"
            sh("ip", "-n", ns, "route", "del", "10.60.20.0/24")
            with trio.fail_after(2):
                while "10.60.20.0/24" not in _routes(ns):
                    await trio.sleep(0.01)
            assert hg.loop.passes >= 1 and hg.programmed_count() == 49
            nursery.cancel_scope.cancel()
    finally:
        if nl is not None:
            nl.stop()
        sh("ip", "netns", "del", ns, check=False)
