"""RepairLoop's period (pure): the long quiet interval only while kernel notifications are read
and nothing waits for a retry (issue #19: no periodic walk of every peer that flanneld lacks);
and the netlink thread a pass runs on keeps nothing of it afterwards."""

import pytest

from flannelpy.backends.repair import QUIET_INTERVAL, RESYNC_INTERVAL, RepairLoop
from flannelpy.hostnet.netlink import NetlinkThread


async def _repair() -> None:
    return None


def loop(urgent: list[bool], quiet: float | None = QUIET_INTERVAL) -> RepairLoop:
    return RepairLoop("test", NetlinkThread(), _repair, lambda change: True, RESYNC_INTERVAL,
                      quiet_interval=quiet, urgent=lambda: urgent[0])


def test_quiet_interval_only_while_notifications_are_read_and_nothing_failed():
    urgent = [False]
    rl = loop(urgent)
    assert rl.period() == RESYNC_INTERVAL  # notifications not (yet) read: the short period
    rl.monitoring = True
    assert rl.period() == QUIET_INTERVAL
    urgent[0] = True  # a peer failed or the device is broken: retried every 10 s
    assert rl.period() == RESYNC_INTERVAL


def test_without_a_quiet_interval_the_period_stays():
    rl = loop([False], quiet=None)
    rl.monitoring = True
    assert rl.period() == RESYNC_INTERVAL


class _Entries:
    """Stands for a repair pass's argument (every peer's entries): weakly referable."""


async def test_the_netlink_thread_keeps_nothing_of_a_finished_call():
    # The thread used to keep its last job (function, arguments, result) while waiting for the
    # next: a repair pass's list of every peer's entries stayed alive until the next request.
    import gc
    import weakref

    nl = NetlinkThread()
    entries, result = _Entries(), _Entries()
    entries_ref, result_ref = weakref.ref(entries), weakref.ref(result)
    got = await nl.rtnl_call(lambda _dumps, arg, res: res if arg is entries else None, entries, result)
    assert got is result
    del entries, result, got
    gc.collect()
    assert entries_ref() is None and result_ref() is None


async def test_a_submitted_job_runs_in_order_and_its_result_can_be_asked_again():
    """NetlinkThread.submit queues without waiting (vxlan overlaps its rounds with it): jobs run
    in the order queued, and a result asked for twice (a cleanup may ask again) is the same."""
    nl = NetlinkThread()
    ran: list[int] = []

    def job(_ipr, n: int) -> int:
        ran.append(n)
        if n == 2:
            raise ValueError("job 2 failed")
        return n * 10

    pending = [nl.submit(job, n) for n in (1, 2, 3)]
    assert [await pending[0].result(), await pending[2].result()] == [10, 30]
    for _ in range(2):
        with pytest.raises(ValueError, match="job 2 failed"):
            await pending[1].result()
    assert await pending[2].result() == 30 and ran == [1, 2, 3]
    nl.stop()
