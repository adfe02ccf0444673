"""Structured logging: one JSON object per line on stderr.

Fields passed with ``extra=`` become keys of the line, so ``log.info("port monitor started",
extra={"backend": "ebpf"})`` prints ``{"ts": ..., "level": "info", "logger": "aether.ports",
"msg": "port monitor started", "backend": "ebpf"}``.
"""

from __future__ import annotations

import logging
import sys
import time

import ujson

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


_secrets: list[str] = []


def redact(secret: str) -> None:
    """Never print ``secret``: every log line has it replaced, whoever logged it (Tornado's own
    loggers print a malformed request's headers whole)."""
    if secret and secret not in _secrets:
        _secrets.append(secret)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = self._format(record)
        for secret in _secrets:
            text = text.replace(secret, "[redacted]")
        return text

    def _format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return ujson.dumps(line, ensure_ascii=False, default=str)


LEVELS = ("debug", "info", "warning", "error")


def setup(level: str = "info") -> None:
    if level.lower() not in LEVELS:
        raise ValueError(f"--log-level / AETHER_LOG_LEVEL must be one of {', '.join(LEVELS)}, not {level!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
