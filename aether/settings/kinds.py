"""What a setting's value may be. A kind reads a value as the command line and the environment
give it (a string) or as ``config.json`` does (JSON), checks it, and says what it must be.

Calling a kind returns the value or raises ValueError with a phrase that completes the
sentence "``SOURCE`` ...": ``must be 1-65535, not 0``. Whoever read the value puts the flag,
variable or key in front of it (see ``sources``), so every message names where the bad value
was and what it must be, on one line.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from aether.excerpt import excerpt

_WHOLE = re.compile(r"\s*[+-]?[0-9]+\s*")


def _whole(raw: Any) -> int | None:
    """An int from a string of ASCII digits or a JSON integer (not a boolean); else None."""
    if isinstance(raw, str):
        return int(raw) if _WHOLE.fullmatch(raw) else None
    return raw if isinstance(raw, int) and not isinstance(raw, bool) else None


def _either(names: Iterable[str]) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


class Kind:
    """The common part: ``what`` names the kind in errors and ``--help``."""

    what = "a value"
    #: What ``--help`` calls the flag's value; None: the setting's name.
    metavar: str | None = None

    def __call__(self, raw: Any) -> Any:
        raise NotImplementedError

    def json(self, raw: Any) -> Any:
        """The value as ``config.json`` holds it: as from the command line, unless the kind
        is a list, which the file holds as an array."""
        return self(raw)

    def refuse(self, raw: Any, what: str | None = None) -> ValueError:
        return ValueError(f"must be {what or self.what}, not {excerpt(raw)}")


class Text(Kind):
    """A string; with ``choices``, one of them (``lower``: in any case, kept lower case)."""

    def __init__(self, choices: Iterable[str] = (), lower: bool = False, metavar: str | None = None):
        self.choices = tuple(choices)
        self.lower = lower
        self.metavar = metavar
        self.what = _either(self.choices) if self.choices else "a string"

    def __call__(self, raw: Any) -> str:
        if not isinstance(raw, str):
            raise self.refuse(raw)
        value = raw.lower() if self.lower else raw
        if self.choices and value not in self.choices:
            raise self.refuse(raw)
        return value


class Integer(Kind):
    """A whole number from ``low`` to ``high`` (either may be open). ``zero`` names what 0
    means where it is the least (``0 (no cap) or more``); ``size``: a number of bytes, which
    the docs also give in KiB or MiB."""

    def __init__(self, low: int | None = None, high: int | None = None, zero: str = "", size: bool = False):
        self.low, self.high, self.zero, self.size = low, high, zero, size
        self.metavar = "BYTES" if size else "N"
        if low is not None and high is not None:
            self.what = f"{low}-{high}"
        elif low == 0:
            self.what = f"0 ({zero}) or more" if zero else "0 or more"
        elif low is not None:
            self.what = f"at least {low}"
        else:
            self.what = "a whole number"

    def __call__(self, raw: Any) -> int:
        value = _whole(raw)
        if value is None:
            raise self.refuse(raw, "a whole number" if self.low is None or self.high is None else f"a whole number, {self.what}")
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise self.refuse(raw)
        return value


class Seconds(Kind):
    """A finite number of seconds: ``positive``, or else 0 or more (``zero`` says what 0 means)."""

    def __init__(self, positive: bool = True, zero: str = ""):
        self.positive, self.zero = positive, zero
        self.metavar = "SECONDS"
        if positive:
            self.what = "a positive number of seconds"
        else:
            self.what = f"0 ({zero}) or more seconds" if zero else "0 or more seconds"

    def __call__(self, raw: Any) -> float:
        try:
            if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
                raise ValueError
            value = float(raw)
        except ValueError:
            raise self.refuse(raw) from None
        if not math.isfinite(value) or not (value > 0 if self.positive else value >= 0):
            raise self.refuse(raw)
        return value


class PowerOfTwo(Kind):
    what = "a power of two"
    metavar = "PAGES"

    def __call__(self, raw: Any) -> int:
        value = _whole(raw)
        if value is None or value < 1 or value & (value - 1):
            raise self.refuse(raw)
        return value


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


class Boolean(Kind):
    """JSON true/false, or true/false, 1/0, yes/no, on/off in any case; a flag alone is true."""

    what = "a boolean: true or false (1/0, yes/no, on/off)"

    def __call__(self, raw: Any) -> bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        raise self.refuse(raw)


class Command(Kind):
    """A command's argv: a JSON array of strings (``config.json``, or a flag or variable
    starting with ``[``), or one shell-quoted string split as the shell would."""

    what = "a command: a JSON array of strings, or one shell-quoted string"
    metavar = "COMMAND"

    def __call__(self, raw: Any) -> tuple[str, ...]:
        import json
        import shlex

        try:
            if isinstance(raw, str):
                raw = json.loads(raw) if raw.lstrip().startswith("[") else shlex.split(raw)
        except ValueError:  # bad JSON, or an unclosed quote
            raise self.refuse(raw) from None
        if not isinstance(raw, (list, tuple)) or not all(isinstance(arg, str) and "\x00" not in arg for arg in raw):
            raise self.refuse(raw)
        if raw and not raw[0]:
            raise self.refuse(raw, "a command whose program is named")
        return tuple(raw)


def _items(raw: Any) -> list | None:
    """A list from ``a,b,c`` (a flag or variable) or a JSON array; None for anything else."""
    if isinstance(raw, str):
        return [item.strip() for item in raw.split(",") if item.strip()]
    return list(raw) if isinstance(raw, (list, tuple)) else None


class Ports(Kind):
    """Port numbers, at most ``most`` of them: ``22,2222,3001``, or a JSON array. Sorted, each once."""

    def __init__(self, most: int = 1024):
        self.most = most
        self.metavar = "PORTS"
        self.what = f"a list of at most {most:,} port numbers (1-65535)"

    def json(self, raw: Any) -> tuple[int, ...]:
        if not isinstance(raw, list):
            raise self.refuse(raw, f"an array of at most {self.most:,} port numbers (1-65535)")
        return self(raw)

    def __call__(self, raw: Any) -> tuple[int, ...]:
        items = _items(raw)
        if items is None:
            raise self.refuse(raw)
        if len(items) > self.most:
            raise ValueError(f"must be at most {self.most:,} ports, not {len(items):,}")
        ports = set()
        for item in items:
            port = _whole(item)
            if port is None or not 1 <= port <= 65535:
                raise self.refuse(item, "port numbers (1-65535)")
            ports.add(port)
        return tuple(sorted(ports))


class Networks(Kind):
    """Addresses or networks: ``127.0.0.1,::1,10.0.0.0/8``, or a JSON array of them."""

    what = "addresses or networks, e.g. 127.0.0.1,::1,10.0.0.0/8"
    metavar = "NETWORKS"

    def __call__(self, raw: Any) -> tuple:
        import ipaddress

        items = _items(raw)
        if items is None or not all(isinstance(item, str) for item in items):
            raise self.refuse(raw)
        try:
            return tuple(ipaddress.ip_network(item, strict=False) for item in items)
        except ValueError:
            raise self.refuse(raw) from None

    def json(self, raw: Any) -> tuple:
        if not isinstance(raw, list):
            raise self.refuse(raw, "an array of addresses or networks")
        return self(raw)


class Directory(Kind):
    """An existing directory, resolved (links followed, made absolute); empty: not given."""

    what = "a directory"
    metavar = "DIR"

    def __call__(self, raw: Any) -> Path | None:
        if not isinstance(raw, str):
            raise self.refuse(raw)
        if not raw:
            return None
        path = Path(raw).resolve()
        if not path.is_dir():
            raise ValueError(f"must be a directory: {path} is not one")
        return path
