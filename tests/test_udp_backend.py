"""udp backend on real kernels: two hosts in namespaces, each running the backend in a
subprocess (tests/udp_driver.py), a container namespace behind each host."""

from __future__ import annotations

import json
import os
import socket
import time
from ipaddress import IPv4Address, IPv4Network

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from udp_driver import CONTAINERS, LEASES, UNDERLAY, UdpLab, in_netns, sh

from flannelpy.backends.base import ExternalInterface
from flannelpy.backends.udp.backend import UdpBackend
from flannelpy.config.network import parse_config
from flannelpy.hostnet.netlink import NetlinkThread
from flannelpy.subnet.lease import Lease, LeaseAttrs, encode_attrs

pytestmark = [pytest.mark.root]


def _udp_backend(port: object = None) -> UdpBackend:
    backend = {"Type": "udp"} if port is None else {"Type": "udp", "Port": port}
    config = parse_config(json.dumps({"Network": "10.50.0.0/16", "Backend": backend}))
    ext = ExternalInterface("eth0", 2, IPv4Address("192.0.2.1"), IPv4Address("192.0.2.1"), 1500)
    return UdpBackend(ext, config, NetlinkThread())


async def test_lease_value_mtu_and_accepts_every_type() -> None:
    b = _udp_backend()
    data = await b.prepare()
    assert (data.backend_type, data.backend_data) == ("", None)
    attrs = LeaseAttrs(public_ip=IPv4Address("192.0.2.1"), backend_type=data.backend_type)
    assert encode_attrs(attrs) == '{"PublicIP":"192.0.2.1","PublicIPv6":null}'
    assert b.mtu() == 1472 and b.port == 8285
    for btype in ("", "host-gw", "vxlan"):
        assert b.accepts(Lease(IPv4Network("10.50.3.0/24"), LeaseAttrs(IPv4Address("192.0.2.3"), btype)))
    assert _udp_backend(9999).port == 9999


@pytest.fixture(scope="module")
def lab():
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    lab = UdpLab(f"fpud-{os.urandom(3).hex()}")
    try:
        lab.build()
        lab.start()
        yield lab
    finally:
        lab.destroy()


def _wait_stat(driver, name: str, above: int) -> int:
    # Counters are updated after each batch; poll with a generous bound instead of sleeping.
    deadline = time.monotonic() + 10
    while True:
        value = driver.stats()[name]
        if value > above or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def test_tun_device_address_mtu_route(lab) -> None:
    link = json.loads(sh("ip", "-n", lab.h[0], "-d", "-j", "addr", "show", "flannel0").stdout)[0]
    assert link["mtu"] == 1500 - 28
    assert link["linkinfo"]["info_data"]["type"] == "tun"
    assert link["linkinfo"]["info_data"]["pi"] is False
    assert link["linkinfo"]["info_data"]["persist"] is False
    assert "UP" in link["flags"]
    assert [(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["family"] == "inet"] == [("10.50.1.0", 32)]
    routes = json.loads(sh("ip", "-n", lab.h[0], "-j", "route", "show", "10.50.0.0/16").stdout)
    assert [r["dev"] for r in routes] == ["flannel0"]
    assert lab.drivers[0].mtu == 1472
    # Bound to the interface address, not 0.0.0.0.
    listening = sh("ip", "netns", "exec", lab.h[0], "ss", "-Huln", "sport", "= :8285").stdout
    assert f"{UNDERLAY[0]}:8285" in listening


def test_ping_between_containers_both_ways(lab) -> None:
    d1, d2 = lab.drivers
    before = d1.stats()
    for i, j in ((0, 1), (1, 0)):
        r = sh("ip", "netns", "exec", lab.c[i], "busybox", "ping", "-c", "3", "-W", "3", CONTAINERS[j], check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "3 packets received" in r.stdout
    after = d1.stats()
    assert after["tx_packets"] - before["tx_packets"] >= 6  # 3 requests + 3 replies
    assert after["rx_packets"] - before["rx_packets"] >= 6
    assert after["tx_bytes"] > before["tx_bytes"] and after["rx_bytes"] > before["rx_bytes"]


def _send_from(ns: str, source: str, payload: bytes, dest: tuple[str, int]) -> None:
    with in_netns(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((source, 0))
        s.sendto(payload, dest)
    finally:
        s.close()


def test_flanneld_wire_format_from_peer_arrives_non_peer_dropped(lab) -> None:
    d1 = lab.drivers[0]
    sh("ip", "-n", lab.h[1], "addr", "add", "192.168.77.3/24", "dev", "fpudu", check=False)
    with in_netns(lab.c[0]):
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind((CONTAINERS[0], 7777))
    sink.settimeout(10)
    try:
        inner = IP(src="10.50.2.9", dst=CONTAINERS[0], ttl=10) / UDP(sport=5555, dport=7777) / b"flannel-wire"
        _send_from(lab.h[1], UNDERLAY[1], bytes(inner), (UNDERLAY[0], 8285))
        data, addr = sink.recvfrom(100)
        assert (data, addr) == (b"flannel-wire", ("10.50.2.9", 5555))

        unknown = d1.stats()["rx_dropped_unknown_source"]
        spoof = IP(src="10.50.2.9", dst=CONTAINERS[0], ttl=10) / UDP(sport=5555, dport=7777) / b"spoofed"
        _send_from(lab.h[1], "192.168.77.3", bytes(spoof), (UNDERLAY[0], 8285))
        assert _wait_stat(d1, "rx_dropped_unknown_source", unknown) == unknown + 1
        # A datagram sent after the spoof arrives first: the spoof never reached the container.
        _send_from(lab.h[1], UNDERLAY[1], bytes(inner), (UNDERLAY[0], 8285))
        assert sink.recvfrom(100)[0] == b"flannel-wire"

        # Once the peer's lease is gone its datagrams are dropped as well.
        assert d1.command(f"del {LEASES[1]}") == "ok"
        _send_from(lab.h[1], UNDERLAY[1], bytes(spoof), (UNDERLAY[0], 8285))
        assert _wait_stat(d1, "rx_dropped_unknown_source", unknown + 1) == unknown + 2
        assert d1.command(f"add {LEASES[1]} {UNDERLAY[1]}") == "ok"
        _send_from(lab.h[1], UNDERLAY[1], bytes(inner), (UNDERLAY[0], 8285))
        assert sink.recvfrom(100)[0] == b"flannel-wire"
    finally:
        sink.close()


def _drops(driver) -> dict[str, int]:
    return {k: v for k, v in driver.stats().items() if k.startswith("rx_dropped")}


def test_spoofed_inner_sources_from_a_real_holder_are_dropped_and_counted(lab) -> None:
    """A datagram from a lease holder's own address (192.168.77.2 holds 10.50.2.0/24) whose
    inner source is 8.8.8.8, or lies in another peer's subnet, or is junk, never reaches the
    container; each is counted under its own reason, and legitimate traffic keeps flowing."""
    d1 = lab.drivers[0]
    sh("ip", "-n", lab.h[1], "addr", "add", "192.168.77.3/24", "dev", "fpudu", check=False)
    assert d1.command("add 10.50.3.0/24 192.168.77.3") == "ok"  # another peer, so 10.50.3.x is leased
    with in_netns(lab.c[0]):
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind((CONTAINERS[0], 7778))
    sink.settimeout(10)
    try:
        def inner(src: str, text: bytes) -> bytes:
            return bytes(IP(src=src, dst=CONTAINERS[0], ttl=10) / UDP(sport=5555, dport=7778) / text)

        before = _drops(d1)
        for src in ("8.8.8.8", "10.50.3.9", "10.50.1.7"):  # internet, another peer's subnet, our own
            _send_from(lab.h[1], UNDERLAY[1], inner(src, b"forged " + src.encode()), (UNDERLAY[0], 8285))
        _send_from(lab.h[1], UNDERLAY[1], b"\x60" + bytes(47), (UNDERLAY[0], 8285))  # IPv6: not ours
        _send_from(lab.h[1], UNDERLAY[1], b"", (UNDERLAY[0], 8285))
        # Legitimate: a container behind the sender, the sender's flannel0 address, the sender itself.
        for src in ("10.50.2.9", "10.50.2.0", UNDERLAY[1]):
            _send_from(lab.h[1], UNDERLAY[1], inner(src, b"legit " + src.encode()), (UNDERLAY[0], 8285))
        got = []
        for _ in range(3):
            data, addr = sink.recvfrom(100)
            got.append((data, addr[0]))
        assert got == [(b"legit 10.50.2.9", "10.50.2.9"), (b"legit 10.50.2.0", "10.50.2.0"),
                       (b"legit " + UNDERLAY[1].encode(), UNDERLAY[1])]
        assert _wait_stat(d1, "rx_dropped_malformed", before["rx_dropped_malformed"] + 1) \
            == before["rx_dropped_malformed"] + 2
        after = _drops(d1)
        assert after["rx_dropped_spoofed_source"] == before["rx_dropped_spoofed_source"] + 3
        assert after["rx_dropped_unknown_source"] == before["rx_dropped_unknown_source"]
        assert after["rx_dropped"] == before["rx_dropped"]
        # Nothing forged was queued behind the legitimate datagrams.
        sink.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sink.recvfrom(100)
    finally:
        sink.close()
        assert d1.command("del 10.50.3.0/24") == "ok"


def test_host_to_remote_container_ping_passes_the_source_check(lab) -> None:
    """Packets a host sends itself carry its flannel0 address (inside its subnet), or the
    address a service bound to (its PublicIP): both pass the peer's check."""
    d2 = lab.drivers[1]
    before = _drops(d2)
    for i, j in ((0, 1), (1, 0)):
        r = sh("ip", "netns", "exec", lab.h[i], "busybox", "ping", "-c", "2", "-W", "3", CONTAINERS[j], check=False)
        assert "2 packets received" in r.stdout, r.stdout + r.stderr
        r = sh("ip", "netns", "exec", lab.h[i], "busybox", "ping", "-c", "2", "-W", "3", "-I", UNDERLAY[i],
               CONTAINERS[j], check=False)
        assert "2 packets received" in r.stdout, r.stdout + r.stderr
    route = sh("ip", "-n", lab.h[1], "route", "get", CONTAINERS[0]).stdout
    assert "dev flannel0 src 10.50.2.0" in route, route  # what the first ping's source was
    assert _drops(d2) == before


def _captured_until_udp_unreachable(cap: socket.socket) -> list[IP]:
    """Packets the forwarder wrote into flannel0 (PACKET_HOST), up to the first one that
    quotes a UDP datagram (the ICMP quotes only 8 payload bytes: the UDP header)."""
    seen = []
    while True:
        data, addr = cap.recvfrom(65536)
        if addr[2] != socket.PACKET_HOST:
            continue
        pkt = IP(data)
        seen.append(pkt)
        if ICMP in pkt and pkt[ICMP].type == 3 and IP(bytes(pkt[ICMP].payload)).proto == 17:
            return seen


def test_unknown_subnet_gets_net_unreachable_except_icmp(lab) -> None:
    d1 = lab.drivers[0]
    with in_netns(lab.h[0]):
        cap = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
    cap.bind(("flannel0", 0))
    cap.settimeout(10)
    with in_netns(lab.c[0]):
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        no_route = d1.stats()["tx_no_route"]
        # ICMP to an unleased subnet: no answer (flanneld never answers ICMP with ICMP).
        sh("ip", "netns", "exec", lab.c[0], "busybox", "ping", "-c", "1", "-W", "1", "10.50.99.1", check=False)
        probe.bind((CONTAINERS[0], 0))
        probe.sendto(b"probe-no-route", ("10.50.99.1", 9))
        replies = _captured_until_udp_unreachable(cap)
        assert len(replies) == 1, [p.summary() for p in replies]
        reply = replies[0]
        assert (reply.src, reply.dst, reply.ttl, reply.proto) == ("10.50.1.0", CONTAINERS[0], 8, 1)
        assert (reply[ICMP].type, reply[ICMP].code) == (3, 0)
        quoted = bytes(reply[ICMP].payload)
        assert IP(quoted).dst == "10.50.99.1" and IP(quoted)[UDP].dport == 9
        assert _wait_stat(d1, "tx_no_route", no_route + 1) >= no_route + 2
    finally:
        cap.close()
        probe.close()


def test_tun_vanishes_when_backend_closes() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    lab = UdpLab(f"fpud-{os.urandom(3).hex()}")
    try:
        lab.build()
        d1, _ = lab.start()
        assert sh("ip", "-n", lab.h[0], "link", "show", "flannel0", check=False).returncode == 0
        assert d1.stop() == 0
        assert sh("ip", "-n", lab.h[0], "link", "show", "flannel0", check=False).returncode != 0
        assert "10.50.0.0/16" not in sh("ip", "-n", lab.h[0], "route").stdout
    finally:
        lab.destroy()
