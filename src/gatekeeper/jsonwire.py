"""JSON as it crosses the wire: strict parsing (RFC 8259) and JSON paths for error messages.

Python's ``json`` reads more than RFC 8259 allows — ``NaN``, ``Infinity``, numbers that
overflow to ``inf`` — and fails with ``RecursionError`` on deep nesting. Whatever gatekeeper
stores must be JSON again when it is served, so every body from outside (API requests,
inbound CI webhooks) is read with ``loads_strict``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

MAX_FACT_DEPTH = 64
"""Deepest nesting of objects and arrays accepted in a fact's ``data`` (``data`` itself is
level 1). Every answer that serves facts back (``GET /v1/facts``, ``/v1/export``, a rule's
decisions and explanation) wraps the data in under 10 more levels, and the JSON encoder and
the database's JSON functions manage several hundred, so whatever is accepted can be read
back, before and after a restart, with a wide margin."""


def loads_strict(data: bytes | str) -> Any:
    """Parse ``data`` as RFC 8259 JSON.

    Raises ``ValueError`` with a short reason for anything else: malformed JSON, bad UTF-8,
    ``NaN``/``Infinity``, a number beyond the float range, an integer of more digits than
    Python converts, nesting too deep to parse.
    """
    try:
        return json.loads(data, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def too_deep(value: Any, limit: int = MAX_FACT_DEPTH) -> bool:
    """True when ``value`` nests objects and arrays (dicts, lists, tuples) more than
    ``limit`` levels deep: ``{}`` is 1, ``{"a": [1]}`` 2, a scalar 0. Iterative, and stops
    at the first container beyond ``limit``, so any depth is safe to ask about."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def json_path(parts: Iterable[Any]) -> str:
    """A JSON path for error messages: ``["facts", 1, "kind"]`` -> ``$.facts[1].kind``."""
    out = "$"
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large for a JSON number here")
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")
