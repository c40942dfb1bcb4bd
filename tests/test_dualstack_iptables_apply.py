"""IptablesManager for IPv6Network (EnableIPv6, issue #14): the same manager runs ip6tables-save and
ip6tables-restore, inside network namespaces named fpi6-<rand>, next to an IPv4 manager."""

import secrets
import subprocess
from ipaddress import IPv4Network, IPv6Network

import pytest
import trio

from flannelpy.hostnet import iptables_rules as R
from flannelpy.hostnet.iptables import IptablesManager

pytestmark = pytest.mark.root

NET6, POD6, OLD_POD6 = IPv6Network("fd42::/48"), IPv6Network("fd42:0:0:1f::/64"), IPv6Network("fd42:0:0:9::/64")
NET, POD = IPv4Network("10.42.0.0/16"), IPv4Network("10.42.63.0/24")


def in_ns(ns, *args):
    return subprocess.run(["nsenter", f"--net=/var/run/netns/{ns}", *args], check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture
def ns(root):
    name = f"fpi6-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


async def test_ipv6_manager_installs_flanneld_rules_with_ip6tables_only(ns):
    v4 = IptablesManager(NET, POD, masq=True, forward=True, netns=ns)
    v6 = IptablesManager(NET6, POD6, masq=True, forward=True, netns=ns, resync_s=1, previous_network=NET6,
                         previous_subnet=OLD_POD6)
    assert (v4.family, v6.family) == ("iptables", "ip6tables")
    # Rules an earlier run made for another IPv6 subnet: the clean-up removes them.
    old = IptablesManager(NET6, OLD_POD6, masq=True, forward=False, netns=ns)
    assert await old.ensure()
    assert "fd42:0:0:9::/64" in in_ns(ns, "ip6tables-save", "-t", "nat")
    async with trio.open_nursery() as nursery:
        await nursery.start(v4.run)
        await nursery.start(v6.run)
        saved6 = R.parse_save(in_ns(ns, "ip6tables-save"))
        saved4 = R.parse_save(in_ns(ns, "iptables-save"))
        want6 = R.desired_rules(NET6, POD6, masq=True, forward=True, random_fully=True)
        want4 = R.desired_rules(NET, POD, masq=True, forward=True, random_fully=True)
        assert R.missing_rules(want6, saved6) == [] and R.missing_rules(want4, saved4) == []
        text6 = in_ns(ns, "ip6tables-save")
        assert "fd42:0:0:9::/64" not in text6 and "10.42." not in text6
        assert "-A FLANNEL-POSTRTG -s fd42::/48 ! -d ff00::/8 -m comment --comment \"flanneld masq\" " \
               "-j MASQUERADE --random-fully" in text6
        assert "fd42" not in in_ns(ns, "iptables-save")
        # A rule deleted by hand comes back on the next resync, from ip6tables.
        in_ns(ns, "ip6tables", "-t", "filter", "-F", "FLANNEL-FWD")
        with trio.fail_after(30):
            while await v6.missing():
                await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
