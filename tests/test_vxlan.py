"""The vxlan backend on real kernel devices: two "hosts" (namespaces a and b) joined by a
veth underlay, each with a "container" namespace behind it, running VxlanBackend through
NetlinkThread(netns=...)."""

from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

import pytest
from netns_helpers import add_addr, add_veth, bridge_json, ifindex, ip_json, namespaces, ping, sh, unique_name

from flannelpy.backends import backend_class
from flannelpy.backends.base import ExternalInterface
from flannelpy.backends.vxlan.backend import VxlanBackend
from flannelpy.config.network import parse_config
from flannelpy.errors import ConfigError
from flannelpy.hostnet.monitor import KernelChange
from flannelpy.hostnet.netlink import NetlinkThread
from flannelpy.subnet.lease import EventKind, Lease, LeaseAttrs, LeaseEvent

pytestmark = pytest.mark.root

A = IPv4Address
NETWORK = "10.55.0.0/16"
UNDERLAY = {"a": "192.168.100.1", "b": "192.168.100.2"}
SUBNET = {"a": IPv4Network("10.55.1.0/24"), "b": IPv4Network("10.55.2.0/24")}


def config(**backend):
    return parse_config(json.dumps({"Network": NETWORK, "Backend": {"Type": "vxlan", **backend}}))


@dataclass
class Host:
    ns: str
    nl: NetlinkThread
    ext: ExternalInterface

    def backend(self, **opts) -> VxlanBackend:
        return VxlanBackend(self.ext, config(**opts), self.nl)


@asynccontextmanager
async def two_hosts(containers: bool = False):
    """Namespaces <p>-a and <p>-b joined by veth ua<->ub (192.168.100.1/.2, mtu 1500); with
    containers, also <p>-ca/-cb behind veths with .1 (host) and .2 (container) of the subnet."""
    p = unique_name("fpvx")
    names = [f"{p}-a", f"{p}-b"] + ([f"{p}-ca", f"{p}-cb"] if containers else [])
    with namespaces(*names):
        a, b = names[0], names[1]
        add_veth(a, "ua", b, "ub")
        add_addr(a, "ua", f"{UNDERLAY['a']}/24")
        add_addr(b, "ub", f"{UNDERLAY['b']}/24")
        if containers:
            for side, host, cont in (("a", a, names[2]), ("b", b, names[3])):
                net = SUBNET[side]
                add_veth(host, "hv", cont, "eth0")
                add_addr(host, "hv", f"{net.network_address + 1}/24")
                add_addr(cont, "eth0", f"{net.network_address + 2}/24")
                sh("ip", "-n", cont, "route", "add", "default", "via", str(net.network_address + 1))
                sh("ip", "netns", "exec", host, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        hosts = {}
        try:
            for side, ns, dev in (("a", a, "ua"), ("b", b, "ub")):
                nl = NetlinkThread(netns=ns)
                ip = A(UNDERLAY[side])
                hosts[side] = Host(ns, nl, ExternalInterface(dev, ifindex(ns, dev), ip, ip, 1500))
            yield hosts, names
        finally:
            for h in hosts.values():
                h.nl.stop()


def lease_of(side: str, mac: str, public: str | None = None, btype: str = "vxlan") -> Lease:
    return Lease(SUBNET[side], LeaseAttrs(A(public or UNDERLAY[side]), btype, {"VNI": 1, "VtepMAC": mac}))


def added(lease: Lease) -> list[LeaseEvent]:
    return [LeaseEvent(EventKind.ADDED, lease)]


def removed(lease: Lease) -> list[LeaseEvent]:
    return [LeaseEvent(EventKind.REMOVED, lease)]


def device(ns: str, name: str = "flannel.1") -> dict:
    return ip_json(ns, "-d", "link", "show", "dev", name)[0]


def neighs(ns: str) -> list[tuple[str, str, list[str]]]:
    return [(n["dst"], n.get("lladdr"), n["state"]) for n in ip_json(ns, "neigh", "show", "dev", "flannel.1")]


def fdbs(ns: str) -> list[tuple[str, str | None, list[str], str]]:
    return [(f["mac"], f.get("dst"), f.get("flags", []), f.get("state", ""))
            for f in bridge_json(ns, "fdb", "show", "dev", "flannel.1")]


def routes_text(ns: str, dst: str) -> str:
    return sh("ip", "-n", ns, "route", "show", dst).strip()


async def up(host: Host, side: str, **opts) -> tuple[VxlanBackend, str]:
    be = host.backend(**opts)
    data = await be.prepare()
    await be.start(Lease(SUBNET[side], LeaseAttrs(host.ext.public_ip, "vxlan", data.backend_data)))
    return be, data.backend_data["VtepMAC"]


async def test_backend_is_registered():
    assert backend_class("vxlan") is VxlanBackend


def test_options_are_validated_with_their_names():
    ext = ExternalInterface("x", 5, A("10.0.0.1"), A("10.0.0.1"), 1500)
    nl = NetlinkThread()
    with pytest.raises(ConfigError, match="Backend.VNI"):
        VxlanBackend(ext, config(VNI=1 << 24), nl)
    with pytest.raises(ConfigError, match="Backend.Port"):
        VxlanBackend(ext, config(Port=70000), nl)
    with pytest.raises(ConfigError, match="Backend.MTU"):
        VxlanBackend(ext, config(MTU=100), nl)
    with pytest.raises(ConfigError, match="Backend.DirectRouting"):
        VxlanBackend(ext, config(DirectRouting="yes"), nl)
    be = VxlanBackend(ext, config(MTU=9000, vni=7), nl)  # keys are case-insensitive
    assert be.mtu() == 8950 and be.spec.name == "flannel.7" and be.spec.port == 8472
    assert VxlanBackend(ext, config(), nl).mtu() == 1450


async def test_two_hosts_entries_like_flanneld_and_ping_crosses(root):
    async with two_hosts(containers=True) as (hosts, names):
        a, b = hosts["a"], hosts["b"]
        be_a, mac_a = await up(a, "a")
        be_b, mac_b = await up(b, "b")
        await be_a.apply(added(lease_of("b", mac_b)))
        await be_b.apply(added(lease_of("a", mac_a)))

        dev = device(a.ns)
        info = dev["linkinfo"]["info_data"]
        assert dev["address"] == mac_a and int(mac_a[:2], 16) & 0x03 == 0x02
        assert dev["mtu"] == 1450 and "UP" in dev["flags"]
        assert info["id"] == 1 and info["port"] == 8472 and info["local"] == UNDERLAY["a"]
        assert info["link"] == "ua" and info["learning"] is False
        assert "gbp" not in info
        assert [(x["local"], x["prefixlen"]) for x in ip_json(a.ns, "-4", "addr", "show", "dev", "flannel.1")[0]["addr_info"]] == [("10.55.1.0", 32)]

        assert neighs(a.ns) == [("10.55.2.0", mac_b, ["PERMANENT"])]
        assert (mac_b, UNDERLAY["b"], ["self"], "permanent") in fdbs(a.ns)
        assert [f for f in fdbs(a.ns) if f[1] is not None] == [(mac_b, UNDERLAY["b"], ["self"], "permanent")]
        assert routes_text(a.ns, "10.55.2.0/24") == "10.55.2.0/24 via 10.55.2.0 dev flannel.1 proto 70 onlink"
        assert routes_text(b.ns, "10.55.1.0/24") == "10.55.1.0/24 via 10.55.1.0 dev flannel.1 proto 70 onlink"
        assert be_a.programmed_peers == 1

        # container a -> container b, across the VXLAN (the only path between the subnets)
        assert ping(names[2], "10.55.2.2")
        rx = device(b.ns)  # counters are in `ip -s`; check the overlay carried packets
        stats = ip_json(b.ns, "-s", "link", "show", "dev", "flannel.1")[0]["stats64"]
        assert stats["rx"]["packets"] >= 2 and rx["operstate"] in ("UNKNOWN", "UP")

        await be_a.apply(removed(lease_of("b", mac_b)))
        assert neighs(a.ns) == []
        assert [f for f in fdbs(a.ns) if f[0] == mac_b] == []
        assert routes_text(a.ns, "10.55.2.0/24") == ""
        assert be_a.programmed_peers == 0
        # removing again carries on past the missing entries
        await be_a.apply(removed(lease_of("b", mac_b)))


async def test_changed_mac_replaces_entries_and_drops_old_fdb(root):
    async with two_hosts() as (hosts, _):
        a = hosts["a"]
        be, _mac = await up(a, "a")
        await be.apply(added(lease_of("b", "0a:00:00:00:00:01")))
        await be.apply(added(lease_of("b", "0a:00:00:00:00:02")))
        assert neighs(a.ns) == [("10.55.2.0", "0a:00:00:00:00:02", ["PERMANENT"])]
        assert [f[0] for f in fdbs(a.ns) if f[1]] == ["0a:00:00:00:00:02"]
        assert routes_text(a.ns, "10.55.2.0/24") == "10.55.2.0/24 via 10.55.2.0 dev flannel.1 proto 70 onlink"
        assert be.programmed_peers == 1


async def test_a_batch_larger_than_a_round_is_applied_in_rounds_in_order(root, monkeypatch):
    """apply() sends APPLY_CHUNK events per netlink round; a batch spanning several rounds ends as
    the same batch in one round would: 40 peers added, a MAC change and a removal in later rounds."""
    import flannelpy.backends.vxlan.backend as vxlan_backend

    monkeypatch.setattr(vxlan_backend, "APPLY_CHUNK", 7)
    async with two_hosts() as (hosts, _):
        a = hosts["a"]
        be, _mac = await up(a, "a")

        def peer(i: int, mac_last: int) -> Lease:
            return Lease(IPv4Network(f"10.55.{100 + i}.0/24"),
                         LeaseAttrs(A(f"192.168.100.{10 + i}"), "vxlan", {"VNI": 1, "VtepMAC": f"0a:00:00:00:{i:02x}:{mac_last:02x}"}))

        batch = [LeaseEvent(EventKind.ADDED, peer(i, 1)) for i in range(40)]
        batch += [LeaseEvent(EventKind.ADDED, peer(3, 2)), LeaseEvent(EventKind.REMOVED, peer(39, 1))]
        await be.apply(batch)
        assert be.programmed_peers == 39
        assert sorted(f[0] for f in fdbs(a.ns) if f[1]) == sorted(
            f"0a:00:00:00:{i:02x}:{2 if i == 3 else 1:02x}" for i in range(39))
        assert len(neighs(a.ns)) == 39 and routes_text(a.ns, "10.55.139.0/24") == ""
        assert ("10.55.103.0", "0a:00:00:00:03:02", ["PERMANENT"]) in neighs(a.ns)
        assert routes_text(a.ns, "10.55.103.0/24") == "10.55.103.0/24 via 10.55.103.0 dev flannel.1 proto 70 onlink"


def refuse_last_request(monkeypatch, only_round: int | None = None) -> list[int]:
    """Make KernelDumps.transact answer ENETDOWN for the last request of every round (or of round
    `only_round` only, counting from 1), which the kernel did carry out: a falsified answer that a
    rollback acts on.  Returns the sizes of the rounds sent, as they are sent."""
    import errno

    from flannelpy.hostnet.netlink import KernelDumps

    real, rounds = KernelDumps.transact, []

    def falsified(self, requests):
        codes = real(self, requests)
        rounds.append(len(requests))
        if only_round is None or len(rounds) == only_round:
            codes[-1] = errno.ENETDOWN
        return codes

    monkeypatch.setattr(KernelDumps, "transact", falsified)
    return rounds


async def test_a_failed_round_leaves_a_later_rounds_entries_for_the_same_peer(root, monkeypatch):
    """Rounds overlap (the next is sent while the last is recorded): when a peer's add fails in
    part and a later round of the same batch adds it again, the failed round's rollback must not
    take away what the later round made.  The kernel's answer for the first round is falsified:
    its route "failed" (it was made), so that round would undo the neighbour and FDB entry."""
    import flannelpy.backends.vxlan.backend as vxlan_backend

    monkeypatch.setattr(vxlan_backend, "APPLY_CHUNK", 2)
    async with two_hosts() as (hosts, _):
        a = hosts["a"]
        be, _mac = await up(a, "a")
        rounds = refuse_last_request(monkeypatch, only_round=1)  # peer b's route
        b = lease_of("b", "0a:00:00:00:00:01")
        other = Lease(IPv4Network("10.55.7.0/24"),
                      LeaseAttrs(A("192.168.100.7"), "vxlan", {"VNI": 1, "VtepMAC": "0a:00:00:00:00:07"}))
        third = Lease(IPv4Network("10.55.8.0/24"),
                      LeaseAttrs(A("192.168.100.8"), "vxlan", {"VNI": 1, "VtepMAC": "0a:00:00:00:00:08"}))
        # b again in the second round, as a re-list's snapshot can bring it after its watch event.
        await be.apply([LeaseEvent(EventKind.ADDED, other), LeaseEvent(EventKind.ADDED, b),
                        LeaseEvent(EventKind.ADDED, b), LeaseEvent(EventKind.ADDED, third)])
        assert rounds[:2] == [6, 6]
        assert ("10.55.2.0", "0a:00:00:00:00:01", ["PERMANENT"]) in neighs(a.ns)
        assert ("0a:00:00:00:00:01", "192.168.100.2", ["self"], "permanent") in fdbs(a.ns)
        assert routes_text(a.ns, "10.55.2.0/24") == "10.55.2.0/24 via 10.55.2.0 dev flannel.1 proto 70 onlink"
        assert be.programmed_peers == 3 and be.data_plane_problems() == []


async def test_a_rollback_keeps_the_fdb_entry_another_peer_shares(root, monkeypatch):
    """Two leases of one host (one VtepMAC, one PublicIP: one FDB entry): when the second one's
    add fails in part, undoing it must not delete the FDB entry the first one still needs."""
    async with two_hosts() as (hosts, _):
        a = hosts["a"]
        be, _mac = await up(a, "a")
        refuse_last_request(monkeypatch)
        first = lease_of("b", "0a:00:00:00:00:01")
        second = Lease(IPv4Network("10.55.9.0/24"), first.attrs)
        await be.apply([LeaseEvent(EventKind.ADDED, first), LeaseEvent(EventKind.ADDED, second)])
        monkeypatch.undo()  # the real answers again, for the teardown
        assert ("0a:00:00:00:00:01", "192.168.100.2", ["self"], "permanent") in fdbs(a.ns)
        assert neighs(a.ns) == [("10.55.2.0", "0a:00:00:00:00:01", ["PERMANENT"])]  # the second's undone
        assert be.programmed_peers == 1


async def test_a_bulk_apply_logs_one_line_and_a_join_its_own(root, caplog):
    import flannelpy.backends.vxlan.backend as vxlan_backend

    async with two_hosts() as (hosts, _):
        a = hosts["a"]
        be, _mac = await up(a, "a")
        peers = [Lease(IPv4Network(f"10.55.{100 + i}.0/24"),
                       LeaseAttrs(A(f"192.168.100.{10 + i}"), "vxlan", {"VNI": 1, "VtepMAC": f"0a:00:00:00:01:{i:02x}"}))
                 for i in range(vxlan_backend.PEER_LINES_MAX + 1)]
        caplog.clear()  # what up() logged (captured when an earlier test left the logger at INFO)
        with caplog.at_level(logging.INFO, logger="flannelpy.backends.vxlan.backend"):
            await be.apply([LeaseEvent(EventKind.ADDED, p) for p in peers])
        lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
        assert lines == [f"flannel.1: {len(peers)} lease events applied: {len(peers)} peers programmed, 0 removed"]
        assert be.programmed_peers == len(peers)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="flannelpy.backends.vxlan.backend"):
            await be.apply(removed(peers[0]) + added(lease_of("b", "0a:00:00:00:00:01")))
        lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
        assert lines == ["peer 10.55.100.0/24 removed",
                         "peer 10.55.2.0/24: vtep 0a:00:00:00:00:01 at 192.168.100.2, route via 10.55.2.0 onlink"]


async def test_other_backend_types_are_ignored(root, caplog):
    async with two_hosts() as (hosts, _):
        a = hosts["a"]
        be, _mac = await up(a, "a")
        with caplog.at_level(logging.INFO, logger="flannelpy.backends.vxlan.backend"):
            await be.apply(added(lease_of("b", "0a:00:00:00:00:01", btype="host-gw")))
        assert "not vxlan" in caplog.text
        assert neighs(a.ns) == [] and routes_text(a.ns, "10.55.2.0/24") == ""
        assert be.programmed_peers == 0


async def test_device_reused_with_its_mac_and_stale_addresses_removed(root):
    async with two_hosts() as (hosts, _):
        a = hosts["a"]
        be, mac = await up(a, "a")
        index = ifindex(a.ns, "flannel.1")
        sh("ip", "-n", a.ns, "addr", "add", "10.55.9.0/32", "dev", "flannel.1")
        sh("ip", "-n", a.ns, "addr", "add", "10.55.1.0/16", "dev", "flannel.1")
        sh("ip", "-n", a.ns, "addr", "add", "172.31.0.1/32", "dev", "flannel.1")  # not ours: kept
        be2, mac2 = await up(a, "a")
        assert mac2 == mac and ifindex(a.ns, "flannel.1") == index
        addrs = {(x["local"], x["prefixlen"]) for x in ip_json(a.ns, "-4", "addr", "show", "dev", "flannel.1")[0]["addr_info"]}
        assert addrs == {("10.55.1.0", 32), ("172.31.0.1", 32)}


@pytest.mark.parametrize("make", [
    "id 7 dstport 8472",  # other VNI under our name
    "id 1 dstport 4789",  # other port
    "id 1 dstport 8472 learning",
])
async def test_incompatible_device_is_recreated(root, make):
    async with two_hosts() as (hosts, _):
        a = hosts["a"]
        sh("ip", "-n", a.ns, "link", "add", "flannel.1", "address", "0a:de:ad:be:ef:00", "type", "vxlan",
           *make.split(), "local", UNDERLAY["a"], "dev", "ua")
        be, mac = await up(a, "a")
        info = device(a.ns)["linkinfo"]["info_data"]
        assert (info["id"], info["port"], info["learning"]) == (1, 8472, False)
        assert mac != "0a:de:ad:be:ef:00" and device(a.ns)["address"] == mac


async def test_gbp_port_and_mtu_options(root):
    async with two_hosts() as (hosts, _):
        a = hosts["a"]
        be, mac = await up(a, "a", VNI=42, Port=4789, GBP=True, MTU=1400)
        dev = device(a.ns, "flannel.42")
        info = dev["linkinfo"]["info_data"]
        assert (info["id"], info["port"], dev["mtu"]) == (42, 4789, 1350)
        assert info.get("gbp") is True and be.mtu() == 1350


async def test_direct_routing_on_same_segment_and_vxlan_beyond(root):
    async with two_hosts() as (hosts, _):
        a = hosts["a"]
        sh("ip", "-n", a.ns, "route", "add", "192.168.200.0/24", "via", "192.168.100.254")
        be, _mac = await up(a, "a", DirectRouting=True)
        await be.apply(added(lease_of("b", "0a:00:00:00:00:01")))
        assert routes_text(a.ns, "10.55.2.0/24") == "10.55.2.0/24 via 192.168.100.2 dev ua proto 70"
        assert neighs(a.ns) == [] and [f for f in fdbs(a.ns) if f[1]] == []

        far = Lease(IPv4Network("10.55.3.0/24"),
                    LeaseAttrs(A("192.168.200.5"), "vxlan", {"VNI": 1, "VtepMAC": "0a:00:00:00:00:03"}))
        await be.apply(added(far))
        assert routes_text(a.ns, "10.55.3.0/24") == "10.55.3.0/24 via 10.55.3.0 dev flannel.1 proto 70 onlink"
        assert (("0a:00:00:00:00:03", "192.168.200.5", ["self"], "permanent")) in fdbs(a.ns)
        assert be.programmed_peers == 2

        await be.apply(removed(lease_of("b", "0a:00:00:00:00:01")))
        assert routes_text(a.ns, "10.55.2.0/24") == ""
        assert routes_text(a.ns, "10.55.3.0/24") != ""


async def test_failed_step_rolls_back_earlier_ones(root, caplog):
    async with two_hosts() as (hosts, _):
        a = hosts["a"]
        be, _mac = await up(a, "a")
        # On a down device neigh and FDB entries can be added but an onlink route cannot
        # (ENETDOWN), so the third step fails and the first two must be undone.
        sh("ip", "-n", a.ns, "link", "set", "flannel.1", "down")
        with caplog.at_level(logging.ERROR, logger="flannelpy.backends.vxlan.backend"):
            await be.apply(added(lease_of("b", "0a:00:00:00:00:01")))
        assert "not programmed: Network is down" in caplog.text
        assert neighs(a.ns) == []
        assert [f for f in fdbs(a.ns) if f[1]] == []
        assert routes_text(a.ns, "10.55.2.0/24") == ""
        assert be.programmed_peers == 0
        assert be.data_plane_problems() == ["1 peer failed: 10.55.2.0/24: via 192.168.100.2: Network is down"]
        # The next pass brings the device up and programs the peer.
        report = await be.reconcile_once()
        assert report.device == "flannel.1: was down, set up" and report.failures == {}
        assert routes_text(a.ns, "10.55.2.0/24") == "10.55.2.0/24 via 10.55.2.0 dev flannel.1 proto 70 onlink"
        assert be.programmed_peers == 1 and be.data_plane_problems() == []


async def test_reconcile_recreates_device_restores_entries_removes_unexplained(root):
    async with two_hosts() as (hosts, _):
        a = hosts["a"]
        be, mac = await up(a, "a")
        await be.apply(added(lease_of("b", "0a:00:00:00:00:01")))
        assert (await be.reconcile_once()).changed is False  # nothing to do is a quiet pass
        old_index = be.index
        sh("ip", "-n", a.ns, "link", "del", "flannel.1")
        # What the kernel monitor reports makes /readyz say so until the pass has repaired it.
        assert be._notice(KernelChange("link", True, 0, ifindex=old_index))
        assert be.data_plane_problems() == ["flannel.1 missing, re-creating"]
        report = await be.reconcile_once()
        assert be.data_plane_problems() == [] and be.index != old_index
        assert report.device == f"re-created flannel.1 with MAC {mac} (it was missing)"
        assert sorted(report.added) == ["fdb 0a:00:00:00:00:01", "neigh 10.55.2.0", "route 10.55.2.0/24"]
        assert device(a.ns)["address"] == mac and device(a.ns)["mtu"] == 1450
        assert [(x["local"], x["prefixlen"]) for x in ip_json(a.ns, "-4", "addr", "show", "dev", "flannel.1")[0]["addr_info"]] == [("10.55.1.0", 32)]
        assert neighs(a.ns) == [("10.55.2.0", "0a:00:00:00:00:01", ["PERMANENT"])]
        assert routes_text(a.ns, "10.55.2.0/24") == "10.55.2.0/24 via 10.55.2.0 dev flannel.1 proto 70 onlink"
        # Entries no lease explains: removed only once the agent says the peer set is complete.
        sh("ip", "-n", a.ns, "neigh", "add", "10.55.9.0", "lladdr", "0a:00:00:00:00:09", "dev", "flannel.1", "nud", "permanent")
        sh("bridge", "-n", a.ns, "fdb", "append", "0a:00:00:00:00:09", "dev", "flannel.1", "dst", "192.168.100.9")
        sh("ip", "-n", a.ns, "route", "add", "10.55.9.0/24", "via", "10.55.9.0", "dev", "flannel.1", "onlink")
        sh("ip", "-n", a.ns, "route", "add", "10.55.10.0/24", "via", "192.168.100.10", "proto", "70")  # direct, ours
        sh("ip", "-n", a.ns, "route", "add", "10.55.11.0/24", "via", "192.168.100.11")  # not ours (proto boot)
        assert (await be.reconcile_once()).removed == []
        be.peers_synced()
        report = await be.reconcile_once()
        assert sorted(report.removed) == ["fdb 0a:00:00:00:00:09", "neigh 10.55.9.0", "route 10.55.10.0/24",
                                          "route 10.55.9.0/24"]
        assert neighs(a.ns) == [("10.55.2.0", "0a:00:00:00:00:01", ["PERMANENT"])]
        assert [f[0] for f in fdbs(a.ns) if f[1]] == ["0a:00:00:00:00:01"]
        assert routes_text(a.ns, "10.55.11.0/24") != ""
        # A changed MAC (it flushes the device's neighbours) and MTU are put back.
        sh("ip", "-n", a.ns, "link", "set", "flannel.1", "mtu", "1300", "address", "0a:00:00:00:00:77")
        report = await be.reconcile_once()
        assert report.device == f"flannel.1: MAC 0a:00:00:00:00:77 -> {mac}, MTU 1300 -> 1450"
        assert report.added == ["neigh 10.55.2.0"]
        assert device(a.ns)["address"] == mac and device(a.ns)["mtu"] == 1450
        assert be.repair_counters()["device"] == 2 and be.programmed_peers == 1


async def test_event_path_repairs_foreign_changes_and_ignores_our_own(root):
    """The monitor wakes the repair for someone else's change within a fraction of a second,
    while our own programming (its notifications carry our socket's port id) wakes nothing."""
    import trio

    async with two_hosts() as (hosts, _):
        a = hosts["a"]
        be = VxlanBackend(a.ext, config(), a.nl, resync_interval=3600)  # only the event path can repair
        data = await be.prepare()
        await be.start(Lease(SUBNET["a"], LeaseAttrs(a.ext.public_ip, "vxlan", data.backend_data)))
        async with trio.open_nursery() as nursery:
            await nursery.start(be.run)
            with trio.fail_after(5):
                while not be.loop.monitoring:
                    await trio.sleep(0.01)
            for n in range(3, 53):
                await be.apply(added(Lease(IPv4Network(f"10.55.{n}.0/24"), LeaseAttrs(
                    A(f"192.168.100.{n}"), "vxlan", {"VNI": 1, "VtepMAC": f"0a:00:00:00:01:{n:02x}"}))))
            await trio.sleep(0.5)
            assert be.loop.passes == 0, "our own programming woke the repair loop"
            sh("ip", "-n", a.ns, "route", "del", "10.55.7.0/24")
            started = trio.current_time()
            with trio.fail_after(2):
                while routes_text(a.ns, "10.55.7.0/24") == "":
                    await trio.sleep(0.01)
            print(f"FIGURE vxlan event-path route repair: {trio.current_time() - started:.3f}s")
            assert be.loop.passes >= 1 and be.programmed_peers == 50
            nursery.cancel_scope.cancel()
