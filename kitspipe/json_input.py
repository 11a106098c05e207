"""Parsing JSON that comes from outside kitspipe: plans and presets, ``dataset.json``, ``splits.json``.

Python's ``json`` accepts more than JSON and sets no limits. ``NaN`` and ``Infinity`` parse,
a repeated key silently keeps its last value, ``1e999`` becomes ``inf``, a 5000-digit integer
fails with a message about ``sys.set_int_max_str_digits``, and a few thousand nested brackets
raise ``RecursionError`` from inside the parser. Every one of these is refused here with a
one-line reason, before a value reaches the schema. Files that kitspipe writes itself
(manifests, checkpoint sidecars) are read with plain ``json``.
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from pathlib import Path
from typing import Any

# Plans nest four levels deep and dataset.json three; 32 leaves room and keeps the parser's
# recursion far from Python's limit.
MAX_DEPTH = 32
# Digits of an integer, or characters of a number with a fraction or exponent: enough for any
# seed, voxel count or float64 written in full (17 significant digits and an exponent).
MAX_INTEGER_DIGITS = 20
MAX_NUMBER_CHARS = 32
MAX_BYTES = 16 * 1024 * 1024

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = {"[": 1, "{": 1, "]": -1, "}": -1}


class JsonInputError(ValueError):
    """Why a JSON text was refused, in the parts of an error line."""

    def __init__(self, problem: str, observed: str = "", expected: str = ""):
        self.problem, self.observed, self.expected = problem, observed, expected
        detail = f" ({observed} vs {expected})" if expected else f" ({observed})" if observed else ""
        super().__init__(problem + detail)


def parse_json(text: str, what: str = "JSON") -> Any:
    """``json.loads`` of untrusted text, with limits.

    Args:
        text: the JSON text.
        what: how the text is named in the message for a ``NaN``/``Infinity`` constant.

    Raises:
        JsonInputError: invalid JSON, a duplicate key, a ``NaN``/``Infinity`` constant, nesting
            deeper than ``MAX_DEPTH`` or a number longer than the limits.
    """
    # Depth is measured before parsing, outside strings, so no input can exhaust the recursion.
    depth = max(accumulate((_BRACKETS[c] for c in _STRING.sub("", text) if c in _BRACKETS), initial=0))
    if depth > MAX_DEPTH:
        raise JsonInputError("JSON nested too deeply", f"{depth} levels", f"at most {MAX_DEPTH}")

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict:
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise JsonInputError(f"duplicate key {key!r}")
            seen.add(key)
        return dict(pairs)

    def constant(name: str) -> Any:
        raise JsonInputError(f"{name} is not allowed in {what}")

    try:
        return json.loads(text, object_pairs_hook=pairs_hook, parse_constant=constant,
                          parse_int=_integer, parse_float=_number)
    except json.JSONDecodeError as error:
        raise JsonInputError("invalid JSON", str(error)) from None


def read_json(path: str | Path, what: str = "JSON") -> Any:
    """:func:`parse_json` of a file; a file over ``MAX_BYTES`` is refused unread.

    Raises:
        OSError: the file cannot be read.
        JsonInputError: as :func:`parse_json`, or the file is too large.
    """
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise JsonInputError("JSON file too large", f"{size} bytes", f"at most {MAX_BYTES}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise JsonInputError("not UTF-8 text", str(error)[:80]) from None
    return parse_json(text, what)


def _integer(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise JsonInputError("integer too long", f"{len(text.lstrip('-'))} digits", f"at most {MAX_INTEGER_DIGITS}")
    return int(text)


def _number(text: str) -> float:
    if len(text) > MAX_NUMBER_CHARS:
        raise JsonInputError("number too long", f"{len(text)} characters", f"at most {MAX_NUMBER_CHARS}")
    value = float(text)
    if not math.isfinite(value):
        raise JsonInputError("number out of range", text, "a finite float64")
    return value
