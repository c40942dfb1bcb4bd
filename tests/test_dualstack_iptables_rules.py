"""ip6tables rules for a dual-stack network (issue #14): flanneld's masqIP6Rules and forward rules for
IPv6Network, as pure data; one root test feeds the payload to the real ip6tables-restore in a
namespace (fp6r-<rand>) and reads it back with ip6tables-save, byte for byte."""

import secrets
import shutil
import subprocess
from ipaddress import IPv4Network, IPv6Network

import pytest

from flannelpy.hostnet import iptables_rules as R

NET6, POD6 = IPv6Network("fd42::/48"), IPv6Network("fd42:0:0:1f::/64")
NET4, POD4 = IPv4Network("10.42.0.0/16"), IPv4Network("10.42.63.0/24")

MASQ6_RF = """\
-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s fd42:0:0:1f::/64 -d fd42::/48 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s fd42::/48 -d fd42:0:0:1f::/64 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG ! -s fd42::/48 -d fd42:0:0:1f::/64 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s fd42::/48 ! -d ff00::/8 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
-A FLANNEL-POSTRTG ! -s fd42::/48 -d fd42::/48 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
"""

FWD6 = """\
-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD
-A FLANNEL-FWD -s fd42::/48 -m comment --comment "flanneld forward" -j ACCEPT
-A FLANNEL-FWD -d fd42::/48 -m comment --comment "flanneld forward" -j ACCEPT
"""


def lines(rules):
    return "".join(r.line() + "\n" for r in rules)


def test_ipv6_masq_rules_match_flanneld_masqip6rules():
    assert lines(R.masq_rules(NET6, POD6, random_fully=True)) == MASQ6_RF
    assert lines(R.masq_rules(NET6, POD6, random_fully=False)) == MASQ6_RF.replace(" --random-fully", "")


def test_ipv6_forward_and_docker_user_rules():
    assert lines(R.forward_rules(NET6)) == FWD6
    assert R.docker_user_rule(NET6).line() == \
        '-A DOCKER-USER -s fd42::/48 -d fd42::/48 -m comment --comment "flanneld forward" -j ACCEPT'


def test_ipv4_rules_unchanged_by_the_family_switch():
    assert R.multicast_for(NET4) == "224.0.0.0/4" and R.multicast_for(NET6) == "ff00::/8"
    assert "! -d 224.0.0.0/4" in lines(R.masq_rules(NET4, POD4, random_fully=True))


def test_mixing_families_is_refused():
    with pytest.raises(ValueError, match="mix IPv4 and IPv6"):
        R.masq_rules(NET6, POD4, random_fully=True)
    with pytest.raises(ValueError, match="mix IPv4 and IPv6"):
        R.desired_rules(NET6, POD6, masq=True, forward=True, random_fully=True, previous_network=NET4)


def test_fresh_ipv6_payload():
    d = R.desired_rules(NET6, POD6, masq=True, forward=True, random_fully=True)
    assert R.restore_payload(d, R.SavedTables()) == (
        "*nat\n:FLANNEL-POSTRTG - [0:0]\n" + MASQ6_RF + "COMMIT\n" + "*filter\n:FLANNEL-FWD - [0:0]\n" + FWD6 + "COMMIT\n")


def test_another_instances_rules_are_kept_and_ours_recognised_across_families():
    saved = R.parse_save(
        "*nat\n:FLANNEL-POSTRTG - [0:0]\n"
        '-A FLANNEL-POSTRTG -s fd43::/48 -d fd43:0:0:5::/64 -m comment --comment "flanneld masq" -j RETURN\n'
        '-A FLANNEL-POSTRTG -s fd42:0:0:9::/64 -d fd42::/48 -m comment --comment "flanneld masq" -j RETURN\n'
        '-A FLANNEL-POSTRTG -s 10.42.0.0/16 -m comment --comment "flanneld masq" -j RETURN\n'
        "COMMIT\n")
    d = R.desired_rules(NET6, POD6, masq=True, forward=False, random_fully=True)
    foreign = R.foreign_rules(d, saved)
    # fd43:: is another flanneld's; our stale fd42:0:0:9:: rule is ours (rebuilt away); an IPv4 rule is
    # never "ours" for the IPv6 network (compared without a TypeError)
    assert [spec.split(" -m")[0] for _, _, spec in foreign] == ["-s fd43::/48 -d fd43:0:0:5::/64", "-s 10.42.0.0/16"]


def test_previous_ipv6_masq_rules_when_the_ipv6_subnet_changed():
    old = R.previous_masq_rules(NET6, IPv6Network("fd42:0:0:9::/64"), NET6, POD6)
    assert old and all("fd42:0:0:1f::" not in r.spec_text for r in old)
    assert any("-s fd42:0:0:9::/64 -d fd42::/48" in r.spec_text for r in old)
    assert R.previous_masq_rules(NET6, POD6, NET6, POD6) == []
    assert R.previous_masq_rules(NET4, POD4, NET6, POD6) == []  # the IPv4 file values are the other tool's


def test_pre_chain_flanneld_ipv6_rules_are_found():
    saved = R.parse_save(
        "*nat\n"
        "-A POSTROUTING -s fd42::/48 ! -d ff00::/8 -j MASQUERADE --random-fully\n"
        "-A POSTROUTING -s fd42::/48 ! -d 224.0.0.0/4 -j MASQUERADE\n"
        "COMMIT\n")
    found = R.legacy_rules(saved, [(NET6, POD6)])
    assert [r.spec_text for r in found] == ["-s fd42::/48 ! -d ff00::/8 -j MASQUERADE --random-fully"]


@pytest.mark.root
def test_ipv6_payload_round_trips_through_real_ip6tables(root):
    if not shutil.which("ip6tables-restore"):
        pytest.skip("ip6tables-restore is not installed")
    ns = f"fp6r-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        def in_ns(*args, stdin=None):
            return subprocess.run(["nsenter", f"--net=/var/run/netns/{ns}", *args], input=stdin,
                                  capture_output=True, text=True, check=True)

        d = R.desired_rules(NET6, POD6, masq=True, forward=True, random_fully=True)
        in_ns("ip6tables-restore", "--noflush", stdin=R.restore_payload(d, R.SavedTables()))
        saved = R.parse_save(in_ns("ip6tables-save").stdout)
        assert R.missing_rules(d, saved) == []
        got = "".join(f"-A {c} {spec}\n" for c in ("POSTROUTING", "FLANNEL-POSTRTG")
                      for spec in saved.chain("nat", c))
        assert got == MASQ6_RF
        assert "".join(f"-A {c} {spec}\n" for c in ("FORWARD", "FLANNEL-FWD") for spec in saved.chain("filter", c)) == FWD6
        # and a second pass against what is there changes nothing (no duplicate jump)
        in_ns("ip6tables-restore", "--noflush", stdin=R.restore_payload(d, saved))
        again = R.parse_save(in_ns("ip6tables-save").stdout)
        assert again.chain("nat", "POSTROUTING") == saved.chain("nat", "POSTROUTING")
        assert again.chain("nat", "FLANNEL-POSTRTG") == saved.chain("nat", "FLANNEL-POSTRTG")
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
