"""A multi-host flannel lab on one machine: network namespaces as hosts, real etcd, real flanneld.

Topology (every namespace name starts with the lab's prefix, so nothing else is touched):

    <prefix>-ul   underlay: bridge `br0` 10.250.0.1/24 and etcd listening on it
    <prefix>-hN   host N: `eth0` 10.250.0.(10+N)/24 on the underlay bridge, runs `flanneld`
    <prefix>-cN   container N: `eth0` behind bridge `cbr0` in host N, addressed from its subnet.env

With `ipv6` (dual stack, `flannelctl lab up --ipv6`) the underlay also carries fd99::/64 (br0 fd99::1,
host N fd99::(10+N)), the default config sets EnableIPv6 with IPv6Network fd42::/48, and each
container also gets an address from FLANNEL_IPV6_SUBNET.

Each agent is started exactly as a user would run it (`flanneld -etcd-endpoints=... -iface=eth0`)
through `nsenter --net=`, in its own session so the lab outlives `flannelctl lab up`.  The lab's
state (names, PIDs, paths) is kept in `<workdir>/lab.json`, written before anything is made and
updated as each process starts, so `lab down` from another process removes what `lab up` made even
when `up` was interrupted half-way; whatever no state names (a process started a moment before a
SIGKILL) is found by the lab's namespace names (flannelpy.lab.leftovers).

From the host's own namespace the lab's addresses are not reachable (10.250.0.1 would follow the
default route off the machine).  With `forward_etcd` (what `flannelctl lab up` uses) etcd is also
served on 127.0.0.1:<port> in the host's namespace by flannelpy.lab.portforward.

With `etcd_tls` (`flannelctl lab up --etcd-tls both|server-only`) etcd serves https with
--client-cert-auth, certificates from flannelpy.lab.pki in <workdir>/pki; "server-only" is the classic
guide's cluster whose JSON gateway cannot serve, so the agents' `-etcd-transport auto` picks gRPC.
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
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network
from typing import Any

from flannelpy.errors import FlannelError
from flannelpy.fileutil import atomic_write
from flannelpy.subnet.envfile import parse_env_file

from .etcd_server import EtcdServer
from .leftovers import find_leftovers, lab_namespaces, list_namespaces, processes_in, stop_processes
from .pki import PkiError, PkiFiles, check_mode, make_pki

UNDERLAY_NET = IPv4Network("10.250.0.0/24")
UNDERLAY_NET6 = IPv6Network("fd99::/64")  # the underlay's IPv6 side (Lab.ipv6)
DEFAULT_IPV6_NETWORK = "fd42::/48"
ETCD_IP = "10.250.0.1"
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
DEFAULT_WORKDIR = "/run/flannelpy-lab"
DEFAULT_PREFIX = "fplab"


class LabError(FlannelError):
    pass


def lab_command(prefix: str, workdir: str, action: str) -> str:
    """`flannelctl lab [--prefix P] [--workdir W] ACTION`: the options only where they are not the defaults,
    so the command printed is the one that works for this lab."""
    default = os.path.join(DEFAULT_WORKDIR, prefix)
    opts = "" if prefix == DEFAULT_PREFIX else f" --prefix {prefix}"
    opts += f" --workdir {workdir}" if workdir and os.path.abspath(workdir) != default else ""
    return f"flannelctl lab{opts} {action}"


def down_command(prefix: str, workdir: str = "") -> str:
    """The command that removes this lab (what to tell a user about leftovers)."""
    return lab_command(prefix, workdir, "down")


def host_ip(index: int) -> str:
    return str(UNDERLAY_NET.network_address + 10 + index)


def host_ip6(index: int) -> str:
    """Host N's underlay IPv6 address: fd99::(10+N), written in hex as the kernel prints it."""
    return str(UNDERLAY_NET6.network_address + 10 + index)


def own_command(name: str) -> str:
    """flanneld/flannelctl from the same installation as this Python (a venv need not be on PATH)."""
    sibling = os.path.join(os.path.dirname(sys.executable), name)
    return sibling if os.access(sibling, os.X_OK) else name


def default_config(backend: str, network: str = "10.5.0.0/16", ipv6_network: str = "") -> str:
    """The network config the lab writes; `none` writes no Backend at all (flanneld: udp).
    ipv6_network: dual stack (EnableIPv6 with that IPv6Network)."""
    doc: dict[str, Any] = {"Network": network}
    if ipv6_network:
        doc.update(EnableIPv6=True, IPv6Network=ipv6_network)
    if backend != "none":
        doc["Backend"] = {"Type": backend}
    return json.dumps(doc)


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


@dataclass(frozen=True)
class PingResult:
    ok: bool
    tried: str  # the command, and where it ran
    output: str  # its last line: the packet loss summary, or the error


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


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
    ip6: str = ""  # dual stack: the underlay IPv6 address
    subnet6: str = ""  # FLANNEL_IPV6_SUBNET once written
    container_ip6: str = ""

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
    # etcd also on 127.0.0.1:<host_etcd_port> in the host's namespace (flannelpy.lab.portforward)
    forward_etcd: bool = False
    host_etcd_port: int = 0
    forward_pid: int = 0
    # Dual stack: IPv6 on the underlay (fd99::/64) and, unless `config` is given, EnableIPv6 in it.
    ipv6: bool = False
    # etcd over TLS with client certificates: "" (plain http), "both" or "server-only" (flannelpy.lab.pki)
    etcd_tls: str = ""

    def __post_init__(self) -> None:
        if not self.workdir:
            self.workdir = os.path.join(DEFAULT_WORKDIR, self.prefix)
        if not self.config:
            self.config = default_config(self.backend, ipv6_network=DEFAULT_IPV6_NETWORK if self.ipv6 else "")
        if not 1 <= self.hosts <= 200:
            raise LabError(f"--hosts {self.hosts}: must be between 1 and 200")
        try:
            check_mode(self.etcd_tls)
        except PkiError as err:
            raise LabError(str(err)) from None
        self._etcd: EtcdServer | None = None
        # Popen handles of agents started by this process: stop_agent reaps through them so the
        # exit status is not lost to subprocess's reaping of dropped Popen objects.
        self._agent_procs: dict[int, subprocess.Popen] = {}
        self.last_pings: dict[tuple[int, int], PingResult] = {}  # what ping() tried, for the report

    # --- names -----------------------------------------------------------------------------

    @property
    def underlay_ns(self) -> str:
        return f"{self.prefix}-ul"

    @property
    def etcd_endpoint(self) -> str:
        return f"{self._scheme}://{ETCD_IP}:{ETCD_CLIENT_PORT}"

    @property
    def host_etcd_endpoint(self) -> str:
        """etcd as reachable from the host's own namespace ("" without forward_etcd)."""
        return f"{self._scheme}://127.0.0.1:{self.host_etcd_port}" if self.host_etcd_port else ""

    @property
    def _scheme(self) -> str:
        return "https" if self.etcd_tls else "http"

    @property
    def pki(self) -> PkiFiles | None:
        """The lab's certificates (<workdir>/pki) with etcd_tls, else None."""
        return PkiFiles(os.path.join(self.workdir, "pki")) if self.etcd_tls else None

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
        atomic_write(self.state_file, json.dumps(asdict(self), indent=2).encode())

    @staticmethod
    def exists(prefix: str = DEFAULT_PREFIX, workdir: str = "") -> bool:
        return os.path.exists(os.path.join(workdir or os.path.join(DEFAULT_WORKDIR, prefix), "lab.json"))

    @classmethod
    def load(cls, prefix: str = DEFAULT_PREFIX, workdir: str = "") -> "Lab":
        path = os.path.join(workdir or os.path.join(DEFAULT_WORKDIR, prefix), "lab.json")
        try:
            with open(path) as f:
                doc = json.load(f)
            hosts = [LabHost(**h) for h in doc.pop("host_list")]
            lab = cls(**doc)
        except FileNotFoundError:
            raise LabError(f"no lab {prefix!r} ({path} not found); start one with `flannelctl lab up`") from None
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
            raise LabError(f"lab {prefix!r}: {path} is unreadable ({err}); `{down_command(prefix, workdir)}` "
                           f"removes the lab by its names") from None
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
            raise LabError(f"lab {self.prefix!r} already exists ({self.state_file}); "
                           f"run `{down_command(self.prefix, self.workdir)}` first")
        left = find_leftovers(self.prefix)
        if not left.empty():
            raise LabError(f"lab {self.prefix!r} has leftovers of an earlier run ({left.describe()}); "
                           f"remove them with `{down_command(self.prefix, self.workdir)}`, or use another --prefix")
        for tool in ("etcd", "etcdctl", "nsenter", "ip", "busybox", *(["openssl"] if self.etcd_tls else [])):
            if shutil.which(tool) is None:
                raise LabError(f"{tool} not found: install it (see .ci/setup)")
        os.makedirs(self.workdir, exist_ok=True)
        try:
            self.save()  # before anything exists: from here on `lab down` finds what this build makes
            self._build_underlay()
            if self.pki is not None:
                self._make_pki(self.pki)
            self._start_etcd()
            if self.forward_etcd:
                self._start_forwarder()
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
        if self.ipv6:
            run("ip", "-n", ns, "addr", "add", f"{UNDERLAY_NET6.network_address + 1}/64", "dev", "br0", "nodad")
        run("ip", "-n", ns, "link", "set", "br0", "up")

    def _make_pki(self, pki: PkiFiles) -> None:
        # 127.0.0.1 too: the forwarder serves the same etcd (same certificate) on the host's loopback.
        try:
            make_pki(pki.dir, [ETCD_IP, "127.0.0.1"], self.etcd_tls)
        except PkiError as err:
            raise LabError(str(err)) from None

    def _start_etcd(self) -> None:
        etcd = EtcdServer(data_dir=os.path.join(self.workdir, "etcd"), name="lab", enable_v2=True,
                          listen_ip=ETCD_IP, netns=self.underlay_ns,
                          client_port=ETCD_CLIENT_PORT, peer_port=ETCD_PEER_PORT, tls=self.pki)
        os.makedirs(etcd.data_dir, exist_ok=True)
        self._etcd = etcd
        self.etcd_pid = etcd.launch()
        self.save()  # the PID on disk before the wait: an interrupt now must not orphan etcd
        try:
            etcd.wait_healthy()
        except RuntimeError as err:
            raise LabError(str(err)) from None

    def _start_forwarder(self, timeout: float = 15.0) -> None:
        """etcd on 127.0.0.1:<port> of the host's namespace: a listening socket made here, handed to
        flannelpy.lab.portforward running in the underlay namespace (see its docstring)."""
        import socket

        import httpx

        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind(("127.0.0.1", 0))
            listener.listen(64)
            log = open(os.path.join(self.workdir, "etcd-forward.log"), "ab")
            try:
                proc = subprocess.Popen(
                    ["nsenter", f"--net=/var/run/netns/{self.underlay_ns}", sys.executable, "-m",
                     "flannelpy.lab.portforward", "--fd", str(listener.fileno()), "--to", f"{ETCD_IP}:{ETCD_CLIENT_PORT}",
                     "--lab", self.prefix],
                    stdout=log, stderr=log, stdin=subprocess.DEVNULL, pass_fds=(listener.fileno(),),
                    start_new_session=True)
            finally:
                log.close()
            self.forward_pid = proc.pid
            self.host_etcd_port = listener.getsockname()[1]
            self.save()
        finally:
            listener.close()  # the forwarder holds its own copy
        deadline = time.monotonic() + timeout
        verify = self.etcd.ssl_context() if self.etcd_tls else True
        while True:
            try:
                if httpx.get(f"{self.host_etcd_endpoint}/health", timeout=2, verify=verify).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"the etcd forwarder on {self.host_etcd_endpoint} does not answer; "
                               f"see {self.workdir}/etcd-forward.log")
            time.sleep(0.1)

    @property
    def etcd(self) -> EtcdServer:
        if self._etcd is None:
            self._etcd = EtcdServer(data_dir=os.path.join(self.workdir, "etcd"), name="lab", enable_v2=True,
                                    listen_ip=ETCD_IP, netns=self.underlay_ns,
                                    client_port=ETCD_CLIENT_PORT, peer_port=ETCD_PEER_PORT, tls=self.pki)
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
        host = LabHost(index=i, netns=ns, container_ns=cns, ip=host_ip(i), dir=os.path.join(self.workdir, f"h{i}"),
                       ip6=host_ip6(i) if self.ipv6 else "")
        self.host_list.append(host)
        os.makedirs(host.dir, exist_ok=True)
        run("ip", "netns", "add", ns)
        run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"h{i}", "netns", self.underlay_ns)
        run("ip", "-n", self.underlay_ns, "link", "set", f"h{i}", "master", "br0", "up")
        run("ip", "-n", ns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        if host.ip6:
            # nodad: usable at once, so the agent finds it when it starts
            run("ip", "-n", ns, "addr", "add", f"{host.ip6}/64", "dev", "eth0", "nodad")
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        run("sysctl", "-qw", "net.ipv4.ip_forward=1", netns=ns)
        if host.ip6:
            run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1", netns=ns)

    def agent_command(self, host: LabHost) -> list[str]:
        return [
            own_command("flanneld"),
            f"-etcd-endpoints={self.etcd_endpoint}",
            *([f"-etcd-cafile={self.pki.ca}", f"-etcd-certfile={self.pki.client_cert}",
               f"-etcd-keyfile={self.pki.client_key}"] if self.pki else []),
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
                    host.subnet = env.get("FLANNEL_SUBNET", "")  # absent: an IPv6-only flanneld
                    host.subnet6 = env.get("FLANNEL_IPV6_SUBNET", "")
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
        if host.subnet6:
            bridge6 = IPv6Interface(host.subnet6)
            cip6 = IPv6Interface((int(bridge6.ip) + 1, bridge6.network.prefixlen))
            run("ip", "-n", ns, "addr", "add", str(bridge6), "dev", "cbr0", "nodad")
            run("ip", "-n", cns, "addr", "add", str(cip6), "dev", "eth0", "nodad")
            run("ip", "-n", cns, "-6", "route", "add", "default", "via", str(bridge6.ip))
            host.container_ip6 = str(cip6.ip)

    # --- use -------------------------------------------------------------------------------

    def host(self, i: int) -> LabHost:
        for h in self.host_list:
            if h.index == i:
                return h
        raise LabError(f"no host {i} in lab {self.prefix!r} (hosts 1..{self.hosts})")

    def ping(self, src: int, dst: int, count: int = 1, timeout_s: int = 2) -> bool:
        """One ping (or `count`) from container src to container dst; True when all replies came."""
        result = self.ping_report(src, dst, count, timeout_s)
        self.last_pings[(src, dst)] = result
        return result.ok

    def ping_report(self, src: int, dst: int, count: int = 1, timeout_s: int = 2, *,
                    ipv6: bool = False) -> "PingResult":
        """ipv6: between the containers' IPv6 addresses (dual stack)."""
        a, b = self.host(src), self.host(dst)
        have_a, have_b = (a.container_ip6, b.container_ip6) if ipv6 else (a.container_ip, b.container_ip)
        cmd = ["busybox", "ping", *(["-6"] if ipv6 else []), "-c", str(count), "-W", str(timeout_s),
               have_b or "(no container IP)"]
        tried = f"{' '.join(cmd)} in netns {a.container_ns}"
        if not have_a or not have_b:
            return PingResult(False, tried, "a container has no address (its host has no subnet.env?)")
        try:
            proc = run(*cmd, netns=a.container_ns, check=False, timeout=count * timeout_s + 10)
        except subprocess.TimeoutExpired:
            return PingResult(False, tried, "ping did not finish")
        return PingResult(proc.returncode == 0, tried, _last_line(proc.stdout + proc.stderr))

    def ping_matrix(self) -> dict[tuple[int, int], bool]:
        return {(a.index, b.index): self.ping(a.index, b.index)
                for a in self.host_list for b in self.host_list if a.index != b.index}

    def wait_all_pings(self, timeout: float = 30.0, *, ipv6: bool = False) -> dict[tuple[int, int], bool]:
        """Retry failing pairs until all answer or the time is up (peers appear via the watch).
        ipv6: the containers' IPv6 addresses."""
        deadline = time.monotonic() + timeout
        results = {(a.index, b.index): False for a in self.host_list for b in self.host_list if a.index != b.index}
        while True:
            for pair, ok in results.items():
                if not ok:
                    if ipv6:
                        result = self.ping_report(*pair, timeout_s=1, ipv6=True)
                        self.last_pings[pair] = result
                        results[pair] = result.ok
                    else:
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
        key = f"{self.etcd_prefix.rstrip('/')}/subnets/{net.network_address}-{net.prefixlen}"
        if self.host(i).subnet6:  # dual stack: flanneld's `<v4>&<v6>` key
            net6 = IPv6Interface(self.host(i).subnet6).network
            key += f"&{net6.network_address}-{net6.prefixlen}"
        return key

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

    def backend_shown(self) -> str:
        """The backend the agents run: a config without Backend means udp, as in flanneld."""
        try:
            backend = json.loads(self.config).get("Backend")
        except (ValueError, AttributeError):
            return self.backend
        if backend is None:
            return "udp (no Backend in config)"
        return str(backend.get("Type", self.backend)) if isinstance(backend, dict) else self.backend

    def status(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "backend": self.backend,
            "backend_running": self.backend_shown(),
            "etcd": {"endpoint": self.host_etcd_endpoint, "endpoint_in_lab": self.etcd_endpoint,
                     "namespace": self.underlay_ns, "pid": self.etcd_pid,
                     "running": bool(self.etcd_pid) and _pid_alive(self.etcd_pid),
                     "forwarder_pid": self.forward_pid,
                     "forwarder_running": bool(self.forward_pid) and _pid_alive(self.forward_pid),
                     **({"tls": self.etcd_tls, "cacert": self.pki.ca, "cert": self.pki.client_cert,
                         "key": self.pki.client_key} if self.pki else {})},
            "etcd_prefix": self.etcd_prefix,
            "config": self.config,
            "hosts": [
                {"host": h.index, "namespace": h.netns, "ip": h.ip, "subnet": h.subnet, "mtu": h.mtu,
                 "container_namespace": h.container_ns, "container_ip": h.container_ip,
                 "agent_pid": h.pid, "agent_running": bool(h.pid) and _pid_alive(h.pid), "log": h.log_file,
                 **({"ip6": h.ip6, "subnet6": h.subnet6, "container_ip6": h.container_ip6} if self.ipv6 else {})}
                for h in self.host_list
            ],
        }

    # --- tear down ---------------------------------------------------------------------------

    def down(self) -> list[str]:
        """Stop our processes by PID, then anything else in our namespaces, delete the namespaces by name
        (those of hosts the state does not know too), remove the workdir (lab.json last of all)."""
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
        if self.forward_pid:
            stop_pid(self.forward_pid)
            self.forward_pid = 0
        existing = list_namespaces()
        names = sorted(set(n for n in self.all_namespaces() if n in existing) | set(lab_namespaces(self.prefix, existing)))
        # Whatever the state did not name: a process started just before an interrupt, a user's helper.
        stop_processes(processes_in(names))
        for name in names:
            run("ip", "netns", "del", name, check=False)
            removed.append(name)
        shutil.rmtree(self.workdir, ignore_errors=True)
        return removed


def status_lines(st: dict[str, Any]) -> list[str]:
    """Pure: `lab status` as text, from Lab.status().  Every address printed for use from this shell is
    127.0.0.1 or inside an `nsenter` command: the lab's own addresses would leave the machine from here."""
    etcd = st["etcd"]
    prefix = st.get("etcd_prefix", "/coreos.com/network")
    lines = [f"lab {st['prefix']}: backend {st.get('backend_running') or st['backend']}, "
             f"{len(st['hosts'])} host{'s' if len(st['hosts']) != 1 else ''}, etcd prefix {prefix}"]
    state = f"{'running' if etcd['running'] else 'stopped'}"
    # With TLS every command needs the lab's CA and client certificate (etcd runs --client-cert-auth).
    ctl_tls = f" --etcd-cafile {etcd['cacert']} --etcd-certfile {etcd['cert']} --etcd-keyfile {etcd['key']}" \
        if etcd.get("tls") else ""
    etcdctl_tls = f" --cacert={etcd['cacert']} --cert={etcd['cert']} --key={etcd['key']}" if etcd.get("tls") else ""
    if etcd.get("endpoint"):
        forwarder = "" if etcd.get("forwarder_running", True) else ", forwarder stopped"
        lines.append(f"etcd: {etcd['endpoint']} from this shell ({state} in netns {etcd['namespace']}{forwarder}), e.g.")
        lines.append(f"  flannelctl leases --etcd-endpoints {etcd['endpoint']} --etcd-prefix {prefix}{ctl_tls}")
        lines.append(f"  etcdctl --endpoints={etcd['endpoint']}{etcdctl_tls} get --prefix {prefix}")
    else:
        lines.append(f"etcd: {state} in netns {etcd['namespace']}, reached from this shell with")
        lines.append(f"  nsenter --net=/var/run/netns/{etcd['namespace']} etcdctl --endpoints={etcd['endpoint_in_lab']}"
                     f"{etcdctl_tls} get --prefix {prefix}")
    if etcd.get("tls") == "server-only":
        lines.append("etcd TLS: client certificates required; the server certificate has extendedKeyUsage serverAuth "
                     "only, so etcd's JSON gateway cannot serve: v3 clients with -etcd-transport auto (the agents, "
                     "flannelctl) use etcd's gRPC API (agent logs: 'etcd v3 transport: gRPC, because ...')")
    elif etcd.get("tls"):
        lines.append("etcd TLS: client certificates required; the server certificate has extendedKeyUsage "
                     "serverAuth,clientAuth, so etcd's JSON gateway serves v3 clients (no gRPC needed)")
    lines.append(f"{'HOST':<5} {'NETNS':<12} {'UNDERLAY IP':<13} {'SUBNET':<16} {'MTU':<5} {'CONTAINER IP':<14} AGENT")
    for h in st["hosts"]:
        agent = f"pid {h['agent_pid']}" if h["agent_running"] else "stopped"
        lines.append(f"{h['host']:<5} {h['namespace']:<12} {h['ip']:<13} {h['subnet'] or '-':<16} {h['mtu'] or '-':<5} "
                     f"{h['container_ip'] or '-':<14} {agent}")
    if any("ip6" in h for h in st["hosts"]):
        lines.append(f"{'HOST':<5} {'UNDERLAY IPv6':<13} {'IPv6 SUBNET':<24} CONTAINER IPv6")
        for h in st["hosts"]:
            lines.append(f"{h['host']:<5} {h['ip6'] or '-':<13} {h['subnet6'] or '-':<24} {h['container_ip6'] or '-'}")
    docker = [h for h in st["hosts"] if "docker" in h]
    if docker:
        lines.append("docker: one dockerd per host; flanneld writes bip and mtu into its daemon.json; image busybox "
                     "(made from this machine's busybox, nothing is pulled)")
        for h in docker:
            d = h["docker"]
            lines.append(f"  host {h['host']}: dockerd {'pid ' + str(d['pid']) if d['running'] else 'stopped'}, "
                         f"docker0 bip {d.get('bip') or '-'} mtu {d.get('mtu') or '-'}, "
                         f"container {d['container']} {h['container_ip'] or '-'}, socket unix://{d['socket']}")
        if len(docker) > 1 and docker[1]["container_ip"]:
            a, b = docker[0], docker[1]
            lines.append(f"  try: docker -H unix://{a['docker']['socket']} exec {a['docker']['container']} "
                         f"ping -c 1 {b['container_ip']}")
            lines.append(f"       docker -H unix://{a['docker']['socket']} run --rm busybox ping -c 1 {b['container_ip']}")
    lines.append("(underlay and container addresses exist only inside the lab's namespaces: "
                 "use them through nsenter --net=/var/run/netns/NETNS)")
    return lines


def ping_lines(results: dict[tuple[int, int], bool], tried: dict[tuple[int, int], "PingResult"],
               hosts: int, family: str = "") -> list[str]:
    """Pure: the ping section; a failed pair says what was tried and what it answered.
    family: "IPv6" for the dual-stack lab's second section."""
    what = f"cross-host {family} pings" if family else "cross-host pings"
    if hosts < 2:
        return [f"{what}: none (a 1-host lab has no pair of hosts; use --hosts 2 or more)"]
    lines = [f"{what}:"]
    for (a, b), ok in sorted(results.items()):
        line = f"  container on host {a} -> container on host {b}: {'ok' if ok else 'FAILED'}"
        if not ok and (a, b) in tried:
            r = tried[(a, b)]
            line += f" (tried `{r.tried}`: {r.output or 'no answer'})"
        lines.append(line)
    return lines


def print_status(lab: Lab, out=sys.stdout) -> None:
    for line in status_lines(lab.status()):
        print(line, file=out)
