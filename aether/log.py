"""Structured logging on stderr: one line per record, as JSON (the default) or logfmt.

Fields passed with ``extra=`` become keys of the line, so ``log.info("port monitor started",
extra={"backend": "ebpf"})`` prints ``{"ts": ..., "level": "info", "logger": "aether.ports",
"msg": "port monitor started", "backend": "ebpf"}``, or in logfmt
``ts=... level=info logger=aether.ports msg="port monitor started" backend=ebpf``.

Every record is one line in both formats: newlines and other control characters in messages,
values and tracebacks (the ``exc`` field) are escaped, and nothing is coloured, so journald and
any line-based collector keep each record whole.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

import ujson

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


_secrets: list[str] = []


def redact(secret: str) -> None:
    """Never print ``secret``: every log line has it replaced, whoever logged it (Tornado's own
    loggers print a malformed request's headers whole)."""
    if secret and secret not in _secrets:
        _secrets.append(secret)


class _Formatter(logging.Formatter):
    """The fields of a record; subclasses write them as one line."""

    def format(self, record: logging.LogRecord) -> str:
        text = self.line(self.fields(record))
        for secret in _secrets:
            # Also as the format writes it, should the secret hold a character it escapes.
            for form in {secret, self.escaped(secret)}:
                text = text.replace(form, "[redacted]")
        return text

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        fields = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                fields[key] = value
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            fields["stack"] = self.formatStack(record.stack_info)
        return fields

    def line(self, fields: dict[str, Any]) -> str:
        raise NotImplementedError

    def escaped(self, text: str) -> str:
        raise NotImplementedError


#: Characters some line splitters take for a line break (NEL, LINE and PARAGRAPH SEPARATOR) and
#: the other C1 controls: escaped in both formats, so a record stays one line for every reader.
_BREAKERS = {c: f"\\u{c:04x}" for c in (*range(0x80, 0xA0), 0x2028, 0x2029)}


class JsonFormatter(_Formatter):
    def line(self, fields: dict[str, Any]) -> str:
        # Raw, they can only stand inside a JSON string, where \uXXXX means the same.
        return ujson.dumps(fields, ensure_ascii=False, default=str).translate(_BREAKERS)

    def escaped(self, text: str) -> str:
        return ujson.dumps(text, ensure_ascii=False)[1:-1].translate(_BREAKERS)


#: What makes a logfmt value need quotes: a space, ``=``, a quote, a backslash, a control
#: character, or nothing at all.
_NEEDS_QUOTES = re.compile(r'[\s="\\\x00-\x1f\x7f-\x9f\u2028\u2029]|^$')
_ESCAPES = {ord("\\"): "\\\\", ord('"'): '\\"', ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}
_ESCAPES.update({c: f"\\u{c:04x}" for c in (*range(0x20), 0x7F) if c not in _ESCAPES})
_ESCAPES.update(_BREAKERS)
_BAD_KEY = re.compile(r"[^\w.\-]")


class LogfmtFormatter(_Formatter):
    """``key=value`` pairs; values that need it quoted, with ``\\n``-style escapes inside."""

    def line(self, fields: dict[str, Any]) -> str:
        return " ".join(f"{_BAD_KEY.sub('_', key) or '_'}={self.value(value)}" for key, value in fields.items())

    def value(self, value: Any) -> str:
        if value is None:
            return "null"
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            text = value
        elif isinstance(value, (int, float)):
            return repr(value)
        elif isinstance(value, (list, tuple, dict)):
            text = ujson.dumps(value, ensure_ascii=False, default=str)
        else:
            text = str(value)
        return f'"{self.escaped(text)}"' if _NEEDS_QUOTES.search(text) else text

    def escaped(self, text: str) -> str:
        return text.translate(_ESCAPES)


LEVELS = ("debug", "info", "warning", "error")
FORMATS = {"json": JsonFormatter, "logfmt": LogfmtFormatter}


def setup(level: str = "info", format: str = "json") -> None:
    if level.lower() not in LEVELS:
        raise ValueError(f"--log-level / AETHER_LOG_LEVEL must be one of {', '.join(LEVELS)}, not {level!r}")
    if format not in FORMATS:
        raise ValueError(f"--log-format / AETHER_LOG_FORMAT must be one of {', '.join(FORMATS)}, not {format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(FORMATS[format]())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
