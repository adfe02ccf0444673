"""A long-running command's stdout, written without ever blocking its event loop.

``aether ports watch | slow-reader``: once the pipe's 64 KiB are full, a plain ``write()``
blocks, and a process blocked in a system call runs no handler of its loop's: SIGTERM and
SIGINT went unanswered for as long as the reader read nothing. Here what the kernel does not
take yet is held and written once the fd is writable, so the loop, and its signal handlers,
always run. O_NONBLOCK belongs to an open file description, which stdout shares with whatever
inherited or dup'ed it (stderr, with ``2>&1``, whose log lines would then be lost on a full
pipe): a pipe is opened anew through ``/proc/self/fd``, a description of its own, and only
that one is non-blocking. A socket cannot be opened so; its own description is made
non-blocking, and given back its mode at the end.

Held output is bounded. A ``frame`` (a whole screen of ``watch --human``) replaces the frames
not yet begun: a reader that falls behind gets the latest screen, not every one. Lines are
all kept, up to :data:`MAX_HELD` bytes; past that the reader is taken for gone (``on_gone``).
A terminal or a file is written as before, blocking: neither stays full.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from collections import deque
from collections.abc import Callable

#: Bytes of lines held for a reader that does not read: 16 MiB is some 50,000 port events.
MAX_HELD = 16 << 20


class Output:
    """Writes to ``fd`` (stdout's) on ``loop``; ``on_gone()`` when the reader has gone (EPIPE)
    or holds back more than :data:`MAX_HELD`. :meth:`close` before the loop ends."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, on_gone: Callable[[], None]):
        self.loop = loop
        self.on_gone = on_gone
        mode = os.fstat(fd).st_mode
        self.nonblocking = stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)
        self._was_blocking = os.get_blocking(fd)
        self._own = False  # the fd is a description of our own, closed at the end
        if stat.S_ISFIFO(mode):
            try:
                fd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                self._own = True
            except OSError:
                pass  # no /proc: the shared description, as for a socket
        if self.nonblocking and not self._own:
            os.set_blocking(fd, False)
        self.fd = fd
        self._held: deque[bytes] = deque()  # what the fd has not taken yet, in order
        self._held_bytes = 0
        self._frame_started = False  # the first held chunk is a frame partly written
        self._last_is_frame = False  # the last held chunk is a whole frame not begun
        self._waiting = False
        self.gone = False

    def write(self, data: bytes) -> None:
        """Lines (or any bytes): all written, in order."""
        self._hold(data, frame=False)

    def frame(self, data: bytes) -> None:
        """A whole screen: replaces a held screen that has not begun to be written."""
        self._hold(data, frame=True)

    def _hold(self, data: bytes, frame: bool) -> None:
        if self.gone or not data:
            return
        if not self.nonblocking:
            self._blocking_write(data)
            return
        if frame and self._last_is_frame and not (len(self._held) == 1 and self._frame_started):
            self._held_bytes -= len(self._held.pop())
        self._held.append(data)
        self._held_bytes += len(data)
        self._last_is_frame = frame
        if len(self._held) == 1:
            self._frame_started = False
        if self._held_bytes > MAX_HELD:
            self._gone()
            return
        if not self._waiting:
            self._flush()

    def _blocking_write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except BrokenPipeError:
            self._gone()

    def _flush(self) -> None:
        while self._held:
            chunk = self._held[0]
            try:
                written = os.write(self.fd, chunk)
            except BlockingIOError:
                written = 0
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                    self._gone()
                    return
                raise
            if written < len(chunk):
                if written:
                    self._held[0] = chunk[written:]
                    self._held_bytes -= written
                    self._frame_started = True
                if not self._waiting:
                    self._waiting = True
                    self.loop.add_writer(self.fd, self._flush)
                return
            self._held.popleft()
            self._held_bytes -= written
            self._frame_started = False
            if not self._held:
                self._last_is_frame = False
        if self._waiting:
            self._waiting = False
            self.loop.remove_writer(self.fd)

    def _gone(self) -> None:
        if self.gone:
            return
        self.gone = True
        self._held.clear()
        self._held_bytes = 0
        if self._waiting:
            self._waiting = False
            self.loop.remove_writer(self.fd)
        self.on_gone()

    def close(self) -> None:
        """Stop waiting on the fd (what is still held is dropped: the command is stopping) and
        give it back its blocking mode. Whatever is written after is dropped."""
        self.gone = True
        self._held.clear()
        if self._waiting:
            self._waiting = False
            self.loop.remove_writer(self.fd)
        if self._own:
            self._own = self.nonblocking = False
            os.close(self.fd)
        elif self.nonblocking:
            try:
                os.set_blocking(self.fd, self._was_blocking)
            except OSError:
                pass
