"""Dual stack (EnableIPv6, issue #14) on the namespace lab: real etcd, the real `flanneld` command line
on each host, an underlay with IPv4 and IPv6 (fd99::/64), containers with an address of each family.

Two flannelpy hosts (vxlan, host-gw), then a mixed lab where host 2 runs the real flanneld v0.20.2:
pings of both families both ways, and its lease, subnet.env and flannel-v6.1 compared field by field
with ours.  The mixed test is skipped where ../shared/anchors (the reference binaries) is absent.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import tempfile
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv6Interface, IPv6Network
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from flannelpy.lab.netns_lab import Lab, LabHost

pytestmark = [pytest.mark.root, pytest.mark.etcd]

ANCHORS = Path(__file__).resolve().parent.parent.parent / "shared" / "anchors"
FLANNELD_V0_20_2 = ANCHORS / "flanneld-v0.20.2.xz"


@pytest.fixture
def make_lab(root: None) -> Iterator[Callable[..., Lab]]:
    """Factory: make_lab(cls=Lab, **Lab kwargs) builds and starts a dual-stack lab; all are torn down."""
    labs: list[Lab] = []

    def make(cls: type[Lab] = Lab, **kwargs: Any) -> Lab:
        prefix = "fp6" + secrets.token_hex(2)
        workdir = tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp")  # short: unix socket paths
        lab = cls(prefix=prefix, workdir=workdir, ipv6=True, **kwargs)
        labs.append(lab)
        lab.up(wait=30)
        return lab

    yield make
    for lab in labs:
        lab.down()
        left = [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
                if n.startswith(lab.prefix + "-")]
        assert not left, f"lab.down() left namespaces {left}"


def logs(lab: Lab) -> str:
    return "\n".join(f"--- host {h.index} ---\n{lab.tail_log(h.index, 30)}" for h in lab.host_list)


def assert_pings(lab: Lab) -> None:
    for ipv6 in (False, True):
        results = lab.wait_all_pings(30, ipv6=ipv6)
        failed = {pair: lab.last_pings[pair].output for pair, ok in results.items() if not ok}
        assert not failed, f"{'IPv6' if ipv6 else 'IPv4'} container pings failed: {failed}\n{logs(lab)}"


def subnet_env_lines(lab: Lab, i: int) -> list[tuple[str, str]]:
    with open(lab.host(i).subnet_file) as f:
        return [tuple(line.split("=", 1)) for line in f.read().splitlines()]  # type: ignore[misc]


def v6_device(lab: Lab, i: int) -> dict[str, Any]:
    """What flannel-v6.1 is on host i, as the fields flanneld's and ours must share."""
    dev = lab.ip_json(i, "-d", "link", "show", "dev", "flannel-v6.1")[0]
    info = dev["linkinfo"]["info_data"]
    addrs = [(a["local"], a["prefixlen"]) for a in lab.ip_json(i, "-6", "addr", "show", "dev", "flannel-v6.1")[0]
             ["addr_info"] if a["scope"] == "global"]
    return {"kind": dev["linkinfo"]["info_kind"], "mtu": dev["mtu"], "up": "UP" in dev["flags"],
            "vni": info["id"], "port": info["port"], "learning": info["learning"],
            "local": info.get("local6", info.get("local")), "link": info["link"], "addresses": addrs,
            "mac": dev["address"]}


def v6_entries_for(lab: Lab, i: int, peer: int) -> dict[str, Any]:
    """Host i's route, neighbour and FDB entry for host `peer`'s IPv6 subnet."""
    net = IPv6Interface(lab.host(peer).subnet6).network
    routes = [r for r in lab.ip_json(i, "-6", "route", "show", str(net))]
    neighs = [(n["dst"], n.get("lladdr"), n["state"]) for n in lab.ip_json(i, "-6", "neigh", "show", "dev",
                                                                           "flannel-v6.1")]
    fdb = [(f["mac"], f["dst"], f.get("state")) for f in lab.bridge_json(i, "fdb", "show", "dev", "flannel-v6.1")
           if f.get("dst")]
    return {"routes": [(r["dst"], r.get("gateway"), r.get("dev"), "onlink" in r.get("flags", []), r.get("metric"))
                       for r in routes], "neighs": neighs, "fdb": fdb}


def lease_key_name(lab: Lab, i: int) -> str:
    return lab.lease_key(i).rsplit("/", 1)[1]


def test_two_flannelpy_hosts_vxlan_dual_stack(make_lab: Callable[..., Lab], tmp_path: Path) -> None:
    lab = make_lab(hosts=2, backend="vxlan", agent_flags=[f"-docker-daemon-json={tmp_path}/daemon-{{host}}.json"])
    assert_pings(lab)
    for i in (1, 2):  # Docker's bridge gets the IPv6 subnet too (its first address, as FLANNEL_IPV6_SUBNET)
        daemon = json.loads((tmp_path / f"daemon-{i}.json").read_text())
        assert daemon["ipv6"] is True and daemon["fixed-cidr-v6"] == str(IPv6Interface(lab.host(i).subnet6).network)
        assert daemon["bip"] == lab.host(i).subnet
    for i, peer in ((1, 2), (2, 1)):
        h, p = lab.host(i), lab.host(peer)
        value = lab.lease_value(i)
        assert list(value) == ["PublicIP", "PublicIPv6", "BackendType", "BackendData", "BackendV6Data"]
        assert value["PublicIP"] == h.ip and value["PublicIPv6"] == h.ip6
        assert value["BackendV6Data"] == {"VNI": 1, "VtepMAC": v6_device(lab, i)["mac"]}
        assert [k for k, _v in subnet_env_lines(lab, i)] == [
            "FLANNEL_NETWORK", "FLANNEL_SUBNET", "FLANNEL_IPV6_NETWORK", "FLANNEL_IPV6_SUBNET", "FLANNEL_MTU",
            "FLANNEL_IPMASQ"]
        net6 = IPv6Interface(h.subnet6).network
        assert net6.subnet_of(IPv6Network("fd42::/48")) and net6.prefixlen == 64
        assert v6_device(lab, i) | {"mac": None} == {
            "kind": "vxlan", "mtu": 1430, "up": True, "vni": 1, "port": 8472, "learning": False, "local": h.ip6,
            "link": "eth0", "addresses": [(str(net6.network_address), 128)], "mac": None}
        pnet = IPv6Interface(p.subnet6).network
        entries = v6_entries_for(lab, i, peer)
        assert entries["routes"] == [(str(pnet), str(pnet.network_address), "flannel-v6.1", True, 1024)]
        assert entries["neighs"] == [(str(pnet.network_address), v6_device(lab, peer)["mac"], ["PERMANENT"])]
        assert entries["fdb"] == [(v6_device(lab, peer)["mac"], p.ip6, "permanent")]
    # ip6tables carries the masquerade rules for IPv6Network, iptables those for Network only.
    saved6 = subprocess.run(["nsenter", f"--net=/var/run/netns/{lab.host(1).netns}", "ip6tables-save", "-t", "nat"],
                            capture_output=True, text=True, check=True).stdout
    assert "-A FLANNEL-POSTRTG -s fd42::/48 ! -d ff00::/8" in saved6 and "10.5.0.0/16" not in saved6


def test_two_flannelpy_hosts_host_gw_dual_stack(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(hosts=2, backend="host-gw")
    assert_pings(lab)
    p = lab.host(2)
    net6 = IPv6Interface(p.subnet6).network
    assert [(r["dst"], r.get("gateway"), r.get("dev"), r.get("protocol")) for r in
            lab.ip_json(1, "-6", "route", "show", str(net6))] == [(str(net6), p.ip6, "eth0", "70")]
    assert lab.lease_value(2) == {"PublicIP": p.ip, "PublicIPv6": p.ip6, "BackendType": "host-gw"}


def test_mixed_with_flanneld_v0_20_2_vxlan_dual_stack(make_lab: Callable[..., Lab], tmp_path: Path) -> None:
    """Host 1 runs flannelpy, host 2 the real flanneld v0.20.2: pings of both families both ways,
    and flanneld's lease, subnet.env and flannel-v6.1 against ours, field by field."""
    if not FLANNELD_V0_20_2.exists():
        pytest.skip(f"{FLANNELD_V0_20_2} is absent (the reference binaries live beside the repository)")
    binary = tmp_path / "flanneld-v0.20.2"
    with open(binary, "wb") as out:
        subprocess.run(["xz", "-dc", str(FLANNELD_V0_20_2)], stdout=out, check=True)
    binary.chmod(0o755)

    @dataclass
    class MixedLab(Lab):
        def agent_command(self, host: LabHost) -> list[str]:
            if host.index == 2:
                return [str(binary), f"-etcd-endpoints={self.etcd_endpoint}", f"-etcd-prefix={self.etcd_prefix}",
                        "-iface=eth0", f"-subnet-file={host.subnet_file}", "-ip-masq"]
            return super().agent_command(host)

    lab = make_lab(MixedLab, hosts=2, backend="vxlan")
    assert_pings(lab)
    assert "main.go" in lab.tail_log(2, 200) and "Allocated lease" in lab.tail_log(2, 200)  # the Go flanneld

    ours, theirs = lab.lease_value(1), lab.lease_value(2)
    # Keys: flanneld's MakeSubnetKey on both sides, in the same place.
    for i in (1, 2):
        v4 = IPv4Interface(lab.host(i).subnet).network
        v6 = IPv6Interface(lab.host(i).subnet6).network
        assert lease_key_name(lab, i) == f"{v4.network_address}-{v4.prefixlen}&{v6.network_address}-{v6.prefixlen}"
    listed = lab.etcdctl("get", f"{lab.etcd_prefix}/subnets/", "--prefix", "--keys-only").stdout.split()
    assert sorted(listed) == sorted([lab.lease_key(1), lab.lease_key(2)])
    # Values: the same fields in the same order, the same types.
    assert list(ours) == list(theirs)
    for field in ours:
        assert type(ours[field]) is type(theirs[field]), field
    assert list(ours["BackendV6Data"]) == list(theirs["BackendV6Data"]) == ["VNI", "VtepMAC"]
    assert theirs["PublicIPv6"] == lab.host(2).ip6 and ours["PublicIPv6"] == lab.host(1).ip6
    # subnet.env: the same lines in the same order; the networks equal, the subnets each host's own.
    env1, env2 = subnet_env_lines(lab, 1), subnet_env_lines(lab, 2)
    assert [k for k, _ in env1] == [k for k, _ in env2]
    same = {"FLANNEL_NETWORK", "FLANNEL_IPV6_NETWORK", "FLANNEL_MTU", "FLANNEL_IPMASQ"}
    assert [(k, v) for k, v in env1 if k in same] == [(k, v) for k, v in env2 if k in same]
    assert IPv6Interface(dict(env2)["FLANNEL_IPV6_SUBNET"]).ip == IPv6Interface(lab.host(2).subnet6).network[1]
    # flannel-v6.1: everything but the MAC and the host's own addresses is the same.
    dev1, dev2 = v6_device(lab, 1), v6_device(lab, 2)
    own = {"mac", "local", "addresses"}
    assert {k: v for k, v in dev1.items() if k not in own} == {k: v for k, v in dev2.items() if k not in own}
    for i, dev in ((1, dev1), (2, dev2)):
        net6 = IPv6Interface(lab.host(i).subnet6).network
        assert dev["local"] == lab.host(i).ip6 and dev["addresses"] == [(str(net6.network_address), 128)]
    # Each one's entries for the other: route via the base address onlink, neighbour, FDB.
    e1, e2 = v6_entries_for(lab, 1, 2), v6_entries_for(lab, 2, 1)
    for i, entries, peer in ((1, e1, 2), (2, e2, 1)):
        pnet = IPv6Interface(lab.host(peer).subnet6).network
        assert entries["routes"] == [(str(pnet), str(pnet.network_address), "flannel-v6.1", True, 1024)], i
    assert e1["neighs"] == [(str(IPv6Interface(lab.host(2).subnet6).network.network_address), dev2["mac"],
                             ["PERMANENT"])]
    assert e2["neighs"] == [(str(IPv6Interface(lab.host(1).subnet6).network.network_address), dev1["mac"],
                             ["PERMANENT"])]
    assert e1["fdb"] == [(dev2["mac"], lab.host(2).ip6, "permanent")]
    assert e2["fdb"] == [(dev1["mac"], lab.host(1).ip6, "permanent")]
    assert json.dumps(theirs["BackendV6Data"]["VNI"]) == "1"


# --- flannelctl lab up --ipv6 ------------------------------------------------------------------


def flannelctl(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(["flannelctl", *args], capture_output=True, text=True, timeout=timeout)


def test_flannelctl_lab_up_ipv6_pings_both_families(root: None) -> None:
    prefix = "fp6c" + secrets.token_hex(2)
    lab = ["lab", "--prefix", prefix, "--workdir", tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp")]
    try:
        up = flannelctl(*lab, "up", "--ipv6", "--json")
        assert up.returncode == 0, up.stdout + up.stderr
        doc = json.loads(up.stdout)
        assert json.loads(doc["config"])["EnableIPv6"] is True
        assert sorted((p.get("family", "ipv4"), p["ok"]) for p in doc["pings"]) == [
            ("ipv4", True), ("ipv4", True), ("ipv6", True), ("ipv6", True)]
        assert all(h["subnet6"].startswith("fd42:") and h["ip6"].startswith("fd99::") for h in doc["hosts"])
        text = flannelctl(*lab, "status", "--ping")
        assert text.returncode == 0 and "cross-host IPv6 pings:" in text.stdout, text.stdout + text.stderr
        assert "UNDERLAY IPv6" in text.stdout
    finally:
        down = flannelctl(*lab, "down")
        assert down.returncode == 0, down.stderr


@pytest.mark.parametrize("extra, says", [
    (["--backend", "udp"], "--ipv6 with --backend udp: dual stack runs on vxlan or host-gw"),
    (["--machines"], "--ipv6: only the namespace and Docker labs run dual stack"),
])
def test_flannelctl_lab_up_ipv6_refusals(root: None, extra: list[str], says: str) -> None:
    prefix = "fp6r" + secrets.token_hex(2)
    proc = flannelctl("lab", "--prefix", prefix, "--workdir", f"/tmp/{prefix}", "up", "--ipv6", *extra, timeout=30)
    assert proc.returncode != 0 and says in proc.stderr, proc.stderr
    assert not Path(f"/tmp/{prefix}").exists()


def test_ipv6_only_flanneld_v0_20_2_gives_two_hosts_one_lease_and_flannelpy_refuses_it(
        make_lab: Callable[..., Lab], tmp_path: Path) -> None:
    """Why EnableIPv4 false is refused: the real flanneld v0.20.2 in etcd mode leases every IPv6-only
    host under `0.0.0.0-0&<IPv6 subnet>` with PublicIP 0.0.0.0, so the second host "finds its lease"
    by that PublicIP and takes the first one's subnet.  flannelpy says so and exits 1, writing nothing."""
    if not FLANNELD_V0_20_2.exists():
        pytest.skip(f"{FLANNELD_V0_20_2} is absent (the reference binaries live beside the repository)")
    binary = tmp_path / "flanneld-v0.20.2"
    with open(binary, "wb") as out:
        subprocess.run(["xz", "-dc", str(FLANNELD_V0_20_2)], stdout=out, check=True)
    binary.chmod(0o755)

    @dataclass
    class GoLab(Lab):
        def agent_command(self, host: LabHost) -> list[str]:
            return [str(binary), f"-etcd-endpoints={self.etcd_endpoint}", f"-etcd-prefix={self.etcd_prefix}",
                    "-iface=eth0", f"-subnet-file={host.subnet_file}"]

        def up(self, wait: float = 60.0) -> None:  # one after the other, so the second sees the first
            self.build()
            for host in self.host_list:
                self.start_agent(host.index)
                self.wait_subnet_env(host.index, wait)

    config = json.dumps({"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd42::/48",
                         "Backend": {"Type": "vxlan"}})
    lab = make_lab(GoLab, hosts=2, backend="vxlan", config=config, with_containers=False)
    keys = lab.etcdctl("get", f"{lab.etcd_prefix}/subnets/", "--prefix", "--keys-only").stdout.split()
    assert len(keys) == 1 and keys[0].rsplit("/", 1)[1].startswith("0.0.0.0-0&fd42:"), keys
    env1, env2 = dict(subnet_env_lines(lab, 1)), dict(subnet_env_lines(lab, 2))
    assert env1["FLANNEL_IPV6_SUBNET"] == env2["FLANNEL_IPV6_SUBNET"]  # two hosts, one subnet
    assert json.loads(lab.etcdctl("get", keys[0], "--print-value-only").stdout)["PublicIP"] == "0.0.0.0"

    ours = subprocess.run(["nsenter", f"--net=/var/run/netns/{lab.host(1).netns}", "flanneld",
                           f"-etcd-endpoints={lab.etcd_endpoint}", "-iface=eth0",
                           f"-subnet-file={tmp_path / 'subnet.env'}", f"-status-socket={tmp_path / 's.sock'}"],
                          capture_output=True, text=True, timeout=60)
    assert ours.returncode == 1, ours.stderr
    assert "EnableIPv4: false (IPv6-only) is not supported with etcd, by flanneld either" in ours.stderr
    assert not (tmp_path / "subnet.env").exists()
