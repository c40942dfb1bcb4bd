import io
import logging
import re

from flannelpy.ops.logsetup import setup_logging


def _emit(verbosity, environ):
    buf = io.StringIO()
    handler = setup_logging(verbosity, stream=buf, environ=environ)
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
