"""The lab with a real Docker per host: flanneld writes bip/mtu into daemon.json, dockerd reads it.

Same topology as `flannelpy.lab.netns_lab`, except that the containers are real Docker containers instead of
`<prefix>-cN` namespaces:

    <prefix>-hN   runs `flanneld ... -docker-daemon-json=<hostdir>/daemon.json` and, once flanneld has
                  written that file, a private `dockerd --config-file=<hostdir>/daemon.json` (own data-root,
                  exec-root, socket and containerd under <workdir>/docker/hN), with one busybox container
                  named `<prefix>-cN` sleeping forever

This is the path a Docker host takes in production (flanneld -> daemon.json -> docker0 with the leased
bip and MTU), including Docker's FORWARD policy DROP that flanneld's FLANNEL-FWD rules must open.
The directory `<workdir>/docker` marks a Docker lab for `flannelctl lab down|status`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from ipaddress import IPv6Interface
from typing import Any

from .dockerd import BUSYBOX, Dockerd, kill_leftovers, stop_dockerd, unmount_under
from .netns_lab import Lab, LabError, LabHost, PingResult, _last_line, _pid_alive, run

# flanneld runs with -ip-masq, so Docker must not masquerade too (mk-docker-opts.sh turns
# FLANNEL_IPMASQ=true into --ip-masq=false); otherwise container-to-container traffic leaves NATed.
DEFAULT_DAEMON_JSON: dict[str, Any] = {"ip-masq": False}
SLEEP_FOREVER = ["sleep", "2000000000"]  # busybox sleep has no "infinity"
MAX_UNIX_PATH = 107  # sun_path is 108 bytes including the NUL


@dataclass
class DockerLab(Lab):
    docker: bool = True
    # daemon.json written before flanneld starts; flanneld must add bip/mtu and keep these keys
    daemon_json: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_DAEMON_JSON))
    dockerd_pids: dict[str, int] = field(default_factory=dict)  # host index (as str: JSON keys) -> PID

    def __post_init__(self) -> None:
        super().__post_init__()
        self.with_containers = False  # Docker makes the containers; no <prefix>-cN namespaces
        self._dockerds: dict[int, Dockerd] = {}

    # --- names -----------------------------------------------------------------------------

    @property
    def docker_dir(self) -> str:
        return os.path.join(self.workdir, "docker")

    def all_namespaces(self) -> list[str]:
        return [self.underlay_ns] + [f"{self.prefix}-h{i}" for i in range(1, self.hosts + 1)]

    def daemon_json_path(self, host: LabHost) -> str:
        return os.path.join(host.dir, "daemon.json")

    def container_name(self, host: LabHost) -> str:
        # The name the container namespace would have had; unique per lab like everything else.
        return host.container_ns

    def dockerd(self, host: LabHost) -> Dockerd:
        """The host's daemon: the one this process launched, or a handle on its socket (other process)."""
        d = self._dockerds.get(host.index)
        if d is None:
            d = Dockerd(host.netns, os.path.join(self.docker_dir, f"h{host.index}"), self.daemon_json_path(host),
                        name=host.netns)
            self._dockerds[host.index] = d
        return d

    # --- bring up ----------------------------------------------------------------------------

    def up(self, wait: float = 60.0) -> None:
        for tool in ("dockerd", "docker", "containerd", "runc"):
            if shutil.which(tool) is None:
                raise LabError(f"{tool} not found: install docker.io (see .ci/setup)")
        if not os.path.isfile(BUSYBOX):
            raise LabError(f"{BUSYBOX} not found: install busybox-static (the container image is built from it)")
        sock = os.path.join(self.docker_dir, f"h{self.hosts}", "exec", "containerd", "containerd.sock")
        if len(sock) > MAX_UNIX_PATH:
            raise LabError(f"--workdir {self.workdir} is too long for dockerd's unix sockets ({sock})")
        super().up(wait)  # underlay, etcd, hosts, flanneld; tears itself down on failure
        try:
            self._start_docker(wait)
            self.save()
        except BaseException:
            self.down()
            raise

    def _build_underlay(self) -> None:
        # First step after Lab.up's checks: mark the workdir as a Docker lab before anything exists,
        # so a `lab down` after a crash half-way still stops the daemons.
        os.makedirs(self.docker_dir, exist_ok=True)
        super()._build_underlay()

    def _build_host(self, i: int) -> None:
        super()._build_host(i)
        host = self.host(i)
        with open(self.daemon_json_path(host), "w") as f:
            json.dump(self.daemon_json, f, indent=2)
            f.write("\n")
        # Lab turns forwarding on; a stock Docker host has it off, so dockerd enables it and (since
        # Docker 1.13) sets the FORWARD policy to DROP, which flanneld's FLANNEL-FWD rules must open.
        run("sysctl", "-qw", "net.ipv4.ip_forward=0", netns=host.netns)

    def agent_command(self, host: LabHost) -> list[str]:
        return super().agent_command(host) + [f"-docker-daemon-json={self.daemon_json_path(host)}"]

    def wait_daemon_json(self, host: LabHost, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until flanneld has put this host's lease into daemon.json (it writes it after subnet.env)."""
        path = self.daemon_json_path(host)
        deadline = time.monotonic() + timeout
        doc: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                with open(path) as f:
                    doc = json.load(f)
            except (FileNotFoundError, json.JSONDecodeError):
                doc = {}
            if doc.get("bip") == host.subnet and doc.get("mtu") == host.mtu and self._has_ipv6_side(host, doc):
                return doc
            time.sleep(0.05)
        raise LabError(f"host {host.index}: {path} has no bip={host.subnet} mtu={host.mtu} after {timeout:.0f}s "
                       f"(has {doc}); last log lines:\n{self.tail_log(host.index)}")

    def _has_ipv6_side(self, host: LabHost, doc: dict[str, Any]) -> bool:
        """Dual stack: flanneld has also written ipv6 and fixed-cidr-v6 (our IPv6 subnet) for dockerd."""
        if not self.ipv6:
            return True
        return (doc.get("ipv6") is True and bool(host.subnet6)
                and doc.get("fixed-cidr-v6") == str(IPv6Interface(host.subnet6).network))

    def _start_docker(self, wait: float) -> None:
        for host in self.host_list:
            self.wait_daemon_json(host, wait)
        for host in self.host_list:
            self.dockerd_pids[str(host.index)] = self.dockerd(host).launch()
            self.save()  # each PID on disk before the slow part, so `lab down` finds it if we die now
        with ThreadPoolExecutor(max_workers=len(self.host_list)) as pool:
            for fut in [pool.submit(self._boot_host, host, wait) for host in self.host_list]:
                try:
                    fut.result()
                except RuntimeError as err:  # dockerproc's errors; flannelctl reports LabError cleanly
                    raise LabError(str(err)) from err

    def _boot_host(self, host: LabHost, wait: float) -> None:
        d = self.dockerd(host).wait_ready(wait)
        self._ensure_forward_drop(host)
        d.import_busybox()
        name = self.container_name(host)
        d.run(name, SLEEP_FOREVER, detach=True)
        host.container_ip = d.container_ip(name)
        if not host.container_ip:
            raise LabError(f"host {host.index}: container {name} has no IP on docker0")
        if self.ipv6:
            host.container_ip6 = d.container_ip6(name)
            if not host.container_ip6:
                raise LabError(f"host {host.index}: container {name} has no IPv6 address on docker0 "
                               f"(daemon.json: {self.daemon_json_path(host)})")

    def _ensure_forward_drop(self, host: LabHost) -> None:
        """Docker sets policy DROP when it enables forwarding; versions with --ip-forward-no-drop or a
        pre-enabled forward may not, so make the hardened case explicit."""
        if "-P FORWARD DROP" not in self.forward_policy_rules(host):
            run("iptables", "-P", "FORWARD", "DROP", netns=host.netns)

    def forward_policy_rules(self, host: LabHost) -> str:
        return run("iptables", "-w", "-S", "FORWARD", netns=host.netns).stdout

    # --- use -------------------------------------------------------------------------------

    def ping_report(self, src: int, dst: int, count: int = 1, timeout_s: int = 2, *,
                    ipv6: bool = False) -> PingResult:
        """Ping from the Docker container on host src to the one on host dst (docker exec);
        ipv6: between their IPv6 addresses (dual stack)."""
        a, b = self.host(src), self.host(dst)
        have_a, have_b = (a.container_ip6, b.container_ip6) if ipv6 else (a.container_ip, b.container_ip)
        cmd = ["ping", *(["-6"] if ipv6 else []), "-c", str(count), "-W", str(timeout_s), have_b or "(no container IP)"]
        d = self.dockerd(a)
        tried = f"docker -H {d.host} exec {self.container_name(a)} {' '.join(cmd)}"
        if not have_a or not have_b:
            return PingResult(False, tried, "a container has no address (its dockerd did not start it?)")
        try:
            proc = d.exec(self.container_name(a), cmd, check=False)
        except subprocess.TimeoutExpired:
            return PingResult(False, tried, "docker exec did not finish")
        output = (proc.stdout + proc.stderr).decode(errors="replace")
        return PingResult(proc.returncode == 0, tried, _last_line(output))

    def dockerd_running(self, host: LabHost) -> bool:
        pid = self.dockerd_pids.get(str(host.index), 0)
        return bool(pid) and _pid_alive(pid)

    def status(self) -> dict[str, Any]:
        st = super().status()
        for h, doc in zip(self.host_list, st["hosts"]):
            doc["container_namespace"] = ""  # none in Docker mode
            doc["docker"] = {"pid": self.dockerd_pids.get(str(h.index), 0), "running": self.dockerd_running(h),
                             "socket": self.dockerd(h).sock, "container": self.container_name(h),
                             "daemon_json": self.daemon_json_path(h), **self._bip_mtu(h)}
        return st

    def _bip_mtu(self, host: LabHost) -> dict[str, Any]:
        """What flanneld wrote into the host's daemon.json (what dockerd gave docker0)."""
        try:
            with open(self.daemon_json_path(host)) as f:
                doc = json.load(f)
        except (OSError, ValueError):
            return {"bip": "", "mtu": 0}
        return {"bip": doc.get("bip", ""), "mtu": doc.get("mtu", 0)} if isinstance(doc, dict) else {"bip": "", "mtu": 0}

    # --- tear down ---------------------------------------------------------------------------

    def down(self) -> list[str]:
        """Stop each dockerd (SIGTERM; its containers, containerd and mounts go with it), then Lab.down."""
        for host in self.host_list:
            self._stop_docker(host)
        # Only after a SIGKILLed daemon: its containerd, shims and containers; then any mount left
        # under our workdir (rmtree must never run through a live mount).
        kill_leftovers(self.docker_dir)
        unmount_under(self.workdir)
        return super().down()

    def _stop_docker(self, host: LabHost) -> None:
        pid = self.dockerd_pids.get(str(host.index), 0)
        d = self.dockerd(host)
        if pid and _pid_alive(pid):
            # `sleep` as PID 1 ignores SIGTERM, so dockerd would wait 10 s per container: kill it first.
            try:
                d.docker("rm", "-f", self.container_name(host), check=False, timeout=30)
            except subprocess.TimeoutExpired:
                pass
        if d.proc is not None:
            d.stop()  # our child: wait on it, close its log
        else:
            stop_dockerd(pid, d.sock)
        self.dockerd_pids.pop(str(host.index), None)
