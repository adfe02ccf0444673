"""Each format's rules in aether's vocabulary: config.json's ``ports_attributes``,
devcontainer.json's ``portsAttributes``/``otherPortsAttributes``/``forwardPorts``, and
.gitpod.yml's ``ports``, each read from its parsed value into a :class:`~aether.attributes.rules.Layer`
and the problems found. Pure, no I/O; never raises for any value.

A rule with a bad value (an expression RE2 refuses, a port out of range, an unknown ``onOpen``)
is skipped, with a problem naming its key; the others are used. What a format allows but
aether does not use (``requireLocalPort``, ``elevateIfNeeded``, Gitpod's ``description``) is
read and dropped quietly; a key a format does not define is reported as ``ignored``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from aether.attributes.rules import (
    ON_OPEN,
    PROTOCOL,
    VISIBILITY,
    Command,
    Layer,
    Origin,
    Port,
    Problem,
    Rule,
    SelectorError,
    command,
    port_number,
    port_range,
)
from aether.excerpt import excerpt

CONFIG = "config.json"
DEVCONTAINER = ".devcontainer/devcontainer.json"
GITPOD = ".gitpod.yml"
#: Rules read from one file at most. A resolve looks at every range and expression of a file
#: once per new (port, command line), so this bounds its cost; real files have a handful.
MAX_RULES = 1000
#: Expressions read from one file at most: each costs 2-11 µs per new command line (RE2
#: through its Python binding; bench/attributes.py), so 100 bound a file's to about 1 ms.
MAX_EXPRESSIONS = 100
#: Problems listed for one file at most; the rest are counted.
MAX_PROBLEMS = 100
#: A label's length at most: it is one line in a list.
MAX_LABEL = 100
MAX_REDACT = 32
MAX_OPTION = 64

#: VS Code's ``onAutoForward`` in aether's words. ``openBrowserOnce`` opens like ``open``
#: (remembering "once" is the client's part); ``openPreview`` too: the preview is the page.
VSCODE_ON_OPEN = {
    "notify": "notify",
    "openBrowser": "open",
    "openBrowserOnce": "open",
    "openPreview": "open",
    "silent": "silent",
    "ignore": "ignore",
}
#: Gitpod's ``onOpen``: its ``ignore`` still serves the port without a word (aether's
#: ``silent``); ``ignore-completely`` leaves it out (aether's ``ignore``).
GITPOD_ON_OPEN = {
    "open-browser": "open",
    "open-preview": "open",
    "notify": "notify",
    "ignore": "silent",
    "ignore-completely": "ignore",
}

#: Control characters and the bidirectional overrides: a label from a cloned repository must
#: not rewrite a terminal's screen (``aether ports watch --human``) or reorder what is shown.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_DIGITS = re.compile(r"[0-9]+")
_RANGE = re.compile(r"([0-9]{1,10})-([0-9]{1,10})")
_GITPOD_RANGE = re.compile(r"([0-9]{1,10})[-:]([0-9]{1,10})")
#: devcontainer.json's ``"host:port"``, as VS Code parses it.
_HOST_PORT = re.compile(r"([a-z0-9-]+):([0-9]{1,5})")
_HOST_ADDRESS = re.compile(r"([a-zA-Z0-9_-]+(?:\.[a-zA-Z0-9_-]+)*):([0-9]+)")
_LOCAL = ("localhost", "127.0.0.1")


class Bad(ValueError):
    """One value that makes its rule unusable."""


def _keyed(name: str, key: Any) -> str:
    return f"{name}[{excerpt(key)}]"


def _label(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Bad(f"must be a non-empty string, not {excerpt(value)}")
    if len(value) > MAX_LABEL:
        raise Bad(f"is {len(value)} characters long: at most {MAX_LABEL}")
    if _UNPRINTABLE.search(value):
        raise Bad("holds a control character")
    return value


def _choice(value: Any, allowed: Mapping[str, str] | tuple[str, ...]) -> str:
    if isinstance(value, str) and value in allowed:
        return allowed[value] if isinstance(allowed, Mapping) else value
    return _raise(f"must be one of {', '.join(allowed)}, not {excerpt(value)}")


def _raise(message: str):
    raise Bad(message)


def _redact(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or len(value) > MAX_REDACT:
        raise Bad(f'must be a list of 1 to {MAX_REDACT} options such as ["--password"], not {excerpt(value)}')
    for option in value:
        if not isinstance(option, str) or not 0 < len(option) <= MAX_OPTION or option != option.strip() or " " in option:
            raise Bad(
                f'must hold options such as "--password" (no spaces, at most {MAX_OPTION} characters), not {excerpt(option)}'
            )
    return tuple(value)


def _gitpod_protocol(value: Any) -> str:
    # Older Gitpod schemas had TCP and UDP (deprecated there); aether serves TCP ports only.
    if isinstance(value, str) and value.lower() == "tcp":
        return "tcp"
    return _choice(value, ("http", "https"))


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Bad(f"must be true or false, not {excerpt(value)}")
    return value


#: config.json's attributes: name -> reader. The names are aether's own (snake_case, as every
#: config.json key).
OURS: dict[str, Callable[[Any], Any]] = {
    "label": _label,
    "visibility": lambda value: _choice(value, VISIBILITY),
    "protocol": lambda value: _choice(value, PROTOCOL),
    "on_open": lambda value: _choice(value, ON_OPEN),
    "hide_command": _flag,
    "redact": _redact,
}
#: Spellings of other tools, and what config.json calls them.
_SPELLED = {"onOpen": "on_open", "onAutoForward": "on_open", "hideCommand": "hide_command", "name": "label"}

VSCODE: dict[str, tuple[str, Callable[[Any], Any]] | None] = {
    "label": ("label", _label),
    "onAutoForward": ("on_open", lambda value: _choice(value, VSCODE_ON_OPEN)),
    "protocol": ("protocol", lambda value: _choice(value, ("http", "https"))),
    # About the local end of a tunnel: an aether preview has none.
    "requireLocalPort": None,
    "elevateIfNeeded": None,
}
GITPOD_KEYS: dict[str, tuple[str, Callable[[Any], Any]] | None] = {
    "port": None,  # the selector, read first
    "name": ("label", _label),
    "onOpen": ("on_open", lambda value: _choice(value, GITPOD_ON_OPEN)),
    "visibility": ("visibility", lambda value: _choice(value, VISIBILITY)),
    "protocol": ("protocol", lambda value: _gitpod_protocol(value)),
    "description": None,
}


class _Reading:
    """One file's problems as they are found."""

    def __init__(self, file: str):
        self.file = file
        self._problems: list[Problem] = []
        self._more = 0

    def problem(self, key: str | None, code: str, message: str) -> None:
        if len(self._problems) < MAX_PROBLEMS:
            self._problems.append(Problem(self.file, key, code, message))
        else:
            self._more += 1

    @property
    def problems(self) -> list[Problem]:
        more = [Problem(self.file, None, "invalid", f"{self._more} more problems not listed")] if self._more else []
        return self._problems + more

    def attributes(self, raw: Any, key: str, known: Mapping[str, Any], ours: bool) -> dict | None:
        """The attributes of one rule in aether's words, or None (reported) when one is bad."""
        if not isinstance(raw, Mapping):
            self.problem(key, "invalid", f"must be an object of attributes, not {excerpt(raw)}")
            return None
        attrs: dict[str, Any] = {}
        bad: list[str] = []
        for name, value in raw.items():
            if ours:
                reader = known.get(name)
                if reader is None:
                    hint = f" (did you mean {_SPELLED[name]}?)" if name in _SPELLED else ""
                    bad.append(f"unknown attribute {excerpt(name)}{hint}; known: {', '.join(known)}")
                    continue
                target = name
            else:
                if name not in known:
                    if name == "visibility":
                        message = "visibility is not one of this format's port attributes: set it in aether's config.json (ports_attributes)"
                    else:
                        message = f"unknown attribute {excerpt(name)}, ignored"
                    self.problem(key, "ignored", message)
                    continue
                entry = known[name]
                if entry is None:
                    continue  # read, not used
                target, reader = entry
            try:
                attrs[target] = reader(value)
            except Bad as exc:
                bad.append(f"{name} {exc}")
        if bad:
            self.problem(key, "invalid", f"{'; '.join(bad)}; rule skipped")
            return None
        return attrs

    def enough(self, index: int, key: str) -> bool:
        """Whether the ``index``-th entry of a file is read (the first MAX_RULES are)."""
        if index < MAX_RULES:
            return True
        self.problem(key, "invalid", f"more than {MAX_RULES} rules in one file: this one and those after it are skipped")
        return False


def vscode_selector(key: str):
    """A ``portsAttributes`` key: a port, a range, ``host:port``, else an expression on the
    command line (as VS Code reads them). SelectorError; LookupError(host) for another host."""
    if _DIGITS.fullmatch(key):
        if len(key) > 5:
            raise SelectorError("a port out of range 1-65535")
        return Port(port_number(int(key)))
    found = _RANGE.fullmatch(key)
    if found:
        return port_range(int(found.group(1)), int(found.group(2)))
    found = _HOST_PORT.fullmatch(key)
    if found:
        if found.group(1) not in _LOCAL:
            raise LookupError(found.group(1))
        return Port(port_number(int(found.group(2))))
    return command(key)


def _vscode_rules(reading: _Reading, table: Any, name: str, known: Mapping[str, Any], ours: bool) -> list[Rule]:
    rules: list[Rule] = []
    expressions = 0
    if table is None:
        return rules
    if not isinstance(table, Mapping):
        reading.problem(
            name, "invalid", f"must be an object mapping a port, a range or an expression to attributes, not {excerpt(table)}"
        )
        return rules
    for index, (raw_key, raw) in enumerate(table.items()):
        key = _keyed(name, raw_key)
        if not reading.enough(index, key):
            break
        try:
            selector = vscode_selector(str(raw_key))
            if isinstance(selector, Command):
                expressions += 1
                if expressions > MAX_EXPRESSIONS:
                    reading.problem(key, "invalid", f"more than {MAX_EXPRESSIONS} expressions in one file: rule skipped")
                    continue
        except SelectorError as exc:
            reading.problem(key, "invalid", f"{exc}; rule skipped")
            continue
        except LookupError as exc:
            reading.problem(
                key, "ignored", f"names the host {exc.args[0]} (another container): aether sees this workspace's own ports"
            )
            continue
        attrs = reading.attributes(raw, key, known, ours)
        if attrs is not None:
            rules.append(Rule(Origin(reading.file, key), selector, attrs))
    return rules


def _other(reading: _Reading, raw: Any, name: str, known: Mapping[str, Any], ours: bool) -> Rule | None:
    if raw is None:
        return None
    attrs = reading.attributes(raw, name, known, ours)
    return None if attrs is None else Rule(Origin(reading.file, name), None, attrs)  # type: ignore[arg-type]


def _vscode_layer(
    data: Any, file: str, table: str, fallback: str, known: Mapping[str, Any], ours: bool, forward: str | None = None
) -> tuple[Layer | None, list[Problem]]:
    reading = _Reading(file)
    if not isinstance(data, Mapping):
        reading.problem(None, "unreadable", f"must be an object, not {excerpt(data)}")
        return None, reading.problems
    rules = _vscode_rules(reading, data.get(table), table, known, ours)
    other = _other(reading, data.get(fallback), fallback, known, ours)
    ports = _forward_ports(reading, data.get(forward)) if forward else []
    if not rules and other is None and not ports:
        return None, reading.problems
    return Layer(file, rules, other, "vscode", ports), reading.problems


def from_config(config: Any, file: str = CONFIG) -> tuple[Layer | None, list[Problem]]:
    """config.json's ``ports_attributes`` and ``other_ports_attributes`` (aether's names)."""
    return _vscode_layer(config, file, "ports_attributes", "other_ports_attributes", OURS, True)


def _forward_ports(reading: _Reading, raw: Any) -> list[tuple[int, Origin]]:
    ports: list[tuple[int, Origin]] = []
    if raw is None:
        return ports
    if not isinstance(raw, list):
        reading.problem("forwardPorts", "invalid", f'must be a list of ports or "host:port", not {excerpt(raw)}')
        return ports
    for index, item in enumerate(raw[:MAX_RULES]):
        key = f"forwardPorts[{index}]"
        try:
            if isinstance(item, str):
                found = _HOST_ADDRESS.fullmatch(item)
                if found and found.group(1) not in _LOCAL:
                    reading.problem(
                        key,
                        "ignored",
                        f"names the host {found.group(1)} (another container): aether sees this workspace's own ports",
                    )
                    continue
                item = found.group(2) if found else item
                if not _DIGITS.fullmatch(item) or len(item) > 5:
                    raise SelectorError(f'a port is a number 1-65535 or "host:port", not {excerpt(item)}')
            ports.append((port_number(item), Origin(reading.file, key)))
        except SelectorError as exc:
            reading.problem(key, "invalid", str(exc))
    return ports


def from_devcontainer(data: Any, file: str = DEVCONTAINER) -> tuple[Layer | None, list[Problem]]:
    """devcontainer.json's ``portsAttributes``, ``otherPortsAttributes`` and ``forwardPorts``."""
    return _vscode_layer(data, file, "portsAttributes", "otherPortsAttributes", VSCODE, False, "forwardPorts")


def gitpod_selector(value: Any):
    """A Gitpod ``port``: a number, or a range ``3000-3999`` (or ``3000:3999``)."""
    if isinstance(value, str):
        found = _GITPOD_RANGE.fullmatch(value)
        if found:
            return port_range(int(found.group(1)), int(found.group(2)))
        if not _DIGITS.fullmatch(value) or len(value) > 5:
            raise SelectorError(f"port must be a number or a range such as 3000-3999, not {excerpt(value)}")
    return Port(port_number(value))


def from_gitpod(data: Any, file: str = GITPOD) -> tuple[Layer | None, list[Problem]]:
    """.gitpod.yml's ``ports``."""
    reading = _Reading(file)
    if data is None:
        return None, reading.problems  # an empty file
    if not isinstance(data, Mapping):
        reading.problem(None, "unreadable", f"must be a mapping of keys such as ports:, not {excerpt(data)}")
        return None, reading.problems
    entries = data.get("ports")
    if entries is None:
        return None, reading.problems
    if not isinstance(entries, list):
        reading.problem("ports", "invalid", f"must be a list of entries such as - port: 3000, not {excerpt(entries)}")
        return None, reading.problems
    rules: list[Rule] = []
    seen: dict[int, str] = {}
    for index, entry in enumerate(entries):
        key = f"ports[{index}]"
        if not reading.enough(index, key):
            break
        if not isinstance(entry, Mapping) or "port" not in entry:
            reading.problem(key, "invalid", f"an entry needs a port, e.g. - port: 3000; not {excerpt(entry)}")
            continue
        try:
            selector = gitpod_selector(entry["port"])
        except SelectorError as exc:
            reading.problem(key, "invalid", f"{exc}; entry skipped")
            continue
        attrs = reading.attributes(entry, key, GITPOD_KEYS, False)
        if attrs is None:
            continue
        if isinstance(selector, Port):
            if selector.port in seen:
                reading.problem(
                    key, "ignored", f"port {selector.port} is listed before, at {seen[selector.port]}: Gitpod uses the first"
                )
                continue
            seen[selector.port] = key
        rules.append(Rule(Origin(reading.file, key), selector, attrs))
    if not rules:
        return None, reading.problems
    return Layer(file, rules, None, "gitpod"), reading.problems
