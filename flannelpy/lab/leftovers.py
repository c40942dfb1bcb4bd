"""What a lab left on this machine, found by its name alone: for `lab down` without (or beyond) lab.json.

A lab's namespaces are `<prefix>-ul`, `<prefix>-hN` and `<prefix>-cN` and nothing else has those names,
so they can be found without any state file; its processes (etcd, the agents, the etcd forwarder, a
dockerd and its containerd) all run inside one of them, so they are found by their network namespace.
A dockerd's shims and containers run elsewhere and are found by their paths under the lab's workdir
(flannelpy.lab.dockerd.kill_leftovers).  This is how an interrupted `lab up` that died before writing
(or while updating) its state is still removed completely, and how `lab up` can say what is in its way.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field

NETNS_DIR = "/var/run/netns"


def lab_namespace_pattern(prefix: str) -> re.Pattern[str]:
    """Exactly the names a lab with this prefix makes (another prefix can never match: `fplab-x-ul`
    is not `fplab`'s)."""
    return re.compile(rf"^{re.escape(prefix)}-(ul|h[0-9]+|c[0-9]+)$")


def lab_namespaces(prefix: str, existing: list[str]) -> list[str]:
    """Pure: which of the existing namespace names belong to the lab `prefix`, sorted."""
    pattern = lab_namespace_pattern(prefix)
    return sorted(n for n in existing if pattern.match(n))


@dataclass(frozen=True)
class Proc:
    pid: int
    netns: str
    argv: tuple[str, ...]

    def describe(self) -> str:
        name = os.path.basename(self.argv[0]) if self.argv else "?"
        if name.startswith("python") and len(self.argv) > 1:  # flanneld, the forwarder: name the script
            name = next((os.path.basename(a) for a in self.argv[1:] if not a.startswith("-")), name)
        return f"{name} (pid {self.pid}, netns {self.netns})"


@dataclass
class Leftovers:
    namespaces: list[str] = field(default_factory=list)
    processes: list[Proc] = field(default_factory=list)

    def empty(self) -> bool:
        return not self.namespaces and not self.processes

    def describe(self) -> str:
        parts = []
        if self.namespaces:
            parts.append(f"namespaces {', '.join(self.namespaces)}")
        if self.processes:
            parts.append(f"processes {', '.join(p.describe() for p in self.processes)}")
        return "; ".join(parts) or "nothing"


def list_namespaces() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except OSError:
        return []


def _netns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _argv(pid: int) -> tuple[str, ...]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return tuple(a.decode(errors="replace") for a in fh.read().split(b"\0") if a)
    except OSError:
        return ()


def _ancestors() -> set[int]:
    """This process and its parents: `lab down` run from a shell inside a lab namespace spares that shell."""
    out, pid = set(), os.getpid()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as fh:
                pid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def processes_in(namespaces: list[str]) -> list[Proc]:
    """Every live process whose network namespace is one of these (by inode, as `ip netns pids`)."""
    inodes = {ino: name for name in namespaces if (ino := _netns_inode(os.path.join(NETNS_DIR, name))) is not None}
    if not inodes:
        return []
    spared = _ancestors()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in spared:
            continue
        ino = _netns_inode(f"/proc/{entry}/ns/net")
        if ino in inodes and not _zombie(int(entry)):
            found.append(Proc(int(entry), inodes[ino], _argv(int(entry))))
    return sorted(found, key=lambda p: p.pid)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(") ", 1)[1][0] == "Z"
    except (OSError, IndexError):
        return True


def find_leftovers(prefix: str) -> Leftovers:
    names = lab_namespaces(prefix, list_namespaces())
    return Leftovers(namespaces=names, processes=processes_in(names))


def stop_processes(procs: list[Proc], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL whatever is still there after `timeout` (only the PIDs named)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for p in procs:
            try:
                os.kill(p.pid, sig)
                alive.append(p)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 5.0)
        while alive and time.monotonic() < deadline:
            for p in list(alive):
                try:
                    if os.waitpid(p.pid, os.WNOHANG)[0]:
                        alive.remove(p)
                        continue
                except ChildProcessError:
                    pass  # not our child: /proc says
                if _zombie(p.pid):
                    alive.remove(p)
            time.sleep(0.05)
        procs = alive
        if not procs:
            return


def remove_leftovers(prefix: str, workdir: str) -> Leftovers:
    """Stop every process in the lab's namespaces, what a dockerd of the lab left under `workdir`,
    unmount under it, and delete the namespaces.  Returns what was found (and removed)."""
    from .dockerd import kill_leftovers, unmount_under

    found = find_leftovers(prefix)
    stop_processes(found.processes)
    if workdir and os.path.isdir(workdir):
        kill_leftovers(workdir)
        unmount_under(workdir)
    for name in found.namespaces:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    if looks_like_lab_workdir(workdir):
        shutil.rmtree(workdir, ignore_errors=True)
    return found


# What a lab's workdir holds (netns_lab, docker_lab); a directory with anything else is not removed.
# .lab.json.XXXXXXXX: fileutil.atomic_write's temporary file, left by a lab up killed while saving
_WORKDIR_ENTRIES = re.compile(r"^(lab\.json(\.tmp)?|\.lab\.json\.[A-Za-z0-9_]{8}|etcd|etcd-forward\.log|docker|pki|h[0-9]+)$")


def looks_like_lab_workdir(path: str) -> bool:
    """True for a directory holding only what a lab puts there (so removing it removes nothing else)."""
    try:
        entries = os.listdir(path)
    except OSError:
        return False
    return all(_WORKDIR_ENTRIES.match(e) for e in entries)
