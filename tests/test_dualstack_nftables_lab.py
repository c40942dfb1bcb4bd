"""EnableIPv6 with EnableNFTables on the dual-stack namespace lab (issue #14): real flanneld processes,
real etcd, real kernel, real `nft`.  Both families' rules live in nftables tables flannel-ipv4 and
flannel-ipv6, none in iptables or ip6tables, and switching modes both ways leaves nothing behind.

The "outside" is the lab's underlay namespace (10.250.0.1 / fd99::1): never a real address.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network, ip_network
from typing import Any

import pytest

from flannelpy.hostnet import nftables_rules as R
from flannelpy.lab.netns_lab import ETCD_IP, UNDERLAY_NET6, Lab

pytestmark = [pytest.mark.root, pytest.mark.etcd,
              pytest.mark.skipif(shutil.which("nft") is None, reason="nft not installed (Debian package nftables)")]

NETWORK, IPV6_NETWORK = "10.5.0.0/16", "fd42::/48"
NFT_CONFIG = json.dumps({"Network": NETWORK, "EnableIPv6": True, "IPv6Network": IPV6_NETWORK,
                         "EnableNFTables": True, "Backend": {"Type": "vxlan"}})
IPT_CONFIG = json.dumps({"Network": NETWORK, "EnableIPv6": True, "IPv6Network": IPV6_NETWORK,
                         "Backend": {"Type": "vxlan"}})
OUTSIDE_IP6 = str(UNDERLAY_NET6.network_address + 1)  # the underlay's br0: no route back to fd42::/48
PORT = 40124


@pytest.fixture
def make_lab(root: None) -> Iterator[Callable[..., Lab]]:
    labs: list[Lab] = []

    def make(**kwargs: Any) -> Lab:
        prefix = "fq6" + secrets.token_hex(2)
        lab = Lab(prefix=prefix, workdir=tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp"), ipv6=True, **kwargs)
        labs.append(lab)
        lab.up(wait=30)
        return lab

    yield make
    for lab in labs:
        lab.down()


def in_ns(ns: str, *args: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", f"--net=/var/run/netns/{ns}", *args], check=check, capture_output=True,
                          text=True, timeout=timeout)


def logs(lab: Lab) -> str:
    return "\n".join(f"--- host {h.index} ---\n{lab.tail_log(h.index, 30)}" for h in lab.host_list)


def xtables_flannel(ns: str) -> list[str]:
    """Every line of iptables-save and ip6tables-save naming flannel (chains, jumps, rules)."""
    return [ln for tool in ("iptables-save", "ip6tables-save") for ln in in_ns(ns, tool).stdout.splitlines()
            if "FLANNEL" in ln or "flanneld" in ln]


def nft_table(ns: str, family: str, table: str) -> R.ListedTable | None:
    if table not in R.tables_in(in_ns(ns, "nft", "list", "tables", family).stdout, family):
        return None
    return R.parse_listing(in_ns(ns, "nft", "list", "table", family, table).stdout)


def wanted(lab: Lab, i: int) -> list[tuple[R.Ruleset, R.ListedTable | None]]:
    """(what host i's rules should be, what its kernel has) for flannel-ipv4 and flannel-ipv6."""
    h = lab.host(i)
    out = []
    for network, subnet in ((IPv4Network(NETWORK), IPv4Interface(h.subnet).network),
                            (IPv6Network(IPV6_NETWORK), IPv6Interface(h.subnet6).network)):
        want = R.desired_ruleset(network, subnet, masq=True, forward=True, random_fully=True)
        out.append((want, nft_table(h.netns, want.family, want.table)))
    return out


def assert_pings(lab: Lab) -> None:
    for ipv6 in (False, True):
        results = lab.wait_all_pings(30, ipv6=ipv6)
        failed = {pair: lab.last_pings[pair].output for pair, ok in results.items() if not ok}
        assert not failed, f"{'IPv6' if ipv6 else 'IPv4'} container pings failed: {failed}\n{logs(lab)}"


def source_seen(lab: Lab, sender_ns: str, receiver_ns: str, dst: str) -> str:
    """Send one UDP datagram (either family) from sender_ns to dst:PORT; the source receiver_ns saw."""
    family = "AF_INET6" if ip_network(dst).version == 6 else "AF_INET"
    receiver = subprocess.Popen(
        ["nsenter", f"--net=/var/run/netns/{receiver_ns}", "python3", "-c",
         (f"import socket; s = socket.socket(socket.{family}, socket.SOCK_DGRAM); "
          f"s.bind(({dst!r}, {PORT})); s.settimeout(10); print(s.recvfrom(100)[1][0], flush=True)")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(20):  # until the receiver is bound (the sender retries, one datagram each)
            in_ns(sender_ns, "python3", "-c",
                  f"import socket; socket.socket(socket.{family}, socket.SOCK_DGRAM).sendto(b'x', ({dst!r}, {PORT}))")
            try:
                out, err = receiver.communicate(timeout=0.5)
                assert receiver.returncode == 0, err
                return out.strip()
            except subprocess.TimeoutExpired:
                continue
        pytest.fail(f"no datagram from {sender_ns} reached {dst}\n{logs(lab)}")
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()


def test_dual_stack_nftables_pings_both_families_with_no_iptables_rules(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(hosts=2, backend="vxlan", config=NFT_CONFIG)
    assert_pings(lab)
    for h in lab.host_list:
        assert xtables_flannel(h.netns) == [], f"host {h.index} has flannel iptables/ip6tables rules"
        for want, have in wanted(lab, h.index):
            assert have is not None and R.differences(want, have) == [], f"{want.table}\n{logs(lab)}"
    c1, c2 = lab.host(1), lab.host(2)
    # to the outside: masqueraded to host 1's underlay address, of each family
    assert source_seen(lab, c1.container_ns, lab.underlay_ns, ETCD_IP) == c1.ip
    assert source_seen(lab, c1.container_ns, lab.underlay_ns, OUTSIDE_IP6) == c1.ip6
    # across the overlay: the container's own address arrives
    assert source_seen(lab, c1.container_ns, c2.container_ns, c2.container_ip6) == c1.container_ip6
    with open(c1.log_file) as f:
        text = f.read()
    assert "nftables table ip flannel-ipv4 in place" in text and "nftables table ip6 flannel-ipv6 in place" in text


def _restart_with(lab: Lab, config: str) -> None:
    lab.write_config(config)
    for h in lab.host_list:
        mtime = os.stat(h.subnet_file).st_mtime
        lab.stop_agent(h.index)
        lab.start_agent(h.index)
        lab.wait_subnet_env(h.index, 30, after_mtime=mtime)


def test_dual_stack_switching_iptables_nftables_iptables_leaves_no_leftovers(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(hosts=2, backend="vxlan", config=IPT_CONFIG)
    ns = lab.host(1).netns
    before = xtables_flannel(ns)
    assert any("fd42::/48" in ln for ln in before) and any("10.5.0.0/16" in ln for ln in before)
    assert "flannel" not in in_ns(ns, "nft", "list", "tables").stdout

    _restart_with(lab, NFT_CONFIG)
    assert xtables_flannel(ns) == []
    assert all(have is not None and R.differences(want, have) == [] for want, have in wanted(lab, 1)), logs(lab)
    assert_pings(lab)

    _restart_with(lab, IPT_CONFIG)
    assert "flannel" not in in_ns(ns, "nft", "list", "tables").stdout
    assert sorted(xtables_flannel(ns)) == sorted(before)
    assert_pings(lab)
