"""flanneld: the drop-in daemon's entry point."""

from __future__ import annotations

import logging
import os
import sys

import trio

from flannelpy import __version__
from flannelpy.config.flags import HelpRequested, parse_flags, usage
from flannelpy.errors import FlannelError, UsageError

log = logging.getLogger("flanneld")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        flags = parse_flags(argv, os.environ)
    except HelpRequested:
        print(usage(), file=sys.stderr)
        return 0
    except UsageError as err:
        print(f"flanneld: {err}", file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    if flags["version"]:
        print(__version__, file=sys.stderr)  # flanneld prints its version to stderr
        return 0

    from flannelpy.ops.logsetup import setup_logging

    setup_logging(flags["v"])
    for warning in flags.inactive_in_use():
        log.warning("%s", warning)

    from flannelpy.agent import AgentOptions, run_agent

    try:
        opts = AgentOptions.from_flags(flags)
        trio.run(run_agent, opts)
    except UsageError as err:
        print(f"flanneld: {err}", file=sys.stderr)
        return 2
    except FlannelError as err:
        log.error("%s", err)
        return err.exit_code
    except KeyboardInterrupt:
        return 0
    except Exception as err:  # anything unforeseen still ends in one line
        log.error("unexpected error: %s (run with -v=1 for the traceback)", describe_unexpected(err))
        log.debug("traceback of the unexpected error", exc_info=err)
        return 1
    return 0


def describe_unexpected(err: BaseException) -> str:
    """`Type: message` of the first real error, looking inside (nested) exception groups."""
    while isinstance(err, BaseExceptionGroup) and err.exceptions:
        err = err.exceptions[0]
    text = str(err).replace("\n", " ")
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
