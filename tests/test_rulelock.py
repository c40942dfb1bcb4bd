"""The host-wide rules lock: held by one process at a time, waiting is cancellable."""

import subprocess
import sys
import textwrap

import pytest
import trio

from flannelpy.hostnet.rulelock import host_lock, lock_path

HOLDER = textwrap.dedent("""
    import sys, time, trio
    from flannelpy.hostnet.rulelock import host_lock
    async def main():
        async with host_lock("t", sys.argv[1]):
            print("held", flush=True)
            time.sleep(float(sys.argv[2]))
    trio.run(main)
""")


def _hold_in_other_process(directory: str, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, directory, str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


async def test_a_lock_held_by_another_process_is_waited_for(tmp_path):
    other = _hold_in_other_process(str(tmp_path), 0.4)
    start = trio.current_time()
    async with host_lock("t", str(tmp_path)):
        waited = trio.current_time() - start
    other.wait()
    assert waited >= 0.3, f"entered after {waited:.3f} s while the other process held the lock for 0.4 s"



async def test_waiting_for_the_lock_can_be_cancelled(tmp_path):
    other = _hold_in_other_process(str(tmp_path), 2.0)
    try:
        with trio.move_on_after(0.2) as scope:
            async with host_lock("t", str(tmp_path)):
                pytest.fail("entered a lock another process holds")
        assert scope.cancelled_caught
    finally:
        other.kill()
        other.wait()


async def test_the_lock_is_released_after_the_body_even_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        async with host_lock("t", str(tmp_path)):
            raise RuntimeError("boom")
    with trio.fail_after(1):
        async with host_lock("t", str(tmp_path)):
            pass


def test_the_directory_can_be_moved_by_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FLANNELPY_LOCK_DIR", str(tmp_path))
    assert lock_path("iptables-rules") == str(tmp_path / "iptables-rules.lock")
