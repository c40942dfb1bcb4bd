"""A host-wide lock around read-compute-write of firewall rules.

Two agents on one host (one per network, or flannelpy beside a restarting copy of itself) each
read the tables, compute a batch from what they read and apply it.  Without a lock one agent's
batch can be computed from a listing taken before the other's batch landed and then re-declare
(flush) the shared chain without the other's rules.  xtables.lock does not help: it covers one
iptables command, not the save→restore pair.  An flock on our own file covers the pair.
"""

from __future__ import annotations

import errno
import fcntl
import os
from contextlib import asynccontextmanager
from typing import AsyncIterator

import trio

LOCK_DIR = "/run/flannel"
POLL_S = 0.005
IPTABLES = "iptables-rules"  # held by both managers: the nftables one also edits iptables chains
NFTABLES = "nftables-rules"


def lock_path(name: str, directory: str | None = None) -> str:
    """Where the lock file called `name` lives (FLANNELPY_LOCK_DIR overrides the directory)."""
    return os.path.join(directory or os.environ.get("FLANNELPY_LOCK_DIR", LOCK_DIR), f"{name}.lock")


@asynccontextmanager
async def host_lock(name: str, directory: str | None = None) -> AsyncIterator[None]:
    """Hold an exclusive flock on <dir>/<name>.lock for the body; waiting is cancellable.

    Polls with LOCK_NB instead of blocking a worker thread, so cancellation (shutdown) never
    waits on another process.  A directory we cannot create or write (an unprivileged test run)
    means no other agent can share it either, so the body runs unlocked.
    """
    path = lock_path(name, directory)
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except PermissionError:
        yield
        return
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                await trio.sleep(POLL_S)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock
