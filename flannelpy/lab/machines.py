"""The systemd hosts lab: the Vagrant lab's machines as booted systemd containers on this machine.

`flannelctl lab up --machines` makes what `vagrant up` makes from vagrant/Vagrantfile, minus the VMs: an etcd
machine and N Docker host machines, each a Debian 12 with systemd as PID 1 (`flannelpy.lab.nspawn`) in a
network namespace of its own, on one private network bridged in `<prefix>-ul`:

    <prefix>-etcd    eth1 172.28.128.10/24   provisioned by vagrant/provision-etcd.sh
    <prefix>-hostN   eth1 172.28.128.(10+N)  provisioned by vagrant/provision-host.sh

Every machine also has Vagrant's NAT interface, `eth0` 10.0.2.15/24 with the default route (here a veth whose
other end is plugged into nothing, the same address on every machine as under VirtualBox), so provisioning must pick the private interface as it must
on real VMs. The source tree is copied to each machine's /flannelpy as Vagrant's rsync synced folder does, and
the provisioning scripts run from there exactly as Vagrant's shell provisioner runs them, as root with the same
arguments. Nothing is downloaded inside: the cached roots (`flannelpy.lab.rootfs`) already hold every package
the scripts would install, and pip installs from a wheelhouse bound at /wheelhouse (PIP_NO_INDEX,
PIP_FIND_LINKS). Each host then runs flanneld from the shipped unit and sysconfig, Docker (docker.io) after it
through the shipped drop-in, and a busybox container `fping` (image from `docker import` of busybox-static).

State lives in `<workdir>/lab.json` (default /var/lib/flannelpy-lab/<prefix>: machines' disks do not belong in
/run), so `lab status` and `lab down` work from other processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Network
from typing import Any, Callable

import flannelpy
from flannelpy.fileutil import atomic_write
from flannelpy.subnet.envfile import parse_env_file

from . import rootfs
from .netns_lab import LabError, run
from .nspawn import NSPAWN_RUNTIME_DIR, Machine, MachineError, mounts

DEFAULT_WORKDIR = "/var/lib/flannelpy-lab"
PRIVATE_NET = IPv4Network("172.28.128.0/24")  # the Vagrantfile's private network
ETCD_IP = "172.28.128.10"
NAT_ADDRESS, NAT_GATEWAY = "10.0.2.15/24", "10.0.2.2"  # VirtualBox NAT: the same on every VM
CONTAINER = "fping"
IMAGE = "busybox"
SLEEP_FOREVER = "2000000000"  # busybox sleep has no "infinity"
WHEELHOUSE = "/wheelhouse"
TREE_IGNORE = (".git", ".venv", "__pycache__", "*.egg-info", "build", ".pytest_cache", ".hypothesis")

# `docker import` of the machine's static busybox: an image without a registry (as flannelpy.lab.dockerd).
IMPORT_BUSYBOX = f"""set -e
docker image inspect {IMAGE} >/dev/null 2>&1 && exit 0
d=$(mktemp -d)
mkdir -p "$d/bin" "$d/tmp" "$d/proc" "$d/sys" "$d/dev" "$d/etc"
cp /bin/busybox "$d/bin/"
for n in sh ping sleep ip cat ifconfig route; do ln -s busybox "$d/bin/$n"; done
tar -C "$d" -c . | docker import -c "ENV PATH=/bin" - {IMAGE} >/dev/null
rm -rf "$d"
"""


def host_ip(index: int) -> str:
    return str(PRIVATE_NET.network_address + 10 + index)


def project_dir() -> str:
    """The source checkout this flannelpy runs from: what Vagrant would sync to /flannelpy."""
    top = os.path.dirname(os.path.dirname(os.path.abspath(flannelpy.__file__)))
    for need in ("pyproject.toml", "vagrant/provision-host.sh", "etc/install.sh"):
        if not os.path.exists(os.path.join(top, need)):
            raise LabError(f"the machines lab provisions from a source checkout, but {top} has no {need} "
                           "(install flannelpy from a clone: bash .ci/setup)")
    return top


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class MachineLab:
    prefix: str = "fplab"
    hosts: int = 2
    workdir: str = ""
    cache_dir: str = rootfs.CACHE_DIR
    machines: list[Machine] = field(default_factory=list)
    container_ips: dict[str, str] = field(default_factory=dict)  # machine name -> fping's IP
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step of up()
    kind: str = "machines"

    def __post_init__(self) -> None:
        if not self.workdir:
            self.workdir = os.path.join(DEFAULT_WORKDIR, self.prefix)
        if not 1 <= self.hosts <= 20:
            raise LabError(f"--hosts {self.hosts}: the machines lab takes 1 to 20 hosts")
        self.machines = [m if isinstance(m, Machine) else Machine(**m) for m in self.machines]
        self.progress: Callable[[str], None] = _stderr

    # --- names ---

    @property
    def underlay_ns(self) -> str:
        return f"{self.prefix}-ul"

    @property
    def state_file(self) -> str:
        return os.path.join(self.workdir, "lab.json")

    @property
    def etcd_endpoint(self) -> str:
        return f"http://{ETCD_IP}:2379"

    def machine_names(self) -> list[str]:
        return [f"{self.prefix}-etcd"] + [f"{self.prefix}-host{i}" for i in range(1, self.hosts + 1)]

    def all_namespaces(self) -> list[str]:
        return [self.underlay_ns, *self.machine_names()]

    def machine(self, name: str) -> Machine:
        """A machine by its hostname (etcd, host1, ...) or full name."""
        for m in self.machines:
            if name in (m.hostname, m.name):
                return m
        raise LabError(f"no machine {name!r} in lab {self.prefix!r}")

    @property
    def etcd(self) -> Machine:
        return self.machine("etcd")

    def host(self, i: int) -> Machine:
        return self.machine(f"host{i}")

    def host_machines(self) -> list[Machine]:
        return [m for m in self.machines if m.hostname != "etcd"]

    @property
    def host_list(self) -> list[Machine]:
        """The Docker hosts, under the namespace lab's name for them (flannelctl's shared ping output)."""
        return self.host_machines()

    # --- persistence ---

    def save(self) -> None:
        atomic_write(self.state_file, json.dumps(asdict(self), indent=2).encode())

    @classmethod
    def load(cls, prefix: str, workdir: str = "") -> "MachineLab":
        path = os.path.join(workdir or os.path.join(DEFAULT_WORKDIR, prefix), "lab.json")
        try:
            with open(path) as f:
                doc = json.load(f)
        except FileNotFoundError:
            raise LabError(f"no machines lab {prefix!r} ({path} not found)") from None
        return cls(**doc)

    @staticmethod
    def exists(prefix: str, workdir: str = "") -> bool:
        return os.path.exists(os.path.join(workdir or os.path.join(DEFAULT_WORKDIR, prefix), "lab.json"))

    # --- bring up ---

    def _check(self) -> None:
        if os.path.exists(self.state_file):
            raise LabError(f"lab {self.prefix!r} already exists ({self.state_file}); run `flannelctl lab down` first")
        existing = set(run("ip", "netns", "list").stdout.split())
        clash = [n for n in self.all_namespaces() if n in existing]
        if clash:
            raise LabError(f"namespaces already exist: {', '.join(clash)}; remove them or use another --prefix")
        for tool, package in (("systemd-nspawn", "systemd-container"), ("nsenter", "util-linux"),
                              ("ip", "iproute2")):
            if shutil.which(tool) is None:
                raise LabError(f"{tool} not found: install {package} (see .ci/setup)")
        if not any(fstype == "cgroup2" for fstype, _, _ in mounts()):
            raise LabError("no cgroup v2 hierarchy is mounted (/sys/fs/cgroup or /sys/fs/cgroup/unified): "
                           "the machines' systemd and Docker need one")

    def _step(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.monotonic()
        result = fn()
        self.timings[name] = round(time.monotonic() - start, 1)
        return result

    def up(self) -> None:
        """Build, boot and provision every machine, start a container per host; on failure remove it all."""
        self._check()
        src = project_dir()
        etcd_root = self._step("etcd root", lambda: rootfs.ensure_root(rootfs.ETCD_ROOT, self.progress,
                                                                       self.cache_dir))
        host_root = self._step("host root", lambda: rootfs.ensure_root(rootfs.HOST_ROOT, self.progress,
                                                                       self.cache_dir))
        wheels = self._step("wheelhouse", lambda: rootfs.ensure_wheelhouse(src, self.progress, self.cache_dir))
        os.makedirs(self.workdir, exist_ok=True)
        self.save()  # from here on `lab down` can remove whatever exists
        try:
            self._build_underlay()
            for name in self.machine_names():
                hostname = name[len(self.prefix) + 1:]
                binds = [(os.path.join(self.workdir, hostname, "flannelpy"), "/flannelpy", False)]
                if hostname != "etcd":
                    binds.append((wheels, WHEELHOUSE, True))
                m = Machine(name=name, hostname=hostname, dir=os.path.join(self.workdir, hostname),
                            lower=etcd_root if hostname == "etcd" else host_root, netns=name, binds=binds)
                self.machines.append(m)
                self._build_netns(m)
                shutil.copytree(src, binds[0][0], symlinks=True, ignore=shutil.ignore_patterns(*TREE_IGNORE))
                m.prepare()
                self.save()
            self._step("boot", self._boot_all)
            self._step("provision etcd", lambda: self.provision(self.etcd, "provision-etcd.sh", ETCD_IP))
            self._step("provision hosts", self._provision_hosts)
            self._step("containers", self._start_containers)
            self.save()
        except BaseException:
            self.progress("lab up failed; removing what was made")
            self.down()
            raise

    def _build_underlay(self) -> None:
        ns = self.underlay_ns
        run("ip", "netns", "add", ns)
        run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", ns, "link", "set", "br0", "up")

    def _machine_ip(self, m: Machine) -> str:
        return ETCD_IP if m.hostname == "etcd" else host_ip(int(m.hostname.removeprefix("host")))

    def _build_netns(self, m: Machine) -> None:
        """The machine's NICs, as the VM would have them at power-on: eth0 NAT (unplugged), eth1 private."""
        ns, ul = m.netns, self.underlay_ns
        run("ip", "netns", "add", ns)
        run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", ul, "link", "add", m.hostname, "type", "veth", "peer", "name", "eth1", "netns", ns)
        run("ip", "-n", ul, "link", "set", m.hostname, "master", "br0", "up")
        run("ip", "-n", ns, "addr", "add", f"{self._machine_ip(m)}/{PRIVATE_NET.prefixlen}", "dev", "eth1")
        run("ip", "-n", ns, "link", "set", "eth1", "up")
        # A veth whose other end is left unplugged in the underlay namespace: kernels without the dummy
        # driver have veth, and no traffic can leave through it, as none leaves the lab.
        run("ip", "-n", ul, "link", "add", f"n-{m.hostname}", "type", "veth", "peer", "name", "eth0", "netns", ns)
        run("ip", "-n", ns, "addr", "add", NAT_ADDRESS, "dev", "eth0")
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        run("ip", "-n", ns, "route", "add", "default", "via", NAT_GATEWAY)

    def _boot_all(self) -> None:
        for m in self.machines:
            self.progress(f"booting {m.hostname} (systemd-nspawn, netns {m.netns}) ...")
            m.boot()
            self.save()

    def provision(self, m: Machine, script: str, *args: str) -> None:
        """Run a vagrant/ provisioning script as Vagrant's shell provisioner does: as root, from the synced
        folder, with the Vagrantfile's arguments; pip finds the wheelhouse through its own variables."""
        self.progress(f"provisioning {m.hostname}: vagrant/{script} {' '.join(args)} ...")
        start = time.monotonic()
        env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": WHEELHOUSE} if m.hostname != "etcd" else {}
        proc = m.run("sh", f"/flannelpy/vagrant/{script}", *args, env=env, check=False, timeout=600)
        with open(os.path.join(m.dir, "provision.log"), "w") as f:
            f.write(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise LabError(f"{m.hostname}: vagrant/{script} failed ({proc.returncode}):\n"
                           f"{(proc.stdout + proc.stderr).strip()[-3000:]}")
        last = (proc.stdout.strip().splitlines() or [""])[-1]
        self.progress(f"  {m.hostname} provisioned in {time.monotonic() - start:.0f}s {last}")

    def _provision_hosts(self) -> None:
        with ThreadPoolExecutor(max_workers=len(self.host_machines())) as pool:
            futures = [pool.submit(self.provision, m, "provision-host.sh", ETCD_IP, self._machine_ip(m))
                       for m in self.host_machines()]
            for fut in futures:
                fut.result()

    def _start_containers(self) -> None:
        for m in self.host_machines():
            self.progress(f"{m.hostname}: busybox image (docker import) and container {CONTAINER} ...")
            m.sh(IMPORT_BUSYBOX)
            m.run("docker", "run", "-d", "--restart=always", "--name", CONTAINER, IMAGE, "sleep", SLEEP_FOREVER)
            self.refresh_container_ip(m)

    def refresh_container_ip(self, m: Machine, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        ip = ""
        while time.monotonic() < deadline:
            proc = m.run("docker", "inspect", "-f", "{{.NetworkSettings.IPAddress}}", CONTAINER, check=False)
            ip = proc.stdout.strip()
            if proc.returncode == 0 and ip:
                self.container_ips[m.name] = ip
                self.save()
                return ip
            time.sleep(0.3)
        raise LabError(f"{m.hostname}: container {CONTAINER} has no IP after {timeout:.0f}s")

    # --- machine power ---

    def reboot(self, m: Machine, timeout: float = 120.0) -> None:
        """Power the machine off and on again as a VM: its network namespace (and every device flanneld
        made in it) goes away and comes back with only the NICs; disks (overlay, docker data) stay."""
        m.poweroff()
        # The NICs' underlay ends first: deleting a namespace frees its devices asynchronously, so the names
        # could still be taken when the machine's new NICs are made.
        for end in (m.hostname, f"n-{m.hostname}"):
            run("ip", "-n", self.underlay_ns, "link", "del", end, check=False)
        run("ip", "netns", "del", m.netns)
        self._build_netns(m)
        m.boot(timeout)
        self.save()

    # --- use ---

    def subnet_env(self, m: Machine) -> dict[str, str]:
        """The machine's /run/flannel/subnet.env (empty when there is none), read through its root."""
        if not m.leader_pid:
            return {}
        try:
            with open(f"/proc/{m.leader_pid}/root/run/flannel/subnet.env") as f:
                return parse_env_file(f.read())
        except OSError:
            return {}

    def ping(self, src: Machine, dst: Machine, count: int = 1, timeout_s: int = 2) -> bool:
        """From host src's container to host dst's container, over the overlay."""
        ip = self.container_ips.get(dst.name)
        if not ip or not src.leader_pid:
            return False
        proc = src.run("docker", "exec", CONTAINER, "ping", "-c", str(count), "-W", str(timeout_s), ip,
                       check=False, timeout=count * timeout_s + 30)
        return proc.returncode == 0

    def ping_matrix(self) -> dict[tuple[str, str], bool]:
        hosts = self.host_machines()
        return {(a.hostname, b.hostname): self.ping(a, b) for a in hosts for b in hosts if a is not b}

    def wait_all_pings(self, timeout: float = 60.0) -> dict[tuple[str, str], bool]:
        deadline = time.monotonic() + timeout
        results = {pair: False for pair in self.ping_matrix()}
        while True:
            for pair, ok in results.items():
                if not ok:
                    results[pair] = self.ping(self.machine(pair[0]), self.machine(pair[1]), timeout_s=1)
            if all(results.values()) or time.monotonic() > deadline:
                return results
            time.sleep(0.3)

    def status(self) -> dict[str, Any]:
        machines = []
        for m in self.machines:
            doc: dict[str, Any] = {"machine": m.hostname, "name": m.name, "ip": self._machine_ip(m),
                                   "running": m.running(), "nspawn_pid": m.nspawn_pid, "pid1": m.leader_pid}
            if m.running() and m.leader_pid:
                units = ("etcd",) if m.hostname == "etcd" else ("flanneld", "docker")
                states = m.run("systemctl", "is-active", *units, check=False).stdout.split()
                doc["units"] = dict(zip(units, states))
            if m.hostname != "etcd":
                env = self.subnet_env(m)
                doc.update(subnet=env.get("FLANNEL_SUBNET", ""), mtu=int(env.get("FLANNEL_MTU", 0) or 0),
                           container_ip=self.container_ips.get(m.name, ""))
            machines.append(doc)
        return {"prefix": self.prefix, "kind": "machines", "etcd": self.etcd_endpoint, "workdir": self.workdir,
                "machines": machines, "timings": self.timings}

    # --- tear down ---

    def down(self) -> list[str]:
        """Power every machine off, unmount, delete the namespaces, cgroups and the workdir."""
        def remove(m: Machine) -> None:
            try:
                m.remove()
            except (OSError, MachineError) as err:
                self.progress(f"{m.hostname}: {err}")

        if self.machines:  # in parallel: each waits ~10 s for Docker to stop its containers
            with ThreadPoolExecutor(max_workers=len(self.machines)) as pool:
                list(pool.map(remove, self.machines))
        removed = []
        existing = set(run("ip", "netns", "list", check=False).stdout.split())
        for name in self.all_namespaces():
            if name in existing:
                run("ip", "netns", "del", name, check=False)
                removed.append(name)
        self._release_nspawn_runtime_dir()
        if not any(p == self.workdir or p.startswith(self.workdir + "/") for _, p, _ in mounts()):
            subprocess.run(["rm", "-rf", "--one-file-system", self.workdir], capture_output=True)
        return removed

    @staticmethod
    def _release_nspawn_runtime_dir() -> None:
        """Unmount the tmpfs the lab put on /run/systemd/nspawn once no machine uses it."""
        propagate = os.path.join(NSPAWN_RUNTIME_DIR, "propagate")
        busy = os.path.isdir(propagate) and os.listdir(propagate)
        if not busy and subprocess.run(["mountpoint", "-q", NSPAWN_RUNTIME_DIR]).returncode == 0:
            subprocess.run(["umount", NSPAWN_RUNTIME_DIR], capture_output=True)


def print_status(lab: MachineLab, out=sys.stdout) -> None:
    st = lab.status()
    print(f"lab {st['prefix']} (systemd machines): etcd {st['etcd']}, state in {st['workdir']}", file=out)
    print(f"{'MACHINE':<8} {'IP':<14} {'STATE':<8} {'UNITS':<34} {'SUBNET':<15} {'MTU':<5} CONTAINER IP", file=out)
    for m in st["machines"]:
        units = " ".join(f"{k}={v}" for k, v in m.get("units", {}).items()) or "-"
        print(f"{m['machine']:<8} {m['ip']:<14} {'running' if m['running'] else 'off':<8} {units:<34} "
              f"{m.get('subnet') or '-':<15} {m.get('mtu') or '-':<5} {m.get('container_ip') or '-'}", file=out)
