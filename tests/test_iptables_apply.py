"""IptablesManager against real iptables, inside network namespaces named fpip-<rand>."""

import logging
import secrets
import shlex
import subprocess
from ipaddress import IPv4Network as N

import pytest
import trio

from flannelpy.errors import FlannelError
from flannelpy.hostnet import iptables_rules as R
from flannelpy.hostnet.iptables import MISSING_MSG, IptablesManager

pytestmark = pytest.mark.root

NET, POD, OLD_POD = N("10.5.0.0/16"), N("10.5.72.0/24"), N("10.5.9.0/24")


def sh(*args, check=True):
    return subprocess.run(args, check=check, capture_output=True, text=True)


def in_ns(ns, *args, check=True):
    return sh("nsenter", f"--net=/var/run/netns/{ns}", *args, check=check)


@pytest.fixture
def netns(root):
    """Factory of namespaces; every one created is deleted afterwards."""
    made = []
    tag = secrets.token_hex(3)

    def make(suffix=""):
        name = f"fpip-{tag}{suffix}"
        sh("ip", "netns", "add", name)
        made.append(name)
        return name

    yield make
    for name in made:
        sh("ip", "netns", "del", name, check=False)


def save(ns):
    return R.parse_save(in_ns(ns, "iptables-save").stdout)


def chain(ns, table, name):
    return save(ns).chain(table, name)


def mgr(ns, subnet=POD, **kw):
    kw.setdefault("masq", True)
    kw.setdefault("forward", True)
    return IptablesManager(NET, subnet, resync_s=kw.pop("resync_s", 1), netns=ns, **kw)


def want(rules, chain_name):
    return [r.spec_text for r in rules if r.chain == chain_name]


async def test_rules_present_after_ensure(netns):
    ns = netns()
    m = mgr(ns)
    assert await m.ensure()
    masq = R.masq_rules(NET, POD, random_fully=True)  # iptables 1.8 supports --random-fully
    fwd = R.forward_rules(NET)
    assert chain(ns, "nat", "FLANNEL-POSTRTG") == want(masq, "FLANNEL-POSTRTG")
    assert chain(ns, "nat", "POSTROUTING") == want(masq, "POSTROUTING")
    assert chain(ns, "filter", "FLANNEL-FWD") == want(fwd, "FLANNEL-FWD")
    assert chain(ns, "filter", "FORWARD") == want(fwd, "FORWARD")
    assert await m.missing() == []
    # a second manager (agent restart) finds everything in place and in order: it writes nothing
    again = mgr(ns)
    assert not await again.ensure() and again.applied == 0
    # one that finds our rules out of order (or a jump twice) rebuilds, without duplicating the jumps
    first = want(masq, "FLANNEL-POSTRTG")[0]
    in_ns(ns, "iptables", "-t", "nat", "-D", "FLANNEL-POSTRTG", *shlex.split(first))
    in_ns(ns, "iptables", "-t", "nat", "-A", "FLANNEL-POSTRTG", *shlex.split(first))
    in_ns(ns, "iptables", "-A", "FORWARD", *shlex.split(want(fwd, "FORWARD")[0]))
    assert await m.missing() == []
    assert await mgr(ns).ensure()
    assert chain(ns, "nat", "FLANNEL-POSTRTG") == want(masq, "FLANNEL-POSTRTG")
    assert chain(ns, "nat", "POSTROUTING") == want(masq, "POSTROUTING")
    assert chain(ns, "filter", "FORWARD") == want(fwd, "FORWARD")


async def test_random_fully_can_be_disabled(netns):
    ns = netns()
    await mgr(ns, random_fully_disable=True, forward=False).ensure()
    assert chain(ns, "nat", "FLANNEL-POSTRTG") == want(R.masq_rules(NET, POD, random_fully=False), "FLANNEL-POSTRTG")
    assert chain(ns, "filter", "FLANNEL-FWD") is None


async def test_deleted_rule_comes_back_after_one_resync(netns, caplog):
    ns = netns()
    m = mgr(ns, resync_s=1)
    caplog.set_level(logging.WARNING, logger="flannelpy.hostnet.iptables")
    async with trio.open_nursery() as nursery:
        await nursery.start(m.run)
        before = m.applied
        in_ns(ns, "iptables", "-t", "nat", "-D", "FLANNEL-POSTRTG", "-s", str(NET), "-d", str(POD),
              "-m", "comment", "--comment", "flanneld masq", "-j", "RETURN")
        in_ns(ns, "iptables", "-D", "FORWARD", "-m", "comment", "--comment", "flanneld forward", "-j", "FLANNEL-FWD")
        assert len(await m.missing()) == 2
        with trio.fail_after(30):  # guard against a hang, not a timing assertion
            while m.applied == before:
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert await m.missing() == []
    assert chain(ns, "nat", "FLANNEL-POSTRTG") == want(R.masq_rules(NET, POD, random_fully=True), "FLANNEL-POSTRTG")
    assert any(MISSING_MSG in r.getMessage() for r in caplog.records)


async def test_previous_subnet_and_legacy_rules_removed(netns):
    ns = netns()
    await mgr(ns, subnet=OLD_POD).ensure()
    # what a pre-v0.20 flanneld left straight in POSTROUTING / FORWARD
    in_ns(ns, "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", str(NET), "-d", str(NET), "-j", "RETURN")
    in_ns(ns, "iptables", "-t", "nat", "-A", "POSTROUTING", "!", "-s", str(NET), "-d", str(OLD_POD), "-j", "RETURN")
    in_ns(ns, "iptables", "-A", "FORWARD", "-s", str(NET), "-m", "comment", "--comment", "flanneld forward", "-j", "ACCEPT")
    in_ns(ns, "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "192.168.0.0/16", "-j", "MASQUERADE")  # not ours

    m = mgr(ns, previous_network=NET, previous_subnet=OLD_POD)
    deleted = await m.cleanup_previous()
    old = R.masq_rules(NET, OLD_POD, random_fully=True)
    assert deleted[: len(old)] == old  # the previous subnet's rules, jump included
    assert sorted(r.chain for r in deleted[len(old) :]) == ["FORWARD", "POSTROUTING", "POSTROUTING"]  # legacy
    await m.ensure()
    text = in_ns(ns, "iptables-save").stdout
    assert str(OLD_POD) not in text
    assert chain(ns, "nat", "POSTROUTING") == ["-s 192.168.0.0/16 -j MASQUERADE"] + want(
        R.masq_rules(NET, POD, random_fully=True), "POSTROUTING"
    )
    assert chain(ns, "filter", "FORWARD") == want(R.forward_rules(NET), "FORWARD")
    assert chain(ns, "nat", "FLANNEL-POSTRTG") == want(R.masq_rules(NET, POD, random_fully=True), "FLANNEL-POSTRTG")


async def test_docker_user_rule_inserted_once_and_administrators_rules_keep_precedence(netns):
    ns = netns()
    in_ns(ns, "iptables", "-N", "DOCKER-USER")
    in_ns(ns, "iptables", "-A", "DOCKER-USER", "-j", "RETURN")
    in_ns(ns, "iptables", "-A", "FORWARD", "-j", "DOCKER-USER")
    m = mgr(ns, masq=False)
    await m.ensure()
    # what flannelpy put there before issue #15: an unconditional jump overriding Docker's decisions
    in_ns(ns, "iptables", "-I", "DOCKER-USER", "1", "-m", "comment", "--comment", "flanneld forward", "-j", "FLANNEL-FWD")
    assert await m.cleanup_previous() == [R.LEGACY_DOCKER_USER_JUMP]
    ours = R.docker_user_rule(NET).spec_text
    assert chain(ns, "filter", "DOCKER-USER") == [ours, "-j RETURN"]
    # the administrator inserts a DROP above ours: it stays above, through resyncs and rebuilds
    in_ns(ns, "iptables", "-I", "DOCKER-USER", "1", "-s", "10.5.9.7", "-j", "DROP")
    assert await m.missing() == []
    assert not await m.ensure()
    in_ns(ns, "iptables", "-F", "FLANNEL-FWD")  # forces a rebuild
    assert await m.ensure()
    assert chain(ns, "filter", "DOCKER-USER") == ["-s 10.5.9.7/32 -j DROP", ours, "-j RETURN"]
    # ours deleted: back in, once, before Docker's closing RETURN
    in_ns(ns, "iptables", "-D", "DOCKER-USER", *shlex.split(ours))
    assert await m.missing() != []
    assert await m.ensure()
    assert chain(ns, "filter", "DOCKER-USER") == [ours, "-s 10.5.9.7/32 -j DROP", "-j RETURN"]
    assert not await m.ensure()


async def test_forward_policy_drop_still_forwards_overlay(netns):
    """a (10.5.1.2) -- router (FORWARD policy DROP) -- b (10.5.2.2): our rules let the ping through."""
    r, a, b = netns("r"), netns("a"), netns("b")
    tag = r[5:11]
    for side, last in ((a, 1), (b, 2)):
        dev_r, dev_x = f"fpip{tag}r{last}", f"fpip{tag}x{last}"
        sh("ip", "link", "add", dev_r, "netns", r, "type", "veth", "peer", "name", dev_x, "netns", side)
        in_ns(r, "ip", "addr", "add", f"10.5.{last}.1/24", "dev", dev_r)
        in_ns(r, "ip", "link", "set", dev_r, "up")
        in_ns(side, "ip", "addr", "add", f"10.5.{last}.2/24", "dev", dev_x)
        in_ns(side, "ip", "link", "set", dev_x, "up")
        in_ns(side, "ip", "route", "add", "default", "via", f"10.5.{last}.1")
    in_ns(r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    in_ns(r, "iptables", "-P", "FORWARD", "DROP")
    assert in_ns(a, "busybox", "ping", "-c1", "-W1", "10.5.2.2", check=False).returncode != 0  # DROP really drops
    await mgr(r, masq=False).ensure()
    assert in_ns(a, "busybox", "ping", "-c3", "-W2", "10.5.2.2", check=False).returncode == 0


async def test_missing_iptables_is_a_clear_error(netns, monkeypatch, tmp_path):
    ns = netns()
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FlannelError, match="iptables not found in PATH"):
        await mgr(ns).ensure()


@pytest.mark.docker
@pytest.mark.slow
async def test_with_real_dockerd_our_rule_is_in_docker_user_before_its_return(netns, tmp_path):
    from dockerd import Dockerd

    from flannelpy.docker.daemon_json import update_daemon_json

    ns = netns()
    workdir = f"/tmp/{ns}"
    update_daemon_json(f"{workdir}/daemon.json", "10.5.72.1/24", 1450)
    with Dockerd(ns, workdir, f"{workdir}/daemon.json"):
        m = mgr(ns)
        await m.ensure()
        forward = chain(ns, "filter", "FORWARD")
        assert forward[0] == "-j DOCKER-USER"  # Docker's jump first, so ours in DOCKER-USER runs first
        assert chain(ns, "filter", "DOCKER-USER") == [R.docker_user_rule(NET).spec_text, "-j RETURN"]
        assert await m.missing() == []


async def test_two_networks_in_one_namespace_keep_each_others_rules(netns):
    """Two flanneld instances (different -etcd-prefix and Network) in one namespace: each
    resync leaves the other's rules alone, so neither rebuilds after the first batch."""
    ns = netns()
    net_b, pod_b = N("10.6.0.0/16"), N("10.6.3.0/24")
    a = mgr(ns, resync_s=1)
    b = IptablesManager(net_b, pod_b, masq=True, forward=True, resync_s=1, netns=ns)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await nursery.start(b.run)
        settled = (a.applied, b.applied)
        await trio.sleep(3.5)  # three resyncs of each
        assert (a.applied, b.applied) == settled, "a resync rebuilt the chains: the instances fight"
        assert await a.missing() == [] and await b.missing() == []
        # someone deletes one of a's rules: a rebuilds, b's rules are there throughout
        in_ns(ns, "iptables", "-D", "FLANNEL-FWD", "-s", str(NET), "-m", "comment", "--comment", "flanneld forward",
              "-j", "ACCEPT")
        with trio.fail_after(30):
            while a.applied == settled[0]:
                await trio.sleep(0.1)
        assert await a.missing() == [] and await b.missing() == []
        nursery.cancel_scope.cancel()
    fwd = chain(ns, "filter", "FLANNEL-FWD")
    assert sorted(fwd) == sorted(want(R.forward_rules(NET), "FLANNEL-FWD") + want(R.forward_rules(net_b), "FLANNEL-FWD"))
    post = chain(ns, "nat", "FLANNEL-POSTRTG")
    assert len(post) == len(set(post)) == 11
    assert chain(ns, "nat", "POSTROUTING").count(R.masq_rules(NET, POD, random_fully=True)[0].spec_text) == 1


async def test_a_start_that_read_its_rules_in_place_before_the_lease_runs_nothing_after_it(netns, monkeypatch):
    """TablesBeforeLease: the tables read before the lease.  When they hold our rules in place and
    in order (a restart), apply_at_start neither reads again nor writes; when something is
    missing, the usual locked path runs and puts it back."""
    from flannelpy.hostnet.iptables import TablesBeforeLease

    ns = netns()
    assert await mgr(ns).ensure()
    reads = []
    real_save = IptablesManager.save

    async def counted_save(self):
        reads.append(1)
        return await real_save(self)

    monkeypatch.setattr(IptablesManager, "save", counted_save)
    before = TablesBeforeLease(ns)
    await before.read()
    assert before.error is None
    # the version comes from iptables-save's header line, and it is the one `iptables --version` names
    assert R.parse_version(before.version) == R.parse_version(in_ns(ns, "iptables", "--version").stdout)
    restart = mgr(ns)
    await restart.apply_at_start(before)
    assert (restart.applied, reads) == (0, [])
    assert await restart.missing() == []

    # a read older than BEFORE_LEASE_MAX_AGE_S when the lease came (etcd was slow) is not trusted
    before.read_at -= 10
    late = mgr(ns)
    await late.apply_at_start(before)
    assert reads and late.applied == 0  # read again under the lock: nothing to write
    reads.clear()

    # a rule gone before the start read the tables: the usual path, which restores it
    in_ns(ns, "iptables", "-D", "FORWARD", "-m", "comment", "--comment", "flanneld forward", "-j", "FLANNEL-FWD")
    before = TablesBeforeLease(ns)
    await before.read()
    reads.clear()
    again = mgr(ns)
    await again.apply_at_start(before)
    assert again.applied == 1 and reads
    assert await again.missing() == []


async def test_the_early_read_of_a_namespace_without_tables_asks_iptables_for_its_version(netns):
    """iptables-save prints nothing where no table exists yet (no header, so no version in it):
    the read then runs `iptables --version`, and the start puts every rule in place."""
    from flannelpy.hostnet.iptables import TablesBeforeLease

    ns = netns()
    assert in_ns(ns, "iptables-save").stdout == ""
    before = TablesBeforeLease(ns)
    await before.read()
    assert before.error is None and before.version == in_ns(ns, "iptables", "--version").stdout
    start = mgr(ns)
    await start.apply_at_start(before)
    assert start.applied == 1 and await start.missing() == []


async def test_a_rule_deleted_between_the_early_read_and_the_lease_comes_back_at_the_first_resync(netns):
    """The early read takes no lock, so the tables can change before the lease; what it then
    misses is what a resync catches, as for a rule deleted just after any start."""
    from flannelpy.hostnet.iptables import TablesBeforeLease

    ns = netns()
    assert await mgr(ns).ensure()
    before = TablesBeforeLease(ns)
    await before.read()
    in_ns(ns, "iptables", "-t", "nat", "-D", "POSTROUTING", "-m", "comment", "--comment", "flanneld masq",
          "-j", "FLANNEL-POSTRTG")
    m = mgr(ns, resync_s=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(m.run, before)
        assert m.applied == 0 and len(await m.missing()) == 1
        with trio.fail_after(30):  # guard against a hang, not a timing assertion
            while await m.missing():
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert m.applied == 1
