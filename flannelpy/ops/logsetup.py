"""Logging for flanneld: one line per event on stderr, like klog's output stream.

Verbosity (`-v`, also FLANNELD_V):
  0    INFO and above from flannelpy; library chatter (httpx, hypercorn, pyroute2) at WARNING.
  1    DEBUG from flannelpy (per-peer programming, renew timing, etcd retries).
  2    as 1, plus httpx/httpcore request lines.
  >=3  DEBUG from every library (pyroute2 netlink, hypercorn, trio).

Under systemd with stderr connected to the journal (JOURNAL_STREAM set), journald stamps
each line itself, so lines carry no time, only `<level letter> <logger>: message`.  Otherwise
each line starts with an ISO-8601 UTC time in milliseconds.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Mapping, TextIO

_OURS = ("flanneld", "flannelpy", "flannelctl")
_CHATTY = ("httpx", "httpcore", "hypercorn", "hypercorn.error", "hypercorn.access", "pyroute2", "trio")


class _Formatter(logging.Formatter):
    def __init__(self, timestamps: bool) -> None:
        super().__init__()
        self.timestamps = timestamps

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        t = time.gmtime(record.created)
        return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            # keep one event on one line: the traceback is folded, not dropped
            msg += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        msg = msg.replace("\n", "\\n")
        line = f"{record.levelname[0]} {record.name}: {msg}"
        return f"{self.formatTime(record)} {line}" if self.timestamps else line


def under_journald(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return bool(env.get("JOURNAL_STREAM"))


def setup_logging(verbosity: int, *, stream: TextIO | None = None,
                  environ: Mapping[str, str] | None = None) -> logging.Handler:
    """Configure the root logger once for the process; returns the handler installed."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(_Formatter(timestamps=not under_journald(environ)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbosity >= 3 else logging.WARNING)
    ours = logging.DEBUG if verbosity >= 1 else logging.INFO
    for name in _OURS:
        logging.getLogger(name).setLevel(ours)
    for name in _CHATTY:
        level = logging.NOTSET if verbosity >= 3 else logging.WARNING
        if verbosity == 2 and name in ("httpx", "httpcore"):
            level = logging.INFO
        logging.getLogger(name).setLevel(level)
    return handler
