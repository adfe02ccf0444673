"""Reading a file for the ``files`` channel: a byte range, chunk by chunk, each chunk as text
when it is UTF-8 and as base64 when not. Blocking: the channel runs it in its thread pool.
"""

from __future__ import annotations

import base64
import os
import stat as stat_

from aether.files import FileError
from aether.files.beneath import Root
from aether.files.paths import os_error

#: Raw bytes per ``read`` message: 256 KiB is ~350 KB as base64, well under the 1 MiB limit.
CHUNK_BYTES = 256 << 10
#: Most a single ``read`` request returns; beyond it the client asks by offset and length.
MAX_READ_BYTES = 64 << 20
#: Upper bound on a chunk's JSON-escaped text; above it the chunk goes as base64 instead.
MAX_TEXT_BYTES = 900_000

# Control characters other than these five become \u00XX (6 bytes) in JSON.
_SHORT_ESCAPES = b"\b\t\n\f\r"
_LONG_ESCAPES = bytes(c for c in range(32) if c not in _SHORT_ESCAPES)
_SHORT_ESCAPES += b'"\\'


def json_text_bytes(data: bytes) -> int:
    """An upper bound on the size of UTF-8 ``data`` as a JSON string's content."""
    return (
        len(data)
        + len(data)
        - len(data.translate(None, _SHORT_ESCAPES))
        + 5 * (len(data) - len(data.translate(None, _LONG_ESCAPES)))
    )


def encode_chunk(data: bytes, final: bool) -> tuple[str, str, int]:
    """``(encoding, content, bytes used)`` for one chunk of a file.

    Strict UTF-8 goes as text. A character cut by the chunk's end (when more follows) is left
    for the next chunk, so ``used`` may be up to 3 bytes short of ``len(data)``. Anything else,
    or text that would escape to more than ``MAX_TEXT_BYTES``, goes as base64, all of it.
    """
    used = len(data)
    try:
        text: str | None = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = None
        # The first error being an incomplete sequence at the very end means all before it
        # is valid.
        cut = exc.start
        if not final and exc.reason == "unexpected end of data" and 0 < cut and cut >= len(data) - 3:
            used = cut
            text = data[:used].decode("utf-8")
    if text is not None and json_text_bytes(data[:used]) <= MAX_TEXT_BYTES:
        return "utf-8", text, used
    return "base64", base64.b64encode(data).decode("ascii"), len(data)


class Reader:
    """An open regular file and the byte range a ``read`` sends of it, chunk by chunk."""

    def __init__(self, root: str, path: str, offset: int = 0, length: int | None = None):
        if length is not None and length > MAX_READ_BYTES:
            raise FileError("too_large", path, f"{path}: a read returns at most {MAX_READ_BYTES >> 20} MiB; ask for less")
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer.
            with Root(root) as beneath:
                self.fd, self.rel = beneath.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            raise os_error(exc, path) from None
        try:
            st = os.fstat(self.fd)
            if stat_.S_ISDIR(st.st_mode):
                raise FileError("is_a_directory", path, f"{path}: is a directory; list it instead")
            if not stat_.S_ISREG(st.st_mode):
                raise FileError("invalid", path, f"{path}: not a regular file")
            self.size = st.st_size
            if length is None and self.size - offset > MAX_READ_BYTES:
                raise FileError(
                    "too_large",
                    path,
                    f"{path}: {self.size - offset} bytes from offset {offset} is more than one read "
                    f"returns ({MAX_READ_BYTES >> 20} MiB); read it in parts with offset and length",
                )
        except BaseException:
            os.close(self.fd)
            raise
        self.path = path
        self.offset = offset
        self.end = self.size if length is None else min(self.size, offset + length)

    def next(self) -> dict:
        """The next chunk's message fields; ``eof`` on the last one."""
        start = self.offset
        want = max(0, min(CHUNK_BYTES, self.end - start))
        try:
            data = os.pread(self.fd, want, start) if want else b""
        except OSError as exc:
            raise os_error(exc, self.path) from None
        if len(data) < want:
            self.end = start + len(data)  # the file shrank: stop at its new end
        final = start + len(data) >= self.end
        encoding, content, used = encode_chunk(data, final)
        self.offset = start + used
        return {
            "offset": start,
            "length": used,
            "size": self.size,
            "encoding": encoding,
            "content": content,
            "eof": self.offset >= self.end,
        }

    def close(self) -> None:
        os.close(self.fd)
