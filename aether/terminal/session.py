"""One terminal session (a :class:`Terminal`): its process, its output to every attached
client, its scrollback.

Output is read from the PTY only while every attached client keeps up: once one has more than
``BACKLOG_BYTES`` unsent (see ``aether.server.client``), reading stops until it has drained,
the PTY's buffer fills, and the program writing blocks, as it would on a slow real terminal.
So a ``cat`` of a huge file costs bounded memory, and a client that stops reading altogether is
dropped by its write deadline like any slow client, after which the others go on.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import time
from collections.abc import Callable
from typing import Protocol

from aether.cgroup import Tree
from aether.errors import Refusal
from aether.terminal.output import OutputEncoder, Scrollback
from aether.terminal.process import PtyProcess
from aether.wire import encode, frame

log = logging.getLogger("aether.terminal")

#: Bytes read from the PTY per wake-up: enough to batch a flood into few messages, small enough
#: that one wake-up never holds the event loop for long.
READ_BATCH = 64 << 10
#: Input not yet taken by the PTY beyond which ``input`` is refused.
MAX_PENDING_INPUT = 1 << 20


class Client(Protocol):
    """What a terminal needs of a client attached to it."""

    @property
    def backlogged(self) -> bool: ...

    def send(self, message: dict | bytes) -> None: ...
    def when_drained(self, callback: Callable[[], None]) -> None: ...


class Terminal:
    """A terminal session: ``session_id`` names it on the wire (``sessionId``)."""

    def __init__(
        self,
        session_id: str,
        process: PtyProcess,
        command: list[str],
        cwd: str,
        scrollback: int,
        on_exit: Callable[[Terminal], None],
        on_reaped: Callable[[Tree], None] = lambda tree: None,
    ):
        self.id = session_id
        self.process = process
        self.command = command
        self.cwd = cwd
        self.created = time.time()
        self.clients: set[Client] = set()
        #: Clients that sent ``close`` without being attached: they hear the ``exit`` too.
        self.closers: set[Client] = set()
        self.exit: tuple[int, str | None] | None = None
        self.closing = False
        self._kill_pending = False
        self.detached_since: float | None = None
        self.scrollback = Scrollback(scrollback)
        self._encoder = OutputEncoder()
        self._on_exit = on_exit
        self._on_reaped = on_reaped
        self._waiting_for: set[Client] = set()
        self._input = bytearray()
        self._loop = asyncio.get_running_loop()
        self._reading = False
        self._resume_reading()
        self._loop.add_reader(self._pidfd(), self._process_exited)

    # -- clients ------------------------------------------------------------------------

    def describe(self) -> dict:
        info = {
            "sessionId": self.id,
            "pid": self.process.pid,
            **shown_command(self.command),
            "cwd": self.cwd,
            "cols": self.process.cols,
            "rows": self.process.rows,
            "created": round(self.created * 1000),
            "attached": len(self.clients),
        }
        if self.exit is not None:
            info["exit"] = self._exit_fields()
        return info

    def attach(self, client: Client, reply: dict) -> None:
        """Send ``reply`` with this session's description, then the scrollback marked
        ``replay``, then live output (or the ``exit`` of a session that has ended)."""
        if self.exit is None:
            self.clients.add(client)
            self.detached_since = None
        client.send({**reply, **self.describe()})
        # Bytes the live encoder holds back (an unfinished character) go out with the live
        # stream once complete; replaying them too would send them twice.
        for fields in self.scrollback.replay(hold=self._encoder.held):
            client.send({"channel": "terminal", "type": "output", "sessionId": self.id, **fields, "replay": True})
        if self.exit is not None:
            client.send({"channel": "terminal", "type": "exit", "sessionId": self.id, **self._exit_fields()})

    def detach(self, client: Client) -> None:
        self.clients.discard(client)
        self.closers.discard(client)
        if self._waiting_for:
            self._drained(client)
        if not self.clients and self.detached_since is None:
            self.detached_since = time.monotonic()

    def _broadcast(self, message: dict) -> None:
        built = frame(message)
        for client in list(self.clients):
            client.send(built)

    # -- output -------------------------------------------------------------------------

    def _resume_reading(self) -> None:
        if not self._reading and self.process.fd is not None and self.exit is None:
            self._loop.add_reader(self.process.fd, self._readable)
            self._reading = True

    def _pause_reading(self) -> None:
        if self._reading and self.process.fd is not None:
            self._loop.remove_reader(self.process.fd)
        self._reading = False

    def _read_available(self) -> bytes:
        """Up to ``READ_BATCH`` bytes; b"" at EOF (EIO: no process holds the terminal)."""
        chunks, size = [], 0
        fd = self.process.fd
        while fd is not None and size < READ_BATCH:
            try:
                chunk = os.read(fd, READ_BATCH - size)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.EIO:
                    log.warning("terminal read failed", extra={"session": self.id, "error": exc.strerror})
                self._pause_reading()
                break
            if not chunk:
                self._pause_reading()
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)

    def _readable(self) -> None:
        data = self._read_available()
        if data:
            self._output(data)
        backlogged = [c for c in self.clients if c.backlogged]
        if backlogged:
            self._pause_reading()
            for client in backlogged:
                if client not in self._waiting_for:
                    self._waiting_for.add(client)
                    client.when_drained(functools.partial(self._drained, client))

    def _drained(self, client: Client) -> None:
        self._waiting_for.discard(client)
        if not self._waiting_for:
            self._resume_reading()

    def _output(self, data: bytes) -> None:
        self.scrollback.append(data)
        fields = self._encoder.feed(data)
        if fields and self.clients:
            self._broadcast({"channel": "terminal", "type": "output", "sessionId": self.id, **fields})

    # -- input and size -----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue ``data`` for the PTY; Refusal ``busy`` when too much is still waiting."""
        if self.process.fd is None or self.exit is not None:
            raise Refusal("busy", "the session has ended")
        if len(self._input) + len(data) > MAX_PENDING_INPUT:
            raise Refusal("busy", f"more than {MAX_PENDING_INPUT >> 10} KiB of input is waiting for the program to read it")
        idle = not self._input
        self._input += data
        if idle:
            self._writable()

    def _writable(self) -> None:
        fd = self.process.fd
        if fd is None:
            self._input.clear()
            return
        try:
            sent = os.write(fd, self._input)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._input.clear()
            self._loop.remove_writer(fd)
            return
        del self._input[:sent]
        if self._input:
            self._loop.add_writer(fd, self._writable)
        else:
            self._loop.remove_writer(fd)

    def resize(self, cols: int, rows: int) -> None:
        self.process.resize(cols, rows)

    # -- the end ------------------------------------------------------------------------

    def hang_up(self, grace: float) -> None:
        """Hang up the terminal now (SIGHUP to the shell and its foreground job); SIGKILL
        whatever is left of the session's tree after ``grace``, background and ``setsid``
        jobs included."""
        if self.closing or self.exit is not None:
            return
        self.closing = True
        self._kill_pending = True
        self._stop_io()
        self.process.tree.hold()  # the fallback's: before the hang-up orphans anything
        self.process.close_master()
        self._loop.call_later(grace, self._kill_rest)

    def _kill_rest(self) -> None:
        # The leader is not reaped before this runs (see _process_exited), so the session id
        # still names this session and no other (what the fallback's scan goes by).
        self._kill_pending = False
        self.process.kill_tree()
        if self.exit is not None:
            self._reap()

    def _reap(self) -> None:
        self.process.reap()
        self._on_reaped(self.process.tree)

    def _stop_io(self) -> None:
        self._pause_reading()
        if self.process.fd is not None:
            self._loop.remove_writer(self.process.fd)
        self._input.clear()

    def _process_exited(self) -> None:
        status = self.process.exit_status()
        if status is None:
            return
        self._loop.remove_reader(self._pidfd())
        # What the program wrote before it ended is still in the PTY: send it first (a bounded
        # amount: a background job may keep writing to the terminal).
        for _ in range(4):
            data = self._read_available()
            if not data:
                break
            self._output(data)
        tail = self._encoder.flush()
        if tail and self.clients:
            self._broadcast({"channel": "terminal", "type": "output", "sessionId": self.id, **tail})
        self._stop_io()
        self.exit = status
        self.process.release()
        if not self._kill_pending:
            self._reap()  # else _kill_rest reaps, after its kill
        log.info("terminal exited", extra={"session": self.id, "pid": self.process.pid, "code": status[0]})
        self.clients |= self.closers
        self.closers.clear()
        self._broadcast({"channel": "terminal", "type": "exit", "sessionId": self.id, **self._exit_fields()})
        self._on_exit(self)

    def _pidfd(self) -> int:
        """The process's pidfd: open until ``process.release()``, which comes after every use here."""
        pidfd = self.process.pidfd
        assert pidfd is not None
        return pidfd

    def _exit_fields(self) -> dict:
        assert self.exit is not None  # asked only once the process has exited
        code, signame = self.exit
        return {"code": code, "signal": signame} if signame else {"code": code}

    def shutdown(self) -> None:
        """At daemon exit: hang up without waiting; see :meth:`finish_shutdown`."""
        if self.exit is None:
            self._loop.remove_reader(self._pidfd())
            self._stop_io()
            self.process.tree.hold()
        self.process.release()

    def finish_shutdown(self) -> None:
        """SIGKILL what is left of the session's tree, then reap its leader."""
        self.process.kill_tree()
        if self.process.wait(1):
            self._on_reaped(self.process.tree)
        else:
            log.warning("terminal leader did not exit", extra={"session": self.id, "pid": self.process.pid})


def shown_command(argv: list[str], budget: int = 1024) -> dict:
    """``{"command": argv}``, cut to about ``budget`` characters of JSON so that a ``list`` of
    many sessions stays far below the message limit; ``commandTruncated`` says when cut."""
    if len(encode(argv)) <= budget:
        return {"command": argv}
    shown, used = [], 2
    for arg in argv:
        size = len(encode(arg)) + 1
        if used + size > budget:
            keep = (budget - used) // 6  # a character takes at most 6 characters of JSON
            if keep > 0:
                shown.append(arg[:keep])
            break
        shown.append(arg)
        used += size
    return {"command": shown, "commandTruncated": True}
