"""flannelctl: admin and lab tool.  Each subcommand is a module of this package defining register(subparsers).

Every failure ends in one line on stderr naming the problem (and, where there is one, the fix) and a
non-zero exit: FlannelError's exit code, 2 for bad usage, 130 or 143 when interrupted by SIGINT or
SIGTERM (SIGTERM is routed to the same path, so that `lab up` cleans up after either), 1 for anything
unforeseen.
A traceback is printed only with FLANNELCTL_DEBUG=1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import signal
import sys
import threading
import traceback

from flannelpy.errors import FlannelError

DEBUG_ENV = "FLANNELCTL_DEBUG"

_signal_seen: list[str] = []


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flannelctl", description="flannelpy admin and lab tool")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):  # __main__ runs flannelctl itself; _helpers are no subcommands
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def interrupt_name() -> str:
    """Which signal interrupted this run (SIGTERM is delivered as a KeyboardInterrupt too)."""
    return _signal_seen[-1] if _signal_seen else "SIGINT"


def interrupt_exit_code() -> int:
    """128 + the signal's number, as a shell reports a process ended by it."""
    return 128 + int(getattr(signal, interrupt_name()))


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    # Re-sent as SIGINT rather than raised here: inside trio.run, trio's own SIGINT handler then
    # raises KeyboardInterrupt at a point where it is safe.
    _signal_seen.append("SIGTERM")
    os.kill(os.getpid(), signal.SIGINT)


def _is_interrupt(err: BaseException) -> bool:
    if isinstance(err, KeyboardInterrupt):
        return True
    if isinstance(err, BaseExceptionGroup):
        return all(_is_interrupt(e) for e in err.exceptions)
    return False


def _first_error(err: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups: trio wraps task errors in them."""
    while isinstance(err, BaseExceptionGroup) and err.exceptions:
        flannel = err.split(FlannelError)[0]
        err = flannel.exceptions[0] if flannel is not None else err.exceptions[0]
    return err


def etcd_hint(err: FlannelError, args: argparse.Namespace | None) -> str:
    """The fix to add to an etcd failure, naming where the endpoints came from (empty when none fits)."""
    from flannelpy.etcd.diagnose import TLS
    from flannelpy.etcd.store import StoreUnavailable

    if args is None or not getattr(args, "etcd_options", False) or not isinstance(err, StoreUnavailable):
        return ""
    from ._etcd_args import source_of

    where = source_of(args, "etcd-endpoints")
    if err.kind == TLS:
        if not (args.etcd_cafile or args.etcd_certfile) and "https://" in args.etcd_endpoints:
            return (" (if etcd serves plain HTTP there, use http://; if its certificate is signed by a private CA, "
                    "give --etcd-cafile)")
        return ""
    return (f"; is etcd running and listening there? (endpoints from {where}; "
            f"give --etcd-endpoints http(s)://host:port for another)")


def main(argv: list[str] | None = None) -> int:
    # Signals can be taken over only from the main thread; called from another (a test, an embedding
    # program), the caller keeps its own handling.
    owns_signals = threading.current_thread() is threading.main_thread()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    if owns_signals:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    args: argparse.Namespace | None = None
    try:
        try:
            parser = build_parser()
            args = parser.parse_args(argv)
            code = int(args.func(args) or 0)
        finally:
            sys.stdout.flush()  # here, so that a reader gone away (`| head`) is handled below
        return code
    except SystemExit:
        raise  # argparse: usage error (2) or --help (0), already printed
    except BrokenPipeError:
        # The reader of our output went away (`flannelctl leases | head -1`): as a shell tool would, end
        # quietly; stdout goes to /dev/null so the interpreter's last flush cannot complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except BaseException as exc:  # noqa: BLE001 - the one place every failure becomes one line
        if _is_interrupt(exc):
            print(f"flannelctl: interrupted ({interrupt_name()})", file=sys.stderr)
            return interrupt_exit_code()
        err = _first_error(exc)
        if os.environ.get(DEBUG_ENV):
            traceback.print_exception(exc)
        if isinstance(err, FlannelError):
            print(f"flannelctl: {err}{etcd_hint(err, args)}", file=sys.stderr)
            return err.exit_code
        text = str(err).replace("\n", " ")
        print(f"flannelctl: unexpected error: {type(err).__name__}{': ' + text if text else ''} "
              f"(run with {DEBUG_ENV}=1 for the traceback, and please report it)", file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM) if owns_signals else ():
            # as the process ends, a late signal just ends it (no traceback during interpreter shutdown)
            signal.signal(sig, signal.SIG_DFL if argv is None else previous[sig])  # type: ignore[arg-type]
