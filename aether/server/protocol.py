"""The WebSocket message protocol, apart from any transport.

Every client message is a JSON object with ``channel`` and ``type`` (seed 001). :func:`parse`
turns a frame into a :class:`Message` whose fields have been checked against the schema of its
``(channel, type)``, or raises :class:`ProtocolError`, whose ``to_message`` is the error reply.
Nothing here does I/O, so it can be tested and fuzzed on its own.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union

import ujson

CHANNELS = ("terminal", "files", "agent", "ports", "config")
#: Channels whose messages the server handles today; the others answer ``not_implemented``.
IMPLEMENTED = frozenset({"ports", "config"})
#: Seed 001's maximum message size, read as 1 MiB; larger frames close the connection (1009).
MAX_MESSAGE_BYTES = 1 << 20
_MAX_ID_LENGTH = 256


class ProtocolError(Exception):
    """A message that cannot be acted on; ``to_message`` is the reply the client gets."""

    def __init__(self, code: str, message: str, channel: Optional[str] = None, id: Any = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.channel = channel
        self.id = id

    def to_message(self) -> dict:
        reply = {"channel": self.channel, "type": "error", "code": self.code, "message": self.message}
        if self.id is not None:
            reply["id"] = self.id
        return reply


@dataclasses.dataclass(frozen=True)
class Message:
    channel: str
    type: str
    body: dict
    id: Any = None


def _port(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


def _visibility(value: Any) -> bool:
    return value in ("private", "public")


def _object(value: Any) -> bool:
    return isinstance(value, dict)


#: (channel, type) -> {field: (check, what the field must be)}. Fields not listed are ignored.
SCHEMAS: dict[tuple[str, str], dict[str, tuple[Callable[[Any], bool], str]]] = {
    ("ports", "kill"): {"port": (_port, "an integer 1-65535")},
    ("ports", "visibility"): {
        "port": (_port, "an integer 1-65535"),
        "visibility": (_visibility, '"private" or "public"'),
    },
    ("config", "get"): {},
    ("config", "set"): {"config": (_object, "an object of keys to new values")},
}


def _client_id(obj: dict) -> Any:
    """The client's ``id``, echoed in replies, when it is a short string or an integer (a
    float might be NaN or infinite, which ujson reads but JSON.parse would not read back)."""
    value = obj.get("id")
    if isinstance(value, str) and len(value) <= _MAX_ID_LENGTH:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 1 << 53:
        return value
    return None


def parse(frame: Union[str, bytes]) -> Message:
    """A checked :class:`Message` from one WebSocket frame, or :class:`ProtocolError`."""
    if isinstance(frame, bytes):
        raise ProtocolError("bad_message", "binary frames are not accepted: send JSON text")
    try:
        obj = ujson.loads(frame)
    except (ValueError, OverflowError):
        raise ProtocolError("bad_json", "the message is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_message", "a message must be a JSON object")
    id_ = _client_id(obj)
    channel = obj.get("channel")
    if not isinstance(channel, str):
        raise ProtocolError("bad_message", "field channel is missing or not a string", id=id_)
    if channel not in CHANNELS:
        raise ProtocolError(
            "unknown_channel", f"unknown channel; one of {', '.join(CHANNELS)}", id=id_
        )
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("bad_message", "field type is missing or not a string", channel, id_)
    if channel not in IMPLEMENTED:
        raise ProtocolError("not_implemented", f"channel {channel} is not implemented yet", channel, id_)
    schema = SCHEMAS.get((channel, kind))
    if schema is None:
        types = sorted(t for c, t in SCHEMAS if c == channel)
        raise ProtocolError(
            "unknown_type", f"unknown type for channel {channel}; one of {', '.join(types)}", channel, id_
        )
    for field, (check, what) in schema.items():
        if field not in obj:
            raise ProtocolError("bad_message", f"field {field} is missing", channel, id_)
        if not check(obj[field]):
            raise ProtocolError("bad_message", f"field {field} must be {what}", channel, id_)
    return Message(channel, kind, obj, id_)


def encode(message: dict) -> str:
    return ujson.dumps(message, ensure_ascii=False, escape_forward_slashes=False)
