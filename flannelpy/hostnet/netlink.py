"""One thread owns pyroute2's synchronous IPRoute; trio tasks await calls into it.

pyroute2's asyncio API does not run under trio, and an IPRoute socket must not be used
from several threads at once, so every netlink call goes through this single worker.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, TypeVar

import outcome
import trio
from pyroute2 import IPRoute

T = TypeVar("T")


class NetlinkThread:
    """Runs `fn(ipr, *args)` on the thread that owns the IPRoute socket."""

    def __init__(self, netns: str | None = None) -> None:
        # netns: operate inside /var/run/netns/<netns> (tests); None = this process's namespace.
        self._netns = netns
        self._jobs: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name="netlink", daemon=True)
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def _serve(self) -> None:
        ipr = IPRoute(netns=self._netns) if self._netns else IPRoute()
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                fn, args, deliver = job
                result = outcome.capture(fn, ipr, *args)
                deliver(result)
        finally:
            ipr.close()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(ipr, *args) on the netlink thread and return its result (or raise)."""
        self.start()
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box: list[outcome.Outcome] = []

        def deliver(result: outcome.Outcome) -> None:
            box.append(result)
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        self._jobs.put((fn, args, deliver))
        # The kernel change is not undone if we are cancelled; wait for it so that the
        # caller's view of the data plane stays true.
        with trio.CancelScope(shield=True):
            await done.wait()
        return box[0].unwrap()

    def call_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """For code outside trio (tests, CLI): run on the owning thread and block."""
        self.start()
        ev = threading.Event()
        box: list[outcome.Outcome] = []

        def deliver(result: outcome.Outcome) -> None:
            box.append(result)
            ev.set()

        self._jobs.put((fn, args, deliver))
        ev.wait()
        return box[0].unwrap()

    def stop(self) -> None:
        if self._started:
            self._jobs.put(None)
            self._thread.join(timeout=5)
            self._started = False
