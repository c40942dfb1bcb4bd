"""NftablesManager for IPv6Network (EnableIPv6 with EnableNFTables, issue #14) against the real `nft`
and ip6tables, inside network namespaces named fpnf-<rand>: table ip6 flannel-ipv6 beside
ip flannel-ipv4, resync, another instance's rules, the switch from and back to ip6tables, and IPv6
masquerading through the table."""

import logging
import shutil
from ipaddress import IPv4Network
from ipaddress import IPv6Network as N6

import pytest
import test_nftables as _v4
import trio

from flannelpy.hostnet import iptables_rules as IR
from flannelpy.hostnet import nftables_rules as R
from flannelpy.hostnet.iptables import IptablesManager
from flannelpy.hostnet.nftables import (
    NftablesManager,
    differs_msg,
    remove_flannel_tables,
)

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(shutil.which("nft") is None, reason="nft not installed (Debian package nftables)")]

NET6, POD6, OLD_POD6 = N6("fd42::/48"), N6("fd42:0:0:1f::/64"), N6("fd42:0:0:9::/64")
NET6_B, POD6_B = N6("fd43::/48"), N6("fd43:0:0:3::/64")
NET, POD = IPv4Network("10.5.0.0/16"), IPv4Network("10.5.72.0/24")

# the IPv4 tests' helpers and namespace fixture (fpnf-<rand>), not a copy of them
sh, in_ns, netns = _v4.sh, _v4.in_ns, _v4.netns


def mgr(ns, net=NET6, subnet=POD6, **kw):
    kw.setdefault("masq", True)
    kw.setdefault("forward", True)
    return NftablesManager(net, subnet, resync_s=kw.pop("resync_s", 1), netns=ns, **kw)


def listed(ns, family="ip6", table="flannel-ipv6"):
    if table not in R.tables_in(in_ns(ns, "nft", "list", "tables", family).stdout, family):
        return None
    return R.parse_listing(in_ns(ns, "nft", "list", "table", family, table).stdout)


def xtables_flannel(ns, tool="ip6tables"):
    """Every line of ip6tables-save (iptables-save) naming flannel (chains, jumps, rules)."""
    return [ln for ln in in_ns(ns, f"{tool}-save").stdout.splitlines() if "FLANNEL" in ln or "flanneld" in ln]


async def test_ipv6_table_is_exactly_what_we_write_beside_the_ipv4_table(netns):
    ns = netns()
    v4, v6 = mgr(ns, NET, POD), mgr(ns)
    assert (v6.family, v6.table, v6.xtables) == ("ip6", "flannel-ipv6", "ip6tables")
    assert await v4.ensure() and await v6.ensure()
    want = R.desired_ruleset(NET6, POD6, masq=True, forward=True, random_fully=True)
    t = listed(ns)
    assert set(t.chains) == {"postrtg", "forward"}
    for chain in want.chains:
        got = t.chains[chain.name]
        assert (got.header, got.comment_line, got.rules) == (chain.header, f'comment "{chain.comment}"',
                                                             list(chain.rules))
    assert await v6.missing() == [] and await v4.missing() == []
    assert not await v6.ensure()  # in place: no transaction
    assert "fd42" not in in_ns(ns, "nft", "list", "table", "ip", "flannel-ipv4").stdout
    # removing one family's table leaves the other's alone
    assert await v6.remove()
    assert listed(ns) is None and await v4.missing() == []
    await v6.ensure()
    assert await v4.remove()  # Network's manager: flannel-ipv6 holds our IPv6 rules, so it stays
    assert listed(ns, "ip", "flannel-ipv4") is None and await v6.missing() == []


async def test_ipv6_resync_brings_back_a_deleted_table_and_rule(netns, caplog):
    ns = netns()
    m = mgr(ns, resync_s=1)
    caplog.set_level(logging.WARNING, logger="flannelpy.hostnet.nftables")

    async def wait_resync(before):
        with trio.fail_after(30):  # a hang guard, not a timing assertion
            while m.applied == before or await m.missing():
                await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        await nursery.start(m.run)
        before = m.applied
        in_ns(ns, "nft", "delete", "table", "ip6", "flannel-ipv6")
        assert await m.missing() == ["table ip6 flannel-ipv6"]
        await wait_resync(before)

        handles = in_ns(ns, "nft", "-a", "list", "chain", "ip6", "flannel-ipv6", "postrtg").stdout
        handle = next(ln.split("# handle ")[1] for ln in handles.splitlines() if "daddr != ff00::/8" in ln)
        in_ns(ns, "nft", "delete", "rule", "ip6", "flannel-ipv6", "postrtg", "handle", handle.strip())
        before = m.applied
        assert len(await m.missing()) == 1
        await wait_resync(before)
        nursery.cancel_scope.cancel()
    assert sum(differs_msg("flannel-ipv6") in r.getMessage() for r in caplog.records) == 2
    assert listed(ns, "ip", "flannel-ipv4") is None  # the IPv6 manager never touches the IPv4 table


async def test_ipv6_previous_subnet_goes_and_another_instances_rules_stay(netns):
    ns = netns()
    await mgr(ns, subnet=OLD_POD6).ensure()
    b = mgr(ns, NET6_B, POD6_B)
    await b.ensure()
    a = mgr(ns)
    await a.ensure()
    text = in_ns(ns, "nft", "list", "table", "ip6", "flannel-ipv6").stdout
    assert "fd42:0:0:9::" not in text and "fd43::/48" in text
    assert await a.missing() == [] and await b.missing() == []
    assert not await a.ensure() and not await b.ensure()  # they do not fight over the shared table
    assert await a.remove()
    assert await b.missing() == [] and "fd42:" not in in_ns(ns, "nft", "list", "table", "ip6", "flannel-ipv6").stdout
    assert await b.remove()
    assert listed(ns) is None


async def test_switch_ip6tables_nftables_ip6tables_leaves_nothing_behind(netns):
    ns = netns()
    ipt = IptablesManager(NET6, POD6, masq=True, forward=True, resync_s=1, netns=ns)
    other = IptablesManager(NET6_B, POD6_B, masq=True, forward=True, resync_s=1, netns=ns)
    ipt4 = IptablesManager(NET, POD, masq=True, forward=True, resync_s=1, netns=ns)
    await ipt.ensure()
    await ipt4.ensure()
    lines_alone = xtables_flannel(ns)
    v4_lines = xtables_flannel(ns, "iptables")
    await other.ensure()
    others = [ln for ln in xtables_flannel(ns) if "fd43:" in ln]

    # to nftables: ours leave ip6tables, the other instance's rules and chains stay, iptables is untouched
    async with trio.open_nursery() as nursery:
        await nursery.start(mgr(ns).run)
        nursery.cancel_scope.cancel()
    assert await mgr(ns).missing() == []
    assert [ln for ln in xtables_flannel(ns) if "fd42:" in ln] == []
    assert [ln for ln in xtables_flannel(ns) if "fd43:" in ln] == others
    assert await other.missing() == [] and xtables_flannel(ns, "iptables") == v4_lines

    # the other instance switches too: no flannel chain or jump is left in ip6tables
    async with trio.open_nursery() as nursery:
        await nursery.start(mgr(ns, NET6_B, POD6_B).run)
        nursery.cancel_scope.cancel()
    assert xtables_flannel(ns) == []

    # and both back to ip6tables: the table goes, the ip6tables rules are as before
    await IptablesManager(NET6, POD6, masq=True, forward=True, resync_s=1, netns=ns).ensure()
    assert await remove_flannel_tables(NET6, POD6, netns=ns)
    assert listed(ns) is not None  # the other instance's rules are still in it
    await IptablesManager(NET6_B, POD6_B, masq=True, forward=True, resync_s=1, netns=ns).ensure()
    assert await remove_flannel_tables(NET6_B, POD6_B, netns=ns)
    assert listed(ns) is None
    assert "flannel" not in in_ns(ns, "nft", "list", "tables").stdout
    assert sorted(ln for ln in xtables_flannel(ns) if "fd43:" not in ln) == sorted(lines_alone)
    assert xtables_flannel(ns, "iptables") == v4_lines


async def test_ipv6_masquerade_works_through_the_table(netns):
    """container (fd42:0:0:1f::2) -- router (our table) -- outside (fd98::2, no route back to fd42::/48):
    the ping is answered only if the router masquerades it."""
    r, c, o = netns("r"), netns("c"), netns("o")
    tag = r[5:11]
    for side, addr_r, addr_x in ((c, "fd42:0:0:1f::1/64", "fd42:0:0:1f::2/64"), (o, "fd98::1/64", "fd98::2/64")):
        dev_r, dev_x = f"fpn6{tag}{side[-1]}r", f"fpn6{tag}{side[-1]}x"
        sh("ip", "link", "add", dev_r, "netns", r, "type", "veth", "peer", "name", dev_x, "netns", side)
        in_ns(r, "ip", "addr", "add", addr_r, "dev", dev_r, "nodad")
        in_ns(r, "ip", "link", "set", dev_r, "up")
        in_ns(side, "ip", "addr", "add", addr_x, "dev", dev_x, "nodad")
        in_ns(side, "ip", "link", "set", dev_x, "up")
    in_ns(c, "ip", "-6", "route", "add", "default", "via", "fd42:0:0:1f::1")
    in_ns(r, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
    ping = ("busybox", "ping", "-6")
    assert in_ns(c, *ping, "-c1", "-W1", "fd98::2", check=False).returncode != 0  # no way back
    await mgr(r, forward=False).ensure()
    assert in_ns(c, *ping, "-c2", "-W2", "fd98::2", check=False).returncode == 0
    # and off again: masquerading was what made the difference (a new ping is a new conntrack entry)
    await mgr(r).remove()
    assert in_ns(c, *ping, "-c1", "-W1", "fd98::2", check=False).returncode != 0


async def test_ipv6_docker_user_rule_goes_to_ip6tables(netns):
    """Docker with IPv6 has DOCKER-USER in ip6tables too: our IPv6Network-to-IPv6Network accept goes
    there (an nftables accept cannot overrule Docker's drops), and iptables' chain is not touched."""
    ns = netns()
    for tool in ("ip6tables", "iptables"):
        in_ns(ns, tool, "-N", "DOCKER-USER")
        in_ns(ns, tool, "-A", "DOCKER-USER", "-j", "RETURN")
    m = mgr(ns, masq=False)
    assert await m.ensure_docker_user()
    chain6 = IR.parse_save(in_ns(ns, "ip6tables-save", "-t", "filter").stdout).chain("filter", "DOCKER-USER")
    chain4 = IR.parse_save(in_ns(ns, "iptables-save", "-t", "filter").stdout).chain("filter", "DOCKER-USER")
    assert chain6 == [IR.docker_user_rule(NET6).spec_text, "-j RETURN"] and chain4 == ["-j RETURN"]
    assert not await m.ensure_docker_user()  # in place
