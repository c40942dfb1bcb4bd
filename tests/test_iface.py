"""Interface selection: the pure choice over snapshots, then the real kernel in a netns."""

import logging
from ipaddress import IPv4Address

import pytest
from netns_helpers import add_addr, add_veth, ifindex, namespaces, sh, unique_name

from flannelpy.errors import FlannelError
from flannelpy.hostnet.interface import (
    HostSnapshot,
    LinkFacts,
    check_flags,
    choose_interface,
    select_interface,
    usable_addresses,
)
from flannelpy.hostnet.netlink import NetlinkThread

A = IPv4Address

SNAP = HostSnapshot(
    links=(
        LinkFacts("lo", 1, 65536, (A("127.0.0.1"),)),
        LinkFacts("eth0", 2, 1500, (A("10.0.0.1"), A("10.0.0.2"))),
        LinkFacts("eth1", 3, 9000, (A("169.254.3.3"), A("192.168.5.5"))),
        LinkFacts("wg0", 4, 1420, ()),
        LinkFacts("nomtu", 5, 0, (A("172.16.0.1"),)),
    ),
    default_index=2,
)


def choose(ifaces=(), regexes=(), can_reach="", public_ip="", snap=SNAP):
    return choose_interface(snap, check_flags(list(ifaces), list(regexes), can_reach, public_ip))


def test_default_route_interface_and_first_address():
    ext = choose()
    assert (ext.name, ext.index, ext.ip, ext.public_ip, ext.mtu) == ("eth0", 2, A("10.0.0.1"), A("10.0.0.1"), 1500)


def test_public_ip_overrides_only_the_advertised_address():
    ext = choose(public_ip="203.0.113.9")
    assert ext.ip == A("10.0.0.1") and ext.public_ip == A("203.0.113.9")


def test_global_address_preferred_over_link_local():
    assert usable_addresses(SNAP.links[2]) == [A("192.168.5.5"), A("169.254.3.3")]
    assert choose(ifaces=["eth1"]).ip == A("192.168.5.5")


def test_iface_by_name_and_by_ip_in_order():
    assert choose(ifaces=["eth1"]).name == "eth1"
    ext = choose(ifaces=["10.0.0.2"])
    assert ext.name == "eth0" and ext.ip == A("10.0.0.2")  # the given IP, not the first
    assert choose(ifaces=["eth9", "192.168.5.5", "eth0"]).name == "eth1"


def test_iface_wins_over_regex_and_regex_is_next():
    assert choose(ifaces=["eth0"], regexes=["eth1"]).name == "eth0"
    assert choose(ifaces=["eth9"], regexes=["eth1"]).name == "eth1"


def test_regex_matches_addresses_before_names():
    # "1" is in eth0's address 10.0.0.1 before any name is considered
    assert choose(regexes=["1"]).name == "eth0"
    ext = choose(regexes=[r"^192\.168\."])
    assert ext.name == "eth1" and ext.ip == A("192.168.5.5")
    assert choose(regexes=["^eth1$"]).name == "eth1"


def test_can_reach_uses_route_get_interface_only_without_iface_flags():
    snap = HostSnapshot(SNAP.links, default_index=2, reach_indexes=(3,))
    assert choose(can_reach="192.168.5.1", snap=snap).name == "eth1"
    assert choose(ifaces=["eth0"], can_reach="192.168.5.1", snap=snap).name == "eth0"


def test_nothing_matches_names_what_was_asked_and_what_exists():
    with pytest.raises(FlannelError) as info:
        choose(ifaces=["eth9"], regexes=["^zz"])
    msg = str(info.value)
    assert "-iface=eth9" in msg and "-iface-regex=^zz" in msg
    assert "lo (127.0.0.1)" in msg and "eth0 (10.0.0.1, 10.0.0.2)" in msg and "wg0" in msg


def test_interface_without_ipv4_or_mtu_is_an_error():
    with pytest.raises(FlannelError, match="wg0"):
        choose(ifaces=["wg0"])
    with pytest.raises(FlannelError, match="no interface matches -iface=nomtu"):
        choose(ifaces=["nomtu"])
    with pytest.raises(FlannelError, match="MTU for interface nomtu"):
        choose(snap=HostSnapshot(SNAP.links, default_index=5))


def test_no_default_route_and_no_route_to_can_reach():
    with pytest.raises(FlannelError, match="no IPv4 default route"):
        choose(snap=HostSnapshot(SNAP.links))
    with pytest.raises(FlannelError, match="-iface-can-reach=10.9.9.9: no route"):
        choose(can_reach="10.9.9.9", snap=HostSnapshot(SNAP.links))


@pytest.mark.parametrize(
    "kw,flag",
    [
        (dict(iface_regexes=["eth[0"]), "-iface-regex=eth[0"),
        (dict(can_reach="10.0.0.300"), "-iface-can-reach=10.0.0.300"),
        (dict(can_reach="fe80::1"), "-iface-can-reach"),
        (dict(public_ip="nope"), "-public-ip=nope"),
    ],
)
def test_bad_flags_name_the_flag(kw, flag):
    args = dict(ifaces=[], iface_regexes=[], can_reach="", public_ip="")
    args.update(kw)
    with pytest.raises(FlannelError) as info:
        check_flags(**args)
    assert flag in str(info.value)


def test_vagrant_nat_address_warns(caplog):
    snap = HostSnapshot((LinkFacts("eth0", 2, 1500, (A("10.0.2.15"),)),), default_index=2)
    with caplog.at_level(logging.WARNING, logger="flannelpy.hostnet.interface"):
        choose(snap=snap)
    assert "Vagrant" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flannelpy.hostnet.interface"):
        choose()
    assert "Vagrant" not in caplog.text


# --- real kernel --------------------------------------------------------------------------


@pytest.mark.root
async def test_select_interface_in_namespace(root):
    ns = unique_name("fpvx")
    with namespaces(ns):
        # two underlays: up0 carries the default route, up1 reaches 10.77.0.0/16
        for i, (cidr, mtu) in enumerate((("192.168.70.2/24", 1400), ("172.30.1.2/24", 9000))):
            add_veth(ns, f"up{i}", ns, f"up{i}p", mtu=mtu)
            add_addr(ns, f"up{i}", cidr)
        add_addr(ns, "up1", "172.30.9.9/24")
        sh("ip", "-n", ns, "route", "add", "default", "via", "192.168.70.1", "dev", "up0")
        sh("ip", "-n", ns, "route", "add", "10.77.0.0/16", "via", "172.30.1.1", "dev", "up1")
        nl = NetlinkThread(netns=ns)
        try:
            ext = await select_interface(nl, [], [], "", "")
            assert (ext.name, ext.index, ext.ip, ext.mtu) == ("up0", ifindex(ns, "up0"), A("192.168.70.2"), 1400)

            ext = await select_interface(nl, ["up1"], [], "", "198.51.100.7")
            assert (ext.name, ext.ip, ext.public_ip, ext.mtu) == ("up1", A("172.30.1.2"), A("198.51.100.7"), 9000)

            ext = await select_interface(nl, ["172.30.9.9"], [], "", "")
            assert (ext.name, ext.ip) == ("up1", A("172.30.9.9"))

            ext = await select_interface(nl, [], [r"^172\.30\.9\."], "", "")
            assert (ext.name, ext.ip) == ("up1", A("172.30.9.9"))
            ext = await select_interface(nl, [], ["^up1$"], "", "")
            assert (ext.name, ext.ip) == ("up1", A("172.30.1.2"))

            ext = await select_interface(nl, [], [], "10.77.3.4", "")
            assert ext.name == "up1"
            ext = await select_interface(nl, [], [], "8.8.8.8", "")
            assert ext.name == "up0"

            with pytest.raises(FlannelError) as info:
                await select_interface(nl, ["eth9"], [], "", "")
            assert "eth9" in str(info.value) and "up0 (192.168.70.2)" in str(info.value)
            with pytest.raises(FlannelError, match="-iface-regex"):
                await select_interface(nl, [], ["("], "", "")

            sh("ip", "-n", ns, "route", "del", "default")
            with pytest.raises(FlannelError, match="no IPv4 default route"):
                await select_interface(nl, [], [], "", "")
            with pytest.raises(FlannelError, match="no route to 8.8.8.8"):
                await select_interface(nl, [], [], "8.8.8.8", "")
        finally:
            nl.stop()
