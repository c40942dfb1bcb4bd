"""A multi-host flannel lab on one machine: network namespaces as hosts, real etcd, real flanneld.

Topology (every namespace name starts with the lab's prefix, so nothing else is touched):

    <prefix>-ul   underlay: bridge `br0` 10.250.0.1/24 and etcd listening on it
    <prefix>-hN   host N: `eth0` 10.250.0.(10+N)/24 on the underlay bridge, runs `flanneld`
    <prefix>-cN   container N: `eth0` behind bridge `cbr0` in host N, addressed from its subnet.env

Each agent is started exactly as a user would run it (`flanneld -etcd-endpoints=... -iface=eth0`)
through `nsenter --net=`, in its own session so the lab outlives `flannelctl lab up`.  The lab's
state (names, PIDs, paths) is kept in `<workdir>/lab.json`, so `lab down` from another process
removes exactly what `lab up` made, killing only the PIDs it started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Interface, IPv4Network
from typing import Any

from flannelpy.errors import FlannelError
from flannelpy.subnet.envfile import parse_env_file

from .etcd_server import EtcdServer

UNDERLAY_NET = IPv4Network("10.250.0.0/24")
ETCD_IP = "10.250.0.1"
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
DEFAULT_WORKDIR = "/run/flannelpy-lab"
DEFAULT_PREFIX = "fplab"


class LabError(FlannelError):
    pass


def host_ip(index: int) -> str:
    return str(UNDERLAY_NET.network_address + 10 + index)


def own_command(name: str) -> str:
    """flanneld/flannelctl from the same installation as this Python (a venv need not be on PATH)."""
    sibling = os.path.join(os.path.dirname(sys.executable), name)
    return sibling if os.access(sibling, os.X_OK) else name


def default_config(backend: str, network: str = "10.5.0.0/16") -> str:
    """The network config the lab writes; `none` writes no Backend at all (flanneld: udp)."""
    if backend == "none":
        return json.dumps({"Network": network})
    return json.dumps({"Network": network, "Backend": {"Type": backend}})


def run(*args: str, netns: str | None = None, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    cmd = (["nsenter", f"--net=/var/run/netns/{netns}"] if netns else []) + list(args)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of this process is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def stop_pid(pid: int, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    """Signal a process we started and wait for it to go (SIGKILL after `timeout`)."""
    if not pid or not _pid_alive(pid):
        return
    os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
        except ChildProcessError:
            pass  # not our child (lab down from another process): poll instead
        if not _pid_alive(pid):
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


@dataclass
class LabHost:
    index: int
    netns: str
    container_ns: str
    ip: str
    dir: str
    pid: int = 0
    subnet: str = ""  # FLANNEL_SUBNET once written
    mtu: int = 0
    container_ip: str = ""

    @property
    def subnet_file(self) -> str:
        return os.path.join(self.dir, "subnet.env")

    @property
    def log_file(self) -> str:
        return os.path.join(self.dir, "flanneld.log")

    @property
    def status_socket(self) -> str:
        return os.path.join(self.dir, "flanneld.sock")


@dataclass
class Lab:
    prefix: str = DEFAULT_PREFIX
    hosts: int = 2
    backend: str = "vxlan"
    etcd_api: str = "v3"  # how the config is written: v3 `etcdctl put` or v2 `etcdctl mk`
    etcd_prefix: str = "/coreos.com/network"
    config: str = ""  # raw config JSON; empty = default_config(backend)
    workdir: str = ""
    agent_flags: list[str] = field(default_factory=list)
    agent_env: dict[str, str] = field(default_factory=dict)
    with_containers: bool = True
    host_list: list[LabHost] = field(default_factory=list)
    etcd_pid: int = 0

    def __post_init__(self) -> None:
        if not self.workdir:
            self.workdir = os.path.join(DEFAULT_WORKDIR, self.prefix)
        if not self.config:
            self.config = default_config(self.backend)
        if not 1 <= self.hosts <= 200:
            raise LabError(f"--hosts {self.hosts}: must be between 1 and 200")
        self._etcd: EtcdServer | None = None
        # Popen handles of agents started by this process: stop_agent reaps through them so the
        # exit status is not lost to subprocess's reaping of dropped Popen objects.
        self._agent_procs: dict[int, subprocess.Popen] = {}

    # --- names -----------------------------------------------------------------------------

    @property
    def underlay_ns(self) -> str:
        return f"{self.prefix}-ul"

    @property
    def etcd_endpoint(self) -> str:
        return f"http://{ETCD_IP}:{ETCD_CLIENT_PORT}"

    @property
    def state_file(self) -> str:
        return os.path.join(self.workdir, "lab.json")

    def all_namespaces(self) -> list[str]:
        names = [self.underlay_ns]
        for i in range(1, self.hosts + 1):
            names += [f"{self.prefix}-h{i}", f"{self.prefix}-c{i}"]
        return names

    # --- persistence -------------------------------------------------------------------------

    def save(self) -> None:
        doc = asdict(self)
        tmp = self.state_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=2)
        os.replace(tmp, self.state_file)

    @classmethod
    def load(cls, prefix: str = DEFAULT_PREFIX, workdir: str = "") -> "Lab":
        path = os.path.join(workdir or os.path.join(DEFAULT_WORKDIR, prefix), "lab.json")
        try:
            with open(path) as f:
                doc = json.load(f)
        except FileNotFoundError:
            raise LabError(f"no lab {prefix!r} ({path} not found); start one with `flannelctl lab up`") from None
        hosts = [LabHost(**h) for h in doc.pop("host_list")]
        lab = cls(**doc)
        lab.host_list = hosts
        return lab

    # --- bring up ----------------------------------------------------------------------------

    def up(self, wait: float = 60.0) -> None:
        """Build everything and start the agents; on any failure tear down what was built and raise."""
        self.build()
        try:
            for host in self.host_list:
                self.start_agent(host.index)
            for host in self.host_list:
                self.wait_subnet_env(host.index, wait)
                if self.with_containers:
                    self._build_container(host)
            self.save()
        except BaseException:
            self.down()
            raise

    def build(self) -> None:
        """Everything up() makes except the agents: underlay, etcd, config, host namespaces."""
        if os.path.exists(self.state_file):
            raise LabError(f"lab {self.prefix!r} already exists ({self.state_file}); run `flannelctl lab down` first")
        existing = set(run("ip", "netns", "list").stdout.split())
        clash = [n for n in self.all_namespaces() if n in existing]
        if clash:
            raise LabError(f"namespaces already exist: {', '.join(clash)}; remove them or use another --prefix")
        for tool in ("etcd", "etcdctl", "nsenter", "ip", "busybox"):
            if shutil.which(tool) is None:
                raise LabError(f"{tool} not found: install it (see .ci/setup)")
        os.makedirs(self.workdir, exist_ok=True)
        try:
            self._build_underlay()
            self._start_etcd()
            self.write_config()
            for i in range(1, self.hosts + 1):
                self._build_host(i)
            self.save()
        except BaseException:
            self.down()
            raise

    def _build_underlay(self) -> None:
        ns = self.underlay_ns
        run("ip", "netns", "add", ns)
        run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", ns, "addr", "add", f"{ETCD_IP}/24", "dev", "br0")
        run("ip", "-n", ns, "link", "set", "br0", "up")

    def _start_etcd(self) -> None:
        etcd = EtcdServer(data_dir=os.path.join(self.workdir, "etcd"), name="lab", enable_v2=True,
                          listen_ip=ETCD_IP, netns=self.underlay_ns,
                          client_port=ETCD_CLIENT_PORT, peer_port=ETCD_PEER_PORT)
        os.makedirs(etcd.data_dir, exist_ok=True)
        etcd.start()
        self._etcd = etcd
        self.etcd_pid = etcd.proc.pid if etcd.proc else 0

    @property
    def etcd(self) -> EtcdServer:
        if self._etcd is None:
            self._etcd = EtcdServer(data_dir=os.path.join(self.workdir, "etcd"), name="lab", enable_v2=True,
                                    listen_ip=ETCD_IP, netns=self.underlay_ns,
                                    client_port=ETCD_CLIENT_PORT, peer_port=ETCD_PEER_PORT)
        return self._etcd

    def etcdctl(self, *args: str, api: int = 3, check: bool = True) -> subprocess.CompletedProcess:
        return self.etcd.etcdctl(*args, api=api, check=check)

    def write_config(self, config: str | None = None) -> None:
        key = f"{self.etcd_prefix.rstrip('/')}/config"
        text = self.config if config is None else config
        if self.etcd_api == "v2":
            self.etcdctl("mk", key, text, api=2)  # the classic CentOS guide's command
        else:
            self.etcdctl("put", key, text)

    def _build_host(self, i: int) -> None:
        ns, cns = f"{self.prefix}-h{i}", f"{self.prefix}-c{i}"
        host = LabHost(index=i, netns=ns, container_ns=cns, ip=host_ip(i), dir=os.path.join(self.workdir, f"h{i}"))
        self.host_list.append(host)
        os.makedirs(host.dir, exist_ok=True)
        run("ip", "netns", "add", ns)
        run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"h{i}", "netns", self.underlay_ns)
        run("ip", "-n", self.underlay_ns, "link", "set", f"h{i}", "master", "br0", "up")
        run("ip", "-n", ns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        run("sysctl", "-qw", "net.ipv4.ip_forward=1", netns=ns)

    def agent_command(self, host: LabHost) -> list[str]:
        return [
            own_command("flanneld"),
            f"-etcd-endpoints={self.etcd_endpoint}",
            f"-etcd-prefix={self.etcd_prefix}",
            "-iface=eth0",
            f"-subnet-file={host.subnet_file}",
            f"-status-socket={host.status_socket}",
            "-ip-masq",
            # Per-host values (e.g. -healthz-ip={host_ip}): one agent_flags list serves every host.
            *(f.replace("{host_ip}", host.ip).replace("{host}", str(host.index)) for f in self.agent_flags),
        ]

    def start_agent(self, i: int) -> int:
        host = self.host(i)
        if host.pid and _pid_alive(host.pid):
            raise LabError(f"agent on host {i} is already running (pid {host.pid})")
        log = open(host.log_file, "ab")
        env = dict(os.environ, **self.agent_env)
        env.pop("NOTIFY_SOCKET", None)
        proc = subprocess.Popen(["nsenter", f"--net=/var/run/netns/{host.netns}", *self.agent_command(host)],
                                stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        log.close()
        self._agent_procs[i] = proc
        host.pid = proc.pid
        self.save()
        return proc.pid

    def stop_agent(self, i: int, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Signal host i's agent and wait for it; returns its exit code (negative: killed by that
        signal), or None when it was started by another process (then the code is unknowable)."""
        host = self.host(i)
        proc = self._agent_procs.pop(i, None)
        code: int | None = None
        if proc is not None and proc.pid == host.pid:
            if proc.poll() is None:
                proc.send_signal(sig)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            code = proc.returncode
        else:
            stop_pid(host.pid, sig, timeout)
        host.pid = 0
        self.save()
        return code

    def agent_running(self, i: int) -> bool:
        return bool(self.host(i).pid) and _pid_alive(self.host(i).pid)

    def wait_subnet_env(self, i: int, timeout: float = 60.0, after_mtime: float = 0.0) -> dict[str, str]:
        host = self.host(i)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if os.stat(host.subnet_file).st_mtime > after_mtime:
                    with open(host.subnet_file) as f:
                        env = parse_env_file(f.read())
                    host.subnet = env["FLANNEL_SUBNET"]
                    host.mtu = int(env["FLANNEL_MTU"])
                    return env
            except FileNotFoundError:
                pass
            if host.pid and not _pid_alive(host.pid):
                raise LabError(f"flanneld on host {i} exited; last log lines:\n{self.tail_log(i)}")
            time.sleep(0.05)
        raise LabError(f"host {i}: no {host.subnet_file} after {timeout:.0f}s; last log lines:\n{self.tail_log(i)}")

    def tail_log(self, i: int, lines: int = 20) -> str:
        try:
            with open(self.host(i).log_file, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def _build_container(self, host: LabHost) -> None:
        """A container namespace behind bridge cbr0 in the host, as Docker's docker0 would be."""
        ns, cns = host.netns, host.container_ns
        bridge = IPv4Interface(host.subnet)
        cip = IPv4Interface((int(bridge.ip) + 1, bridge.network.prefixlen))
        run("ip", "netns", "add", cns)
        run("ip", "-n", cns, "link", "set", "lo", "up")
        run("ip", "-n", ns, "link", "add", "cbr0", "type", "bridge")
        run("ip", "-n", ns, "link", "set", "cbr0", "mtu", str(host.mtu))
        run("ip", "-n", ns, "addr", "add", str(bridge), "dev", "cbr0")
        run("ip", "-n", ns, "link", "set", "cbr0", "up")
        run("ip", "-n", ns, "link", "add", "vc", "mtu", str(host.mtu), "type", "veth", "peer", "name", "eth0",
            "netns", cns)
        run("ip", "-n", ns, "link", "set", "vc", "master", "cbr0", "up")
        run("ip", "-n", cns, "link", "set", "eth0", "mtu", str(host.mtu))
        run("ip", "-n", cns, "addr", "add", str(cip), "dev", "eth0")
        run("ip", "-n", cns, "link", "set", "eth0", "up")
        run("ip", "-n", cns, "route", "add", "default", "via", str(bridge.ip))
        host.container_ip = str(cip.ip)

    # --- use -------------------------------------------------------------------------------

    def host(self, i: int) -> LabHost:
        for h in self.host_list:
            if h.index == i:
                return h
        raise LabError(f"no host {i} in lab {self.prefix!r} (hosts 1..{self.hosts})")

    def ping(self, src: int, dst: int, count: int = 1, timeout_s: int = 2) -> bool:
        """One ping (or `count`) from container src to container dst; True when all replies came."""
        a, b = self.host(src), self.host(dst)
        proc = run("busybox", "ping", "-c", str(count), "-W", str(timeout_s), b.container_ip,
                   netns=a.container_ns, check=False, timeout=count * timeout_s + 10)
        return proc.returncode == 0

    def ping_matrix(self) -> dict[tuple[int, int], bool]:
        return {(a.index, b.index): self.ping(a.index, b.index)
                for a in self.host_list for b in self.host_list if a.index != b.index}

    def wait_all_pings(self, timeout: float = 30.0) -> dict[tuple[int, int], bool]:
        """Retry failing pairs until all answer or the time is up (peers appear via the watch)."""
        deadline = time.monotonic() + timeout
        results = {pair: False for pair in self.ping_matrix()}
        while True:
            for pair, ok in results.items():
                if not ok:
                    results[pair] = self.ping(*pair, timeout_s=1)
            if all(results.values()) or time.monotonic() > deadline:
                return results
            time.sleep(0.2)

    def ip_json(self, i: int, *args: str) -> list[dict[str, Any]]:
        """`ip -j -n <host i> <args>` parsed, e.g. lab.ip_json(1, "route")."""
        out = run("ip", "-j", "-n", self.host(i).netns, *args).stdout
        return json.loads(out) if out.strip() else []

    def bridge_json(self, i: int, *args: str) -> list[dict[str, Any]]:
        """`bridge -j -n <host i> <args>` parsed, e.g. lab.bridge_json(1, "fdb", "show", "dev", "flannel.1")."""
        out = run("bridge", "-j", "-n", self.host(i).netns, *args).stdout
        return json.loads(out) if out.strip() else []

    def lease_key(self, i: int) -> str:
        """Host i's lease key in etcd (needs its subnet, i.e. after wait_subnet_env)."""
        subnet = self.host(i).subnet
        if not subnet:
            raise LabError(f"host {i} has no subnet yet")
        net = IPv4Interface(subnet).network
        return f"{self.etcd_prefix.rstrip('/')}/subnets/{net.network_address}-{net.prefixlen}"

    def lease_value(self, i: int, api: str = "") -> dict[str, Any] | None:
        """Host i's lease value as stored in etcd (None when absent).  `api` defaults to the
        lab's etcd_api, which is also what `-etcd-api auto` agents pick."""
        if (api or self.etcd_api) == "v2":
            proc = self.etcdctl("get", self.lease_key(i), api=2, check=False)
            text = proc.stdout.strip() if proc.returncode == 0 else ""
        else:
            text = self.etcdctl("get", self.lease_key(i), "--print-value-only").stdout.strip()
        return json.loads(text) if text else None

    def delete_lease(self, i: int, api: str = "") -> None:
        """Remove host i's lease from etcd as an operator would (etcdctl del / rm)."""
        if (api or self.etcd_api) == "v2":
            self.etcdctl("rm", self.lease_key(i), api=2)
        else:
            out = self.etcdctl("del", self.lease_key(i)).stdout.strip()
            if out != "1":
                raise LabError(f"etcdctl del {self.lease_key(i)} deleted {out or 0} keys, expected 1")

    def agent_status(self, i: int, timeout: float = 5.0) -> dict[str, Any]:
        """Host i's agent /status document, read over its unix status socket (as `flannelctl
        status --json` prints it, without a process start per call)."""
        import httpx

        with httpx.Client(transport=httpx.HTTPTransport(uds=self.host(i).status_socket), timeout=timeout) as c:
            r = c.get("http://flanneld/status")
            r.raise_for_status()
            return r.json()

    def status(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "backend": self.backend,
            "etcd": {"endpoint": self.etcd_endpoint, "namespace": self.underlay_ns, "pid": self.etcd_pid,
                     "running": bool(self.etcd_pid) and _pid_alive(self.etcd_pid)},
            "config": self.config,
            "hosts": [
                {"host": h.index, "namespace": h.netns, "ip": h.ip, "subnet": h.subnet, "mtu": h.mtu,
                 "container_namespace": h.container_ns, "container_ip": h.container_ip,
                 "agent_pid": h.pid, "agent_running": bool(h.pid) and _pid_alive(h.pid), "log": h.log_file}
                for h in self.host_list
            ],
        }

    # --- tear down ---------------------------------------------------------------------------

    def down(self) -> list[str]:
        """Stop our processes by PID, delete our namespaces by name, remove the workdir."""
        removed: list[str] = []
        for host in self.host_list:
            proc = self._agent_procs.pop(host.index, None)
            if proc is not None and proc.pid == host.pid:
                stop_pid(proc.pid)
                proc.poll()  # stop_pid reaped it; let the handle know so it is not reaped again
            elif host.pid:
                stop_pid(host.pid)
            host.pid = 0
        if self._etcd is not None and self._etcd.proc is not None:
            self._etcd.stop()
        elif self.etcd_pid:
            stop_pid(self.etcd_pid)
        self.etcd_pid = 0
        existing = set(run("ip", "netns", "list", check=False).stdout.split())
        for name in self.all_namespaces():
            if name in existing:
                run("ip", "netns", "del", name, check=False)
                removed.append(name)
        shutil.rmtree(self.workdir, ignore_errors=True)
        return removed


def print_status(lab: Lab, out=sys.stdout) -> None:
    st = lab.status()
    etcd = st["etcd"]
    print(f"lab {st['prefix']}: backend {st['backend']}, etcd {etcd['endpoint']} in netns {etcd['namespace']} "
          f"({'running' if etcd['running'] else 'stopped'})", file=out)
    print(f"{'HOST':<5} {'NETNS':<12} {'UNDERLAY IP':<13} {'SUBNET':<16} {'MTU':<5} {'CONTAINER IP':<14} AGENT",
          file=out)
    for h in st["hosts"]:
        agent = f"pid {h['agent_pid']}" if h["agent_running"] else "stopped"
        print(f"{h['host']:<5} {h['namespace']:<12} {h['ip']:<13} {h['subnet'] or '-':<16} {h['mtu'] or '-':<5} "
              f"{h['container_ip'] or '-':<14} {agent}", file=out)
