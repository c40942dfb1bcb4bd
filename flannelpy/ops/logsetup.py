"""Logging for flanneld: one line per event on stderr, like klog's output stream.

Verbosity (`-v`, also FLANNELD_V):
  0    INFO and above from flannelpy; library chatter (httpx, hypercorn, pyroute2) at WARNING.
  1    DEBUG from flannelpy (per-peer programming, renew timing, etcd retries).
  2    as 1, plus httpx/httpcore request lines.
  >=3  DEBUG from every library (pyroute2 netlink, hypercorn, trio).

Formats (`-log-format`, also FLANNELD_LOG_FORMAT):
  text  (default) `2026-11-30T20:46:00.385Z I flanneld: msg`: ISO-8601 UTC time in milliseconds;
        under systemd with stderr connected to the journal (JOURNAL_STREAM set) journald stamps
        each line itself, so lines carry no time, only `I flanneld: msg`.
  klog  flanneld's own lines, `I1130 20:46:00.385123    1234 agent.py:245] msg` (level letter,
        month and day, local time in microseconds, pid right-aligned in 7, file:line), for log
        pipelines that parse flanneld's output.  DEBUG lines are `I` lines, as klog's V-logs are.
  json  one object per line: {"ts": ISO-8601 UTC, "level": "info", "logger", "caller": "file:line", "msg"}.
Every format keeps one event on one line (a traceback is folded into it).
"""

from __future__ import annotations

import json
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
        line = f"{record.levelname[0]} {record.name}: {_one_line(self, record)}"
        return f"{self.formatTime(record)} {line}" if self.timestamps else line


def _one_line(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    msg = record.getMessage()
    if record.exc_info:
        # keep one event on one line: the traceback is folded, not dropped
        msg += " | " + formatter.formatException(record.exc_info).replace("\n", " | ")
    return msg.replace("\n", "\\n")


# klog's severity letters; DEBUG is klog's V-level logging, printed as INFO
_KLOG_LEVEL = {logging.DEBUG: "I", logging.INFO: "I", logging.WARNING: "W", logging.ERROR: "E", logging.CRITICAL: "F"}


class KlogFormatter(logging.Formatter):
    """`Lmmdd hh:mm:ss.uuuuuu threadid file:line] msg`, as klog writes (local time, pid padded to 7)."""

    def format(self, record: logging.LogRecord) -> str:
        t = time.localtime(record.created)
        micros = int((record.created % 1) * 1_000_000)
        letter = _KLOG_LEVEL.get(record.levelno, "I" if record.levelno < logging.WARNING else "E")
        return (f"{letter}{t.tm_mon:02d}{t.tm_mday:02d} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}.{micros:06d} "
                f"{record.process:7d} {record.filename}:{record.lineno}] {_one_line(self, record)}")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        doc = {"ts": ts, "level": record.levelname.lower(), "logger": record.name,
               "caller": f"{record.filename}:{record.lineno}", "msg": record.getMessage()}
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def make_formatter(fmt: str, environ: Mapping[str, str] | None = None) -> logging.Formatter:
    """The formatter for -log-format (text, klog or json); ValueError for any other name."""
    if fmt == "text":
        return _Formatter(timestamps=not under_journald(environ))
    if fmt == "klog":
        return KlogFormatter()
    if fmt == "json":
        return JsonFormatter()
    raise ValueError(f"unknown log format {fmt!r}: text, klog or json")


def under_journald(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return bool(env.get("JOURNAL_STREAM"))


def setup_logging(verbosity: int, *, stream: TextIO | None = None,
                  environ: Mapping[str, str] | None = None, fmt: str = "text") -> logging.Handler:
    """Configure the root logger once for the process; returns the handler installed."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(make_formatter(fmt, environ))
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
