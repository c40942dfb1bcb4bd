"""JSON from etcd, parsed within limits: whatever the bytes, the caller gets a value or one named error.

Anyone who can write to etcd chooses these bytes, and the stock `json.loads` lets some of them
escape as something other than a parse error: 100,000 nested arrays raise RecursionError, an
integer of 5,000 digits a bare ValueError, `NaN`/`Infinity` (not JSON at all) and `1e400` turn
into floats no field can hold.  Go's encoding/json, which flanneld uses, refuses all of them.
`load_json` checks size and nesting before it parses, refuses NaN and Infinity, and returns the
numbers no field can hold (`1e400`, a 40-digit integer) as `OutOfRangeNumber`, a float that
remembers how it was written, so a caller can name the field and show the value.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

# More digits than this and no field of a flannel config or lease can hold the integer
# (a uint64 has 20); it is kept as an OutOfRangeNumber instead of being converted.
MAX_INT_DIGITS = 20
_SHOW_CHARS = 32

# A JSON string (skipped: brackets inside it do not nest) or a bracket.
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


class JsonLimitError(ValueError):
    """The text is not JSON, or is JSON beyond the limits; the message says which."""


class OutOfRangeNumber(float):
    """A JSON number no field can hold (infinite as a float, or too many digits as an integer).

    Its float value is infinity, so every range check fails on it; `text` is what was written."""

    text: str

    def __new__(cls, text: str) -> "OutOfRangeNumber":
        number = super().__new__(cls, math.inf if not text.startswith("-") else -math.inf)
        number.text = text
        return number

    def __repr__(self) -> str:
        return shown(self.text)


def shown(text: str, limit: int = _SHOW_CHARS) -> str:
    """`text` cut to a length fit for a one-line error message."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def show_value(value: Any) -> str:
    """A parsed JSON value as it would be written, shortened for an error message."""
    if isinstance(value, OutOfRangeNumber):
        return shown(value.text)
    try:
        return shown(json.dumps(value))
    except (ValueError, TypeError, RecursionError):
        return shown(repr(value))


def nesting_depth(text: str) -> int:
    """The deepest bracket nesting in `text`, brackets inside strings not counted (no recursion)."""
    depth = deepest = 0
    for match in _TOKEN.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif token in "]}":
            depth -= 1
    return deepest


def _refuse_constant(name: str) -> Any:
    raise JsonLimitError(f"is not valid JSON: {name} is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    return value if math.isfinite(value) else OutOfRangeNumber(text)


def _int(text: str) -> int | float:
    digits = len(text) - text.startswith("-")
    return int(text) if digits <= MAX_INT_DIGITS else OutOfRangeNumber(text)


# One decoder each, built once (json.loads builds a new one per call when given hooks).  The
# parse_int hook only matters for an integer of more than MAX_INT_DIGITS digits, which needs such
# a run of digits somewhere in the text (`\d`: a superset of the ASCII digits JSON takes); without
# one, the C scanner's own int() gives the same value with no Python call per integer.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_float, parse_int=_int)
_DECODER_PLAIN_INTS = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_float)
_LONG_DIGITS = re.compile(rf"\d{{{MAX_INT_DIGITS + 1}}}")


def text_within_size(text: str | bytes, max_bytes: int) -> str:
    """`text` as a str (UTF-8 when bytes), refused when longer than `max_bytes` or not UTF-8."""
    if len(text) > max_bytes:
        raise JsonLimitError(f"is {len(text)} bytes long, more than the limit of {max_bytes}")
    if isinstance(text, (bytes, bytearray)):
        try:
            return bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JsonLimitError(f"is not valid JSON: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    return text


def load_json(text: str | bytes, *, max_bytes: int, max_depth: int) -> Any:
    """Parse `text` (UTF-8 when bytes); JsonLimitError for anything that is not a value within limits."""
    text = text_within_size(text, max_bytes)
    # Nesting never exceeds the number of opening brackets (those inside strings included), so a
    # text with few of them (every lease value) needs no scan.
    if not isinstance(text, str) or text.count("[") + text.count("{") > max_depth:
        depth = nesting_depth(text)
        if depth > max_depth:
            raise JsonLimitError(f"nests {depth} levels deep, more than the limit of {max_depth}")
    decoder = _DECODER if _LONG_DIGITS.search(text) else _DECODER_PLAIN_INTS
    try:
        if text.startswith("\ufeff"):  # as json.loads refuses it
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        return decoder.decode(text)
    except JsonLimitError:
        raise
    except json.JSONDecodeError as exc:
        raise JsonLimitError(f"is not valid JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:  # belt and braces: the checks above should prevent both
        raise JsonLimitError(f"is not valid JSON: {type(exc).__name__}: {shown(str(exc))}") from None


# What a parse yields besides containers and OutOfRangeNumber: skipped without a call.
_SCALARS = frozenset({str, int, float, bool, type(None)})


def has_out_of_range_number(value: Any) -> bool:
    """True when an OutOfRangeNumber sits anywhere in a parsed value (depth already bounded)."""
    if isinstance(value, dict):
        items: Any = value.values()
    elif isinstance(value, list):
        items = value
    else:
        return isinstance(value, OutOfRangeNumber)
    for item in items:
        if type(item) not in _SCALARS and has_out_of_range_number(item):
            return True
    return False
