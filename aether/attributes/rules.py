"""The attributes of a port: which rules match a port and its command line, and what they set.

A :class:`Rule` names a port, a range or a regular expression on the command line
(:class:`Port`, :class:`Range`, :class:`Command`) and sets some of ``label``, ``visibility``,
``protocol``, ``on_open``, ``hide_command`` and ``redact``. A :class:`Layer` holds one file's
rules, ordered as that file's tool orders them; a :class:`Ruleset` holds the layers, most
important first (config.json, then devcontainer.json, then .gitpod.yml), and
:meth:`Ruleset.resolve` gives a port's :class:`Attributes`, with the rule each value came from.

Precedence, per attribute:

- Across files, the first layer that sets an attribute wins it.
- Within a VS Code style layer (config.json, devcontainer.json), as VS Code's own
  ``PortsAttributes.getAttributes``: a port's exact rule sets first; then the ranges that hold
  it, the one that starts lowest first (declaration order among equals); then the command-line
  expressions in declaration order; each only fills what is still unset. Two keys for the same
  port (``"3000"`` and ``"03000"``): the later one, as in VS Code.
- Within a Gitpod layer, as Gitpod's supervisor: the first entry for the exact port, else the
  first range (in file order) that holds it, and that entry alone.
- A layer's "other" attributes (``otherPortsAttributes``) apply only when no rule of any layer
  set a display attribute (``label``, ``visibility``, ``protocol``, ``on_open``) for the port:
  VS Code's fallback, whole, not per attribute.
- ``hide_command`` and ``redact`` add up instead: every matching rule and every layer's other
  attributes contribute, so a command one rule hides no other rule shows again.

Pure, no I/O. Expressions are RE2's (google-re2): matching takes time linear in the command
line whatever the expression, so a hostile ``devcontainer.json`` from a cloned repository
cannot stall the event loop with a backtracking pattern; RE2 has no lookaround and no
backreferences, which such rules never need. Results are cached by (port, command line).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import types
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Union, cast

#: What a client does when the port opens: tell the person; open its preview; list it, no
#: notice; leave it out of lists and notices.
ON_OPEN = ("notify", "open", "silent", "ignore")
VISIBILITY = ("private", "public")
PROTOCOL = ("http", "https", "tcp")
#: The attributes shown with a port; the other-attributes fallback looks at these.
DISPLAY = ("label", "visibility", "protocol", "on_open")
#: Their names on the wire.
WIRE = {
    "label": "label",
    "visibility": "visibility",
    "protocol": "protocol",
    "on_open": "onOpen",
    "hide_command": "hideCommand",
    "redact": "redact",
}
#: Characters of the command line an expression sees. Command lines of dev servers are well
#: under 1 KiB; Linux allows ~2 MiB, and RE2's time is linear in the text, so the bound keeps
#: one match cheap (bench/attributes.py: about 2 µs an expression on a 90-character command
#: line, 11 µs on 4 KiB, through RE2's Python binding).
MATCH_CHARS = 4096
#: Distinct (port, command line) pairs cached before the cache starts over.
CACHE_SIZE = 4096
#: What a redacted argument's value becomes.
REDACTED = "***"
#: RE2 memory per expression (its default is 8 MiB): enough for any command-line pattern, and
#: 1,000 of them cannot take 8 GB.
REGEX_MAX_MEM = 1 << 20

PortSelector = Union["Port", "Range", "Command"]


class Origin(NamedTuple):
    """Where a rule was written: the file (as the workspace root or the state directory names
    it) and its key there, e.g. ``portsAttributes["3000"]``."""

    file: str
    key: str

    def __str__(self) -> str:
        return f"{self.file}: {self.key}"

    def as_dict(self) -> dict:
        return {"file": self.file, "key": self.key}


class Problem(NamedTuple):
    """Something in a file that was not used, and why. ``code``: ``unreadable`` (the file was
    not read), ``invalid`` (the rule or value was skipped, the rest is used), ``ignored``
    (something the format allows that aether does not use, or a key it does not know)."""

    file: str
    key: str | None
    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.key}: {self.message}" if self.key else f"{self.file}: {self.message}"

    def as_dict(self) -> dict:
        return {"file": self.file, "key": self.key, "code": self.code, "message": self.message}


class SelectorError(ValueError):
    """A key that names no port, range or usable expression; the message says why."""


@dataclasses.dataclass(frozen=True)
class Port:
    port: int

    def __str__(self) -> str:
        return str(self.port)


@dataclasses.dataclass(frozen=True)
class Range:
    first: int
    last: int

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"


@dataclasses.dataclass(frozen=True)
class Command:
    pattern: str
    regex: Any = dataclasses.field(compare=False, repr=False)

    def __str__(self) -> str:
        return self.pattern


_DIGITS = re.compile(r"[0-9]{1,10}")


def port_number(value: Any) -> int:
    """A port 1-65535 from a JSON or YAML number or a string of digits; SelectorError."""
    if isinstance(value, bool):
        raise SelectorError("a port is a number 1-65535, not true or false")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        value = int(value)
    if not isinstance(value, int):
        raise SelectorError("a port is a number 1-65535")
    if not 1 <= value <= 65535:
        # int -> str is refused past 4,300 digits: say the size of a huge one, not the number.
        shown = value if -(10**9) < value < 10**9 else "beyond 1-65535"
        raise SelectorError(f"port {shown} is out of range 1-65535")
    return value


def port_range(first: Any, last: Any) -> Range:
    low, high = port_number(first), port_number(last)
    if low > high:
        raise SelectorError(f"range {low}-{high} ends before it starts")
    return Range(low, high)


def command(pattern: str) -> Command:
    """A precompiled expression on the command line; SelectorError for one RE2 refuses."""
    import re2  # only when a file has an expression: most workspaces have none

    if pattern == "":
        raise SelectorError("an empty expression matches every command line: use the other-ports attributes instead")
    options = re2.Options()
    options.log_errors = False  # RE2 would write its own line to stderr for every bad pattern
    options.max_mem = REGEX_MAX_MEM
    try:
        return Command(pattern, re2.compile(pattern, options))
    except re2.error as exc:
        why = exc.args[0] if exc.args else "invalid"
        why = why.decode("utf-8", "replace") if isinstance(why, bytes) else str(why)
        hint = " (RE2 syntax: no lookahead, lookbehind or backreferences)" if "perl operator" in why or "escape" in why else ""
        raise SelectorError(f"not a regular expression: {why}{hint}") from None
    except (TypeError, UnicodeError, ValueError):
        raise SelectorError("not a regular expression") from None


class Rule(NamedTuple):
    """One rule: where it was written, what it matches, and the attributes it sets (the names
    of :data:`WIRE`'s keys)."""

    origin: Origin
    selector: PortSelector
    attrs: Mapping[str, Any]


class Layer:
    """One file's rules, with that file's precedence (``style``: ``vscode`` or ``gitpod``, see
    the module's docstring), its other-ports attributes, and the ports it lists to forward
    (``forwardPorts``: read, not used by the matcher)."""

    def __init__(
        self,
        file: str,
        rules: Sequence[Rule] = (),
        other: Rule | None = None,
        style: str = "vscode",
        forward_ports: Sequence[tuple[int, Origin]] = (),
    ):
        if style not in ("vscode", "gitpod"):
            raise ValueError(f"style must be vscode or gitpod, not {style!r}")
        self.file, self.rules, self.other, self.style = file, tuple(rules), other, style
        self.forward_ports = tuple(forward_ports)
        exact: dict[int, list[Rule]] = {}
        ranges, commands = [], []
        for rule in self.rules:
            selector = rule.selector
            if isinstance(selector, Port):
                exact.setdefault(selector.port, []).append(rule)
            elif isinstance(selector, Range):
                ranges.append(rule)
            else:
                commands.append(rule)
        if style == "vscode":
            # VS Code sorts by a rule's first port (stable), and a later exact key overrides.
            self._exact = {port: tuple(reversed(found)) for port, found in exact.items()}
            ranges.sort(key=lambda rule: cast(Range, rule.selector).first)
        else:
            self._exact = {port: (found[0],) for port, found in exact.items()}
        self._ranges = tuple(ranges)
        self._commands = tuple(commands)

    def commands(self, text: str) -> tuple[Rule, ...]:
        """The expression rules that match the command line ``text``, in declaration order."""
        if not text:
            return ()  # as VS Code: no command line, no expression matches
        return tuple(rule for rule in self._commands if cast(Command, rule.selector).regex.search(text) is not None)

    def match(self, port: int, commands: tuple[Rule, ...] = ()) -> list[Rule]:
        """The rules that match ``port`` (and ``commands``, what :meth:`commands` found for
        its command line), most important first (Gitpod: at most one)."""
        found = list(self._exact.get(port, ()))
        if self.style == "gitpod":
            if not found:
                found = [
                    rule for rule in self._ranges if cast(Range, rule.selector).first <= port <= cast(Range, rule.selector).last
                ][:1]
            return found
        found += [rule for rule in self._ranges if cast(Range, rule.selector).first <= port <= cast(Range, rule.selector).last]
        found += commands
        return found


@dataclasses.dataclass(frozen=True)
class Attributes:
    """What the rules say of one port. An attribute no rule sets is None (the server's own
    default applies); ``sources`` names, per attribute set, the rule that set it (for
    ``redact``, the first of the rules whose lists were joined)."""

    label: str | None = None
    visibility: str | None = None
    protocol: str | None = None
    on_open: str | None = None
    hide_command: bool = False
    redact: tuple[str, ...] = ()
    sources: Mapping[str, Origin] = dataclasses.field(default_factory=lambda: types.MappingProxyType({}))

    def shown_command(self, argv: Sequence[str] | str | None) -> list[str] | str | None:
        """The command line as it may be shown: None when hidden, else with the value of each
        ``redact`` option replaced by ``***``; a string in, a string out."""
        if argv is None or self.hide_command:
            return None
        if isinstance(argv, str):
            return " ".join(redact(argv.split(" "), self.redact)) if self.redact else argv
        return redact(argv, self.redact) if self.redact else list(argv)

    def as_dict(self) -> dict:
        """The attributes set, as the wire names them, with ``sources``."""
        out: dict[str, Any] = {}
        for name in DISPLAY:
            value = getattr(self, name)
            if value is not None:
                out[WIRE[name]] = value
        if self.hide_command:
            out["hideCommand"] = True
        if self.redact:
            out["redact"] = list(self.redact)
        if self.sources:
            out["sources"] = {WIRE[name]: origin.as_dict() for name, origin in self.sources.items()}
        return out


NONE = Attributes()


def redact(argv: Iterable[str], options: Sequence[str]) -> list[str]:
    """``argv`` with the value of each option in ``options`` replaced: ``--password x`` and
    ``--password=x`` become ``--password ***`` and ``--password=***``, and for a short option
    ``-p`` also ``-px`` becomes ``-p***``. An option given as a bare word (``password``) works
    the same on ``password=x``."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        arg = arg if isinstance(arg, str) else str(arg)
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        for option in options:
            if arg == option:
                hide_next = True
            elif arg.startswith(option + "="):
                arg = f"{option}={REDACTED}"
            elif len(option) == 2 and option[0] == "-" and option[1] != "-" and arg.startswith(option):
                arg = option + REDACTED
            else:
                continue
            break
        out.append(arg)
    return out


_SURROGATE = re.compile("[\ud800-\udfff]")


def command_text(command: Sequence[str] | str | None) -> str:
    """The text expressions see: an argv joined with spaces (as VS Code joins
    ``/proc/PID/cmdline``), at most :data:`MATCH_CHARS` characters, NULs as spaces, and a
    lone surrogate (an undecodable byte) as U+FFFD."""
    if command is None:
        return ""
    if isinstance(command, str):
        text = command[:MATCH_CHARS]
    else:
        try:
            # At most MATCH_CHARS + 1 arguments can reach into the first MATCH_CHARS characters.
            parts = itertools.islice(iter(command), MATCH_CHARS + 1)
            text = " ".join(part if isinstance(part, str) else str(part) for part in parts)[:MATCH_CHARS]
        except TypeError:
            text = str(command)[:MATCH_CHARS]
    if "\0" in text:
        text = text.replace("\0", " ")
    if not text.isascii():
        text = _SURROGATE.sub("\ufffd", text)
    return text


class Ruleset:
    """Every layer, most important first, and the attributes they give each port."""

    def __init__(self, layers: Sequence[Layer] = ()):
        self.layers = tuple(layers)
        self._cache: dict[tuple[int, str], Attributes] = {}
        # Expressions depend on the command line alone: ports opened by the same program (a
        # burst of listeners, a server restarted) match them once.
        self._commands: dict[str, tuple[tuple[Rule, ...], ...]] = {}

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(layer.file for layer in self.layers)

    @property
    def forward_ports(self) -> tuple[tuple[int, Origin], ...]:
        """``forwardPorts`` of every layer: (port, where it was listed)."""
        return tuple(item for layer in self.layers for item in layer.forward_ports)

    def __len__(self) -> int:
        return sum(len(layer.rules) + (layer.other is not None) for layer in self.layers)

    def resolve(self, port: int, command: Sequence[str] | str | None = None) -> Attributes:
        """The attributes of ``port`` whose process has ``command`` (an argv, or a command
        line); never raises."""
        if not isinstance(port, int) or isinstance(port, bool):
            port = -1  # matches no port or range
        text = command_text(command)
        key = (port, text)
        found = self._cache.get(key)
        if found is None:
            found = self._resolve(port, text)
            if len(self._cache) >= CACHE_SIZE:
                self._cache.clear()
            self._cache[key] = found
        return found

    def _resolve(self, port: int, text: str) -> Attributes:
        if not self.layers:
            return NONE
        values: dict[str, Any] = {}
        sources: dict[str, Origin] = {}
        hide: Origin | None = None
        redacted: list[str] = []
        redact_origin: Origin | None = None

        def take(rule: Rule, display: bool) -> None:
            nonlocal hide, redact_origin
            attrs = rule.attrs
            if display:
                for name in DISPLAY:
                    if name not in values and attrs.get(name) is not None:
                        values[name] = attrs[name]
                        sources[name] = rule.origin
            if attrs.get("hide_command") and hide is None:
                hide = rule.origin
            for option in attrs.get("redact", ()):
                if option not in redacted:
                    redacted.append(option)
                    redact_origin = redact_origin or rule.origin

        commands = self._commands.get(text)
        if commands is None:
            commands = tuple(layer.commands(text) for layer in self.layers)
            if len(self._commands) >= CACHE_SIZE:
                self._commands.clear()
            self._commands[text] = commands
        for layer, matched in zip(self.layers, commands):
            for rule in layer.match(port, matched):
                take(rule, True)
        fallback = not values
        for layer in self.layers:
            if layer.other is not None:
                take(layer.other, fallback)
        if not values and hide is None and not redacted:
            return NONE
        if hide is not None:
            sources["hide_command"] = hide
        if redact_origin is not None:
            sources["redact"] = redact_origin
        return Attributes(
            hide_command=hide is not None, redact=tuple(redacted), sources=types.MappingProxyType(sources), **values
        )


EMPTY = Ruleset()
