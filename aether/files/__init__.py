"""The workspace's files, for the ``files`` channel: confinement to the workspace root (what
a client's path says, ``paths``; resolving it beneath the root by the kernel, ``beneath``),
the blocking operations on names (``ops``), reading and writing content (``reading``,
``writing``), the C library calls Python lacks (``libc``), and watching through inotify
(``inotify``; ``dirs``, a watch's directories; ``coalescer``, a window's events; ``watch``).
Only ``inotify``'s instance and ``watch`` know of an event loop.
"""

from __future__ import annotations

from aether.errors import Refusal


class FileError(Refusal):
    """An operation refused or failed. ``code`` is the protocol's error code (``not_found``,
    ``forbidden``, ...), ``path`` the client's path as it was sent (None for a request without
    one; the error reply carries it), and ``message`` says which path and why, for a person to
    read."""

    def __init__(self, code: str, path: str | None, message: str):
        super().__init__(code, message, **({"path": path} if path is not None else {}))
        self.path = path
