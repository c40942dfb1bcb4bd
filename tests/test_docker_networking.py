"""Classic Docker networking beside the overlay, with real dockerd (issue #15).

One Docker lab for the module: etcd, two hosts running flanneld (vxlan, -ip-masq, -docker-fixed-cidr)
with a private dockerd each, whose daemon.json starts empty, so everything Docker does differently comes
from what flanneld wrote.  A namespace on the underlay, `<prefix>-wan`, stands for the internet: it holds
198.51.100.1 (TEST-NET-2), routed from the hosts via 10.250.0.250, and runs a busybox httpd.  Every
server here is a busybox httpd started with -vv, whose log names the peer of each request, so the tests
read the source address each server saw.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, IPv4Network

import pytest

from flannelpy.docker import attach_plan as P
from flannelpy.lab.docker_lab import DockerLab
from flannelpy.lab.netns_lab import ETCD_IP, LabHost, run

pytestmark = [pytest.mark.docker, pytest.mark.root, pytest.mark.slow]

WAN_IP = "198.51.100.1"  # "the internet": an address in a lab namespace, never a real one
WAN_GW = "10.250.0.250"
HTTPD = ["busybox", "httpd", "-f", "-vv", "-p", "80", "-h", "/tmp"]
FLANNELCTL = [sys.executable, "-m", "flannelpy.cli.flannelctl"]


@dataclass
class Net:
    lab: DockerLab
    wan_ns: str
    wan_log: str
    wan_pid: int = 0
    ips: dict[str, str] = field(default_factory=dict)  # container name -> its address

    def host(self, i: int) -> LabHost:
        return self.lab.host(i)

    def docker(self, i: int):
        return self.lab.dockerd(self.lab.host(i))

    def c(self, i: int) -> str:
        """The lab's own container on host i (on docker0)."""
        return self.lab.container_name(self.lab.host(i))

    def subnet(self, i: int) -> IPv4Network:
        return IPv4Interface(self.host(i).subnet).network

    def flannel_ip(self, i: int) -> str:
        """flannel.1's address: what a host's own traffic into the overlay carries as source."""
        return str(self.subnet(i).network_address)


def _need(tools: tuple[str, ...]) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed; .ci/setup installs it")


@pytest.fixture(scope="module")
def net():
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    _need(("dockerd", "docker", "containerd", "runc", "busybox"))
    prefix = f"fpn{secrets.token_hex(2)}"
    lab = DockerLab(prefix=prefix, hosts=2, backend="vxlan", daemon_json={},
                    agent_flags=["-docker-fixed-cidr", "-iptables-resync=1"])
    n = Net(lab, f"{prefix}-wan", "")
    wan_proc = None
    try:
        lab.up()
        n.wan_log = os.path.join(lab.workdir, "wan-httpd.log")
        _build_wan(n)
        with open(n.wan_log, "wb") as log:
            wan_proc = subprocess.Popen(["nsenter", f"--net=/var/run/netns/{n.wan_ns}", "busybox", "httpd", "-f",
                                         "-vv", "-p", f"{WAN_IP}:80", "-h", lab.workdir],
                                        stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        n.wan_pid = wan_proc.pid
        # the published web server on host 1, a plain one on host 2
        _start(n, 1, "web", HTTPD, "-p", "8080:80")
        _start(n, 2, "web2", HTTPD)
        for i in (1, 2):
            n.ips[n.c(i)] = n.host(i).container_ip
        yield n
    finally:
        for h in lab.host_list:
            # PID 1 of these containers ignores SIGTERM: dockerd would wait 10 s for each on shutdown
            if lab.dockerd_running(h):
                ids = lab.dockerd(h).docker("ps", "-aq", check=False).stdout.decode().split()
                if ids:
                    lab.dockerd(h).docker("rm", "-f", *ids, check=False)
        if wan_proc is not None:
            wan_proc.send_signal(signal.SIGTERM)
            wan_proc.wait(10)
        subprocess.run(["ip", "netns", "del", n.wan_ns], capture_output=True)
        lab.down()
        assert not [ns for ns in run("ip", "netns", "list").stdout.split() if ns.startswith(prefix)]


def _build_wan(n: Net) -> None:
    ul, wan = n.lab.underlay_ns, n.wan_ns
    run("ip", "netns", "add", wan)
    run("ip", "-n", wan, "link", "set", "lo", "up")
    run("ip", "-n", ul, "link", "add", "wan", "type", "veth", "peer", "name", "eth0", "netns", wan)
    run("ip", "-n", ul, "link", "set", "wan", "master", "br0", "up")
    run("ip", "-n", wan, "addr", "add", f"{WAN_GW}/24", "dev", "eth0")
    run("ip", "-n", wan, "addr", "add", f"{WAN_IP}/32", "dev", "lo")
    run("ip", "-n", wan, "link", "set", "eth0", "up")
    for h in n.lab.host_list:
        run("ip", "-n", h.netns, "route", "add", f"{WAN_IP}/32", "via", WAN_GW)


def _start(n: Net, i: int, name: str, cmd: list[str], *args: str) -> str:
    d = n.docker(i)
    d.run(name, cmd, detach=True, args=args)
    n.ips[name] = d.container_ip(name) or _first_ip(d, name)
    return n.ips[name]


def _first_ip(d, name: str) -> str:
    """The address of a container on a user-defined network (IPAddress is only docker0's)."""
    out = d.docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", name).stdout
    return out.decode().split()[0]


# --- clients and what the servers saw ------------------------------------------------------------------


def _request_script(ip: str, port: int, tag: str, nc: str = "nc") -> str:
    return f'printf "GET /{tag} HTTP/1.0\\r\\n\\r\\n" | {nc} -w 3 {ip} {port}'


def get_from_container(n: Net, i: int, name: str, ip: str, port: int = 80) -> str:
    """An HTTP request from container `name` on host i; returns the tag to find it in the server's log."""
    tag = secrets.token_hex(4)
    out = n.docker(i).exec(name, ["sh", "-c", _request_script(ip, port, tag)], check=False)
    assert out.stdout.startswith(b"HTTP/1."), f"{name} -> {ip}:{port}: no answer ({out.stderr!r})"
    return tag


def get_from_host(n: Net, i: int, ip: str, port: int = 80) -> str:
    tag = secrets.token_hex(4)
    out = run("busybox", "sh", "-c", _request_script(ip, port, tag, "busybox nc"), netns=n.host(i).netns, check=False)
    assert out.stdout.startswith("HTTP/1."), f"host {i} -> {ip}:{port}: no answer ({out.stderr!r})"
    return tag


def get_from_wan(n: Net, ip: str, port: int) -> str:
    tag = secrets.token_hex(4)
    out = run("busybox", "sh", "-c", _request_script(ip, port, tag, "busybox nc"), netns=n.wan_ns, check=False)
    assert out.stdout.startswith("HTTP/1."), f"wan -> {ip}:{port}: no answer ({out.stderr!r})"
    return tag


def seen_by(log: str, tag: str) -> str:
    """The peer address httpd logged for the request carrying `tag` (`[::ffff:10.5.1.2]:4711: url:/tag`)."""
    m = re.search(r"\[?(?:::ffff:)?([0-9.]+)\]?:\d+: url:/" + tag + r"\b", log)
    assert m, f"request {tag} not in the server's log:\n{log[-2000:]}"
    return m[1]


def container_log(n: Net, i: int, name: str) -> str:
    proc = n.docker(i).docker("logs", name)
    return (proc.stdout + proc.stderr).decode(errors="replace")


def wan_log(n: Net) -> str:
    with open(n.wan_log, errors="replace") as f:
        return f.read()


def pings(n: Net, i: int, name: str, ip: str, timeout: float = 10.0) -> bool:
    """Whether container `name` on host i gets an answer from ip within `timeout` (one ping a try)."""
    deadline = time.monotonic() + timeout
    while True:
        if n.docker(i).exec(name, ["ping", "-c1", "-W1", ip], check=False).returncode == 0:
            return True
        if time.monotonic() > deadline:
            return False


def no_ping(n: Net, i: int, name: str, ip: str) -> bool:
    return n.docker(i).exec(name, ["ping", "-c1", "-W1", ip], check=False).returncode != 0


def rules(n: Net, i: int, table: str) -> list[str]:
    return run("iptables-save", "-t", table, netns=n.host(i).netns).stdout.splitlines()


# --- daemon.json ---------------------------------------------------------------------------------------


def test_flanneld_gives_docker_the_lower_half_and_turns_its_masquerade_off(net: Net):
    for i in (1, 2):
        h = net.host(i)
        with open(net.lab.daemon_json_path(h)) as f:
            doc = json.load(f)
        lower = str(P.docker_half(net.subnet(i)))
        assert doc == {"bip": h.subnet, "mtu": 1450, "fixed-cidr": lower, "ip-masq": False}
        ipam = json.loads(net.docker(i).docker("network", "inspect", "bridge", "-f", "{{json .IPAM.Config}}").stdout)
        assert ipam == [{"Subnet": str(net.subnet(i)), "IPRange": lower, "Gateway": h.subnet.split("/")[0]}]
        assert IPv4Interface(f"{net.ips['web' if i == 1 else 'web2']}/25").network == P.docker_half(net.subnet(i))
        # Docker's own rule would come before flanneld's chain and NAT container-to-container traffic
        assert not [r for r in rules(net, i, "nat") if "MASQUERADE" in r and "! -o docker0" in r]


# --- published ports and source addresses -------------------------------------------------------------


def test_published_port_is_reachable_across_hosts_and_each_server_sees_the_right_source(net: Net):
    h1, h2 = net.host(1), net.host(2)
    # Docker's DNAT for -p 8080:80 is in place
    assert any("--dport 8080" in r and f"--to-destination {net.ips['web']}:80" in r for r in rules(net, 1, "nat"))
    cases = [
        # (client, request, source the server must see)
        ("container on host 2 -> host 1:8080", lambda: get_from_container(net, 2, net.c(2), h1.ip, 8080), h2.ip),
        ("container on host 2 -> web's overlay address", lambda: get_from_container(net, 2, net.c(2), net.ips["web"]),
         net.ips[net.c(2)]),
        ("host 2 -> host 1:8080", lambda: get_from_host(net, 2, h1.ip, 8080), h2.ip),
        ("host 2 -> web's overlay address", lambda: get_from_host(net, 2, net.ips["web"]), net.flannel_ip(2)),
        ("the internet -> host 1:8080", lambda: get_from_wan(net, h1.ip, 8080), WAN_GW),
    ]
    for what, request, source in cases:
        tag = request()
        assert seen_by(container_log(net, 1, "web"), tag) == source, what


def _masquerade_counts(n: Net, i: int) -> list[tuple[int, str]]:
    """(packets, rule) of every MASQUERADE rule in host i's nat table that matched anything."""
    out = []
    for line in run("iptables-save", "-c", "-t", "nat", netns=n.host(i).netns).stdout.splitlines():
        m = re.match(r"\[(\d+):\d+\] (-A .*-j MASQUERADE.*)", line)
        if m and int(m[1]):
            out.append((int(m[1]), m[2]))
    return out


def test_outside_traffic_is_masqueraded_exactly_once_and_overlay_traffic_never(net: Net):
    h2 = net.host(2)
    run("iptables", "-w", "-t", "nat", "-Z", netns=h2.netns)
    tag = get_from_container(net, 2, net.c(2), net.ips["web"])
    assert seen_by(container_log(net, 1, "web"), tag) == net.ips[net.c(2)]
    assert _masquerade_counts(net, 2) == []  # inside the Network: no NAT at all

    tag = get_from_container(net, 2, net.c(2), WAN_IP)
    assert seen_by(wan_log(net), tag) == h2.ip
    # the nat table sees a connection's first packet only: one rule, one packet, and it is flanneld's
    assert _masquerade_counts(net, 2) == [
        (1, '-A FLANNEL-POSTRTG -s 10.5.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" '
            '-j MASQUERADE --random-fully')]


# --- Docker's own rules stay Docker's ---------------------------------------------------------------------


def _dockers_rules(n: Net, i: int) -> dict[str, list[str]]:
    """Everything Docker programmed, and the FORWARD policy: what flanneld must leave as it is."""
    out = {}
    for table in ("filter", "nat"):
        out[table] = [r for r in rules(n, i, table)
                      if r.startswith((":FORWARD", "-A")) and "flanneld" not in r and "FLANNEL" not in r]
    return out


def _wait_log(n: Net, i: int, text: str, after: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(n.host(i).log_file, errors="replace") as f:
            if text in f.read()[after:]:
                return
        time.sleep(0.1)
    raise AssertionError(f"host {i}: no {text!r} in the log within {timeout}s:\n{n.lab.tail_log(i)}")


def test_dockers_chains_stay_intact_and_flanneld_does_not_shadow_them(net: Net):
    h1 = net.host(1)
    before = _dockers_rules(net, 1)
    assert ":FORWARD DROP [0:0]" in before["filter"]
    assert "-A DOCKER-USER -j RETURN" in before["filter"]
    ours = '-A DOCKER-USER -s 10.5.0.0/16 -d 10.5.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT'
    assert [r for r in rules(net, 1, "filter") if r.startswith("-A DOCKER-USER")] == [ours, "-A DOCKER-USER -j RETURN"]

    # Docker's isolation between its bridges holds: docker0 <-> a user-defined bridge, both ways
    net.docker(1).docker("network", "create", "isonet")
    iso = _start(net, 1, "iso", ["sleep", "100000"], "--network", "isonet")
    assert no_ping(net, 1, net.c(1), iso)
    assert no_ping(net, 1, "iso", net.ips[net.c(1)])

    # the administrator's DROP in DOCKER-USER wins over ours, and stays first through resyncs and a restart
    c1, c2 = net.ips[net.c(1)], net.ips[net.c(2)]
    drop = ["-s", c2, "-d", c1, "-j", "DROP"]
    run("iptables", "-w", "-I", "DOCKER-USER", "1", *drop, netns=h1.netns)
    try:
        assert no_ping(net, 2, net.c(2), c1)
        with open(h1.log_file) as f:
            size = len(f.read())
        run("iptables", "-w", "-F", "FLANNEL-FWD", netns=h1.netns)  # flanneld must rebuild its rules
        _wait_log(net, 1, "Some iptables rules are missing", size)
        time.sleep(1.5)
        net.lab.stop_agent(1)
        with open(h1.log_file) as f:
            size = len(f.read())
        net.lab.start_agent(1)
        _wait_log(net, 1, "iptables rules in place", size, timeout=45)  # the shared box is slow at times
        time.sleep(1.5)  # a resync or two
        du = [r for r in rules(net, 1, "filter") if r.startswith("-A DOCKER-USER")]
        assert du == [f"-A DOCKER-USER -s {c2}/32 -d {c1}/32 -j DROP", ours, "-A DOCKER-USER -j RETURN"]
        assert no_ping(net, 2, net.c(2), c1)
    finally:
        run("iptables", "-w", "-D", "DOCKER-USER", *drop, netns=h1.netns)
    assert pings(net, 2, net.c(2), c1)
    after = _dockers_rules(net, 1)
    # the same rules as before, plus only what Docker itself made for the new network
    assert ([r for r in after["filter"] + after["nat"] if "br-" not in r]
            == [r for r in before["filter"] + before["nat"] if "br-" not in r])


# --- user-defined bridges ---------------------------------------------------------------------------------


def test_user_defined_bridge_reaches_other_hosts_outbound_only(net: Net):
    d1 = net.docker(1)
    # Docker will not give a user-defined network a part of the lease: docker0 holds all of it (bip)
    refused = d1.docker("network", "create", "--subnet", str(P.attach_half(net.subnet(1))), "leasenet", check=False)
    assert refused.returncode != 0 and b"overlaps" in refused.stderr
    d1.docker("network", "create", "usernet")
    ub = _start(net, 1, "ub1", ["sleep", "100000"], "--network", "usernet")
    assert not IPv4Network("10.5.0.0/16").overlaps(IPv4Network(f"{ub}/32"))
    # out: masqueraded to host 1's flannel address, the only way host 2 can answer
    tag = get_from_container(net, 1, "ub1", net.ips["web2"])
    assert seen_by(container_log(net, 2, "web2"), tag) == net.flannel_ip(1)
    # in: its address means nothing on host 2 (every host has its own Docker-chosen 172.x)
    assert no_ping(net, 2, net.c(2), ub)


# --- flannelctl attach ------------------------------------------------------------------------------------


def flannelctl(n: Net, i: int, *args: str) -> subprocess.CompletedProcess:
    h = n.host(i)
    cmd = ["nsenter", f"--net=/var/run/netns/{h.netns}", *FLANNELCTL, *args]
    if args[0] == "attach":
        cmd += ["--subnet-file", h.subnet_file]
    return subprocess.run(cmd + ["-H", n.docker(i).host], capture_output=True, text=True, timeout=60)


def _links(n: Net, i: int, netns_path: str | None = None) -> list[str]:
    args = ["nsenter", f"--net={netns_path}"] if netns_path else ["nsenter", f"--net=/var/run/netns/{n.host(i).netns}"]
    out = subprocess.run([*args, "ip", "-j", "addr", "show"], capture_output=True, text=True, check=True).stdout
    return sorted(f"{l['ifname']} {[a['local'] for a in l.get('addr_info', [])]}" for l in json.loads(out))


def _container_netns(n: Net, i: int, name: str) -> str:
    pid = n.docker(i).docker("inspect", "-f", "{{.State.Pid}}", name).stdout.decode().strip()
    return f"/proc/{pid}/ns/net"


def test_attach_gives_fixed_overlay_addresses_reachable_across_hosts(net: Net):
    h1 = net.host(1)
    upper = P.attach_half(net.subnet(1))
    fixed = str(upper.network_address + 72)  # e.g. 10.5.x.200
    c2 = net.ips[net.c(2)]
    _start(net, 1, "fixed1", ["sleep", "100000"])

    done = flannelctl(net, 1, "attach", "fixed1", fixed)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"attached {fixed}/24 to fixed1 as eth1 (host side {P.host_link_name(upper.network_address + 72)} on docker0)")
    # both ways across the overlay, and the attached address is the source of its overlay traffic
    assert pings(net, 2, net.c(2), fixed)
    assert pings(net, 1, "fixed1", c2)
    tag = get_from_container(net, 1, "fixed1", net.ips["web2"])
    assert seen_by(container_log(net, 2, "web2"), tag) == fixed

    # no address given: the lowest free one of the upper half, here for a container on a user-defined
    # bridge, which so becomes reachable from other hosts (what the README recommends)
    if "ub1" not in net.ips:
        net.docker(1).docker("network", "create", "usernet2")
        _start(net, 1, "ub1", ["sleep", "100000"], "--network", "usernet2")
    auto = flannelctl(net, 1, "attach", "ub1", "--json")
    assert auto.returncode == 0, auto.stderr
    doc = json.loads(auto.stdout)
    assert doc["address"] == f"{upper.network_address}/24" and doc["interface"] == "eth1"
    assert not doc["default_route"]  # it has Docker's
    assert pings(net, 2, net.c(2), str(upper.network_address))
    tag = get_from_container(net, 1, "ub1", net.ips["web2"])
    assert seen_by(container_log(net, 2, "web2"), tag) == str(upper.network_address)

    # any network namespace, by path; one without a default route gets one through the bridge
    plain = f"{net.lab.prefix}-x1"
    run("ip", "netns", "add", plain)
    try:
        run("ip", "-n", plain, "link", "set", "lo", "up")
        by_path = flannelctl(net, 1, "attach", f"/var/run/netns/{plain}", "--json")
        assert by_path.returncode == 0, by_path.stderr
        assert json.loads(by_path.stdout)["default_route"]
        plain_ip = str(upper.network_address + 1)
        assert json.loads(by_path.stdout)["address"] == f"{plain_ip}/24"
        assert pings(net, 2, net.c(2), plain_ip)
        assert run("ping", "-c1", "-W2", WAN_IP, netns=plain, check=False).returncode == 0  # out via host 1's NAT

        # an address a hand-made interface uses (pipework style, unknown to Docker and to attach)
        hand = str(upper.network_address + 90)
        _hand_made(net, plain, hand)
        # refusals: one line, exit 1, nothing changed in the container or on the host
        fixed1_ns = _container_netns(net, 1, "fixed1")
        before = (_links(net, 1), _links(net, 1, fixed1_ns))
        for address, message in [
            (str(net.subnet(2).network_address + 140), f"is outside this host's subnet {net.subnet(1)} "
                                                        f"(FLANNEL_SUBNET in {h1.subnet_file})"),
            (str(net.subnet(1).network_address + 20), f"is in Docker's half of the subnet, {P.docker_half(net.subnet(1))}"),
            (plain_ip, f"is already in use: attached by flannelctl attach (host link {P.host_link_name(upper.network_address + 1)})"),
            ("10.5.1", "is not an IPv4 address"),
            (hand, f"{hand} is already in use: something on docker0 answers ARP for it"),
        ]:
            bad = flannelctl(net, 1, "attach", "fixed1", address)
            assert bad.returncode == 1 and bad.stdout == "", (address, bad.stdout)
            assert bad.stderr.count("\n") == 1 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
        assert (_links(net, 1), _links(net, 1, fixed1_ns)) == before

        # kernel state in the container's namespace: a flanneld restart changes nothing
        net.lab.stop_agent(1)
        assert fixed in str(_links(net, 1, fixed1_ns))
        net.lab.start_agent(1)
        net.lab.wait_subnet_env(1)
        assert fixed in str(_links(net, 1, fixed1_ns))
        assert pings(net, 2, net.c(2), fixed) and pings(net, 1, "fixed1", c2)

        # detach: gone, unreachable, and a second detach says there is nothing
        gone = flannelctl(net, 1, "detach", "fixed1", fixed)
        assert gone.returncode == 0 and gone.stdout == f"detached {fixed} from fixed1\n", gone.stderr
        assert "eth1" not in str(_links(net, 1, fixed1_ns))
        assert P.host_link_name(upper.network_address + 72) not in str(_links(net, 1))
        assert no_ping(net, 2, net.c(2), fixed)
        again = flannelctl(net, 1, "detach", "fixed1")
        assert again.returncode == 1 and again.stderr == "flannelctl: fixed1 has no address attached by flannelctl attach\n"
        assert flannelctl(net, 1, "detach", f"/var/run/netns/{plain}").returncode == 0
    finally:
        run("ip", "netns", "del", plain, check=False)


def _hand_made(n: Net, netns: str, address: str) -> None:
    """What pipework does: a veth from docker0 into a namespace with a static address."""
    h = n.host(1).netns
    run("ip", "-n", h, "link", "add", "fphand", "type", "veth", "peer", "name", "hand0", "netns", netns)
    run("ip", "-n", h, "link", "set", "fphand", "master", "docker0", "up")
    run("ip", "-n", netns, "addr", "add", f"{address}/24", "dev", "hand0")
    run("ip", "-n", netns, "link", "set", "hand0", "up")
