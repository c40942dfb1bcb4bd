"""hostnet.tools.run_together: concurrent tool runs that fail like sequential ones."""

from __future__ import annotations

import pytest
import trio

from flannelpy.errors import FlannelError
from flannelpy.hostnet.tools import run_together


async def test_results_in_order_and_run_at_once():
    gate = trio.Event()

    async def waits() -> str:
        await gate.wait()  # only the other job opens it: run one after the other, this never ends
        return "waited"

    async def opens() -> str:
        gate.set()
        return "opened"

    with trio.fail_after(5):
        assert await run_together(waits, opens) == ["waited", "opened"]


async def test_an_error_is_raised_as_itself_and_cancels_the_rest():
    finished: list[str] = []

    async def fails() -> None:
        await trio.sleep(0.01)
        raise FlannelError("iptables-save -t nat failed (exit 4): locked")

    async def slow() -> None:
        await trio.sleep(10)
        finished.append("slow")

    with trio.fail_after(5), pytest.raises(FlannelError, match="iptables-save -t nat failed"):
        await run_together(fails, slow)
    assert finished == []


async def test_two_errors_stay_a_group():
    async def fails(n: int) -> None:
        raise FlannelError(f"failure {n}")

    with pytest.raises(BaseExceptionGroup):
        await run_together(lambda: fails(1), lambda: fails(2))
