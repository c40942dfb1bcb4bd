"""flanneld: the drop-in daemon's entry point.

Whatever happens, the process ends with one line saying why, never a Python traceback: a bad flag
(usage, exit 2), a flag asking for a mode flannelpy lacks (exit 1), a start that cannot succeed
(exit 1), and SIGINT/SIGTERM at any point of start-up (exit 0, as flanneld on a signal).  trio is
imported only inside main(), after the signal handling is in place, so a signal during the
imports (they take a few hundred milliseconds) is handled too.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
from typing import Any

from flannelpy import __version__
from flannelpy.config.flags import HelpRequested, parse_flags, usage
from flannelpy.errors import FlannelError, UsageError

log = logging.getLogger("flanneld")

_signal_seen: list[str] = []  # the name of the signal that interrupted us, for the last line


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    """SIGTERM before the agent's own handler exists: end like SIGINT does.  Re-sending SIGINT (rather
    than raising here) lets trio, if it is running, raise KeyboardInterrupt at a safe point."""
    _signal_seen.append("SIGTERM")
    os.kill(os.getpid(), signal.SIGINT)


def install_interrupt_handling() -> dict[int, object]:
    """SIGINT raises KeyboardInterrupt (Python's default); SIGTERM is routed to it.  Returns the
    handlers it replaced."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    return previous


def restore_signals(previous: dict[int, object] | None) -> None:
    """As the process ends (previous=None), a signal simply ends it (the kernel's default): nothing is
    left to clean up, and a KeyboardInterrupt during interpreter shutdown would print a traceback.
    Called in-process (tests), the caller's handlers come back."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL if previous is None else previous[sig])  # type: ignore[arg-type]


def is_interrupt(err: BaseException) -> bool:
    """KeyboardInterrupt, alone or inside (nested) exception groups with nothing else."""
    if isinstance(err, KeyboardInterrupt):
        return True
    if isinstance(err, BaseExceptionGroup):
        return all(is_interrupt(e) for e in err.exceptions)
    return False


def main(argv: list[str] | None = None) -> int:
    previous = install_interrupt_handling()
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except BaseException as err:  # noqa: BLE001 - the last line of defence against a traceback
        if isinstance(err, SystemExit):
            raise
        if is_interrupt(err):
            which = _signal_seen[-1] if _signal_seen else "SIGINT"
            print(f"flanneld: interrupted by {which} during start-up; exiting", file=sys.stderr)
            return 0
        print(f"flanneld: unexpected error: {describe_unexpected(err)}; please report it", file=sys.stderr)
        return 1
    finally:
        restore_signals(None if argv is None else previous)


def load_agent() -> tuple[Any, Any, Any]:
    """trio, AgentOptions and run_agent, imported.  The imports are most of a start's time and
    make ~60k objects that live as long as the process: the cyclic collector is off meanwhile
    (it would walk them again and again, ~5 % of the import time), and they are frozen out of
    its later walks (gc.freeze), which a 5000-lease start pays at every full collection (~15 %
    of its CPU in the bench lab)."""
    gc.disable()
    try:
        import trio

        from flannelpy.agent import AgentOptions, run_agent
    finally:
        gc.enable()
        gc.freeze()
    return trio, AgentOptions, run_agent


def _main(argv: list[str]) -> int:
    try:
        flags = parse_flags(argv, os.environ)
    except HelpRequested:
        print(usage(), file=sys.stderr)
        return 0
    except UsageError as err:
        # One line, not Go's error-then-usage: the usage (60 lines) would bury the one line that matters.
        print(f"flanneld: {err} (flanneld -help lists every flag)", file=sys.stderr)
        return 2
    if flags["version"]:
        print(__version__, file=sys.stderr)  # flanneld prints its version to stderr
        return 0
    refusals = flags.refusals()
    if refusals:
        # Before any warning about the flags that merely have no effect: this start is over.
        for line in refusals:
            print(f"flanneld: {line}", file=sys.stderr)
        return 1

    from flannelpy.ops.logsetup import setup_logging

    setup_logging(flags["v"], fmt=flags["log-format"])
    for warning in flags.inactive_in_use():
        log.warning("%s", warning)

    trio, AgentOptions, run_agent = load_agent()
    try:
        opts = AgentOptions.from_flags(flags)
        trio.run(run_agent, opts)
    except UsageError as err:
        print(f"flanneld: {err}", file=sys.stderr)
        return 2
    except FlannelError as err:
        log.error("%s", err)
        _tell_systemd_why(str(err))
        return err.exit_code
    except Exception as err:  # anything unforeseen still ends in one line
        log.error("unexpected error: %s (run with -v=1 for the traceback)", describe_unexpected(err))
        log.debug("traceback of the unexpected error", exc_info=err)
        _tell_systemd_why(f"unexpected error: {describe_unexpected(err)}")
        return 1
    return 0


def _tell_systemd_why(reason: str) -> None:
    """STATUS= survives the exit in `systemctl status`, whose log excerpt hides a failed attempt's
    lines once the unit restarts; the reason must be where operators look first."""
    import time

    from flannelpy.ops import sdnotify

    one_line = " ".join(reason.split())  # STATUS= is one line; a config error may list several problems
    if sdnotify.notify(f"STATUS=failed: {one_line}"[:1000]):
        # systemd attributes a notification to the unit by the sender's PID, which it can no longer
        # do once we have exited: give it a moment to read the datagram (no sd_notify_barrier here).
        time.sleep(0.2)


def describe_unexpected(err: BaseException) -> str:
    """`Type: message` of the first real error, looking inside (nested) exception groups."""
    while isinstance(err, BaseExceptionGroup) and err.exceptions:
        err = err.exceptions[0]
    text = str(err).replace("\n", " ")
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
