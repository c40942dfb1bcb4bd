"""The reconciliation loop of the kernel backends (vxlan, host-gw): make the kernel match the
accepted leases, every `interval` seconds and within a fraction of a second of the kernel
reporting a change to one of our entries.

The backend supplies `repair()` (one pass: one dump of each table, the pure diff, the few
netlink calls that close it) and `notice(change)` (does this notification concern us?); this
module only decides *when* a pass runs and keeps a failing pass from ever ending the agent.
Notifications of changes our own netlink socket made are skipped, so programming a thousand
peers does not trigger a thousand passes.
"""

from __future__ import annotations

import logging
from ipaddress import IPv4Network
from typing import Awaitable, Callable

import trio

from flannelpy.hostnet.monitor import KernelChange, KernelMonitor
from flannelpy.hostnet.netlink import NetlinkThread

log = logging.getLogger(__name__)

RESYNC_INTERVAL = 10.0  # flanneld's host-gw route check period; ours for both backends
# vxlan's period while the kernel's notifications are read (they wake a pass within ~0.1 s of a
# change): flanneld's vxlan has no periodic walk at all, and a pass over 1000 peers costs ~0.1 s
# of CPU, so every 10 s was 1-4 % of a core for nothing.  A safety net against a lost
# notification (a lost batch of them is reported as an overflow, which wakes a pass).
QUIET_INTERVAL = 300.0
SETTLE = 0.05  # after a notification, let the rest of a burst (a deleted device's entries) arrive
MIN_GAP = 0.25  # at most four event-driven passes a second, whatever fights us


class RepairReport:
    """What one pass found and did.  (A plain class: a dataclass costs ~0.7 ms of every start.)"""

    __slots__ = ("device", "device_error", "added", "removed", "failures", "errors", "checked")

    def __init__(self, *, checked: bool = True) -> None:
        self.device: str | None = None  # what was wrong with the device and has been repaired
        self.device_error: str | None = None  # the device is broken and could not be repaired
        self.added: list[str] = []  # entries restored, e.g. "route 10.5.2.0/24"
        self.removed: list[str] = []  # entries no accepted lease explains, removed
        self.failures: dict[IPv4Network, str] = {}  # peer -> why it is not programmed
        self.errors: list[str] = []  # removals that failed
        self.checked = checked  # False: the entries were not looked at (device broken, no lease yet)

    def __repr__(self) -> str:
        return (f"RepairReport(device={self.device!r}, device_error={self.device_error!r}, added={self.added!r}, "
                f"removed={self.removed!r}, failures={self.failures!r}, errors={self.errors!r}, "
                f"checked={self.checked!r})")

    @property
    def changed(self) -> bool:
        return bool(self.device or self.added or self.removed)

    def summary(self, limit: int = 6) -> str:
        parts = []
        if self.device:
            parts.append(self.device)
        for verb, items in (("restored", self.added), ("removed", self.removed)):
            if items:
                shown = ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")
                parts.append(f"{verb} {len(items)}: {shown}")
        return "; ".join(parts)


def describe_failures(failures: dict[IPv4Network, str], what: str = "peer", limit: int = 3) -> str | None:
    """One readable line for /readyz: "2 peers failed: 10.5.3.0/24: Network is unreachable; ..."."""
    if not failures:
        return None
    items = [f"{subnet}: {reason}" for subnet, reason in sorted(failures.items(), key=lambda kv: kv[0])[:limit]]
    more = f"; and {len(failures) - limit} more" if len(failures) > limit else ""
    plural = "s" if len(failures) != 1 else ""
    return f"{len(failures)} {what}{plural} failed: " + "; ".join(items) + more


class EchoFilter:
    """Changes we just made whose notifications cannot be told from anyone else's.

    The vxlan driver announces every FDB change with port id 0, whoever made it, so the
    sender cannot say it was us.  Before programming an FDB entry the backend expects its
    echo (MAC, deleted?); the first matching notification within `ttl` seconds is ours and
    is dropped.  An expected echo that never comes (the kernel does not announce a change
    that changed nothing) expires, so it can hide at most one foreign change of that same
    entry for `ttl` seconds, which the periodic pass then repairs."""

    def __init__(self, ttl: float = 2.0, clock: Callable[[], float] | None = None) -> None:
        import time

        self.ttl = ttl
        self.clock = clock or time.monotonic
        self._expected: dict[object, float] = {}

    def expect(self, key: object) -> None:
        now = self.clock()
        if len(self._expected) > 4096:  # amortised clean-up of echoes that never came
            self._expected = {k: t for k, t in self._expected.items() if t >= now}
        self._expected[key] = now + self.ttl

    def consume(self, key: object) -> bool:
        """True when `key` was expected (and still fresh): the notification is our echo."""
        deadline = self._expected.pop(key, None)
        if not self._expected:
            # A dict never shrinks: the table sized for a start's thousands of echoes would stay.
            self._expected = {}
        return deadline is not None and deadline >= self.clock()


class RepairLoop:
    """Runs `repair()` periodically and soon after a relevant kernel notification."""

    def __init__(self, what: str, netlink: NetlinkThread, repair: Callable[[], Awaitable[object]],
                 notice: Callable[[KernelChange], bool], interval: float = RESYNC_INTERVAL,
                 *, quiet_interval: float | None = None, urgent: Callable[[], bool] | None = None,
                 monitor_groups: int = KernelMonitor.GROUPS) -> None:
        self.what = what
        self.monitor_groups = monitor_groups  # KernelMonitor.GROUPS_V6 for a backend's IPv6 side
        self.netlink = netlink
        self.repair = repair
        self.notice = notice
        self.interval = interval
        # With notifications read and nothing to retry (urgent() false), passes this far apart.
        self.quiet_interval = quiet_interval
        self.urgent = urgent
        self.passes = 0
        self.monitoring = False  # True while the kernel's notifications are being read
        self._wake = trio.Event()
        self._last_error: str | None = None

    def wake(self) -> None:
        """Ask for a pass now (after the settle delay) instead of at the next interval."""
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            monitor = self._open_monitor()
            if monitor is not None:
                nursery.start_soon(self._watch, monitor)
            task_status.started()
            while True:
                with trio.move_on_after(self.period()):
                    await self._wake.wait()
                if self._wake.is_set():
                    self._wake = trio.Event()
                    await trio.sleep(SETTLE)
                await self._pass()
                await trio.sleep(MIN_GAP)

    def period(self) -> float:
        """Seconds until the next periodic pass: `interval`, or `quiet_interval` while the
        kernel's notifications are read and nothing failed."""
        if self.quiet_interval is None or not self.monitoring or (self.urgent is not None and self.urgent()):
            return self.interval
        return max(self.interval, self.quiet_interval)

    async def _pass(self) -> None:
        self.passes += 1
        try:
            await self.repair()
        except Exception as exc:  # never end the agent: say it once, try again next time
            text = f"{type(exc).__name__}: {exc}"
            if text != self._last_error:
                log.warning("%s: kernel check failed (will retry every %gs): %s", self.what, self.interval, text)
            self._last_error = text
        else:
            if self._last_error is not None:
                log.info("%s: kernel check works again", self.what)
            self._last_error = None

    def _open_monitor(self) -> KernelMonitor | None:
        try:
            return KernelMonitor(self.netlink.netns, self.monitor_groups)
        except OSError as exc:
            log.warning("%s: cannot listen to kernel notifications (%s); checking every %gs only",
                        self.what, exc, self.interval)
            return None

    def _noticed(self, changes: list[KernelChange]) -> bool:
        """notice() every change (it may record what broke), not just until a first relevant one."""
        relevant = False
        for change in changes:
            relevant = self.notice(change) or relevant
        return relevant

    async def _watch(self, monitor: KernelMonitor) -> None:
        own = await trio.to_thread.run_sync(lambda: self.netlink.own_ports)
        self.monitoring = True
        try:
            while True:
                # Our own changes are skipped undecoded (a start echoes one per entry it adds);
                # no batch is held while the next is awaited.
                if self._noticed(await monitor.changes(own)):
                    self.wake()
        except OSError as exc:  # the periodic pass still runs: degrade, never end the agent
            log.warning("%s: kernel notifications failed (%s); checking every %gs only", self.what, exc, self.interval)
        finally:
            self.monitoring = False
            monitor.close()
