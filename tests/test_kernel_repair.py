"""Issue #12's kernel-tampering catalogue, on the namespace lab: real etcd, real `flanneld`, no mocks.

One lab per backend (vxlan, host-gw), two hosts each, cases in sequence against host 1 while a
container on host 1 pings the container on host 2 every 50 ms.  Each case tampers with host 1's
kernel as an operator or a stray script might, measures the seconds until the agent has
repaired it (the event path: the kernel's own notification, not the 10 s resync), and counts
the pings lost.  A case that cuts the data path may lose what it cut (about the repair time);
one that does not must lose nothing.  The figures are printed as `FIGURE ...` lines (pytest -s).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import tempfile
import time
from ipaddress import IPv4Interface, IPv4Network
from typing import Any, Callable, Iterator

import httpx
import pytest

from flannelpy.lab.netns_lab import Lab, run

pytestmark = [pytest.mark.root, pytest.mark.etcd]

REPAIR_BOUND = 2.0  # seconds: what the event path must achieve for every case (resync is 10 s)
PING_INTERVAL = 0.05
FIGURES: list[dict[str, Any]] = []


def figure(case: str, **values: Any) -> None:
    FIGURES.append({"case": case, **values})
    print(f"FIGURE kernel-repair {case}: " + ", ".join(f"{k}={v}" for k, v in values.items()), flush=True)


class KLab(Lab):
    """The lab plus what the catalogue needs: readiness, kernel views of host 1, a pinger."""

    def readyz(self, i: int) -> tuple[int, str]:
        with httpx.Client(transport=httpx.HTTPTransport(uds=self.host(i).status_socket), timeout=5) as c:
            r = c.get("http://flanneld/readyz")
            return r.status_code, r.text

    def ns(self, i: int) -> str:
        return self.host(i).netns

    def sh(self, i: int, *args: str) -> str:
        return run(*args, netns=self.ns(i)).stdout

    def net(self, i: int) -> IPv4Network:
        return IPv4Interface(self.host(i).subnet).network

    def routes(self, i: int) -> list[dict[str, Any]]:
        return self.ip_json(i, "route", "show", "table", "main")

    def route_to(self, i: int, dst: IPv4Network | str) -> dict[str, Any] | None:
        found = [r for r in self.routes(i) if r["dst"] == str(dst)]
        return found[0] if found else None

    def free_subnet(self, third_octet: int) -> IPv4Network:
        """A /24 in Network that no host holds."""
        taken = {self.net(h.index) for h in self.host_list}
        for n in range(third_octet, 255):
            cand = IPv4Network(f"10.5.{n}.0/24")
            if cand not in taken:
                return cand
        raise AssertionError("no free subnet")

    def put_lease(self, subnet: IPv4Network, value: dict[str, Any]) -> str:
        key = f"{self.etcd_prefix}/subnets/{subnet.network_address}-{subnet.prefixlen}"
        self.etcdctl("put", key, json.dumps(value))
        return key

    def del_key(self, key: str) -> None:
        self.etcdctl("del", key)

    def logs(self) -> str:
        return "\n".join(f"--- host {h.index} ---\n{self.tail_log(h.index, 25)}" for h in self.host_list)


class Pinger:
    """busybox ping from container 1 to container 2 every 50 ms; stop() -> (sent, lost).

    Lost = sequence numbers below the last one answered that got no reply, so requests still
    in flight when the pinger is stopped (a loaded machine's late replies) are not counted."""

    def __init__(self, lab: KLab) -> None:
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/var/run/netns/{lab.host(1).container_ns}", "busybox", "ping",
             "-i", str(PING_INTERVAL), "-W", "1", lab.host(2).container_ip],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def stop(self) -> tuple[int, int]:
        time.sleep(0.3)  # a few answered requests after the repair
        self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=10)
        m = re.search(r"(\d+) packets transmitted", out)
        assert m, f"no ping summary in {out!r}"
        answered = {int(x) for x in re.findall(r"seq=(\d+)", out)}
        assert answered, f"no reply at all: {out[-500:]!r}"
        return int(m.group(1)), len(set(range(max(answered))) - answered)


def wait_for(pred: Callable[[], bool], timeout: float, what: str, lab: KLab) -> float:
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            pytest.fail(f"timed out after {timeout}s waiting for {what}\n{lab.logs()}")
        time.sleep(0.01)
    return round(time.monotonic() - start, 3)


def make_lab(backend: str) -> Iterator[KLab]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    prefix = "fpk" + secrets.token_hex(2)
    lab = KLab(prefix=prefix, workdir=tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp"), backend=backend)
    try:
        lab.up(wait=30)
        results = lab.wait_all_pings(30)
        assert all(results.values()), f"pings before tampering: {results}\n{lab.logs()}"
        yield lab
    finally:
        lab.down()
        leftover = [n for n in run("ip", "netns", "list").stdout.split() if n.startswith(prefix + "-")]
        assert not leftover, f"lab.down() left namespaces {leftover}"


def tamper_case(lab: KLab, case: str, tamper: Callable[[], None], repaired: Callable[[], bool],
                cuts: bool, bound: float = REPAIR_BOUND) -> float:
    """Tamper with host 1, measure the repair and the pings lost; asserts both bounds."""
    assert repaired(), f"{case}: not in the repaired state before tampering\n{lab.logs()}"
    pinger = Pinger(lab)
    time.sleep(0.5)
    tamper()
    seconds = wait_for(repaired, 15, f"{case}: repair", lab)
    sent, lost = pinger.stop()
    figure(case, repair_s=seconds, pings_sent=sent, pings_lost=lost)
    assert lab.agent_running(1) and lab.agent_running(2), lab.logs()
    assert seconds <= bound, f"{case}: repaired after {seconds}s, bound {bound}s\n{lab.logs()}"
    if cuts:
        # what the tampering cut: about the repair time, plus a ping's round of slack
        assert lost <= int(seconds / PING_INTERVAL) + 4, f"{case}: {lost} pings lost in {seconds}s"
    else:
        assert lost == 0, f"{case}: {lost} pings lost though the data path was not cut"
    return seconds


# --- vxlan ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vx() -> Iterator[KLab]:
    yield from make_lab("vxlan")


_EXPECT: dict[str, Any] = {}


def vx_expect(lab: KLab) -> dict[str, Any]:
    """What host 1 must hold for host 2 (from the leases in etcd; read once per lab)."""
    if _EXPECT.get("prefix") != lab.prefix:
        _EXPECT.clear()
        _EXPECT.update(prefix=lab.prefix, own_mac=lab.lease_value(1)["BackendData"]["VtepMAC"],
                       mac=lab.lease_value(2)["BackendData"]["VtepMAC"], ip=lab.host(2).ip, net=lab.net(2),
                       base=str(lab.net(2).network_address), own=(str(lab.net(1).network_address), 32))
    return _EXPECT


def vx_peer_ok(lab: KLab) -> bool:
    """Host 1 holds exactly flanneld's entries for host 2, on a healthy flannel.1."""
    f = vx_expect(lab)
    dev = lab.ip_json(1, "link", "show", "dev", "flannel.1") if _has_dev(lab) else []
    if not dev or dev[0]["address"] != f["own_mac"] or dev[0]["mtu"] != 1450 or "UP" not in dev[0]["flags"]:
        return False
    shown = lab.ip_json(1, "-4", "addr", "show", "dev", "flannel.1")  # [] while it has no IPv4 address
    addrs = shown[0].get("addr_info", []) if shown else []
    if [(a["local"], a["prefixlen"]) for a in addrs] != [f["own"]]:
        return False
    r = lab.route_to(1, f["net"])
    if not r or r.get("gateway") != f["base"] or r.get("dev") != "flannel.1" or "onlink" not in r.get("flags", []):
        return False
    neigh = lab.ip_json(1, "neigh", "show", "dev", "flannel.1")
    if not any(n["dst"] == f["base"] and n.get("lladdr") == f["mac"] and "PERMANENT" in n["state"] for n in neigh):
        return False
    fdb = lab.bridge_json(1, "fdb", "show", "dev", "flannel.1")
    return any(e["mac"] == f["mac"] and e.get("dst") == f["ip"] for e in fdb)


def _has_dev(lab: KLab) -> bool:
    return run("ip", "link", "show", "dev", "flannel.1", netns=lab.ns(1), check=False).returncode == 0


def test_vxlan_delete_device(vx: KLab) -> None:
    mac = vx_expect(vx)["own_mac"]
    tamper_case(vx, "vxlan: delete flannel.1", lambda: vx.sh(1, "ip", "link", "del", "flannel.1"),
                lambda: vx_peer_ok(vx), cuts=True)
    assert vx.ip_json(1, "link", "show", "dev", "flannel.1")[0]["address"] == mac
    assert "re-created flannel.1" in vx.tail_log(1, 40)
    assert vx.readyz(1) == (200, "flanneld is ready")


def test_vxlan_delete_peer_route(vx: KLab) -> None:
    net = vx_expect(vx)["net"]
    tamper_case(vx, "vxlan: delete peer route", lambda: vx.sh(1, "ip", "route", "del", str(net)),
                lambda: vx_peer_ok(vx), cuts=True)


def test_vxlan_delete_fdb_entry(vx: KLab) -> None:
    f = vx_expect(vx)
    tamper_case(vx, "vxlan: delete FDB entry",
                lambda: vx.sh(1, "bridge", "fdb", "del", f["mac"], "dev", "flannel.1", "dst", f["ip"]),
                lambda: vx_peer_ok(vx), cuts=True)


def test_vxlan_delete_neighbour(vx: KLab) -> None:
    f = vx_expect(vx)
    tamper_case(vx, "vxlan: delete neighbour", lambda: vx.sh(1, "ip", "neigh", "del", f["base"], "dev", "flannel.1"),
                lambda: vx_peer_ok(vx), cuts=True)


def test_vxlan_change_device_mac(vx: KLab) -> None:
    tamper_case(vx, "vxlan: change flannel.1 MAC",
                lambda: vx.sh(1, "ip", "link", "set", "flannel.1", "address", "0a:0b:0c:0d:0e:0f"),
                lambda: vx_peer_ok(vx), cuts=True)


def test_vxlan_change_device_mtu(vx: KLab) -> None:
    tamper_case(vx, "vxlan: change flannel.1 MTU", lambda: vx.sh(1, "ip", "link", "set", "flannel.1", "mtu", "1300"),
                lambda: vx_peer_ok(vx), cuts=False)


def test_vxlan_change_device_address(vx: KLab) -> None:
    own = f"{vx.net(1).network_address}/32"
    stray = f"{vx.free_subnet(150).network_address}/32"

    def tamper() -> None:
        vx.sh(1, "ip", "addr", "del", own, "dev", "flannel.1")
        vx.sh(1, "ip", "addr", "add", stray, "dev", "flannel.1")

    # Deleting a device's last IPv4 address makes the kernel flush the routes through it, so
    # this does cut the overlay until the repair.
    tamper_case(vx, "vxlan: replace flannel.1 address", tamper, lambda: vx_peer_ok(vx), cuts=True)


def test_vxlan_device_down(vx: KLab) -> None:
    tamper_case(vx, "vxlan: set flannel.1 down", lambda: vx.sh(1, "ip", "link", "set", "flannel.1", "down"),
                lambda: vx_peer_ok(vx), cuts=True)


def test_vxlan_bogus_route_on_device_removed_others_untouched(vx: KLab) -> None:
    bogus = vx.free_subnet(160)
    user_in_network = vx.free_subnet(170)  # proto static via the underlay: not ours
    outside = "192.168.77.0/24"  # a user's route outside Network
    vx.sh(1, "ip", "route", "add", str(user_in_network), "via", "10.250.0.99", "proto", "static")
    vx.sh(1, "ip", "route", "add", outside, "via", "10.250.0.98")
    tamper_case(vx, "vxlan: bogus route inside Network on flannel.1",
                lambda: vx.sh(1, "ip", "route", "add", str(bogus), "via", str(bogus.network_address),
                              "dev", "flannel.1", "onlink"),
                lambda: vx_peer_ok(vx) and vx.route_to(1, bogus) is None, cuts=False)
    time.sleep(0.5)
    assert vx.route_to(1, user_in_network) is not None and vx.route_to(1, outside) is not None
    vx.sh(1, "ip", "route", "del", str(user_in_network))
    vx.sh(1, "ip", "route", "del", outside)


def test_vxlan_restart_removes_entries_of_leases_deleted_meanwhile(vx: KLab) -> None:
    ghost = vx.free_subnet(77)
    ghost_mac = "0a:00:00:00:77:77"
    key = vx.put_lease(ghost, {"PublicIP": "10.250.0.77", "PublicIPv6": None, "BackendType": "vxlan",
                               "BackendData": {"VNI": 1, "VtepMAC": ghost_mac}})
    wait_for(lambda: vx.route_to(1, ghost) is not None, 10, "the ghost peer programmed on host 1", vx)
    user_route = vx.free_subnet(180)
    vx.sh(1, "ip", "route", "add", str(user_route), "via", "10.250.0.97")  # proto boot, not ours
    pinger = Pinger(vx)
    vx.stop_agent(1)
    vx.del_key(key)
    stray = vx.free_subnet(190)
    vx.sh(1, "ip", "route", "add", str(stray), "via", str(stray.network_address), "dev", "flannel.1", "onlink")
    vx.sh(1, "ip", "route", "add", str(vx.free_subnet(200)), "via", "10.250.0.96", "proto", "70")  # ours, direct
    started = time.monotonic()
    vx.start_agent(1)

    def stale_gone() -> bool:
        have = {r["dst"] for r in vx.routes(1)}
        fdb = vx.bridge_json(1, "fdb", "show", "dev", "flannel.1")
        neigh = vx.ip_json(1, "neigh", "show", "dev", "flannel.1")
        return (str(ghost) not in have and str(stray) not in have and str(vx.free_subnet(200)) not in have
                and not any(e["mac"] == ghost_mac for e in fdb)
                and not any(n["dst"] == str(ghost.network_address) for n in neigh))

    seconds = wait_for(stale_gone, 20, "stale entries removed after restart", vx)
    sent, lost = pinger.stop()
    figure("vxlan: restart removes entries of a lease deleted while down", cleaned_s_after_start=seconds,
           pings_sent=sent, pings_lost=lost)
    assert vx_peer_ok(vx) and vx.route_to(1, user_route) is not None
    assert lost == 0, f"{lost} pings lost across the restart"
    vx.sh(1, "ip", "route", "del", str(user_route))
    wait_for(lambda: vx.readyz(1)[0] == 200, 10, "host 1 ready after restart", vx)
    assert time.monotonic() - started < 30


def test_vxlan_status_counts_programmed_peers(vx: KLab) -> None:
    status = vx.agent_status(1)
    assert status["peers_programmed"] == 1 and status["data_plane_problems"] == []


# --- host-gw ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hg() -> Iterator[KLab]:
    yield from make_lab("host-gw")


def hg_peer_ok(lab: KLab) -> bool:
    r = lab.route_to(1, lab.net(2))
    return bool(r) and r.get("gateway") == lab.host(2).ip and r.get("dev") == "eth0" and r.get("protocol") == "70"


def test_hostgw_unreachable_peer_keeps_agents_up(hg: KLab) -> None:
    """The issue's crash: a lease whose PublicIP no host can reach.  Either refused before the
    backend (lease admission) or refused by the kernel (logged, retried); never a crash."""
    pinger = Pinger(hg)
    key = hg.put_lease(hg.free_subnet(201), {"PublicIP": "198.51.100.7", "PublicIPv6": None, "BackendType": "host-gw"})
    time.sleep(3)
    sent, lost = pinger.stop()
    figure("host-gw: lease with an unreachable PublicIP", agents_up=hg.agent_running(1) and hg.agent_running(2),
           pings_sent=sent, pings_lost=lost)
    assert hg.agent_running(1) and hg.agent_running(2), hg.logs()
    assert lost == 0 and hg_peer_ok(hg)
    assert "Traceback" not in hg.tail_log(1, 60) and "Traceback" not in hg.tail_log(2, 60)
    hg.del_key(key)


def test_hostgw_peer_the_kernel_refuses_is_reported_and_retried(hg: KLab) -> None:
    """A PublicIP on a network host 1 is connected to, but not via the underlay: admitted, yet
    the kernel refuses `via <it> dev eth0`.  /readyz says so; the other peer keeps working."""
    hg.sh(1, "ip", "link", "add", "xnet0", "type", "veth", "peer", "name", "xnet1")
    hg.sh(1, "ip", "addr", "add", "192.168.50.1/24", "dev", "xnet0")
    hg.sh(1, "ip", "link", "set", "xnet0", "up")
    hg.sh(1, "ip", "link", "set", "xnet1", "up")
    # Lease admission reads the host's networks at start: restart host 1's agent to see xnet0.
    hg.stop_agent(1)
    hg.start_agent(1)
    wait_for(lambda: os.path.exists(hg.host(1).status_socket) and hg.readyz(1)[0] == 200, 20, "host 1 back", hg)
    subnet = hg.free_subnet(202)
    pinger = Pinger(hg)
    key = hg.put_lease(subnet, {"PublicIP": "192.168.50.7", "PublicIPv6": None, "BackendType": "host-gw"})
    seconds = wait_for(lambda: hg.readyz(1)[0] == 503, 10, "/readyz 503 on host 1", hg)
    code, text = hg.readyz(1)
    status = hg.agent_status(1)
    sent, lost = pinger.stop()
    figure("host-gw: peer route the kernel refuses", readyz_503_after_s=seconds, readyz=text,
           pings_sent=sent, pings_lost=lost)
    assert "192.168.50.7" in text and str(subnet) in text and "1 peer route failed" in text
    assert status["peers_programmed"] == 1 and status["leases_seen"] == 2, status
    assert hg.agent_running(1) and hg.agent_running(2) and lost == 0 and hg_peer_ok(hg)
    log = hg.tail_log(1, 80)
    assert log.count(f"route to {subnet} via 192.168.50.7 not programmed") == 1, log  # once, not per pass
    hg.del_key(key)
    seconds = wait_for(lambda: hg.readyz(1) == (200, "flanneld is ready"), 10, "/readyz 200 again", hg)
    figure("host-gw: lease of the refused peer deleted", readyz_200_after_s=seconds)
    hg.sh(1, "ip", "link", "del", "xnet0")


def test_hostgw_delete_route(hg: KLab) -> None:
    tamper_case(hg, "host-gw: delete peer route", lambda: hg.sh(1, "ip", "route", "del", str(hg.net(2))),
                lambda: hg_peer_ok(hg), cuts=True)


def test_hostgw_replace_route_with_wrong_gateway(hg: KLab) -> None:
    tamper_case(hg, "host-gw: peer route re-pointed",
                lambda: hg.sh(1, "ip", "route", "replace", str(hg.net(2)), "via", "10.250.0.99", "dev", "eth0"),
                lambda: hg_peer_ok(hg), cuts=True)


def test_hostgw_our_stray_route_removed_others_untouched(hg: KLab) -> None:
    stray = hg.free_subnet(210)
    users = hg.free_subnet(211)
    hg.sh(1, "ip", "route", "add", str(users), "via", "10.250.0.95")  # proto boot: not ours
    hg.sh(1, "ip", "route", "add", "192.168.78.0/24", "via", "10.250.0.94", "proto", "70")  # outside Network
    tamper_case(hg, "host-gw: stray route of ours inside Network",
                lambda: hg.sh(1, "ip", "route", "add", str(stray), "via", "10.250.0.93", "proto", "70"),
                lambda: hg_peer_ok(hg) and hg.route_to(1, stray) is None, cuts=False)
    time.sleep(0.5)
    assert hg.route_to(1, users) is not None and hg.route_to(1, "192.168.78.0/24") is not None
    hg.sh(1, "ip", "route", "del", str(users))
    hg.sh(1, "ip", "route", "del", "192.168.78.0/24")


def test_hostgw_restart_removes_route_of_lease_deleted_meanwhile(hg: KLab) -> None:
    ghost = hg.free_subnet(77)
    key = hg.put_lease(ghost, {"PublicIP": "10.250.0.77", "PublicIPv6": None, "BackendType": "host-gw"})
    wait_for(lambda: hg.route_to(1, ghost) is not None, 10, "ghost route on host 1", hg)
    pinger = Pinger(hg)
    hg.stop_agent(1)
    hg.del_key(key)
    hg.start_agent(1)
    seconds = wait_for(lambda: hg.route_to(1, ghost) is None, 20, "ghost route removed after restart", hg)
    sent, lost = pinger.stop()
    figure("host-gw: restart removes the route of a lease deleted while down", cleaned_s_after_start=seconds,
           pings_sent=sent, pings_lost=lost)
    assert hg_peer_ok(hg) and lost == 0
    wait_for(lambda: hg.readyz(1) == (200, "flanneld is ready"), 10, "host 1 ready after restart", hg)


def test_print_figures() -> None:
    """The table of record (run with -s to see it)."""
    for f in FIGURES:
        print("FIGURE", json.dumps(f), flush=True)
