import io
import json
import logging
import os
import re

import pytest

from flannelpy.ops.logsetup import make_formatter, setup_logging


def _emit(verbosity, environ, fmt="text"):
    buf = io.StringIO()
    handler = setup_logging(verbosity, stream=buf, environ=environ, fmt=fmt)
    try:
        logging.getLogger("flanneld").info("hello\nworld")
        logging.getLogger("flanneld").debug("detail")
    finally:
        logging.getLogger().removeHandler(handler)
    return buf.getvalue()


def test_journald_lines_have_no_timestamp():
    assert _emit(0, {"JOURNAL_STREAM": "8:1234"}) == "I flanneld: hello\\nworld\n"


def test_iso_time_and_debug_at_v1():
    out = _emit(1, {}).splitlines()
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z I flanneld: hello", out[0])
    assert out[1].endswith("D flanneld: detail")


def test_klog_lines_are_flanneld_lines():
    """flanneld's own format, as real v0.20.2 writes it:
    `I1130 22:35:59.377456    3096 main.go:204] CLI flags config: ...`"""
    out = _emit(1, {"JOURNAL_STREAM": "8:1"}, fmt="klog").splitlines()  # klog keeps its header under journald too
    m = re.match(r"^I(\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d{6}) +(\d+) test_logsetup\.py:(\d+)\] hello\\nworld$", out[0])
    assert m, out[0]
    assert int(m.group(7)) == os.getpid()
    assert out[0][21] == " " and out[0][22:29] == f"{os.getpid():7d}"  # a space, then the pid right-aligned in 7
    assert out[1].startswith("I") and out[1].endswith("] detail")  # DEBUG is a V-log: an I line


def test_klog_levels_and_json():
    buf = io.StringIO()
    handler = setup_logging(0, stream=buf, environ={}, fmt="klog")
    try:
        logging.getLogger("flanneld").warning("w")
        logging.getLogger("flanneld").error("e")
    finally:
        logging.getLogger().removeHandler(handler)
    assert [line[0] for line in buf.getvalue().splitlines()] == ["W", "E"]
    lines = _emit(0, {}, fmt="json").splitlines()
    assert len(lines) == 1  # one object per line, the newline inside the message escaped
    doc = json.loads(lines[0])
    assert doc["level"] == "info" and doc["logger"] == "flanneld" and doc["msg"] == "hello\nworld"
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", doc["ts"])
    assert re.match(r"test_logsetup\.py:\d+$", doc["caller"])


def test_a_traceback_stays_on_one_line_in_every_format():
    for fmt in ("text", "klog", "json"):
        buf = io.StringIO()
        handler = setup_logging(0, stream=buf, environ={}, fmt=fmt)
        try:
            try:
                raise ValueError("boom")
            except ValueError:
                logging.getLogger("flanneld").exception("failed")
        finally:
            logging.getLogger().removeHandler(handler)
        assert buf.getvalue().count("\n") == 1, (fmt, buf.getvalue())
        assert "boom" in buf.getvalue()


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="text, klog or json"):
        make_formatter("xml")
