"""Issue #7's reliability catalogue, on the namespace lab: real etcd, real `flanneld`, no mocks.

Every test builds its own lab with a fresh `fpr<4 hex>` prefix, stops only the processes it
started (by PID) and deletes only its own namespaces (by name), also when it fails.  The
figures each test measures (lost pings, re-creation time, ...) are printed on one
`FIGURE ...` line, so `pytest -s` shows them.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import threading
import time
from ipaddress import IPv4Network

import pytest

from flannelpy.lab.netns_lab import ETCD_IP, Lab, LabError, run, stop_pid
from flannelpy.subnet.envfile import parse_env_file

pytestmark = [pytest.mark.root, pytest.mark.etcd]


def _prefix() -> str:
    return f"fpr{secrets.token_hex(2)}"


def figure(name: str, **values: object) -> None:
    print(f"FIGURE {name}: " + ", ".join(f"{k}={v}" for k, v in values.items()), flush=True)


class RLab(Lab):
    """The lab plus what these tests need: agents whose exit status we keep, hosts added
    later, a lab with no agent started yet, per-host extra flags."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.procs: dict[int, subprocess.Popen] = {}
        self.host_flags: dict[int, list[str]] = {}

    def agent_command(self, host) -> list[str]:
        return [*super().agent_command(host), *self.host_flags.get(host.index, [])]

    def start_agent(self, i: int) -> int:
        # As Lab.start_agent, but keeping the Popen so that the exit status is ours to read.
        host = self.host(i)
        log = open(host.log_file, "ab")
        env = dict(os.environ, **self.agent_env)
        env.pop("NOTIFY_SOCKET", None)
        proc = subprocess.Popen(["nsenter", f"--net=/var/run/netns/{host.netns}", *self.agent_command(host)],
                                stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        log.close()
        self.procs[i] = proc
        host.pid = proc.pid
        self.save()
        return proc.pid

    def stop_agent(self, i: int, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(i, None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.host(i).pid = 0
        self.save()

    def add_host(self, start: bool = True, container: bool = True) -> int:
        """One more host (and container) after the lab is up; its agent starts now."""
        self.hosts += 1  # first, so that down() removes its namespaces whatever happens next
        i = self.hosts
        self._build_host(i)
        self.save()
        if start:
            self.start_agent(i)
            self.wait_subnet_env(i, 60)
            if container:
                self._build_container(self.host(i))
            self.save()
        return i

    def down(self) -> list[str]:
        for i in list(self.procs):
            self.stop_agent(i, signal.SIGKILL)
        return super().down()

    # --- observations ----------------------------------------------------------------------

    def route(self, i: int, subnet: str) -> str:
        return run("ip", "route", "show", str(IPv4Network(subnet, strict=False)), netns=self.host(i).netns).stdout.strip()

    def wait_route(self, i: int, subnet: str, timeout: float = 20.0) -> float:
        """Wait until host i has a route to `subnet`; the wall-clock time it was seen."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.route(i, subnet):
                return time.time()
            time.sleep(0.02)
        raise LabError(f"host {i}: no route to {subnet} after {timeout}s; log:\n{self.tail_log(i)}")

    def new_host_reaches(self, hosts) -> dict[int, float]:
        """Add a host; for each of `hosts`, seconds from the new agent writing its subnet.env
        to the route to its subnet being there (<= 0: the route came first)."""
        new = self.add_host(container=False)
        written = os.stat(self.host(new).subnet_file).st_mtime
        seen = {i: round(self.wait_route(i, self.host(new).subnet) - written, 3) for i in hosts}
        self._build_container(self.host(new))
        self.save()
        return seen

    def leases(self) -> dict[str, dict]:
        """subnet key -> decoded value, for every key under <prefix>/subnets/."""
        out = self.etcdctl("get", "--prefix", f"{self.etcd_prefix}/subnets/", "-w", "json").stdout
        doc = json.loads(out)
        import base64
        leases = {}
        for kv in doc.get("kvs") or []:
            key = base64.b64decode(kv["key"]).decode().rsplit("/", 1)[-1]
            try:
                leases[key] = json.loads(base64.b64decode(kv["value"]))
            except ValueError:
                leases[key] = None
        return leases

    def log_text(self, i: int) -> str:
        try:
            with open(self.host(i).log_file, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""


class Pinger:
    """A background `busybox ping -i <interval>` from one container to another; counts losses."""

    def __init__(self, lab: Lab, src: int, dst: int, interval: float) -> None:
        self.interval = interval
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/var/run/netns/{lab.host(src).container_ns}",
             "busybox", "ping", "-i", str(interval), lab.host(dst).container_ip],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def stop(self) -> dict[str, float]:
        """SIGINT (busybox prints its statistics); {'sent', 'received', 'lost', 'longest_gap_s'}.

        The very last request may still be in flight when SIGINT lands, so it is not counted."""
        time.sleep(self.interval * 2)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=10)
        m = re.search(r"(\d+) packets transmitted, (\d+) packets received", out)
        assert m, f"no ping statistics in:\n{out[-2000:]}"
        sent = int(m.group(1))
        seqs = {int(s) for s in re.findall(r"seq=(\d+)", out)}
        lost_seqs = sorted(set(range(sent - 1)) - seqs)
        longest = run_len = 0
        prev = None
        for s in lost_seqs:
            run_len = run_len + 1 if prev is not None and s == prev + 1 else 1
            longest = max(longest, run_len)
            prev = s
        return {"sent": sent, "received": len(seqs), "lost": len(lost_seqs),
                "longest_gap_s": round(longest * self.interval, 2)}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def make_lab(root):
    """Factory for RLabs; every lab made is torn down afterwards, whatever happened."""
    labs: list[RLab] = []
    pingers: list[Pinger] = []

    def make(cls=RLab, up: bool = True, **kwargs) -> RLab:
        lab = cls(prefix=kwargs.pop("prefix", _prefix()), **kwargs)
        labs.append(lab)
        if up:
            lab.up()
        else:
            lab.build()
        return lab

    make.pingers = pingers
    try:
        yield make
    finally:
        for p in pingers:
            p.kill()
        for lab in labs:
            lab.down()


def _pinger(make_lab, lab, src, dst, interval) -> Pinger:
    p = Pinger(lab, src, dst, interval)
    make_lab.pingers.append(p)
    time.sleep(interval * 3)  # a few replies before the disruption
    return p


# --- 1. etcd restarted under traffic -------------------------------------------------------------


@pytest.mark.slow
def test_etcd_restart_loses_no_pings_and_watch_resumes(make_lab):
    lab = make_lab(hosts=2, backend="vxlan")
    assert all(lab.wait_all_pings(20).values())
    pids = {i: lab.host(i).pid for i in (1, 2)}
    ping = _pinger(make_lab, lab, 1, 2, 0.2)

    started = time.monotonic()
    lab.etcd.stop()
    time.sleep(3)  # long enough for both agents' watches to notice and start reconnecting
    lab.etcd.start()
    outage = time.monotonic() - started
    time.sleep(2)
    stats = ping.stop()

    # The agents rode it out: same processes, still alive.
    assert {i: lab.host(i).pid for i in (1, 2)} == pids and all(lab.agent_running(i) for i in (1, 2))
    # A lease made after etcd came back reaches every host: the watches resumed.
    reach = lab.new_host_reaches((1, 2))
    results = lab.wait_all_pings(20)
    figure("etcd restart", outage_s=round(outage, 1), **stats, route_to_new_lease_s=reach)
    assert stats["lost"] == 0, stats
    assert stats["received"] >= 20
    assert all(results.values()), results
    for i in (1, 2):
        assert "interrupted" in lab.log_text(i) or "reconnect" in lab.log_text(i).lower()


# --- 2. 3-member etcd cluster, leader killed -----------------------------------------------------

CLUSTER_PORTS = [(2379, 2380), (22379, 22380), (32379, 32380)]


class ClusterLab(RLab):
    """The lab with a 3-member etcd cluster on the underlay bridge (one IP, three port pairs)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.members: dict[str, subprocess.Popen] = {}

    @property
    def etcd_endpoint(self) -> str:  # what agent_command passes as -etcd-endpoints
        return ",".join(f"http://{ETCD_IP}:{c}" for c, _ in CLUSTER_PORTS)

    def member_names(self) -> list[str]:
        return [f"m{n}" for n in range(1, len(CLUSTER_PORTS) + 1)]

    def _start_etcd(self) -> None:
        cluster = ",".join(f"{name}=http://{ETCD_IP}:{p}" for name, (_c, p) in zip(self.member_names(), CLUSTER_PORTS))
        for name, (cport, pport) in zip(self.member_names(), CLUSTER_PORTS):
            data = os.path.join(self.workdir, f"etcd-{name}")
            os.makedirs(data, exist_ok=True)
            client, peer = f"http://{ETCD_IP}:{cport}", f"http://{ETCD_IP}:{pport}"
            log = open(os.path.join(data, "etcd.log"), "ab")
            self.members[name] = subprocess.Popen(
                ["nsenter", f"--net=/var/run/netns/{self.underlay_ns}", "etcd", "--name", name,
                 "--data-dir", os.path.join(data, "data"),
                 "--listen-client-urls", client, "--advertise-client-urls", client,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", cluster, "--initial-cluster-state", "new",
                 "--initial-cluster-token", self.prefix, "--enable-v2=true", "--log-level", "warn"],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
            log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.etcdctl("endpoint", "health", check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise LabError("3-member etcd cluster did not become healthy in 30s")

    def etcdctl(self, *args: str, api: int = 3, check: bool = True, endpoints: str = "") -> subprocess.CompletedProcess:
        # (--endpoints is a string slice: given twice, etcdctl would use both lists.)
        env = dict(os.environ, ETCDCTL_API=str(api))
        return subprocess.run(
            ["nsenter", f"--net=/var/run/netns/{self.underlay_ns}", "etcdctl",
             f"--endpoints={endpoints or self.etcd_endpoint}", *(["--dial-timeout=2s"] if api == 3 else []), *args],
            env=env, capture_output=True, text=True, check=check, timeout=30)

    def endpoint_status(self, members=None) -> list[dict]:
        members = members or self.member_names()
        endpoints = ",".join(f"http://{ETCD_IP}:{CLUSTER_PORTS[self.member_names().index(m)][0]}" for m in members)
        out = self.etcdctl("endpoint", "status", "-w", "json", "--command-timeout=1s", check=False,
                           endpoints=endpoints).stdout
        return json.loads(out or "[]")

    def leader_member(self, members=None) -> tuple[str, str]:
        """(member name, endpoint) of the current leader, asking only `members`."""
        for st in self.endpoint_status(members):
            if st["Status"]["header"]["member_id"] == st["Status"]["leader"]:
                port = int(st["Endpoint"].rsplit(":", 1)[1])
                idx = [c for c, _ in CLUSTER_PORTS].index(port)
                return self.member_names()[idx], st["Endpoint"]
        raise LabError("no etcd leader")

    def move_leader(self, target: str) -> None:
        name, endpoint = self.leader_member()
        if name == target:
            return
        st = self.endpoint_status([target])[0]
        self.etcdctl("move-leader", format(st["Status"]["header"]["member_id"], "x"), endpoints=endpoint)
        deadline = time.monotonic() + 10
        while self.leader_member()[0] != target:
            if time.monotonic() > deadline:
                raise LabError(f"leadership did not move to {target}")
            time.sleep(0.1)

    def down(self) -> list[str]:
        for proc in self.members.values():
            stop_pid(proc.pid, signal.SIGTERM, timeout=10)
            proc.poll()
        return super().down()


@pytest.mark.slow
def test_etcd_cluster_leader_killed_agents_keep_leases_and_watch(make_lab):
    lab = make_lab(ClusterLab, hosts=2, backend="vxlan")
    assert all(lab.wait_all_pings(20).values())
    pids = {i: lab.host(i).pid for i in (1, 2)}
    before = lab.leases()
    # The harsh case: the leader is also the member the agents talk to (the first endpoint, m1).
    lab.move_leader("m1")
    name, endpoint = lab.leader_member()
    assert name == "m1"

    killed = time.monotonic()
    lab.members[name].kill()  # SIGKILL, by the PID we started
    lab.members[name].wait()
    # Wait for a new leader among the survivors.
    new_leader = None
    while time.monotonic() - killed < 20:
        try:
            new_leader = lab.leader_member([m for m in lab.member_names() if m != name])[0]
            break
        except (LabError, KeyError, ValueError):
            time.sleep(0.1)
    election_s = time.monotonic() - killed
    assert new_leader and new_leader != name

    # A new host's lease reaches the old hosts through their (re-established) watches.
    reach = lab.new_host_reaches((1, 2))
    results = lab.wait_all_pings(20)
    after = lab.leases()
    failovers = {i: lab.log_text(i).count("interrupted") for i in (1, 2)}
    figure("etcd leader killed", killed=f"{name} ({endpoint})", new_leader=new_leader,
           election_s=round(election_s, 2), route_to_new_lease_s=reach, watch_reconnect_log_lines=failovers)
    assert all(results.values()), results
    # No agent restarted, and both still hold the leases they had.
    assert {i: lab.host(i).pid for i in (1, 2)} == pids and all(lab.agent_running(i) for i in (1, 2))
    for key, value in before.items():
        assert after.get(key) == value, (key, value, after.get(key))
    for i in (1, 2):
        assert lab.procs[i].poll() is None
        assert failovers[i] > 0  # their watch was on the killed member and moved to another


# --- 3. kill -9 and restart ----------------------------------------------------------------------


def _vtep_mac(lab: RLab, i: int) -> str:
    out = run("ip", "-j", "link", "show", "flannel.1", netns=lab.host(i).netns).stdout
    return json.loads(out)[0]["address"]


@pytest.mark.slow
def test_agent_sigkill_and_restart_keeps_subnet_and_mac(make_lab):
    lab = make_lab(hosts=2, backend="vxlan")
    assert all(lab.wait_all_pings(20).values())
    subnet, mac = lab.host(1).subnet, _vtep_mac(lab, 1)
    ping = _pinger(make_lab, lab, 2, 1, 0.1)

    t0 = time.monotonic()
    lab.stop_agent(1, signal.SIGKILL)
    mtime = os.stat(lab.host(1).subnet_file).st_mtime
    lab.start_agent(1)
    lab.wait_subnet_env(1, 30, after_mtime=mtime)  # the restarted agent rewrites it
    # Wait until the restarted agent reports ready (it rewrote subnet.env and runs its loops).
    _wait_log(lab, 1, "running: subnet", after=1)
    restart_s = time.monotonic() - t0
    time.sleep(1)
    stats = ping.stop()
    figure("kill -9 + restart", restart_to_running_s=round(restart_s, 2), **stats)

    assert lab.host(1).subnet == subnet
    assert _vtep_mac(lab, 1) == mac
    assert lab.leases()[_key(subnet)]["BackendData"]["VtepMAC"] == mac
    assert stats["lost"] * 0.1 <= 1.0, stats
    assert all(lab.wait_all_pings(10).values())


def _key(flannel_subnet: str) -> str:
    return str(IPv4Network(flannel_subnet, strict=False)).replace("/", "-")


def _wait_log(lab: RLab, i: int, text: str, after: int = 0, timeout: float = 30) -> None:
    """Wait until `text` appears more than `after` times in host i's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lab.log_text(i).count(text) > after:
            return
        if not lab.agent_running(i):
            raise LabError(f"agent {i} exited:\n{lab.tail_log(i)}")
        time.sleep(0.05)
    raise LabError(f"host {i}: no {text!r} in the log after {timeout}s:\n{lab.tail_log(i)}")


# --- 4. 50 agents at once ------------------------------------------------------------------------


@pytest.mark.slow
def test_fifty_agents_at_once_get_fifty_distinct_subnets(make_lab):
    n = 50
    lab = make_lab(up=False, hosts=1, backend="alloc", with_containers=False)
    host = lab.host(1)
    procs: list[subprocess.Popen] = []
    try:
        t0 = time.monotonic()
        for k in range(1, n + 1):
            log = open(os.path.join(host.dir, f"a{k}.log"), "ab")
            procs.append(subprocess.Popen(
                ["nsenter", f"--net=/var/run/netns/{host.netns}", "flanneld",
                 f"-etcd-endpoints={lab.etcd_endpoint}", "-iface=eth0", f"-public-ip=10.250.1.{k}",
                 f"-subnet-file={host.dir}/a{k}.env", f"-status-socket={host.dir}/a{k}.sock",
                 "-iptables-forward-rules=false"],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True))
            log.close()
        envs: dict[int, dict[str, str]] = {}
        deadline = time.monotonic() + 240
        while len(envs) < n and time.monotonic() < deadline:
            for k in range(1, n + 1):
                if k not in envs and os.path.exists(f"{host.dir}/a{k}.env"):
                    envs[k] = parse_env_file(open(f"{host.dir}/a{k}.env").read())
            if any(p.poll() is not None for p in procs):
                break
            time.sleep(0.2)
        all_leased_s = time.monotonic() - t0
        crashed = {k + 1: p.returncode for k, p in enumerate(procs) if p.poll() is not None}
        subnets = {k: e["FLANNEL_SUBNET"] for k, e in envs.items()}
        leases = lab.leases()
        logs = "".join(open(os.path.join(host.dir, f"a{k}.log"), errors="replace").read()
                       for k in range(1, n + 1))
        races = logs.count("was taken by another host while we created it")
        figure("50 agents", all_leased_s=round(all_leased_s, 1), crashed=len(crashed),
               distinct_subnets=len(set(subnets.values())), leases_in_etcd=len(leases), lost_races=races)
        assert not crashed, {k: open(os.path.join(host.dir, f"a{k}.log")).read()[-1500:] for k in crashed}
        assert len(envs) == n
        assert len(set(subnets.values())) == n
        assert len(leases) == n
        assert sorted(v["PublicIP"] for v in leases.values()) == sorted(f"10.250.1.{k}" for k in range(1, n + 1))
        nets = [IPv4Network(s, strict=False) for s in subnets.values()]
        assert all(not a.overlaps(b) for x, a in enumerate(nets) for b in nets[x + 1:])
        # And they all stop cleanly.
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=30) for p in procs]
        assert codes == [0] * n
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


# --- 5. an operator deletes a running host's lease -----------------------------------------------


@pytest.mark.slow
def test_deleted_lease_is_recreated_within_a_second(make_lab):
    lab = make_lab(hosts=2, backend="vxlan")
    assert all(lab.wait_all_pings(20).values())
    key_name = _key(lab.host(1).subnet)
    key = f"{lab.etcd_prefix}/subnets/{key_name}"
    before = lab.leases()[key_name]
    watch = subprocess.Popen(
        ["nsenter", f"--net=/var/run/netns/{lab.underlay_ns}", "etcdctl", f"--endpoints={lab.etcd_endpoint}",
         "watch", key], env=dict(os.environ, ETCDCTL_API="3"),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    events: list[tuple[float, str]] = []

    def reader() -> None:
        for line in watch.stdout:
            events.append((time.monotonic(), line.strip()))

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        time.sleep(0.5)  # the watch is established
        ping = _pinger(make_lab, lab, 2, 1, 0.2)
        lab.etcdctl("del", key)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(e == "PUT" for _, e in events):
            time.sleep(0.01)
        time.sleep(1)
        stats = ping.stop()
    finally:
        watch.kill()
        watch.wait()
        t.join(5)
    deleted = next(ts for ts, e in events if e == "DELETE")
    put = next((ts for ts, e in events if e == "PUT" and ts >= deleted), None)
    assert put is not None, f"lease never re-created; log:\n{lab.tail_log(1)}"
    recreated_s = put - deleted
    after = lab.leases()[key_name]
    figure("lease deleted by operator", recreated_s=round(recreated_s, 3), **stats)
    assert recreated_s < 1.0
    assert after["PublicIP"] == before["PublicIP"] and after["BackendData"] == before["BackendData"]
    assert stats["lost"] == 0, stats
    assert lab.agent_running(1) and "re-created lease" in lab.log_text(1)
    assert all(lab.wait_all_pings(10).values())


# --- 6. out of subnets ---------------------------------------------------------------------------


@pytest.mark.slow
def test_out_of_subnets_second_agent_exits_nonzero_without_subnet_env(make_lab):
    config = json.dumps({"Network": "10.9.0.0/16", "SubnetMin": "10.9.1.0", "SubnetMax": "10.9.1.0",
                         "Backend": {"Type": "vxlan"}})
    lab = make_lab(up=False, hosts=2, config=config, with_containers=False)
    lab.start_agent(1)
    assert lab.wait_subnet_env(1, 30)["FLANNEL_SUBNET"] == "10.9.1.1/24"
    t0 = time.monotonic()
    lab.start_agent(2)
    code = lab.procs[2].wait(timeout=60)
    figure("out of subnets", exit_code=code, exit_after_s=round(time.monotonic() - t0, 2))
    log = lab.log_text(2)
    assert code != 0
    assert "out of subnets" in log and "10.9.1.0" in log, log
    assert "Traceback" not in log
    assert not os.path.exists(lab.host(2).subnet_file)
    assert not [f for f in os.listdir(lab.host(2).dir) if f.startswith("subnet.env")]
    assert lab.agent_running(1)  # the first one is untouched


# --- 7. bad config in etcd, garbage leases written by others -------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("config, field", [
    ('{"Network":"10.5.0.0/16","SubnetLen":31,"Backend":{"Type":"vxlan"}}', "SubnetLen"),
    ('{"Network":"10.5.0.0/16","Backend":{"Type":"geneve"}}', "Backend.Type"),
    ('{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.7"', "not valid JSON"),
])
def test_bad_config_in_etcd_agent_exits_nonzero(make_lab, config, field):
    lab = make_lab(up=False, hosts=1, config=config, with_containers=False)
    lab.start_agent(1)
    code = lab.procs[1].wait(timeout=60)
    log = lab.log_text(1)
    figure("bad config", field=field, exit_code=code)
    assert code != 0, log
    assert field in log, log
    assert "Traceback" not in log
    assert not os.path.exists(lab.host(1).subnet_file)
    assert run("ip", "link", "show", "flannel.1", netns=lab.host(1).netns, check=False).returncode != 0


GARBAGE = {
    "not-a-subnet": '{"PublicIP":"10.250.0.99"}',        # bad key name
    "10.5.1.0-24": "this is not json",                     # non-JSON value
    "10.5.2.0-24": '{"PublicIP":5}',                       # wrong type
    "10.5.3.0-24": '["PublicIP","10.250.0.98"]',           # not an object
    "10.5.4.0-24": '{"PublicIP":"10.250.0.97","BackendType":"vxlan","BackendData":{"VNI":"one"}}',
    "10.5.5.0-33": '{"PublicIP":"10.250.0.96"}',           # impossible prefix length
}


@pytest.mark.slow
def test_garbage_leases_are_skipped_and_agent_keeps_running(make_lab):
    config = json.dumps({"Network": "10.5.0.0/16", "SubnetMin": "10.5.1.0", "SubnetMax": "10.5.6.0",
                         "Backend": {"Type": "vxlan"}})
    lab = make_lab(up=False, hosts=2, config=config)
    for key, value in GARBAGE.items():
        lab.etcdctl("put", f"{lab.etcd_prefix}/subnets/{key}", value)
    lab.start_agent(1)
    env = lab.wait_subnet_env(1, 60)
    # 10.5.1-4 hold garbage, so the only free /24 in SubnetMin..SubnetMax is 10.5.5 or 10.5.6.
    assert env["FLANNEL_SUBNET"] in ("10.5.5.1/24", "10.5.6.1/24"), env
    _wait_log(lab, 1, "running: subnet")
    # More garbage while it runs: the watch skips it too.
    lab.etcdctl("put", f"{lab.etcd_prefix}/subnets/zzz", "\x01\x02 garbage")
    lab.etcdctl("put", f"{lab.etcd_prefix}/subnets/10.5.200.0-24", '{"PublicIP":"nope"}')
    _wait_log(lab, 1, "skipping watch event")
    # A real peer still gets through after all that.
    lab.start_agent(2)
    lab.wait_subnet_env(2, 60)
    lab.wait_route(1, lab.host(2).subnet)
    log = lab.log_text(1)
    skipped = log.count("skipping lease")
    figure("garbage leases", skipped_log_lines=skipped, watch_skips=log.count("skipping watch event"),
           subnet=env["FLANNEL_SUBNET"])
    assert lab.agent_running(1) and lab.agent_running(2)
    for key in ("not-a-subnet", "10.5.1.0-24", "10.5.2.0-24", "10.5.3.0-24", "10.5.4.0-24"):
        assert key in log, (key, log)
    assert "Traceback" not in log
    # Nobody touched the garbage: it is someone else's.
    leases = lab.leases()
    assert leases["10.5.1.0-24"] is None and leases["not-a-subnet"] == {"PublicIP": "10.250.0.99"}
