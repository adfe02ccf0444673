"""One turn of the configured backend: a process started for the turn, given the conversation
on stdin, read as JSON lines on stdout (see ``stdio``), and held to its limits.

The process gets a session and process group of its own, every signal at its default, and a
process tree of its own (:mod:`aether.cgroup`: a cgroup where there is one), so stopping it
stops whatever it started as well, ``setsid`` and ``nohup`` children included. It is stopped
(SIGTERM to the tree, SIGKILL ``KILL_GRACE`` seconds later) and the turn fails when:

- nothing comes on its stdout for ``timeout`` seconds (``timeout``);
- a line breaks the protocol (``bad_output``);
- it writes more than ``max_output`` bytes, stdout and stderr together, a line over 1 MiB, or a
  reply over ``stdio.MAX_REPLY_JSON`` (``too_large``);
- it writes an ``error`` line (``backend_error``, with its message).

A cancelled turn is stopped the same way and ends ``cancelled``. A backend that exits non-zero
or dies of a signal on its own fails the turn with ``backend_failed`` and the tail of its
stderr; one that exits 0 having written no reply fails it with ``bad_output``. Whatever is left
of the tree when the turn ends gets SIGKILL.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
from collections.abc import Callable, Sequence

from aether import spawn
from aether.agent import stdio
from aether.cgroup import Tree, Trees
from aether.errors import Refusal
from aether.pidtree import ScanTree

KILL_GRACE = 2.0
READ_CHUNK = 64 << 10
STDERR_TAIL = 2048
#: Once the backend has exited, how long a child of its that inherited stdout may keep the
#: turn open: then the group is killed and the turn ends.
EXIT_DRAIN = 1.0

Error = tuple[str, str]


class Outcome:
    """How a turn ended: ``status`` complete, failed or cancelled; ``error`` (code, message)."""

    __slots__ = ("status", "error")

    def __init__(self, status: str, error: Error | None = None):
        self.status, self.error = status, error

    def __repr__(self) -> str:
        return f"Outcome({self.status!r}, {self.error!r})"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class Child:
    """The backend's process: its stdout and stderr as asyncio streams, its stdin a
    non-blocking pipe, its exit seen through a pidfd. It is reaped only by :meth:`close`,
    after the tree has been killed (so the fallback's session id names it until then)."""

    def __init__(self, argv: Sequence[str], cwd: str, env: dict, tree: Tree):
        spawn.check_program(argv[0], cwd, env)
        pipes = [os.pipe() for _ in range(3)]
        ours, theirs = (pipes[0][1], pipes[1][0], pipes[2][0]), (pipes[0][0], pipes[1][1], pipes[2][1])
        try:
            self.pid = spawn.spawn(argv, cwd=cwd, env=env, stdio=theirs, cgroup_procs=tree.procs, new_session=True)
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        tree.started(self.pid)
        self.stdin: int | None = ours[0]
        os.set_blocking(self.stdin, False)
        self._pipes = [os.fdopen(ours[1], "rb", buffering=0), os.fdopen(ours[2], "rb", buffering=0)]
        self.stdout, self.stderr = asyncio.StreamReader(), asyncio.StreamReader()
        self._transports: list[asyncio.BaseTransport] = []
        self.pidfd = os.pidfd_open(self.pid)
        self.returncode: int | None = None
        self._loop = asyncio.get_running_loop()
        self._exited = self._loop.create_future()
        self._loop.add_reader(self.pidfd, self._exit_seen)

    async def connect(self) -> None:
        for pipe, reader in zip(self._pipes, (self.stdout, self.stderr)):
            transport, _ = await self._loop.connect_read_pipe(functools.partial(asyncio.StreamReaderProtocol, reader), pipe)
            self._transports.append(transport)

    def _exit_seen(self) -> None:
        self._loop.remove_reader(self.pidfd)
        self.returncode = spawn.exited(self.pid)
        if not self._exited.done():
            self._exited.set_result(self.returncode)

    async def wait(self) -> int | None:
        return await asyncio.shield(self._exited)

    async def write(self, data: bytes) -> None:
        """All of ``data`` to its stdin; OSError (EPIPE) if it closed it."""
        stdin = self.stdin
        assert stdin is not None  # closed only once the turn is written
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(stdin, view) :]
            except BlockingIOError:
                ready = self._loop.create_future()
                self._loop.add_writer(stdin, ready.set_result, None)
                try:
                    await ready
                finally:
                    self._loop.remove_writer(stdin)

    def close_stdin(self) -> None:
        if self.stdin is not None:
            os.close(self.stdin)
            self.stdin = None

    def close(self) -> None:
        """Close our ends; reap it now if it has exited, else when it does."""
        self.close_stdin()
        for i, pipe in enumerate(self._pipes):
            if i < len(self._transports):
                self._transports[i].close()  # and the pipe with it
            else:
                pipe.close()
        if self._exited.done():
            self._reap()
        else:
            self._loop.remove_reader(self.pidfd)
            self._loop.add_reader(self.pidfd, self._reap)

    def _reap(self) -> None:
        self._loop.remove_reader(self.pidfd)
        os.close(self.pidfd)
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


class BackendRun:
    """Runs ``argv`` for one turn; ``on_event`` hears each tool note and final message once
    ``reply`` has taken it, and the deltas too, those in a row from one read joined into one:
    a backend writing many tiny deltas costs the loop one event per read, not one per line."""

    def __init__(
        self,
        argv: Sequence[str],
        request: bytes,
        *,
        cwd: str,
        env: dict,
        timeout: float,
        max_output: int,
        on_event: Callable[[stdio.Event], None],
        trees: Trees | None = None,
    ):
        self.argv, self.request, self.cwd, self.env = list(argv), request, cwd, env
        self.timeout, self.max_output, self.on_event = timeout, max_output, on_event
        self.reply = stdio.Reply()
        self.pid: int | None = None
        self._trees = trees
        self.tree: Tree | None = None
        self._proc: Child | None = None
        self._cancelled = False
        self._fault: Error | None = None
        self._output = 0
        self._stderr = bytearray()
        self._lines = 0
        self._deltas: list[str] = []
        self._kill_timer: asyncio.TimerHandle | None = None

    async def run(self) -> Outcome:
        if self._cancelled:
            return Outcome("cancelled")
        tree = self.tree = self._trees.new() if self._trees is not None else ScanTree()
        try:
            proc = Child(self.argv, self.cwd, self.env, tree)
        except (OSError, spawn.NotFound) as exc:
            self._done(tree)
            return Outcome("failed", ("backend_failed", f"cannot start {self.argv[0]}: {exc.strerror or exc}"))
        self._proc, self.pid = proc, proc.pid
        exited = asyncio.ensure_future(proc.wait())
        helpers: list[asyncio.Future] = []
        try:
            await proc.connect()
            if self._cancelled:
                self._stop(None)
            helpers = [asyncio.ensure_future(self._feed(proc)), asyncio.ensure_future(self._read_stderr(proc))]
            await self._read_stdout(proc, exited)
            await self._wait(exited)
            # stderr ends with the process (or its tree, killed below); its tail may still be in flight.
            await asyncio.wait([helpers[1]], timeout=0.2)
        finally:
            for task in (*helpers, exited):
                task.cancel()
            if self._kill_timer is not None:
                self._kill_timer.cancel()
            self._signal(signal.SIGKILL)
            proc.close()
            self.tree = None  # its leader reaped: the fallback's ids may name another's soon
            self._done(tree)
        return self._outcome(proc.returncode)

    def _done(self, tree: Tree) -> None:
        if self._trees is not None:
            self._trees.done(tree)
        else:
            tree.release()

    def cancel(self) -> None:
        """Stop the backend; the turn ends ``cancelled``."""
        self._cancelled = True
        if self._proc is not None:
            self._stop(None)

    def kill(self) -> None:
        """SIGKILL the whole tree now (the daemon is stopping)."""
        self._cancelled = True
        self._signal(signal.SIGKILL)

    # -- the process --------------------------------------------------------------------

    async def _feed(self, proc: Child) -> None:
        try:
            await proc.write(self.request)
        except OSError:
            pass  # it exited, or closed stdin, without reading the turn: its own business
        finally:
            proc.close_stdin()

    async def _read_stdout(self, proc: Child, exited: asyncio.Future) -> None:
        splitter = stdio.LineSplitter()
        read: asyncio.Future | None = None
        try:
            while self._fault is None and not self._cancelled:
                if read is None:
                    read = asyncio.ensure_future(proc.stdout.read(READ_CHUNK))
                waiting = {read} if exited.done() else {read, exited}
                done, _ = await asyncio.wait(
                    waiting, timeout=EXIT_DRAIN if exited.done() else self.timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if read not in done:
                    if done:
                        continue  # it exited: what it wrote is read with the shorter wait
                    if not exited.done():
                        self._stop(("timeout", f"the backend wrote nothing for {self.timeout:g} s"))
                    break  # or: it exited, and a child of its holds stdout open
                chunk, read = read.result(), None
                if not chunk:
                    last = splitter.end()
                    if last is not None:
                        self._take(last)
                    break
                self._count(len(chunk))
                for line in splitter.feed(chunk):
                    self._take(line)
                    if self._fault is not None or self._cancelled:
                        break
                self._flush()
        except Refusal as fault:
            self._stop((fault.code, fault.message))
        finally:
            self._flush()  # the reply has them: announce them too
            if read is not None:
                read.cancel()

    def _take(self, line: bytes) -> None:
        self._lines += 1
        event = stdio.parse_line(line, self._lines)
        if event is None:
            return
        if isinstance(event, stdio.Failure):
            self._stop(("backend_error", event.message))
            return
        self.reply.add(event)
        if isinstance(event, stdio.Delta):
            self._deltas.append(event.text)
            return
        self._flush()
        self.on_event(event)

    def _flush(self) -> None:
        """Announce the deltas taken since the last event as one."""
        if self._deltas:
            text = "".join(self._deltas)
            self._deltas.clear()
            self.on_event(stdio.Delta(text))

    async def _read_stderr(self, proc: Child) -> None:
        while chunk := await proc.stderr.read(READ_CHUNK):
            self._stderr += chunk
            del self._stderr[:-STDERR_TAIL]
            try:
                self._count(len(chunk))
            except Refusal as fault:
                self._stop((fault.code, fault.message))

    def _count(self, size: int) -> None:
        self._output += size
        if self._output > self.max_output:
            raise Refusal("too_large", f"the backend wrote more than {self.max_output} bytes")

    async def _wait(self, exited: asyncio.Future) -> None:
        """Until it has exited: at most ``timeout`` more after its stdout ended."""
        if not exited.done() and self._fault is None and not self._cancelled:
            await asyncio.wait([exited], timeout=self.timeout)
            if not exited.done():
                self._stop(("timeout", f"the backend closed its output but did not exit within {self.timeout:g} s"))
        await exited

    def _stop(self, error: Error | None) -> None:
        """SIGTERM to the tree, SIGKILL after ``KILL_GRACE``; the first error is the turn's."""
        if error is not None and self._fault is None:
            self._fault = error
        if self._kill_timer is None:
            self._signal(signal.SIGTERM)
            self._kill_timer = asyncio.get_running_loop().call_later(KILL_GRACE, self._signal, signal.SIGKILL)

    def _signal(self, number: int) -> None:
        if self.pid is None or self.tree is None:
            return
        if number == signal.SIGTERM:
            self.tree.hold()  # the fallback's: what SIGTERM orphans is still SIGKILLed
        self.tree.signal(number)

    # -- the end ------------------------------------------------------------------------

    def stderr_tail(self) -> str:
        """The last ``STDERR_TAIL`` bytes the backend wrote to stderr, as text."""
        return self._stderr.decode("utf-8", "replace").strip()

    def _outcome(self, returncode: int | None) -> Outcome:
        if self._cancelled:
            return Outcome("cancelled")
        if self._fault is not None:
            return Outcome("failed", self._fault)
        if returncode:
            why = f"exited with status {returncode}" if returncode > 0 else f"was killed by {_signal_name(-returncode)}"
            tail = self.stderr_tail()
            return Outcome("failed", ("backend_failed", f"the backend {why}" + (f"; its stderr ends: {tail}" if tail else "")))
        if self.reply.empty:
            return Outcome("failed", ("bad_output", "the backend exited without writing a reply"))
        return Outcome("complete")
