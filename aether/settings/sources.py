"""Where a setting's value comes from: the first of its flag, its ``AETHER_*`` variable, its
``config.json`` key (``aether serve`` alone reads that file) and its default.

A value is parsed and checked by the setting's kind where it is read; a bad one is a
ValueError naming where it was: ``--port must be 1-65535, not 0``, ``AETHER_PORT must be ...``,
``/var/lib/aether/config.json key port must be ...``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from aether.settings.table import BY_NAME, ENV, GATEWAY, GLOBAL, SERVE, SETTINGS, Setting

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

#: Variables no process the daemon starts (terminals, agent backends) may inherit.
PRIVATE_ENV = tuple(setting.env for setting in SETTINGS if setting.secret)


class ConfigFile:
    """The settings of a ``config.json``: its values by key, its path, and where a key was
    read from a nested object, the key as it is written there (``agent.timeout``)."""

    def __init__(self, values: dict[str, Any], path: str = "config.json", origins: dict[str, str] | None = None):
        self.values = values
        self.path = path
        self.origins = origins or {}


def pick(setting: Setting, given: Any = None, file: ConfigFile | None = None, command: str = SERVE) -> Any:
    """The value of ``setting``: ``given`` (its flag's on ``command``, as argparse left it), else
    its variable (an empty one counts as unset, as systemd's ``Environment=NAME=`` leaves it),
    else its key in ``file``, else its default; ValueError naming the source of a bad value."""
    parse: Callable[[Any], Any] = setting.kind
    if given is not None:
        raw, source = given, setting.flag_on(command)
    elif os.environ.get(setting.env):
        raw, source = os.environ[setting.env], setting.env
    elif file is not None and setting.key is not None and setting.key in file.values:
        raw, source = file.values[setting.key], f"{file.path} key {file.origins.get(setting.key, setting.key)}"
        parse = setting.kind.json
    else:
        return setting.default
    try:
        return parse(raw)
    except ValueError as exc:
        raise ValueError(f"{source} {exc}") from None


def value(name: str, given: Any = None, command: str = SERVE) -> Any:
    """One setting from its flag's value on ``command`` (``given``), its variable or its
    default: what every command but ``serve`` reads (none of them reads ``config.json``)."""
    return pick(BY_NAME[name], given, command=command)


def check_environment() -> None:
    """ValueError naming the variable for any malformed environment-only setting: every
    command checks them at its start, before any part reads one."""
    for setting in SETTINGS:
        if setting.scope == ENV:
            pick(setting)


def child_environment() -> dict[str, str]:
    """The daemon's environment, as a child it starts gets it: without :data:`PRIVATE_ENV`."""
    return {k: v for k, v in os.environ.items() if k not in PRIVATE_ENV}


def plain(markdown: str) -> str:
    """Help text for a terminal: a link's text alone, no backticks, ``%`` as argparse wants it."""
    import re

    return re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", markdown).replace("`", "").replace("%", "%%")


def add_flags(parser: argparse.ArgumentParser, command: str, help: dict[str, str] | None = None) -> None:
    """The flags of ``command`` (``"serve"``, ``"ports watch"``; ``""``: those before any
    command), each with its variable and default in its help. Values stay strings for
    :func:`pick` to parse, so a bad one gets the same one line from a flag as from a variable.
    ``help`` replaces a setting's own help for this command, by name."""
    from aether.settings.kinds import Boolean, Text

    for setting in flags_of(command):
        text = (help or {}).get(setting.name) or plain(setting.help)
        text = f"{text} (env {setting.env}; default {plain(shown_default(setting))})"
        flag = setting.flag_on(command)
        assert flag is not None  # flags_of gives only settings with one
        if isinstance(setting.kind, Boolean):
            parser.add_argument(flag, dest=setting.name, action="store_const", const=True, default=None, help=text)
            continue
        choices = getattr(setting.kind, "choices", ()) if isinstance(setting.kind, Text) else ()
        metavar = "{" + ",".join(choices) + "}" if choices else setting.kind.metavar or setting.name.upper()
        parser.add_argument(flag, dest=setting.name, default=None, metavar=metavar, help=text)


def flags_of(command: str) -> list[Setting]:
    """The settings whose flag ``command`` takes (``""``: before any command)."""
    if command == "":
        return [setting for setting in SETTINGS if setting.scope == GLOBAL]
    taken = [
        setting
        for setting in SETTINGS
        if setting.flag and (command == setting.scope in (SERVE, GATEWAY) or command in setting.commands)
    ]
    # A command's own settings first, then those it shares with serve.
    return sorted(taken, key=lambda setting: setting.scope != command) if command == GATEWAY else taken


def shown_default(setting: Setting) -> str:
    """The default as the docs give it, in Markdown: ``3001``, ``1048576`` (1 MiB), off."""
    if setting.shown:
        return setting.shown
    default = setting.default
    if default is None or default == ():
        return "none"
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, tuple):
        return f"`{','.join(map(str, default))}`"
    if isinstance(default, float):
        return f"`{default:g}`"
    if isinstance(default, int) and getattr(setting.kind, "size", False):
        unit, count = next(
            (unit, default >> shift)
            for unit, shift in (("MiB", 20), ("KiB", 10), ("bytes", 0))
            if default >> shift and not default & ((1 << shift) - 1)
        )
        return f"`{default}` ({count} {unit})"
    return f"`{default}`"
