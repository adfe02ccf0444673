"""JSON with comments, as VS Code reads ``devcontainer.json``: JSON plus ``//`` line comments,
``/* */`` block comments and a trailing comma before ``}`` or ``]``; nothing else of JSON5.

The text is blanked where it holds a comment or a trailing comma (each character replaced by a
space, newlines kept), so what is left is plain JSON of the same length, read by the standard
library: an error's line and column are the file's own. A ``//`` or ``/*`` inside a string is
text, not a comment; block comments do not nest (``/* a /* b */`` ends at the first ``*/``,
as in JavaScript). A duplicate key keeps its last value, as VS Code's parser does, and is
reported. JSON5 (single quotes, unquoted keys, hex numbers) is refused: the tools that read
``devcontainer.json`` refuse it too, so a file aether reads is one they read.
"""

from __future__ import annotations

import json
import re
from typing import Any

#: A string (escapes taken whole, so ``"\\"//"`` is one string and then a comment), a line
#: comment, a block comment, an unterminated block comment, or a character the blanking looks
#: at. Each alternative starts with a different character and none backtracks into another, so
#: the scan is linear in the text.
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|//[^\n]*|/\*.*?\*/|/\*|[,}\]]', re.S)
_BLANK = re.compile(r"[^\n]")


class JsoncError(ValueError):
    """Not JSON with comments: ``message``, and where (1-based ``line`` and ``column``)."""

    def __init__(self, message: str, line: int, column: int):
        super().__init__(f"line {line}, column {column}: {message}")
        self.message, self.line, self.column = message, line, column


def _where(text: str, index: int) -> tuple[int, int]:
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


def strip(text: str) -> str:
    """``text`` with its comments and trailing commas blanked: plain JSON, same length."""
    pieces: list[str] = []
    done = 0  # text[:done] is in pieces
    comma = -1  # where the last comma is in the output, while only blanks and comments follow it
    for match in _TOKEN.finditer(text):
        start, end = match.span()
        gap = text[done:start]
        if gap.strip():
            comma = -1  # a value came between the comma and this token: not trailing
        pieces.append(gap)
        token = match.group()
        if token.startswith("//") or (token.startswith("/*") and len(token) > 2):
            piece = _BLANK.sub(" ", token)
        elif token == "/*":
            raise JsoncError("a /* comment is never closed with */", *_where(text, start))
        else:
            if token in "}]" and comma >= 0:
                pieces[comma] = " "
            comma = len(pieces) if token == "," else -1
            piece = token
        pieces.append(piece)
        done = end
    pieces.append(text[done:])
    return "".join(pieces)


def loads(text: str, duplicates: list[str] | None = None) -> Any:
    """The value of ``text``; JsoncError saying what is wrong and where. Keys given twice in
    one object are appended to ``duplicates`` when it is given."""
    if text.startswith("\ufeff"):
        text = " " + text[1:]  # a byte-order mark, as editors on Windows write: not an error

    def pairs(items: list[tuple[str, Any]]) -> dict:
        made: dict = {}
        for key, value in items:
            if key in made and duplicates is not None:
                duplicates.append(key)
            made[key] = value
        return made

    plain = strip(text)
    try:
        return json.loads(plain, object_pairs_hook=pairs)
    except json.JSONDecodeError as exc:
        raise JsoncError(exc.msg, exc.lineno, exc.colno) from None
    except RecursionError:
        raise JsoncError("nested too deep", 1, 1) from None
