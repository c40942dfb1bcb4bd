"""Cached Debian root file systems and a Python wheelhouse for the systemd machines lab.

A machine of `flannelpy.lab.machines` boots a Debian 12 root made by `mmdebstrap` from Debian's own packages,
with everything its provisioning would `apt-get install` already in it: inside the lab's network namespaces
there is no route to Debian or PyPI. Roots are built once and kept under CACHE_DIR, named by a hash of what
went into them (suite, variant, package list), so changing a list builds a new root and an unchanged list never
rebuilds. Machines never write to a cached root: each gets an overlay of its own.

The wheelhouse holds flannelpy's dependencies (and the build backend pip needs to build flannelpy from its
source tree) as wheels for the machines' Python; the machines install from it with pip's own
PIP_NO_INDEX/PIP_FIND_LINKS, exactly as an offline host would.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from typing import Callable, Iterator

from flannelpy.errors import FlannelError

CACHE_DIR = "/var/cache/flannelpy-lab"
SUITE = "bookworm"
VARIANT = "minbase"
MACHINE_PYTHON = "3.11"  # bookworm's python3; the wheelhouse is made for it

# Every machine: an init, a bus, the tools a provisioning script and the lab's checks use.
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "iproute2", "iputils-ping", "procps", "kmod")
# What vagrant/provision-etcd.sh installs.
ETCD_PACKAGES = BASE_PACKAGES + ("etcd-server", "etcd-client")
# What vagrant/provision-host.sh installs (and etc/install.sh needs: python3 with venv), plus busybox-static
# for a Docker image made without a registry.
HOST_PACKAGES = BASE_PACKAGES + ("docker.io", "iptables", "python3", "python3-venv", "busybox-static")

Progress = Callable[[str], None]


class RootfsError(FlannelError):
    pass


@dataclass(frozen=True)
class RootSpec:
    """One cached root: what goes in, and so its name."""

    role: str
    packages: tuple[str, ...]
    suite: str = SUITE
    variant: str = VARIANT

    @property
    def key(self) -> str:
        """A short hash of everything that changes the root's content; the cache entry's name."""
        text = "\n".join([self.suite, self.variant, *sorted(set(self.packages))])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        return f"rootfs-{self.role}-{self.suite}-{self.key}"

    def mmdebstrap_command(self, target: str) -> list[str]:
        return ["mmdebstrap", f"--variant={self.variant}", f"--include={','.join(self.packages)}",
                self.suite, target]


ETCD_ROOT = RootSpec("etcd", ETCD_PACKAGES)
HOST_ROOT = RootSpec("host", HOST_PACKAGES)



def wheelhouse_requirements(pyproject_text: str) -> list[str]:
    """What the machines' pip needs offline: the project's dependencies and its build backend."""
    doc = tomllib.loads(pyproject_text)
    return [*doc["project"]["dependencies"], *doc["build-system"]["requires"], "wheel"]


def wheelhouse_key(requirements: list[str], python: str = MACHINE_PYTHON) -> str:
    text = "\n".join([python, *sorted(requirements)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- actions ----------------------------------------------------------------------------------------------


class _Lock:
    """An exclusive lock on a file in the cache, so two labs never build the same entry at once."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)

    def __enter__(self) -> "_Lock":
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _stream(cmd: list[str], progress: Progress, label: str, timeout: float) -> None:
    """Run cmd, passing its progress lines on with the elapsed time; raise with its tail on failure."""
    start = time.monotonic()
    tail: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            text=True, errors="replace")
    assert proc.stdout is not None
    try:
        for line in _lines(proc.stdout):
            tail = (tail + [line])[-15:]
            if line.startswith("I: "):
                progress(f"{label} [{time.monotonic() - start:4.0f}s] {line.removeprefix('I: ')}")
            if time.monotonic() - start > timeout:
                proc.terminate()
    except BaseException:  # interrupted: mmdebstrap cleans up its mounts on SIGTERM; wait for it
        proc.terminate()
        proc.wait()
        raise
    if proc.wait() != 0:
        raise RootfsError(f"{label}: {cmd[0]} failed ({proc.returncode}):\n" + "\n".join(tail))


def _lines(stream) -> Iterator[str]:
    for line in stream:
        yield line.rstrip("\n")


def ensure_root(spec: RootSpec, progress: Progress, cache_dir: str = CACHE_DIR) -> str:
    """The cached root for spec, built with mmdebstrap first if it is not there yet; returns its path."""
    path = os.path.join(cache_dir, spec.name)
    if os.path.isdir(path):
        return path
    if shutil.which("mmdebstrap") is None:
        raise RootfsError("mmdebstrap not found: install it (apt-get install mmdebstrap; see .ci/setup)")
    with _Lock(os.path.join(cache_dir, spec.name + ".lock")):
        if os.path.isdir(path):  # another lab built it while we waited
            return path
        tmp = path + ".building"
        shutil.rmtree(tmp, ignore_errors=True)
        progress(f"building the {spec.role} root file system ({spec.suite}, {len(spec.packages)} packages; "
                 f"once, then cached in {path}) ...")
        start = time.monotonic()
        try:
            _stream(spec.mmdebstrap_command(tmp), progress, f"  {spec.role} root", timeout=1200)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        os.rename(tmp, path)
        progress(f"  {spec.role} root built in {time.monotonic() - start:.0f}s")
    return path


def ensure_wheelhouse(project_dir: str, progress: Progress, cache_dir: str = CACHE_DIR) -> str:
    """Wheels of flannelpy's dependencies and build backend for the machines' Python, fetched once."""
    with open(os.path.join(project_dir, "pyproject.toml")) as f:
        requirements = wheelhouse_requirements(f.read())
    path = os.path.join(cache_dir, f"wheelhouse-py{MACHINE_PYTHON}-{wheelhouse_key(requirements)}")
    if os.path.isdir(path):
        return path
    with _Lock(path + ".lock"):
        if os.path.isdir(path):
            return path
        tmp = path + ".building"
        shutil.rmtree(tmp, ignore_errors=True)
        progress(f"fetching wheels for the machines' Python {MACHINE_PYTHON} into {path} ...")
        cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q",
               "--only-binary=:all:", f"--python-version={MACHINE_PYTHON}", "--dest", tmp, *requirements]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RootfsError(f"pip download for the wheelhouse failed ({proc.returncode}): "
                              f"{proc.stderr.strip()[-2000:]}")
        os.rename(tmp, path)
        progress(f"  {len(os.listdir(path))} wheels")
    return path
