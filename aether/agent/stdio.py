"""The backend's stdio protocol, apart from any process: the turn written to its stdin, its
stdout cut into lines, each line read into an event, and the reply those events add up to.

The daemon writes one JSON line to the backend's stdin, then closes it::

    {"type": "turn", "conversationId": "c-…", "turnId": "c-….4", "messages": [...], "workspace": {...}}

The backend answers with JSON lines on stdout, then exits 0::

    {"type": "delta", "text": "Port 8000 is "}            text as it is produced
    {"type": "tool", "name": "ports", "text": "ran …"}      a note about a tool it used
    {"type": "message", "text": "Port 8000 is …"}          optional: the whole reply, last
    {"type": "error", "message": "…"}                      the backend gives up: the turn fails

Blank lines are skipped and unknown fields ignored. Anything else (a line that is not JSON, an
unknown ``type``, a field of the wrong kind, a line after ``message``, a line over
``MAX_LINE_BYTES``, a reply over ``MAX_REPLY_JSON``) is a :class:`~aether.errors.Refusal`: the turn ends with its code.
Nothing here does I/O, so every rule is tested without processes.
"""

from __future__ import annotations

import json

from aether.errors import Refusal
from aether.protocol import is_text
from aether.wire import encoded_size

#: One line of backend output, newline excluded.
MAX_LINE_BYTES = 1 << 20
#: A reply's text and tool notes, as JSON: the ``message`` and ``history`` frames that carry a
#: whole turn then stay under the protocol's 1 MiB message limit, whatever the text holds.
MAX_REPLY_JSON = 768 << 10
MAX_TOOL_NAME = 200
#: An ``error`` line's message is kept to its first this many bytes (as the stderr tail is):
#: it is stored with the turn and sent to every client.
MAX_ERROR_MESSAGE = 2048
_SNIPPET = 120


class Delta:
    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text


class Tool:
    __slots__ = ("name", "text")

    def __init__(self, name: str, text: str):
        self.name, self.text = name, text


class Final:
    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text


class Failure:
    __slots__ = ("message",)

    def __init__(self, message: str):
        self.message = message


Event = Delta | Tool | Final | Failure


def turn_request(conversation_id: str, turn_id: str, messages: list[dict], workspace: dict) -> bytes:
    """The one line written to the backend's stdin."""
    line = {"type": "turn", "conversationId": conversation_id, "turnId": turn_id, "messages": messages, "workspace": workspace}
    return json.dumps(line, ensure_ascii=False).encode("utf-8") + b"\n"


class LineSplitter:
    """Cuts a byte stream into lines; a line longer than ``max_line`` is a ``too_large`` fault
    as soon as it is seen, before its newline arrives (so it is never held whole)."""

    def __init__(self, max_line: int = MAX_LINE_BYTES):
        self.max_line = max_line
        self._partial = bytearray()

    def feed(self, chunk: bytes) -> list[bytes]:
        lines = []
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            piece = chunk[start:end]
            if self._partial:
                self._partial += piece
                piece = bytes(self._partial)
                self._partial.clear()
            self._check(len(piece))
            lines.append(piece)
            start = end + 1
        self._partial += chunk[start:]
        self._check(len(self._partial))
        return lines

    def end(self) -> bytes | None:
        """At end of stream: a last line that had no newline, if any."""
        if not self._partial:
            return None
        line = bytes(self._partial)
        self._partial.clear()
        return line

    def _check(self, length: int) -> None:
        if length > self.max_line:
            raise Refusal("too_large", f"the backend wrote a line of more than {self.max_line} bytes")


def _snippet(line: bytes) -> str:
    text = line[:_SNIPPET].decode("utf-8", "replace")
    return json.dumps(text + ("…" if len(line) > _SNIPPET else ""), ensure_ascii=False)


def parse_line(line: bytes, number: int) -> Event | None:
    """The event of stdout line ``number`` (from 1), None for a blank line, or Refusal."""
    if not line.strip():
        return None
    where = f"line {number} of the backend's output"
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise Refusal("bad_output", f"{where} is not JSON: {_snippet(line)}") from None
    if not isinstance(obj, dict):
        raise Refusal("bad_output", f"{where} is not a JSON object: {_snippet(line)}")
    kind = obj.get("type")

    def field(name: str, default: str | None = None) -> str:
        value = obj.get(name, default)
        if not is_text(value):
            raise Refusal("bad_output", f"{where}: a {kind} needs {name} as a string of valid Unicode")
        return value

    if kind == "delta":
        return Delta(field("text"))
    if kind == "tool":
        name = field("name")
        if not name or len(name) > MAX_TOOL_NAME:
            raise Refusal("bad_output", f"{where}: a tool name must be 1-{MAX_TOOL_NAME} characters")
        return Tool(name, field("text", ""))
    if kind == "message":
        return Final(field("text"))
    if kind == "error":
        message = field("message", "") or "the backend reported an error without a message"
        return Failure(_capped(message, MAX_ERROR_MESSAGE))
    shown = json.dumps(kind, ensure_ascii=False)[:_SNIPPET] if kind is not None else "none"
    raise Refusal("bad_output", f"{where} has type {shown}; expected delta, tool, message or error")


def _capped(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8 (and an ellipsis) if it is longer."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode("utf-8", "ignore") + "…"


class Reply:
    """What a turn's events add up to: its text (the ``message`` when the backend sent one,
    else the deltas joined) and its tool notes, at most ``limit`` bytes of JSON together."""

    def __init__(self, limit: int = MAX_REPLY_JSON):
        self.limit = limit
        self.tools: list[dict] = []
        self.final: str | None = None
        self._parts: list[str] = []
        self._deltas_size = 0
        self._tools_size = 0

    @property
    def text(self) -> str:
        if self.final is not None:
            return self.final
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    @property
    def size(self) -> int:
        """About the bytes the reply takes as JSON (without joining the text)."""
        text = encoded_size(self.final) if self.final is not None else self._deltas_size
        return text + self._tools_size

    @property
    def empty(self) -> bool:
        return self.final is None and not self._parts and not self.tools

    def add(self, event: Event) -> None:
        """Take a delta, tool note or final message; Refusal if it breaks a rule."""
        if self.final is not None:
            raise Refusal("bad_output", "the backend wrote more after its message line, which must be its last")
        if isinstance(event, Delta):
            self._deltas_size += encoded_size(event.text)
            self._check(self._deltas_size)
            if event.text:
                self._parts.append(event.text)
        elif isinstance(event, Tool):
            self._tools_size += encoded_size(event.name) + encoded_size(event.text) + 20
            self._check(self._deltas_size)
            self.tools.append({"name": event.name, "text": event.text})
        elif isinstance(event, Final):
            self._check(encoded_size(event.text))
            self.final = event.text

    def _check(self, text_size: int) -> None:
        if text_size + self._tools_size > self.limit:
            raise Refusal("too_large", f"the reply grew past {self.limit >> 10} KiB")
