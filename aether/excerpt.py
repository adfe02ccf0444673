"""A value someone sent, shown in an error message: as JSON, cut short.

``repr`` would do for a value of our own. A client's value can be a list nested a thousand
deep (``repr`` recurses until Python's limit, and the error becomes an ``internal``), a
megabyte string, or a string that is not valid Unicode. :func:`excerpt` walks at most
``DEPTH`` levels and stops writing once it has ``limit`` characters, so its cost and its
length are bounded whatever it is given.
"""

from __future__ import annotations

import re
from typing import Any

import ujson

#: Characters an excerpt holds at most (a port list's bad element, a key, a short path).
LIMIT = 60
#: Levels shown; deeper containers are written ``[…]`` / ``{…}``.
DEPTH = 3
_SURROGATE = re.compile("[\ud800-\udfff]")


def excerpt(value: Any, limit: int = LIMIT) -> str:
    """``value`` as JSON, at most ``limit`` characters: ``…`` ends one that was cut."""
    pieces: list[str] = []
    room = limit + 1  # one past the limit tells a cut excerpt from one that fits exactly

    def put(text: str) -> bool:
        nonlocal room
        pieces.append(text[:room])
        room -= len(text)
        return room > 0

    def walk(item: Any, depth: int) -> bool:
        # Recursion is bounded by DEPTH; ``put`` returning False stops the walk at ``limit``.
        if isinstance(item, dict):
            if depth >= DEPTH:
                return put("{…}")
            if not put("{"):
                return False
            for i, (key, child) in enumerate(item.items()):
                if (i and not put(", ")) or not walk(key, depth + 1) or not put(": ") or not walk(child, depth + 1):
                    return False
            return put("}")
        if isinstance(item, (list, tuple)):
            if depth >= DEPTH:
                return put("[…]")
            if not put("["):
                return False
            for i, child in enumerate(item):
                if (i and not put(", ")) or not walk(child, depth + 1):
                    return False
            return put("]")
        if isinstance(item, str):
            # Only the start of a long string is encoded; a lone surrogate, which UTF-8 cannot
            # hold, is written as its JSON escape.
            start = item[:room]
            ascii_only = _SURROGATE.search(start) is not None
            return put(ujson.dumps(start, ensure_ascii=ascii_only, escape_forward_slashes=False))
        if item is None or isinstance(item, bool):
            return put("null" if item is None else "true" if item else "false")
        if isinstance(item, float):
            return put(repr(item))  # NaN and Infinity (which ujson reads) too
        if isinstance(item, int):
            # int -> str is quadratic in the digits (and refused past 4,300): show the size.
            return put(str(item) if -(10**18) < item < 10**18 else f"<an integer of {item.bit_length()} bits>")
        return put(f"<{type(item).__name__}>")

    walk(value, 0)
    text = "".join(pieces)
    return text if len(text) <= limit else text[: limit - 1] + "…"
