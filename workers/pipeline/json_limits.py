"""Bounds on untrusted JSON (a project's schema and few-shot examples, an imported row, a
teacher's answer): nesting depth and size, measured without recursion.

Python's ``json`` raises ``RecursionError`` (not a ``ValueError``) on input nested about a
thousand levels deep, and code that walks a parsed value recursively (``jsonschema``, JSON
encoders, PostgreSQL's jsonb parser) fails somewhere below that. Every such value is parsed
with ``loads_bounded`` or checked with ``check_depth``, so nesting deeper than ``MAX_DEPTH``
becomes one clear ``JSONTooDeep`` error.
"""
from __future__ import annotations

import json

#: Deepest nesting of arrays and objects accepted anywhere (``{"a": [1]}`` is 2 deep).
MAX_DEPTH = 32


class JSONTooDeep(ValueError):
    """A JSON value nests arrays/objects deeper than the limit; the message says so."""


def json_depth(value, stop_after: int | None = None) -> int:
    """Nesting depth of a parsed JSON value: 0 for a scalar, 1 for ``[]`` or ``{"a": 1}``, one
    more per level of arrays/objects inside. Iterative (no recursion, whatever the depth);
    stops walking once the depth passes ``stop_after`` and returns that depth."""
    if not isinstance(value, (dict, list, tuple)):
        return 0
    deepest = 0
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > deepest:
            deepest = depth
            if stop_after is not None and deepest > stop_after:
                return deepest
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, (dict, list, tuple)):
                stack.append((child, depth + 1))
    return deepest


def check_depth(value, *, max_depth: int = MAX_DEPTH) -> None:
    """Raise JSONTooDeep when ``value`` nests deeper than ``max_depth`` levels."""
    if json_depth(value, stop_after=max_depth) > max_depth:
        raise JSONTooDeep(f"nested more than {max_depth} levels deep")


def loads_bounded(text: str | bytes, *, max_depth: int = MAX_DEPTH):
    """``json.loads(text)`` that refuses nesting deeper than ``max_depth`` levels. Raises
    ``json.JSONDecodeError`` for malformed JSON and ``JSONTooDeep`` (both ValueError) for input
    nested too deeply, however deep (even past the interpreter's recursion limit)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise JSONTooDeep(f"nested more than {max_depth} levels deep") from None
    check_depth(value, max_depth=max_depth)
    return value


def openers_at_most(text: str, limit: int = MAX_DEPTH) -> bool:
    """True when ``text`` holds at most ``limit`` ``[`` and ``{`` characters, so no JSON value
    in it can nest deeper than ``limit`` (a cheap pre-check before walking a parsed value)."""
    return text.count("[") + text.count("{") <= limit
