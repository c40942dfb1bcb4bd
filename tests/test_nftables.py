"""NftablesManager against the real `nft`, inside network namespaces named fpnf-<rand>."""

import logging
import secrets
import shlex
import shutil
import subprocess
import threading
from ipaddress import IPv4Network as N

import pytest
import trio

from flannelpy.errors import FlannelError
from flannelpy.hostnet import iptables_rules as IR
from flannelpy.hostnet import nftables_rules as R
from flannelpy.hostnet.iptables import IptablesManager
from flannelpy.hostnet.nftables import (
    DIFFERS_MSG,
    NftablesManager,
    check_tools,
    remove_flannel_tables,
)

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(shutil.which("nft") is None, reason="nft not installed (Debian package nftables)")]

NET, POD, OLD_POD = N("10.5.0.0/16"), N("10.5.72.0/24"), N("10.5.9.0/24")
NET_B, POD_B = N("10.6.0.0/16"), N("10.6.3.0/24")


def sh(*args, check=True, stdin=None):
    return subprocess.run(args, check=check, capture_output=True, text=True, input=stdin)


def in_ns(ns, *args, check=True, stdin=None):
    return sh("nsenter", f"--net=/var/run/netns/{ns}", *args, check=check, stdin=stdin)


@pytest.fixture
def netns(root):
    made = []
    tag = secrets.token_hex(3)

    def make(suffix=""):
        name = f"fpnf-{tag}{suffix}"
        sh("ip", "netns", "add", name)
        made.append(name)
        return name

    yield make
    for name in made:
        sh("ip", "netns", "del", name, check=False)


def mgr(ns, net=NET, subnet=POD, **kw):
    kw.setdefault("masq", True)
    kw.setdefault("forward", True)
    return NftablesManager(net, subnet, resync_s=kw.pop("resync_s", 1), netns=ns, **kw)


def listed(ns, family="ip", table="flannel-ipv4"):
    out = in_ns(ns, "nft", "list", "tables", family).stdout
    if table not in R.tables_in(out, family):
        return None
    return R.parse_listing(in_ns(ns, "nft", "list", "table", family, table).stdout)


def iptables_flannel(ns):
    """Every line of iptables-save naming flannel (chains, jumps, rules)."""
    return [ln for ln in in_ns(ns, "iptables-save").stdout.splitlines() if "FLANNEL" in ln or "flanneld" in ln]


async def test_listing_is_exactly_what_we_write(netns):
    """nft prints our rules back byte for byte: the comparison the resync relies on."""
    ns = netns()
    m = mgr(ns)
    assert await m.ensure()
    t = listed(ns)
    want = R.desired_ruleset(NET, POD, masq=True, forward=True, random_fully=True)
    for chain in want.chains:
        got = t.chains[chain.name]
        assert (got.header, got.comment_line, got.rules) == (chain.header, f'comment "{chain.comment}"', list(chain.rules))
    assert set(t.chains) == {"postrtg", "forward"}
    assert await m.missing() == []
    assert not await m.ensure()  # in place: no transaction
    await mgr(ns, random_fully_disable=True, forward=False).ensure()
    t = listed(ns)
    assert set(t.chains) == {"postrtg"} and t.chains["postrtg"].rules[-1].endswith("daddr 10.5.0.0/16 masquerade")


async def test_resync_brings_back_a_deleted_table_rule_or_policy(netns, caplog):
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
        in_ns(ns, "nft", "delete", "table", "ip", "flannel-ipv4")
        assert await m.missing() == ["table ip flannel-ipv4"]
        await wait_resync(before)

        handles = in_ns(ns, "nft", "-a", "list", "chain", "ip", "flannel-ipv4", "postrtg").stdout
        handle = next(ln.split("# handle ")[1] for ln in handles.splitlines() if "10.5.72.0/24 ip daddr 10.5.0.0/16" in ln)
        in_ns(ns, "nft", "delete", "rule", "ip", "flannel-ipv4", "postrtg", "handle", handle.strip())
        before = m.applied
        assert len(await m.missing()) == 1
        await wait_resync(before)

        in_ns(ns, "nft", "chain", "ip", "flannel-ipv4", "forward", "{ policy drop ; }")
        before = m.applied
        assert await m.missing()
        await wait_resync(before)
        nursery.cancel_scope.cancel()
    assert listed(ns).chains["forward"].header == R.FWD_HEADER
    assert sum(DIFFERS_MSG in r.getMessage() for r in caplog.records) == 3


async def test_replace_is_atomic(netns):
    """While the table is replaced over and over, every listing taken meanwhile shows all rules;
    and a transaction that fails half-way leaves the previous table as it was."""
    ns = netns()
    m = mgr(ns)
    await m.ensure()
    want = R.desired_ruleset(NET, POD, masq=True, forward=True, random_fully=True)
    seen: list[bool] = []
    lacking: list[str] = []  # what a listing without all rules showed (for the failure message)
    errors: list[str] = []  # listings nft itself could not make (not about the table)
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            proc = in_ns(ns, "nft", "list", "table", "ip", "flannel-ipv4", check=False)
            if proc.returncode != 0 and "No such file or directory" not in proc.stderr:
                # nft could not list at all (interrupted or busy under load): says nothing about the table.
                # A missing table ("No such file or directory") does count: a replace must never remove it.
                errors.append(proc.stderr.strip())
                continue
            t = R.parse_listing(proc.stdout) if proc.stdout.strip() else None
            ok = t is not None and R.differences(want, t) == []
            seen.append(ok)
            if not ok:
                lacking.append(f"rc={proc.returncode} stderr={proc.stderr.strip()!r} stdout={proc.stdout[:400]!r}")

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(60):
            m._bootstrapped = False  # force a full replace each time
            assert await m.ensure()
    finally:
        stop.set()
        watcher.join()
    assert len(seen) > 20 and all(seen), f"{seen.count(False)} of {len(seen)} listings lacked rules: {lacking[:3]}"
    assert len(errors) <= len(seen) // 10, f"nft list failed {len(errors)} times: {errors[:3]}"

    before = in_ns(ns, "nft", "list", "table", "ip", "flannel-ipv4").stdout
    broken = R.Ruleset("ip", "flannel-ipv4", (R.Chain("forward", R.FWD_HEADER, "x", ("ip saddr 10.7.0.0/16 accept",
                                                                                       "ip saddr nonsense accept")),))
    with pytest.raises(FlannelError, match="nft -f - failed"):
        await m._apply(R.apply_script(broken, None))
    assert in_ns(ns, "nft", "list", "table", "ip", "flannel-ipv4").stdout == before


async def test_previous_subnet_rules_go_and_another_instances_stay(netns):
    ns = netns()
    await mgr(ns, subnet=OLD_POD).ensure()
    b = mgr(ns, NET_B, POD_B)
    await b.ensure()
    a = mgr(ns)
    await a.ensure()
    text = in_ns(ns, "nft", "list", "table", "ip", "flannel-ipv4").stdout
    assert "10.5.9.0/24" not in text
    assert await a.missing() == [] and await b.missing() == []
    # neither resync rebuilds: the two do not fight over the shared table
    assert not await a.ensure() and not await b.ensure()
    # removing a keeps b's rules, then removing b takes the table
    assert await a.remove()
    assert await b.missing() == [] and "10.5." not in in_ns(ns, "nft", "list", "table", "ip", "flannel-ipv4").stdout
    assert await b.remove()
    assert listed(ns) is None


async def test_remove_takes_the_table_and_an_empty_ipv6_table(netns):
    ns = netns()
    m = mgr(ns)
    assert not await m.remove()  # nothing there
    await m.ensure()
    in_ns(ns, "nft", "add", "table", "ip6", "flannel-ipv6")  # what flanneld >= 0.25 makes without IPv6
    assert await m.remove()
    assert listed(ns) is None and listed(ns, "ip6", "flannel-ipv6") is None
    # an IPv6 table with rules in it is not ours to remove yet
    in_ns(ns, "nft", "-f", "-", stdin="table ip6 flannel-ipv6 {\nchain forward {\n"
                                     "type filter hook forward priority filter; policy accept;\n"
                                     "ip6 saddr fd42::/48 accept\n}\n}\n")
    assert not await m.remove()
    assert listed(ns, "ip6", "flannel-ipv6").chains["forward"].rules == ["ip6 saddr fd42::/48 accept"]


async def test_switch_iptables_nftables_iptables_leaves_nothing_behind(netns):
    ns = netns()
    ipt = IptablesManager(NET, POD, masq=True, forward=True, resync_s=1, netns=ns)
    other = IptablesManager(NET_B, POD_B, masq=True, forward=True, resync_s=1, netns=ns)
    await ipt.ensure()
    lines_alone = iptables_flannel(ns)
    await other.ensure()
    others = [ln for ln in iptables_flannel(ns) if "10.6." in ln]

    # to nftables: ours leave iptables, the other instance's rules and chains stay
    async with trio.open_nursery() as nursery:
        await nursery.start(mgr(ns).run)
        nursery.cancel_scope.cancel()
    assert await mgr(ns).missing() == []
    assert [ln for ln in iptables_flannel(ns) if "10.5." in ln] == []
    assert [ln for ln in iptables_flannel(ns) if "10.6." in ln] == others
    assert await other.missing() == []

    # the other instance switches too: no flannel chain or jump is left in iptables
    async with trio.open_nursery() as nursery:
        await nursery.start(mgr(ns, NET_B, POD_B).run)
        nursery.cancel_scope.cancel()
    assert iptables_flannel(ns) == []

    # and both back to iptables: the tables go, the iptables rules are as before
    ipt2 = IptablesManager(NET, POD, masq=True, forward=True, resync_s=1, netns=ns)
    await ipt2.ensure()
    assert await remove_flannel_tables(NET, POD, netns=ns)
    assert listed(ns) is not None  # the other instance's rules are still in it
    await IptablesManager(NET_B, POD_B, masq=True, forward=True, resync_s=1, netns=ns).ensure()
    assert await remove_flannel_tables(NET_B, POD_B, netns=ns)
    assert listed(ns) is None
    assert "flannel" not in in_ns(ns, "nft", "list", "tables").stdout
    assert sorted(ln for ln in iptables_flannel(ns) if "10.6." not in ln) == sorted(lines_alone)


async def test_masquerade_works_through_the_table(netns):
    """container (10.5.72.2) -- router (our table) -- outside (198.18.0.2, no route back to 10.5/16):
    the ping is answered only if the router masquerades it."""
    r, c, o = netns("r"), netns("c"), netns("o")
    tag = r[5:11]
    for side, addr_r, addr_x in ((c, "10.5.72.1/24", "10.5.72.2/24"), (o, "198.18.0.1/24", "198.18.0.2/24")):
        dev_r, dev_x = f"fpnf{tag}{side[-1]}r", f"fpnf{tag}{side[-1]}x"
        sh("ip", "link", "add", dev_r, "netns", r, "type", "veth", "peer", "name", dev_x, "netns", side)
        in_ns(r, "ip", "addr", "add", addr_r, "dev", dev_r)
        in_ns(r, "ip", "link", "set", dev_r, "up")
        in_ns(side, "ip", "addr", "add", addr_x, "dev", dev_x)
        in_ns(side, "ip", "link", "set", dev_x, "up")
    in_ns(c, "ip", "route", "add", "default", "via", "10.5.72.1")
    in_ns(r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    assert in_ns(c, "busybox", "ping", "-c1", "-W1", "198.18.0.2", check=False).returncode != 0  # no way back
    await mgr(r, forward=False).ensure()
    assert in_ns(c, "busybox", "ping", "-c2", "-W2", "198.18.0.2", check=False).returncode == 0
    # and off again: masquerading was what made the difference (a new ping is a new conntrack entry)
    await mgr(r).remove()
    assert in_ns(c, "busybox", "ping", "-c1", "-W1", "198.18.0.2", check=False).returncode != 0


async def test_missing_nft_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FlannelError, match="^EnableNFTables: nft not found in PATH; install nftables"):
        check_tools()


async def test_docker_user_keeps_our_rule_in_nftables_mode(netns):
    """Docker's iptables FORWARD drops are not overruled by an nftables accept, so where DOCKER-USER
    exists our one Network-to-Network rule stays there in nftables mode too, and comes back."""
    ns = netns()
    in_ns(ns, "iptables", "-N", "DOCKER-USER")
    in_ns(ns, "iptables", "-A", "DOCKER-USER", "-j", "RETURN")
    in_ns(ns, "iptables", "-A", "FORWARD", "-j", "DOCKER-USER")
    ours = IR.docker_user_rule(NET).spec_text
    m = mgr(ns, resync_s=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(m.run)
        assert docker_user(ns) == [ours, "-j RETURN"]
        in_ns(ns, "iptables", "-D", "DOCKER-USER", *shlex.split(ours))
        with trio.fail_after(30):
            while docker_user(ns) != [ours, "-j RETURN"]:
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert not await mgr(ns, forward=False).ensure_docker_user()  # only with forward rules
    assert [ln for ln in iptables_flannel(ns) if "DOCKER-USER" not in ln] == []


def docker_user(ns):
    return IR.parse_save(in_ns(ns, "iptables-save", "-t", "filter").stdout).chain("filter", "DOCKER-USER")


async def test_nftables_accept_does_not_beat_dockers_drop_but_the_docker_user_rule_does(netns):
    """a (10.5.1.2) -- router -- b (10.5.2.2); the router's iptables FORWARD is Docker's shape
    (policy DROP, a jump to DOCKER-USER that RETURNs).  Our nftables forward chain accepts, yet the
    ping is dropped (every base chain sees the packet); our DOCKER-USER rule lets it through."""
    r, a, b = netns("r"), netns("a"), netns("b")
    tag = r[5:11]
    for side, last in ((a, 1), (b, 2)):
        dev_r, dev_x = f"fpnf{tag}r{last}", f"fpnf{tag}x{last}"
        sh("ip", "link", "add", dev_r, "netns", r, "type", "veth", "peer", "name", dev_x, "netns", side)
        in_ns(r, "ip", "addr", "add", f"10.5.{last}.1/24", "dev", dev_r)
        in_ns(r, "ip", "link", "set", dev_r, "up")
        in_ns(side, "ip", "addr", "add", f"10.5.{last}.2/24", "dev", dev_x)
        in_ns(side, "ip", "link", "set", dev_x, "up")
        in_ns(side, "ip", "route", "add", "default", "via", f"10.5.{last}.1")
    in_ns(r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    in_ns(r, "iptables", "-N", "DOCKER-USER")
    in_ns(r, "iptables", "-A", "DOCKER-USER", "-j", "RETURN")
    in_ns(r, "iptables", "-A", "FORWARD", "-j", "DOCKER-USER")
    in_ns(r, "iptables", "-P", "FORWARD", "DROP")
    m = mgr(r, masq=False)
    assert await m.ensure() and await m.missing() == []
    assert in_ns(a, "busybox", "ping", "-c1", "-W1", "10.5.2.2", check=False).returncode != 0
    assert await m.ensure_docker_user()
    assert in_ns(a, "busybox", "ping", "-c3", "-W2", "10.5.2.2", check=False).returncode == 0
