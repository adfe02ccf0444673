"""Terminal output as protocol fields: UTF-8 text where it is text, base64 where it is not.

A read from a PTY can end inside a multibyte character, and programs can print bytes that are
not UTF-8 at all. :class:`OutputEncoder` holds back an incomplete character at the end of a
read until the next one completes it, and sends a piece that is not valid UTF-8 as base64, so
no byte is lost or altered either way. :class:`Scrollback` keeps the last bytes for ``attach``.
"""

from __future__ import annotations

import base64
import collections
from collections.abc import Iterator


def complete_prefix(data: bytes) -> int:
    """Where the last complete UTF-8 character of ``data`` ends: ``len(data)`` unless it ends
    inside a multibyte sequence whose remaining bytes may still come."""
    n = len(data)
    for back in range(1, min(4, n + 1)):
        byte = data[n - back]
        if byte < 0x80:
            return n
        if 0xC2 <= byte <= 0xF4:  # a lead byte: is its sequence complete?
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return n if back >= need else n - back
        if byte >= 0xC0:  # never starts a character: nothing to wait for
            return n
    return n


def fields(data: bytes) -> dict:
    """``{"data": text}``, or ``{"data": base64, "encoding": "base64"}`` when not UTF-8."""
    try:
        return {"data": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"data": base64.b64encode(data).decode("ascii"), "encoding": "base64"}


class OutputEncoder:
    def __init__(self) -> None:
        self._carry = b""

    @property
    def held(self) -> int:
        """How many bytes of output are held back, waiting for the rest of a character."""
        return len(self._carry)

    def feed(self, data: bytes) -> dict | None:
        """Fields for ``data`` (plus what was held back), or None if all of it is held back."""
        data = self._carry + data
        cut = complete_prefix(data)
        self._carry = data[cut:]
        return fields(data[:cut]) if cut else None

    def flush(self) -> dict | None:
        """What was held back, at the end of output (an incomplete character: base64)."""
        data, self._carry = self._carry, b""
        return fields(data) if data else None


class Scrollback:
    """The last ``limit`` bytes of output."""

    def __init__(self, limit: int):
        self.limit = limit
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0

    def append(self, data: bytes) -> None:
        if self.limit <= 0:
            return
        self._chunks.append(data)
        self._size += len(data)
        while self._size > self.limit:
            excess = self._size - self.limit
            head = self._chunks[0]
            if len(head) <= excess:
                self._chunks.popleft()
                self._size -= len(head)
            else:
                self._chunks[0] = head[excess:]
                self._size -= excess

    def __len__(self) -> int:
        return self._size

    def replay(self, hold: int = 0, piece: int = 32 << 10) -> Iterator[dict]:
        """The kept output but its last ``hold`` bytes, as fields, in pieces of at most
        ``piece`` bytes (so no message nears the 1 MiB limit even when every byte is escaped),
        starting at a character boundary."""
        data = b"".join(self._chunks)
        if hold:
            data = data[:-hold]
        start = 0
        while start < len(data) and start < 3 and 0x80 <= data[start] < 0xC0:
            start += 1  # the trimmed front cut a character: drop its tail
        encoder = OutputEncoder()
        for offset in range(start, len(data), piece):
            out = encoder.feed(data[offset : offset + piece])
            if out:
                yield out
        out = encoder.flush()
        if out:
            yield out
