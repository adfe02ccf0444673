"""A process on its own pseudo-terminal: spawn, resize, input, hang-up, exit.

The child runs through util-linux ``setsid --ctty``: it starts a new session and makes the PTY
its controlling terminal, so Ctrl-C typed as input reaches the foreground job and a hang-up
reaches the shell, as in a real terminal. Doing that in Python would need ``preexec_fn``, which
is not safe in a process with threads (the registry has one). It is started by
:func:`aether.spawn.spawn` (signals reset, inside the session's cgroup from the start); ``setsid``
execs the command in place only because that child is not a process-group leader; then the pid
we hold is the command's, and the session id too.

Exit is seen through a pidfd, with no SIGCHLD handler and no thread. The child is reaped only by
:meth:`PtyProcess.reap`: while it is a zombie its pid, hence the session id, cannot be reused,
so the fallback :class:`aether.pidtree.ScanTree` can still find what is left of the session.
"""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import signal
import struct
import termios
from collections.abc import Sequence
from pathlib import Path

from aether import spawn
from aether.cgroup import Tree
from aether.errors import Refusal
from aether.pidtree import ScanTree
from aether.settings.sources import child_environment

SETSID = shutil.which("setsid") or "/usr/bin/setsid"


def child_env(extra: dict | None, session_id: str) -> dict:
    env = child_environment()
    # The client's emulator, not whatever terminal the daemon was started from; ``env`` may
    # say otherwise.
    env["TERM"] = "xterm-256color"
    env["COLORTERM"] = "truecolor"
    env["AETHER_TERMINAL_SESSION"] = session_id
    env.update(extra or {})
    return env


def set_size(fd: int, cols: int, rows: int) -> None:
    # On the master, the kernel sends SIGWINCH to the foreground process group when it changes.
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _status(returncode: int) -> tuple[int, str | None]:
    if returncode >= 0:
        return returncode, None
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"SIG{-returncode}"
    return 128 - returncode, name


class PtyProcess:
    """The child and the master side of its PTY (non-blocking); ``tree`` is every process it
    starts, which :meth:`kill_tree` ends."""

    def __init__(self, argv: Sequence[str], cwd: str | Path, env: dict, cols: int, rows: int, tree: Tree | None = None):
        try:
            spawn.check_program(argv[0], str(cwd), env)
        except spawn.NotFound as exc:
            raise Refusal("not_found", f"command not found: {exc.program}") from None
        self.tree = tree if tree is not None else ScanTree()
        master, slave = os.openpty()
        try:
            set_size(master, cols, rows)
            self.pid = spawn.spawn(
                [SETSID, "--ctty", *argv], cwd=str(cwd), env=env, stdio=(slave, slave, slave), cgroup_procs=self.tree.procs
            )
        except BaseException as exc:
            os.close(master)
            if isinstance(exc, OSError):
                raise Refusal("spawn_failed", f"cannot start {argv[0]}: {exc.strerror}") from None
            raise
        finally:
            os.close(slave)
        self.tree.started(self.pid)
        os.set_blocking(master, False)
        self.fd: int | None = master
        self.pidfd: int | None = os.pidfd_open(self.pid)
        self.returncode: int | None = None  # once reaped: as subprocess has it
        self.cols, self.rows = cols, rows

    def resize(self, cols: int, rows: int) -> None:
        if self.fd is not None:
            set_size(self.fd, cols, rows)
        self.cols, self.rows = cols, rows

    def close_master(self) -> None:
        """Close our side: the kernel hangs up the terminal (SIGHUP to the shell and its
        foreground job)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def kill_tree(self) -> None:
        """SIGKILL every process the session started, wherever it went: what ignored the
        hang-up, background and ``setsid`` jobs included."""
        self.tree.kill()

    def exit_status(self) -> tuple[int, str | None] | None:
        """``(code, signal name)`` once the child has exited, else None; it is not reaped.
        A death by signal N has code 128+N, as a shell reports it."""
        returncode = self.returncode if self.returncode is not None else spawn.exited(self.pid)
        return None if returncode is None else _status(returncode)

    def reap(self) -> None:
        """Collect the exited child (after which its pid may be reused)."""
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)

    def wait(self, timeout: float) -> bool:
        """Reap the child once it exits, waiting at most ``timeout`` seconds; False if it has not."""
        if self.returncode is None and self.exit_status() is None:
            pidfd = os.pidfd_open(self.pid)
            try:
                select.select([pidfd], [], [], timeout)
            finally:
                os.close(pidfd)
            if self.exit_status() is None:
                return False
        self.reap()
        return True

    def release(self) -> None:
        self.close_master()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
