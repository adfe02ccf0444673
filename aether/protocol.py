"""The WebSocket message protocol, apart from any transport.

Every client message is a JSON object with ``channel`` and ``type`` (docs/protocol.md).
:func:`parse` turns a frame into a :class:`Message` whose fields have been checked against the
schema of its ``(channel, type)``, or raises :class:`ProtocolError`, a refusal that says what
of the frame could be read (``aether.wire.refused`` makes it the error reply). Nothing here does
I/O, so it can be tested and fuzzed on its own; every layer may import it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, TypeGuard

import ujson

from aether.errors import Refusal

CHANNELS = ("terminal", "files", "agent", "ports", "config")
#: The protocol's maximum message size, 1 MiB; larger frames close the connection (1009).
MAX_MESSAGE_BYTES = 1 << 20
_MAX_ID_LENGTH = 256
#: Arrays and objects nest at most this deep in a field that takes any shape (``config``; a
#: field's other checks admit one level, or none). ``config`` needs 2 (``ignoredPorts`` > a
#: port); Python's own recursion (``repr``, ``json``: ~1,000 frames) is never approached.
MAX_DEPTH = 32


class ProtocolError(Refusal):
    """A frame that is not a message the protocol has, with what of it could be read: its
    ``channel`` and ``id`` (for the reply) and its ``type`` when the channel has it (for the
    metrics)."""

    def __init__(self, code: str, message: str, channel: str | None = None, id: Any = None, type: str | None = None):
        super().__init__(code, message)
        self.channel = channel
        self.id = id
        self.type = type


@dataclasses.dataclass(frozen=True)
class Message:
    channel: str
    type: str
    body: dict
    id: Any = None


def _int(low: int, high: int) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


_port = _int(1, 65535)
_dimension = _int(1, 1000)
_offset = _int(0, (1 << 53) - 1)
_SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_ENV_NAME = re.compile(r"[^=\x00]{1,256}")
_MAX_ARGS = 256
_MAX_COMMAND = 16 << 10


def _visibility(value: Any) -> bool:
    return value in ("private", "public")


def _protocol(value: Any) -> bool:
    return value in ("https", "http", "tcp", "auto")


def depth(value: Any) -> int:
    """How deep arrays and objects nest in ``value`` (0 for a scalar); a walk, not recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in item if isinstance(child, (dict, list)))
    return deepest


def _object(value: Any) -> bool:
    # ujson reads 1,024 levels; a handler that walked or rendered them would recurse past
    # Python's limit. Fields not in a schema are never read, so they are not walked.
    return isinstance(value, dict) and depth(value) <= MAX_DEPTH


#: Lone surrogates: JSON lets ``"\ud800"`` through, UTF-8 cannot hold it. A scan, not an
#: encode: a 1 MiB ``input`` or ``write`` is checked without being copied.
_SURROGATE = re.compile("[\ud800-\udfff]")
#: The same, but for ``\udc80``-``\udcff``: a file name's undecodable bytes (surrogateescape).
_UNESCAPED_SURROGATE = re.compile("[\ud800-\udc7f\udd00-\udfff]")


def is_text(value: Any) -> TypeGuard[str]:
    """A string that is valid Unicode. (Also what the agent takes from its backend's JSON.)"""
    return isinstance(value, str) and _SURROGATE.search(value) is None


def _bool(value: Any) -> bool:
    return isinstance(value, bool)


def _session_id(value: Any) -> bool:
    return isinstance(value, str) and _SESSION_ID.fullmatch(value) is not None


def _os_string(value: Any) -> bool:
    """A string the OS can take: valid Unicode, or a name whose bytes are not UTF-8 given as
    lone ``\udc80``-``\udcff`` (Python's surrogateescape, as the server sends such names)."""
    return isinstance(value, str) and "\x00" not in value and _UNESCAPED_SURROGATE.search(value) is None


def _path(value: Any) -> bool:
    return 0 < len(value) <= 4096 and _os_string(value) if isinstance(value, str) else False


def _prompt_text(value: Any) -> bool:
    return is_text(value) and bool(value.strip())


def _encoding(value: Any) -> bool:
    return value in ("utf-8", "base64")


def _command(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value.strip()) and len(value) <= _MAX_COMMAND and _os_string(value)
    return (
        isinstance(value, list)
        and 0 < len(value) <= _MAX_ARGS
        and all(map(_os_string, value))
        and bool(value[0])
        and sum(map(len, value)) <= _MAX_COMMAND
    )


def _env(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and len(value) <= _MAX_ARGS
        and all(_ENV_NAME.fullmatch(k) and _os_string(k) and _os_string(v) for k, v in value.items())
    )


_Field = tuple[Callable[[Any], bool], str]
_PORT: _Field = (_port, "an integer 1-65535")
_SESSION: _Field = (_session_id, "1-64 characters of A-Z a-z 0-9 . _ : -")
_DIMENSION: _Field = (_dimension, "an integer 1-1000")
_PATH: _Field = (_path, "a non-empty path of at most 4096 characters")
_OFFSET: _Field = (_offset, "an integer 0 or more")
_BOOL: _Field = (_bool, "true or false")
_ENCODING: _Field = (_encoding, '"utf-8" or "base64"')
_CONVERSATION = _SESSION

#: (channel, type) -> {field: (check, what the field must be)}. A field whose name ends in
#: ``?`` is optional (the check applies when it is present); fields not listed are ignored. A
#: check that takes arrays or objects of any shape bounds their depth (``MAX_DEPTH``).
SCHEMAS: dict[tuple[str, str], dict[str, _Field]] = {
    ("ports", "kill"): {"port": _PORT},
    ("ports", "visibility"): {"port": _PORT, "visibility": (_visibility, '"private" or "public"')},
    ("ports", "protocol"): {"port": _PORT, "protocol": (_protocol, '"https", "http", "tcp" or "auto"')},
    ("config", "get"): {},
    ("config", "set"): {"config": (_object, f"an object of keys to new values, nested at most {MAX_DEPTH} deep")},
    ("config", "registry"): {},
    ("terminal", "create"): {
        "sessionId?": _SESSION,
        "cols": _DIMENSION,
        "rows": _DIMENSION,
        "cwd?": _PATH,
        "command?": (_command, "a non-empty string (run by the shell) or array of strings (argv), 16 KiB at most"),
        "env?": (_env, "an object of variable names to string values"),
    },
    ("terminal", "input"): {"sessionId": _SESSION, "data": (is_text, "a string"), "encoding?": _ENCODING},
    ("terminal", "resize"): {"sessionId": _SESSION, "cols": _DIMENSION, "rows": _DIMENSION},
    ("terminal", "close"): {"sessionId": _SESSION},
    ("terminal", "attach"): {"sessionId": _SESSION},
    ("terminal", "detach"): {"sessionId": _SESSION},
    ("terminal", "list"): {},
    ("files", "list"): {"path": _PATH},
    ("files", "stat"): {"path": _PATH},
    ("files", "read"): {"path": _PATH, "offset?": _OFFSET, "length?": _OFFSET},
    ("files", "write"): {
        "path": _PATH,
        "content": (is_text, "a string"),
        "encoding?": _ENCODING,
        "offset?": _OFFSET,
        "createParents?": _BOOL,
    },
    ("files", "mkdir"): {"path": _PATH, "parents?": _BOOL},
    ("files", "delete"): {"path": _PATH, "recursive?": _BOOL},
    ("files", "rename"): {"from": _PATH, "to": _PATH, "overwrite?": _BOOL},
    ("files", "watch"): {"path": _PATH, "recursive?": _BOOL},
    ("files", "unwatch"): {"watchId": (is_text, "a string")},
    ("agent", "prompt"): {"conversationId?": _CONVERSATION, "text": (_prompt_text, "a string that is not empty or blank")},
    ("agent", "cancel"): {"conversationId": _CONVERSATION},
    ("agent", "history"): {"conversationId?": _CONVERSATION},
    ("agent", "list"): {},
}
#: (channel, type) -> the request's fields that its error reply repeats (when the request has
#: them), so that a client sees which port, watch or conversation was refused. Only fields of
#: the schema: their values have been checked.
ECHOED: dict[tuple[str, str], tuple[str, ...]] = {
    ("ports", "kill"): ("port",),
    ("files", "unwatch"): ("watchId",),
    **{
        key: ("conversationId",)
        for key, schema in SCHEMAS.items()
        if key[0] == "agent" and schema.keys() & {"conversationId", "conversationId?"}
    },
}
#: SCHEMAS as ``parse`` walks them: (name, optional, check, what), the ``?`` read once here.
_FIELDS: dict[tuple[str, str], tuple[tuple[str, bool, Callable[[Any], bool], str], ...]] = {
    key: tuple((name.rstrip("?"), name.endswith("?"), check, what) for name, (check, what) in schema.items())
    for key, schema in SCHEMAS.items()
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


def parse(frame: str | bytes) -> Message:
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
        raise ProtocolError("unknown_channel", f"unknown channel; one of {', '.join(CHANNELS)}", id=id_)
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("bad_message", "field type is missing or not a string", channel, id_)
    fields = _FIELDS.get((channel, kind))
    if fields is None:
        types = sorted(t for c, t in SCHEMAS if c == channel)
        raise ProtocolError("unknown_type", f"unknown type for channel {channel}; one of {', '.join(types)}", channel, id_)
    for field, optional, check, what in fields:
        if field not in obj:
            if optional:
                continue
            raise ProtocolError("bad_message", f"field {field} is missing", channel, id_, kind)
        if not check(obj[field]):
            raise ProtocolError("bad_message", f"field {field} must be {what}", channel, id_, kind)
    return Message(channel, kind, obj, id_)
