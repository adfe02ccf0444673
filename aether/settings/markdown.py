"""The settings tables of docs/settings.md, written from ``table``.

Each table stands between two markers in the document, which :func:`rewrite` replaces with
what the table says now: ``<!-- settings:begin -->`` and ``<!-- settings:end -->`` around
``aether serve``'s, and the same with ``global``, ``gateway`` or ``env`` for those of every command, of
``aether gateway`` (each flag it takes, those it shares with ``serve`` too) and of the
environment alone.
"""

from __future__ import annotations

import re

from aether.settings.sources import flags_of, shown_default
from aether.settings.table import ENV, GATEWAY, GLOBAL, SERVE, Setting, of

#: The block name in the markers -> the scope whose table it holds.
BLOCKS = {"": SERVE, "global": GLOBAL, "gateway": GATEWAY, "env": ENV}
_MARKERS = re.compile(r"(<!-- settings:begin( \w+|) -->\n)(.*?)(<!-- settings:end\2 -->)", re.S)


def _code(text: str) -> str:
    return f"`{text}`"


def _rows(scope: str) -> list[list[str]]:
    def row(setting: Setting) -> list[str]:
        cells = {
            SERVE: [_code(setting.key) if setting.key else "", _code(setting.flag or "")],
            GLOBAL: [_code(setting.flag or "")],
            GATEWAY: [_code(setting.flag_on(GATEWAY) or "")],
            ENV: [],
        }[scope]
        return [*cells, _code(setting.env), shown_default(setting), setting.help]

    return [row(setting) for setting in (flags_of(GATEWAY) if scope == GATEWAY else of(scope))]


_HEADS = {
    SERVE: ["`config.json` key", "flag", "variable", "default", "what it is"],
    GLOBAL: ["flag (before the command)", "variable", "default", "what it is"],
    GATEWAY: ["flag", "variable", "default", "what it is"],
    ENV: ["variable", "default", "what it is"],
}


def table(scope: str) -> str:
    """One scope's table, a row a setting, in the order of ``table``."""
    lines = [_HEADS[scope], ["---"] * len(_HEADS[scope]), *_rows(scope)]
    return "".join("| " + " | ".join(line) + " |\n" for line in lines).replace("|  |", "| |")


def rewrite(text: str) -> str:
    """``text`` with each block between markers holding its table as ``table`` says now;
    ValueError for a block name it does not know."""

    def block(match: re.Match) -> str:
        name = (match.group(2) or "").strip()
        if name not in BLOCKS:
            raise ValueError(f"unknown settings block {name!r}; known: {', '.join(repr(b) for b in BLOCKS)}")
        return match.group(1) + table(BLOCKS[name]) + match.group(4)

    return _MARKERS.sub(block, text)


def blocks(text: str) -> list[str]:
    """The names of the blocks ``text`` has markers for."""
    return [(match.group(2) or "").strip() for match in _MARKERS.finditer(text)]
