"""Running the host's network tools (iptables-save/-restore, nft) from trio, optionally inside a
network namespace, with a failure turned into one FlannelError line naming the command."""

from __future__ import annotations

import functools
import shutil
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from flannelpy.errors import FlannelError


def netns_prefix(netns: str | None) -> list[str]:
    """The command prefix that runs a tool inside /var/run/netns/<netns> (tests); [] = here."""
    return ["nsenter", f"--net=/var/run/netns/{netns}"] if netns else []


async def run_tool(prefix: list[str], args: list[str], stdin: bytes = b"", *, package: str) -> str:
    """Run `prefix + args`, return its stdout; `package` names what to install when it is missing."""
    cmd = prefix + args
    try:
        proc = await trio.run_process(cmd, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False)
    except FileNotFoundError as err:
        raise FlannelError(f"cannot run {cmd[0]!r}: {err.strerror}; is {package} installed?") from err
    if proc.returncode != 0:
        why = " ".join(proc.stderr.decode(errors="replace").split())  # errors are one line
        raise FlannelError(f"{' '.join(args)} failed (exit {proc.returncode}): {why}")
    return proc.stdout.decode(errors="replace")


async def run_together(*jobs: Callable[[], Awaitable[Any]]) -> list[Any]:
    """Await the jobs concurrently (tool runs are processes: a start waits for the slowest, not
    the sum); their results in order.  A job's error is raised as itself, as a sequential call
    would raise it (not inside an ExceptionGroup), and cancels the others."""
    results: list[Any] = [None] * len(jobs)

    async def one(i: int, job: Callable[[], Awaitable[Any]]) -> None:
        results[i] = await job()

    try:
        async with trio.open_nursery() as nursery:
            for i, job in enumerate(jobs):
                nursery.start_soon(one, i, job)
    except BaseExceptionGroup as group:
        errors = [e for e in group.exceptions if not isinstance(e, trio.Cancelled)]
        if len(errors) == 1 and not isinstance(errors[0], BaseExceptionGroup):
            raise errors[0] from None
        raise
    return results


async def save_nat_and_filter(prefix: list[str], save: str) -> str:
    """`<save> -t nat` and `<save> -t filter` (iptables-save or ip6tables-save), run at once: the
    two tables flannel's rules live in, as one iptables-save text."""
    nat, filter_ = await run_together(
        functools.partial(run_tool, prefix, [save, "-t", "nat"], package="iptables"),
        functools.partial(run_tool, prefix, [save, "-t", "filter"], package="iptables"))
    return nat + filter_


async def list_nft_tables(netns: str | None = None) -> str | None:
    """`nft list tables` (None when nft is absent, since then no table of flannel's can exist)."""
    if shutil.which("nft") is None:
        return None
    return await run_tool(netns_prefix(netns), ["nft", "list", "tables"], package="nftables")
