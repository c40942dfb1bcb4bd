"""EnableNFTables on the namespace lab: real flanneld processes, real etcd, real kernel, real `nft`.

The "outside" is the lab's underlay namespace (etcd's address, 10.250.0.1): never a real address.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from ipaddress import IPv4Interface
from typing import Any

import pytest

from flannelpy.hostnet import nftables_rules as R
from flannelpy.lab.netns_lab import ETCD_IP, Lab

pytestmark = [pytest.mark.root, pytest.mark.etcd,
              pytest.mark.skipif(shutil.which("nft") is None, reason="nft not installed (Debian package nftables)")]

NFT_CONFIG = '{"Network":"10.5.0.0/16","EnableNFTables":true,"Backend":{"Type":"vxlan"}}'
IPT_CONFIG = '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}'
PORT = 40123


@pytest.fixture
def make_lab(root: None) -> Iterator[Callable[..., Lab]]:
    labs: list[Lab] = []

    def make(**kwargs: Any) -> Lab:
        prefix = "fpn" + secrets.token_hex(2)
        lab = Lab(prefix=prefix, workdir=tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp"), **kwargs)
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


def iptables_flannel(ns: str) -> list[str]:
    return [ln for ln in in_ns(ns, "iptables-save").stdout.splitlines() if "FLANNEL" in ln or "flanneld" in ln]


def nft_table(ns: str) -> R.ListedTable | None:
    if R.TABLE_V4 not in R.tables_in(in_ns(ns, "nft", "list", "tables", "ip").stdout, "ip"):
        return None
    return R.parse_listing(in_ns(ns, "nft", "list", "table", "ip", R.TABLE_V4).stdout)


def want(lab: Lab, i: int) -> R.Ruleset:
    subnet = IPv4Interface(lab.host(i).subnet).network
    return R.desired_ruleset(IPv4Interface("10.5.0.0/16").network, subnet, masq=True, forward=True, random_fully=True)


def source_seen(lab: Lab, sender_ns: str, receiver_ns: str, dst: str) -> str:
    """Send one UDP datagram from sender_ns to dst:PORT; the source address receiver_ns saw."""
    receiver = subprocess.Popen(
        ["nsenter", f"--net=/var/run/netns/{receiver_ns}", "python3", "-c",
         ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
          f"s.bind(({dst!r}, {PORT})); s.settimeout(10); print(s.recvfrom(100)[1][0], flush=True)")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(20):  # until the receiver is bound (the sender retries, one datagram each)
            in_ns(sender_ns, "python3", "-c",
                  "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
                  f".sendto(b'x', ({dst!r}, {PORT}))")
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


def test_two_hosts_with_nftables_ping_masquerade_and_no_iptables_rules(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(hosts=2, backend="vxlan", config=NFT_CONFIG)
    results = lab.wait_all_pings(15)
    assert all(results.values()), f"pings failed: {results}\n{logs(lab)}"
    for h in lab.host_list:
        assert iptables_flannel(h.netns) == [], f"host {h.index} has flannel iptables rules"
        assert R.differences(want(lab, h.index), nft_table(h.netns)) == [], logs(lab)
    c1, c2 = lab.host(1), lab.host(2)
    # to the outside: masqueraded to host 1's underlay address
    assert source_seen(lab, c1.container_ns, lab.underlay_ns, ETCD_IP) == c1.ip
    # across the overlay: the container's own address arrives
    assert source_seen(lab, c1.container_ns, c2.container_ns, c2.container_ip) == c1.container_ip
    with open(c1.log_file) as f:
        assert "nftables table ip flannel-ipv4 in place" in f.read()


def _restart_with(lab: Lab, config: str) -> None:
    lab.write_config(config)
    for h in lab.host_list:
        mtime = os.stat(h.subnet_file).st_mtime
        lab.stop_agent(h.index)
        lab.start_agent(h.index)
        lab.wait_subnet_env(h.index, 30, after_mtime=mtime)


def test_switching_iptables_nftables_iptables_leaves_no_leftovers(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(hosts=2, backend="vxlan", config=IPT_CONFIG)
    ns = lab.host(1).netns
    iptables_before = iptables_flannel(ns)
    assert any(":FLANNEL-POSTRTG" in ln for ln in iptables_before) and nft_table(ns) is None

    _restart_with(lab, NFT_CONFIG)
    assert iptables_flannel(ns) == []
    assert R.differences(want(lab, 1), nft_table(ns)) == []
    assert all(lab.wait_all_pings(15).values()), logs(lab)

    _restart_with(lab, IPT_CONFIG)
    assert nft_table(ns) is None
    assert "flannel" not in in_ns(ns, "nft", "list", "tables").stdout
    assert sorted(iptables_flannel(ns)) == sorted(iptables_before)
    assert all(lab.wait_all_pings(15).values()), logs(lab)


def test_config_validation_names_enable_nftables() -> None:
    from flannelpy.config.network import parse_config, validate_config

    assert parse_config(NFT_CONFIG).enable_nftables is True
    assert parse_config(IPT_CONFIG).enable_nftables is False
    assert parse_config(json.dumps({"Network": "10.5.0.0/16", "enablenftables": True})).enable_nftables is True
    problems = validate_config('{"Network":"10.5.0.0/16","EnableNFTables":"yes"}')
    assert [str(p) for p in problems] == ['EnableNFTables: expected true or false, got "yes"']


def test_enable_nftables_without_nft_is_refused_before_the_lease(root: None, tmp_path) -> None:
    """A host with iptables but no `nft`: one error line naming the fix, exit 1, no lease, no subnet.env."""
    from flannelpy.lab.netns_lab import own_command

    prefix = "fpn" + secrets.token_hex(2)
    lab = Lab(prefix=prefix, hosts=1, config=NFT_CONFIG, with_containers=False,
              workdir=tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp"))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("nsenter", "iptables", "iptables-save", "iptables-restore"):
        os.symlink(shutil.which(tool), bindir / tool)
    try:
        lab.build()
        host = lab.host(1)
        proc = subprocess.run(
            ["nsenter", f"--net=/var/run/netns/{host.netns}", own_command("flanneld"),
             f"-etcd-endpoints={lab.etcd_endpoint}", "-iface=eth0", f"-subnet-file={host.subnet_file}",
             f"-status-socket={host.status_socket}", "-ip-masq"],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False,
            env=dict(os.environ, PATH=str(bindir)))
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1, out
        errors = [ln for ln in out.splitlines() if "nft not found" in ln]
        assert len(errors) == 1 and "EnableNFTables: nft not found in PATH; install nftables" in errors[0], out
        assert "Traceback" not in out and "acquired lease" not in out, out
        assert lab.etcdctl("get", "--prefix", "/coreos.com/network/subnets/", "--keys-only").stdout.strip() == ""
        assert not os.path.exists(host.subnet_file)
    finally:
        lab.down()
