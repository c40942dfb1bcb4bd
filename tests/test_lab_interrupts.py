"""An interrupted `flannelctl lab up` leaves nothing that `flannelctl lab down` cannot remove.

SIGINT (Ctrl-C) and SIGTERM 0.5, 1, 2 and 4 s into `lab up`: no traceback, one line, and afterwards
`lab down` leaves no namespace of the lab and none of the processes that were running in them.  A
SIGKILL (no clean-up at all) with the state file then deleted: `lab up` refuses, naming every leftover
and the command that removes them; `lab down` removes them by the lab's names.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from flannelpy.lab.leftovers import find_leftovers

pytestmark = [pytest.mark.root, pytest.mark.etcd, pytest.mark.slow]


def caught_signals(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("SigCgt:"):
                return int(line.split()[1], 16)
    return 0


def wait_until_handling_signals(proc: subprocess.Popen, timeout: float = 30.0) -> float:
    """Seconds until the CLI's main() has taken over SIGTERM (Python's own start-up, before any flannelpy
    code runs, is not ours to handle); the test's delays count from the spawn but never start before that."""
    start = time.monotonic()
    while time.monotonic() - start < timeout and proc.poll() is None:
        try:
            if caught_signals(proc.pid) & (1 << (signal.SIGTERM - 1)):
                return time.monotonic() - start
        except OSError:
            break
        time.sleep(0.01)
    return time.monotonic() - start


def signal_after(cmd: list[str], delay: float, sig: int, timeout: float = 180) -> tuple[subprocess.CompletedProcess, bool]:
    """Run cmd, send `sig` `delay` seconds after its start; (result, whether the signal was sent)."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until_handling_signals(proc)
    time.sleep(max(0.0, delay - (time.monotonic() - started)))
    sent = proc.poll() is None
    if sent:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), sent


def lab_process_pids(prefix: str) -> list[int]:
    return [p.pid for p in find_leftovers(prefix).processes]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def processes_naming(text: str) -> list[int]:
    """Processes whose command line names `text` (the lab's unique prefix or workdir)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    if text.encode() in fh.read() and alive(int(entry)):
                        out.append(int(entry))
            except OSError:
                pass
    return out


@pytest.fixture
def lab_names(root):
    prefix = "fpq" + secrets.token_hex(2)
    workdir = tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp")
    yield prefix, workdir
    subprocess.run(["flannelctl", "lab", "--prefix", prefix, "--workdir", workdir, "down"], capture_output=True,
                   timeout=120)
    shutil.rmtree(workdir, ignore_errors=True)
    assert find_leftovers(prefix).empty()


def assert_down_removes_everything(prefix: str, workdir: str) -> str:
    pids = lab_process_pids(prefix)
    down = subprocess.run(["flannelctl", "lab", "--prefix", prefix, "--workdir", workdir, "down"],
                          capture_output=True, text=True, timeout=120)
    assert "Traceback" not in down.stdout + down.stderr
    left = find_leftovers(prefix)
    assert left.empty(), left.describe()
    assert not [p for p in pids if alive(p)], "processes of the lab survived `lab down`"
    assert not processes_naming(prefix) and not processes_naming(workdir)
    return down.stdout + down.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("delay", [0.5, 1.0, 2.0, 4.0])
def test_interrupted_lab_up_leaves_nothing_lab_down_cannot_remove(lab_names, sig, delay):
    prefix, workdir = lab_names
    up, sent = signal_after(["flannelctl", "lab", "--prefix", prefix, "--workdir", workdir, "up"], delay, sig)
    output = up.stdout + up.stderr
    assert "Traceback" not in output, output
    if sent and up.returncode == -sig and up.stdout.rstrip().endswith("to remove the lab"):
        pass  # the signal came as the finished lab up was exiting (default action then): a whole lab, removed below
    elif sent and up.returncode != 0:
        assert up.returncode == 128 + sig, output
        last = up.stderr.strip().splitlines()[-1]
        assert last.startswith("flannelctl: ") and signal.Signals(sig).name in last, output
        assert len(up.stderr.strip().splitlines()) == 1, output
    else:
        assert up.returncode == 0, output  # finished before the signal: a whole lab, removed below
    assert_down_removes_everything(prefix, workdir)


def test_killed_lab_up_without_state_is_named_and_removed(lab_names):
    """SIGKILL gives `lab up` no chance to clean up; without lab.json the lab is found by its names."""
    prefix, workdir = lab_names
    proc = subprocess.Popen(["flannelctl", "lab", "--prefix", prefix, "--workdir", workdir, "up"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    # etcd up and host 1's flanneld started: not just any process in -h1 (lab up's own short-lived
    # `nsenter ... sysctl` runs there before the agent, and an nsenter is flanneld only once it has exec'd)
    while not any(p.netns.endswith("-h1") and p.describe().startswith("flanneld (pid ")
                  for p in find_leftovers(prefix).processes):
        assert time.monotonic() < deadline and proc.poll() is None, "lab up never started an agent"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    os.unlink(os.path.join(workdir, "lab.json"))
    left = find_leftovers(prefix)
    assert f"{prefix}-ul" in left.namespaces and any("etcd" in p.describe() for p in left.processes)

    again = subprocess.run(["flannelctl", "lab", "--prefix", prefix, "--workdir", workdir, "up"],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and again.stdout.startswith("starting lab")
    assert len(again.stderr.splitlines()) == 1, again.stderr
    assert f"lab {prefix!r} has leftovers of an earlier run (namespaces {prefix}-" in again.stderr
    assert "etcd (pid " in again.stderr and "flanneld (pid " in again.stderr
    assert f"remove them with `flannelctl lab --prefix {prefix} --workdir {workdir} down`" in again.stderr

    out = assert_down_removes_everything(prefix, workdir)
    assert f"lab {prefix}: no state file; removed what was left: namespaces {prefix}-" in out
    assert not os.path.exists(workdir), os.listdir(workdir)  # only lab files were in it


@pytest.mark.parametrize("entries, lab_only", [
    (["lab.json", "etcd", "etcd-forward.log", "h1", "h2", "pki", "docker"], True),
    ([".lab.json.fa8hs_sn", "etcd", "h1"], True),  # atomic_write's temporary file, a lab up killed while saving
    (["etcd", "notes.txt"], False),  # someone else's file: the directory is not removed
    ([".lab.json.x", "h1"], False),
])
def test_a_lab_workdir_is_recognised_by_what_a_lab_puts_there(tmp_path, entries, lab_only):
    from flannelpy.lab.leftovers import looks_like_lab_workdir

    for name in entries:
        (tmp_path / name).mkdir()
    assert looks_like_lab_workdir(str(tmp_path)) is lab_only
