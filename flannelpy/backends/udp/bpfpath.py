"""The udp backend's kernel-speed path: loads bpf/udp_encap.bpf.o, attaches its programs with
tc (flannel0 egress: encapsulate; the underlay's ingress: admit and decapsulate), keeps its
maps in step with the peer table, reads its counters, and removes everything on close.

Loading goes through the ordinary tools (`bpftool prog loadall ... pinmaps`, `tc filter add
... bpf da pinned`): they handle BTF, relocations and the verifier's log, which a loader of our
own would have to re-implement.  Map writes and counter reads are bpf(2) calls through ctypes
on the pinned maps (one syscall per lease change or counter, no process per scrape).

Pins live in /sys/fs/bpf/flannelpy/net<inode of this network namespace>-<port>/ (bpffs is
shared by all namespaces of a mount namespace, so the name must be the namespace's own, and
the port's: instances in one namespace differ by port); bpffs is
mounted when missing.  Nothing is left behind on close: the filters are deleted, the clsact
qdisc too when we added it and it is empty, the pin folder unlinked (the kernel frees the
programs and maps with their last reference).
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import platform
import shutil
import struct
import subprocess
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Mapping

from . import bpfmaps

log = logging.getLogger(__name__)

OBJECT = Path(__file__).with_name("bpf") / "udp_encap.bpf.o"
BPFFS = Path("/sys/fs/bpf")
FORWARDER_CHOICES = ("auto", "bpf", "python")
# tc filter priority: late, out of the way of priorities people type by hand; the handle is
# the backend's port, so instances on other ports in one namespace keep their own filters.
FILTER_PREF = "49285"
ENCAP_PROG = "flannel_encap"
DECAP_PROG = "flannel_decap"

_BPF_SYSCALL = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}
_BPF_MAP_LOOKUP_ELEM, _BPF_MAP_UPDATE_ELEM, _BPF_MAP_DELETE_ELEM, _BPF_OBJ_GET = 1, 2, 3, 7
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfUnavailable(Exception):
    """The kernel or the host cannot run the BPF path; the message says why (one line)."""


def python_reason(choice: str) -> str | None:
    """Why the Python forwarder runs without trying BPF, or None when BPF is to be tried."""
    if choice == "python":
        return "-udp-forwarder=python"
    return None


# --- bpf(2) on pinned maps -------------------------------------------------------------------

class _ElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64), ("rest", ctypes.c_uint8 * 96)]


class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32),
                ("rest", ctypes.c_uint8 * 112)]


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    number = _BPF_SYSCALL.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, f"bpf(2) number unknown on {platform.machine()}")
    ret = _libc.syscall(ctypes.c_long(number), ctypes.c_int(cmd), ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr)))
    if ret < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return ret


class PinnedMap:
    """A pinned BPF map opened by path; keys and values are bytes of the map's sizes."""

    def __init__(self, path: Path) -> None:
        raw = ctypes.create_string_buffer(os.fsencode(path))
        attr = _ObjAttr(pathname=ctypes.addressof(raw))
        self.fd = _bpf(_BPF_OBJ_GET, attr)
        self.path = path

    def _elem(self, cmd: int, key: bytes, value: ctypes.Array | None, flags: int = 0) -> None:
        k = ctypes.create_string_buffer(key, len(key))
        attr = _ElemAttr(map_fd=self.fd, key=ctypes.addressof(k),
                         value=ctypes.addressof(value) if value is not None else 0, flags=flags)
        _bpf(cmd, attr)

    def update(self, key: bytes, value: bytes) -> None:
        self._elem(_BPF_MAP_UPDATE_ELEM, key, ctypes.create_string_buffer(value, len(value)))

    def delete(self, key: bytes) -> None:
        try:
            self._elem(_BPF_MAP_DELETE_ELEM, key, None)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise

    def lookup(self, key: bytes, size: int) -> bytes:
        out = ctypes.create_string_buffer(size)
        self._elem(_BPF_MAP_LOOKUP_ELEM, key, out)
        return out.raw

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --- tools -----------------------------------------------------------------------------------

def _run(*cmd: str) -> subprocess.CompletedProcess:
    """Run a tool; a missing tool or a hang is a failed run (the caller words the reason)."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return subprocess.CompletedProcess(cmd, 127, "", f"{cmd[0]}: not found")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", f"{cmd[0]}: no answer in 30 s")


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line.strip() for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
    return lines[-1] if lines else f"exit status {proc.returncode}"


def _link_type(dev: str) -> str:
    proc = _run("ip", "-j", "link", "show", "dev", dev)
    try:
        return json.loads(proc.stdout)[0].get("link_type", "")
    except (ValueError, IndexError, AttributeError):
        return ""


def pin_dir(port: int) -> Path:
    """Where this namespace's instance on `port` pins its programs and maps."""
    inode = os.stat("/proc/self/ns/net").st_ino
    return BPFFS / "flannelpy" / f"net{inode}-{port}"


def _ensure_bpffs() -> None:
    if _run("stat", "-f", "-c", "%T", str(BPFFS)).stdout.strip() == "bpf_fs":
        return
    BPFFS.mkdir(parents=True, exist_ok=True)
    proc = _run("mount", "-t", "bpf", "bpf", str(BPFFS))
    if proc.returncode != 0:
        raise BpfUnavailable(f"cannot mount bpffs on {BPFFS}: {_last_line(proc)}")


def _clsact(dev: str) -> bool:
    """Add a clsact qdisc to `dev`; True when we added it (False: it was there)."""
    proc = _run("tc", "qdisc", "add", "dev", dev, "clsact")
    if proc.returncode == 0:
        return True
    if "File exists" in proc.stderr or "Exclusivity flag on" in proc.stderr:
        return False
    raise BpfUnavailable(f"tc qdisc add dev {dev} clsact: {_last_line(proc)}")


def _attach(dev: str, hook: str, prog: Path, handle: int) -> None:
    proc = _run("tc", "filter", "replace", "dev", dev, hook, "pref", FILTER_PREF, "handle", str(handle),
                "bpf", "da", "pinned", str(prog))
    if proc.returncode != 0:
        raise BpfUnavailable(f"tc refused {prog.name} on {dev} {hook}: {_last_line(proc)}")


def _detach(dev: str, hook: str, handle: int) -> None:
    _run("tc", "filter", "del", "dev", dev, hook, "pref", FILTER_PREF, "handle", str(handle), "bpf")


def _filters_left(dev: str) -> bool:
    out = "".join(_run("tc", "filter", "show", "dev", dev, hook).stdout for hook in ("ingress", "egress"))
    return bool(out.strip())


class BpfPath:
    """The loaded programs and maps of one udp backend; every method blocks (call from a thread)."""

    def __init__(self, ext_name: str, ext_ifindex: int, local_ip: IPv4Address, port: int) -> None:
        self.ext_name = ext_name
        self.ext_ifindex = ext_ifindex
        self.local_ip = local_ip
        self.port = port
        self.dir = pin_dir(port)
        self.maps: dict[str, PinnedMap] = {}
        self.tun_name: str | None = None
        self.tun_ifindex = 0
        self._added_clsact = False
        self._written: dict[str, dict[bytes, bytes]] = {"peers": {}, "senders": {}}
        self._ncpus = 1

    # -- setup / teardown --

    def load(self, tun_name: str, tun_ifindex: int, subnets: Mapping[IPv4Network, str]) -> None:
        """Load, fill the maps, attach to both hooks; BpfUnavailable (after undoing everything)
        when any step is refused."""
        try:
            self._load(tun_name, tun_ifindex, subnets)
        except BaseException:
            self.close()
            raise

    def _load(self, tun_name: str, tun_ifindex: int, subnets: Mapping[IPv4Network, str]) -> None:
        if not OBJECT.is_file():
            raise BpfUnavailable(f"{OBJECT} is missing")
        for tool in ("tc", "bpftool"):
            if shutil.which(tool) is None:
                raise BpfUnavailable(f"{tool} is not installed")
        if platform.machine() not in _BPF_SYSCALL:
            raise BpfUnavailable(f"no bpf(2) syscall number known for {platform.machine()}")
        self._ncpus = bpfmaps.parse_cpu_list(Path("/sys/devices/system/cpu/possible").read_text())
        link_type = _link_type(self.ext_name)
        if link_type != "ether":
            # The programs parse and build Ethernet frames on the underlay (an L3 underlay such
            # as a WireGuard or PPP link would need other programs).
            raise BpfUnavailable(f"{self.ext_name} is not an Ethernet device (link type {link_type or 'unknown'})")
        _ensure_bpffs()
        if self.dir.exists():
            # A previous run in this namespace was killed: its pins hold nothing of ours now.
            log.warning("removing stale BPF pins in %s", self.dir)
            _detach(self.ext_name, "ingress", self.port)
            shutil.rmtree(self.dir, ignore_errors=True)
        try:
            self.dir.mkdir(parents=True)
        except FileNotFoundError:  # another namespace's agent removed the shared parent just now
            self.dir.mkdir(parents=True)
        proc = _run("bpftool", "prog", "loadall", str(OBJECT), str(self.dir / "progs"),
                    "pinmaps", str(self.dir / "maps"))
        if proc.returncode != 0:
            raise BpfUnavailable(f"the kernel refused the programs: {_last_line(proc)}")
        for name in ("peers", "senders", "config", "stats"):
            self.maps[name] = PinnedMap(self.dir / "maps" / name)
        self.sync(subnets)
        self._write_config(tun_ifindex)
        self._added_clsact = _clsact(self.ext_name)
        self.attach_tun(tun_name, tun_ifindex)
        _attach(self.ext_name, "ingress", self.dir / "progs" / DECAP_PROG, self.port)

    def offload_warning(self) -> str | None:
        """A line to log when the underlay is a veth that passes offloaded packets on unfinished.

        Encapsulated here, a packet keeps its offloads (CHECKSUM_PARTIAL, GSO) until the
        underlay's driver: a NIC, or software for one without tunnel offloads, finishes them
        before the wire.  A veth does not, so a user-space receiver in the same kernel
        (flanneld's proxy, the Python path) would read unfinished inner checksums and 64 KiB
        datagrams.  Receivers on the BPF path are not affected."""
        if shutil.which("ethtool") is None:
            return None
        if "driver: veth" not in _run("ethtool", "-i", self.ext_name).stdout:
            return None
        if "tx-checksumming: on" not in _run("ethtool", "-k", self.ext_name).stdout:
            return None
        return (f"{self.ext_name} is a veth with tx offloads on: peers on this kernel that are not on the BPF "
                f"path (flanneld, -udp-forwarder=python) need `ethtool -K {self.ext_name} tx off` here")

    def attach_tun(self, tun_name: str, tun_ifindex: int) -> None:
        """Encapsulate on this flannel0 (again, after the device was re-created)."""
        _clsact(tun_name)
        _attach(tun_name, "egress", self.dir / "progs" / ENCAP_PROG, self.port)
        self.tun_name, self.tun_ifindex = tun_name, tun_ifindex
        self._write_config(tun_ifindex)

    def _write_config(self, tun_ifindex: int) -> None:
        self.maps["config"].update(bytes(4), bpfmaps.config_value(self.local_ip, self.port, tun_ifindex, self.ext_ifindex))

    def close(self) -> None:
        """Remove the filters, our clsact, the pins.  Safe to call twice, or after a failed load."""
        _detach(self.ext_name, "ingress", self.port)
        if self._added_clsact and not _filters_left(self.ext_name):
            _run("tc", "qdisc", "del", "dev", self.ext_name, "clsact")
        self._added_clsact = False
        if self.tun_name is not None:
            _detach(self.tun_name, "egress", self.port)  # usually gone with the TUN already
            self.tun_name = None
        for m in self.maps.values():
            m.close()
        self.maps.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            self.dir.parent.rmdir()  # the last flannelpy of this mount namespace
        except OSError:
            pass

    # -- run time --

    def sync(self, subnets: Mapping[IPv4Network, str]) -> None:
        """Make `peers` and `senders` hold exactly these leases (only the differences are written)."""
        wanted = dict(zip(("peers", "senders"), bpfmaps.desired_maps(subnets)))
        for name in ("senders", "peers"):  # a sender is dropped before its routes, added after
            updates, deletions = bpfmaps.map_changes(self._written[name], wanted[name])
            for key in deletions:
                self.maps[name].delete(key)
                del self._written[name][key]
        for name in ("peers", "senders"):
            updates, _ = bpfmaps.map_changes(self._written[name], wanted[name])
            for key, value in updates:
                self.maps[name].update(key, value)
                self._written[name][key] = value

    def counters(self) -> dict[str, int]:
        stats = self.maps.get("stats")
        if stats is None:
            return {}
        size = 8 * self._ncpus
        return bpfmaps.counters_from(
            bpfmaps.sum_per_cpu(stats.lookup(struct.pack("=I", i), size), self._ncpus)
            for i in range(len(bpfmaps.STAT_NAMES)))
