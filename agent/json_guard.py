"""``json.loads`` for untrusted text, refusing deep nesting before parsing.

CPython's JSON parser recurses once per ``[`` or ``{``: a few kilobytes of brackets raise
``RecursionError`` (not ``ValueError``), which escaped the callers' handlers as an HTTP 500 or
an exception that killed a call's DTLS loop; near the recursion limit the parse is slow too.
No message of this protocol nests more than a few levels, so anything past ``MAX_DEPTH`` is
refused by a linear scan that never recurses, before ``json.loads`` sees it.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

#: Deepest nesting of arrays and objects accepted (the protocol itself needs about 4).
MAX_DEPTH = 64

# One JSON string: a quote, then anything but a quote or backslash, or an escaped character.
# Unrolled so that it never backtracks; brackets inside strings are not nesting.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
# Openers to +1, closers to -1 (0xFF as int8), so the running sum is the depth.
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


class JsonTooDeep(ValueError):
    """The text nests arrays/objects deeper than allowed (a ``ValueError``: invalid JSON)."""


def loads(raw: str | bytes, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads(raw)``, but ``JsonTooDeep`` for nesting past ``max_depth``.

    Bytes are decoded exactly as ``json.loads`` does (UTF-8/16/32 by their first bytes), so
    the scan sees the same characters the parser would. Raises ``ValueError`` (including
    ``JsonDecodeError``, ``UnicodeDecodeError`` and ``JsonTooDeep``) for anything invalid.
    """
    text = raw if isinstance(raw, str) else raw.decode(json.detect_encoding(raw), "surrogatepass")
    check_depth(text, max_depth)
    return json.loads(text)


def check_depth(text: str, max_depth: int = MAX_DEPTH) -> None:
    """Raise ``JsonTooDeep`` if brackets outside strings nest deeper than ``max_depth``.

    Linear and non-recursive. Text that is not valid JSON (an unterminated string) may be
    judged either way: ``json.loads`` refuses it afterwards regardless.
    """
    if text.count("[") + text.count("{") <= max_depth:
        return  # cannot nest that deep: the common case costs two C-speed counts
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    if not brackets:
        return
    steps = np.frombuffer(brackets.encode("ascii").translate(_STEPS), dtype=np.int8)
    if int(np.cumsum(steps, dtype=np.int64).max()) > max_depth:
        raise JsonTooDeep(f"JSON nested deeper than {max_depth} levels")
