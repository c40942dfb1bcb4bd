"""Dual stack (issue #14): the host's IPv6 underlay is protected from peer leases as its IPv4 underlay is — an IPv6
subnet over a connected IPv6 network, one of the host's IPv6 addresses or a route's IPv6 gateway is refused, a
PublicIPv6 that is one of the host's addresses is refused, and host-gw peers need their PublicIPv6 on a connected
IPv6 network.  Pure tests, plus the underlay as read from a real namespace."""

from __future__ import annotations

import secrets
import subprocess
from ipaddress import IPv4Address as A
from ipaddress import IPv4Network as N
from ipaddress import IPv6Address as A6
from ipaddress import IPv6Network as N6

import pytest

from flannelpy.hostnet.underlay import Underlay
from flannelpy.subnet.admission import Admission, AdmissionRules, protected_ranges
from flannelpy.subnet.lease import EventKind, Lease, LeaseAttrs, LeaseEvent

UNDERLAY = Underlay(
    connected=((N("10.250.0.0/24"), "eth0"),), addresses=((A("10.250.0.11"), "eth0"),),
    gateways=((A("10.250.0.1"), N("0.0.0.0/0")),),
    # an IPv6Network carved out of a site prefix the host also routes in: fd42:0:0:ff00::/56 is connected on eth1
    connected6=((N6("fd99::/64"), "eth0"), (N6("fd42:0:0:ff00::/56"), "eth1"), (N6("fe80::/64"), "eth0")),
    addresses6=((A6("fd99::b"), "eth0"), (A6("fd42:0:0:ff00::b"), "eth1"), (A6("fd99::77"), "eth0")),
    gateways6=((A6("fd42:0:0:fe00::1"), N6("::/0")),),
)


def rules(**kw) -> AdmissionRules:
    base = dict(network=N("10.5.0.0/16"), own_subnet=N("10.5.9.0/24"), own_public_ip=A("10.250.0.11"),
                underlay=UNDERLAY, ipv6_network=N6("fd42::/48"), own_ipv6_subnet=N6("fd42:0:0:9::/64"),
                own_public_ipv6=A6("fd99::b"), own_vtep_mac_v6="02:00:00:00:06:01")
    base.update(kw)
    return AdmissionRules(**base)


def lease(v6: str, ip6: str = "fd99::c", btype: str = "vxlan", ip: str = "10.250.0.12") -> Lease:
    data = {"VNI": 1, "VtepMAC": "02:00:00:00:00:02"} if btype == "vxlan" else None
    data6 = {"VNI": 1, "VtepMAC": "02:00:00:00:06:02"} if btype == "vxlan" else None
    return Lease(N("10.5.1.0/24"), LeaseAttrs(A(ip), btype, data, A6(ip6), data6), ipv6_subnet=N6(v6))


def judged(rule_set: AdmissionRules, bad: Lease):
    step = Admission(rule_set).apply([LeaseEvent(EventKind.ADDED, bad)])
    return step.refused[0] if step.refused else None


def test_protected_ipv6_ranges_are_the_underlay_inside_ipv6network():
    got = dict(protected_ranges(N6("fd42::/48"), UNDERLAY))
    assert got == {
        N6("fd42:0:0:ff00::/56"): "the network fd42:0:0:ff00::/56 connected on eth1",
        N6("fd42:0:0:ff00::b/128"): "this host's address fd42:0:0:ff00::b on eth1",
        N6("fd42:0:0:fe00::1/128"): "the gateway fd42:0:0:fe00::1 of the default route",
    }
    # the IPv4 side is unchanged by the IPv6 fields
    assert [str(n) for n, _ in protected_ranges(N("10.250.0.0/16"), UNDERLAY)] == [
        "10.250.0.0/24", "10.250.0.11/32", "10.250.0.1/32"]


@pytest.mark.parametrize("v6, ip6, says", [
    ("fd42:0:0:ff00::/64", "fd99::c", "overlaps the network fd42:0:0:ff00::/56 connected on eth1"),
    ("fd42:0:0:fe00::/64", "fd99::c", "overlaps the gateway fd42:0:0:fe00::1 of the default route"),
    ("fd42:0:0:1::/64", "fd99::77", "PublicIPv6 fd99::77 is an address of this host"),
])
def test_ipv6_sides_that_would_cut_the_host_off_its_underlay_are_refused(v6, ip6, says):
    refusal = judged(rules(), lease(v6, ip6))
    assert refusal is not None and says in refusal.reason, refusal


def test_host_gw_needs_the_peers_public_ipv6_on_a_connected_network():
    hostgw = rules(onlink_backend="host-gw", own_vtep_mac_v6=None)
    assert judged(hostgw, lease("fd42:0:0:1::/64", "fd99::c", btype="host-gw")) is None
    refusal = judged(hostgw, lease("fd42:0:0:1::/64", "fd55::c", btype="host-gw"))
    assert refusal is not None and refusal.code == "unreachable" and "PublicIPv6 fd55::c" in refusal.reason
    # vxlan peers may be routed: no on-link requirement
    assert judged(rules(), lease("fd42:0:0:1::/64", "fd55::c")) is None


def test_an_ipv4_only_network_ignores_the_ipv6_underlay():
    v4only = rules(ipv6_network=None, own_ipv6_subnet=None, own_public_ipv6=None, own_vtep_mac_v6=None)
    plain = Lease(N("10.5.1.0/24"), LeaseAttrs(A("10.250.0.12"), "vxlan", {"VNI": 1, "VtepMAC": "02:00:00:00:00:02"}))
    assert judged(v4only, plain) is None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def test_the_ipv6_underlay_is_read_from_the_kernel(root):
    from flannelpy.hostnet.netlink import IPRoute
    from flannelpy.hostnet.underlay import read_underlay

    ns = f"fpu6{secrets.token_hex(2)}"
    _ip("netns", "add", ns)
    try:
        _ip("-n", ns, "link", "add", "u0", "type", "veth", "peer", "name", "u1")
        _ip("-n", ns, "link", "add", "flannel-v6.1", "type", "veth", "peer", "name", "u2")  # flannel's: left out
        _ip("-n", ns, "addr", "add", "fd77::1/64", "dev", "u0", "nodad")
        _ip("-n", ns, "addr", "add", "fd42:0:0:9::/128", "dev", "flannel-v6.1", "nodad")
        for dev in ("u0", "u1", "flannel-v6.1", "u2"):
            _ip("-n", ns, "link", "set", dev, "up")
        _ip("-n", ns, "-6", "route", "add", "default", "via", "fd77::fe", "dev", "u0")
        _ip("-n", ns, "-6", "route", "add", "fd78::/64", "dev", "u0")
        _ip("-n", ns, "-6", "route", "add", "fd42:0:0:5::/64", "via", "fd42:0:0:5::", "dev", "flannel-v6.1", "onlink")
        ipr = IPRoute(netns=ns)
        try:
            u = read_underlay(ipr)
        finally:
            ipr.close()
    finally:
        _ip("netns", "del", ns)
    connected6 = dict(u.connected6)
    assert connected6[N6("fd77::/64")] == "u0" and connected6[N6("fd78::/64")] == "u0"
    assert (A6("fd77::1"), "u0") in u.addresses6
    assert u.gateways6 == ((A6("fd77::fe"), N6("::/0")),)
    assert not any("fd42" in str(x) for x in (*u.connected6, *u.addresses6, *u.gateways6)), u
    assert not any(n.is_multicast for n, _ in u.connected6)
