"""A process on its own pseudo-terminal: spawn, resize, input, hang-up, exit.

The child runs through util-linux ``setsid --ctty``: it starts a new session and makes the PTY
its controlling terminal, so Ctrl-C typed as input reaches the foreground job and a hang-up
reaches the shell, as in a real terminal. Doing that in Python would need ``preexec_fn``, which
is not safe in a process with threads (the registry has one). ``setsid`` execs the command in
place only because the child Popen makes is not a process-group leader (so no
``start_new_session``); then the pid we hold is the command's, and the session id too.

Exit is seen through a pidfd, with no SIGCHLD handler and no thread. The child is reaped only by
:meth:`PtyProcess.reap`: while it is a zombie its pid, hence the session id, cannot be reused,
so :meth:`PtyProcess.kill_session` can still find what is left of the session safely.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import struct
import subprocess
import termios
from pathlib import Path
from typing import Optional, Sequence

from aether.config import child_environment

SETSID = shutil.which("setsid") or "/usr/bin/setsid"


class SpawnError(Exception):
    """The command could not be started; ``code`` is a protocol error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def child_env(extra: Optional[dict], session_id: str) -> dict:
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


def _status(returncode: int) -> tuple[int, Optional[str]]:
    if returncode >= 0:
        return returncode, None
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"SIG{-returncode}"
    return 128 - returncode, name


class PtyProcess:
    """The child and the master side of its PTY (non-blocking)."""

    def __init__(self, argv: Sequence[str], cwd: Path, env: dict, cols: int, rows: int):
        program = argv[0] if "/" not in argv[0] else os.path.join(cwd, argv[0])
        if shutil.which(program, path=env.get("PATH", os.defpath)) is None:
            raise SpawnError("not_found", f"command not found: {argv[0]}")
        master, slave = os.openpty()
        try:
            set_size(master, cols, rows)
            self.proc = subprocess.Popen(
                [SETSID, "--ctty", *argv],
                stdin=slave,
                stdout=slave,
                stderr=slave,
                cwd=cwd,
                env=env,
                close_fds=True,
            )
        except BaseException as exc:
            os.close(master)
            if isinstance(exc, OSError):
                raise SpawnError("spawn_failed", f"cannot start {argv[0]}: {exc.strerror}") from None
            raise
        finally:
            os.close(slave)
        os.set_blocking(master, False)
        self.fd: Optional[int] = master
        self.pid = self.proc.pid
        self.pidfd = os.pidfd_open(self.pid)
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

    def kill_session(self) -> None:
        """SIGKILL every process still in the child's session: what ignored the hang-up."""
        sid = self.pid
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                if os.getsid(pid) == sid:
                    os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                continue

    def exit_status(self) -> Optional[tuple[int, Optional[str]]]:
        """``(code, signal name)`` once the child has exited, else None; it is not reaped.
        A death by signal N has code 128+N, as a shell reports it."""
        if self.proc.returncode is not None:
            return _status(self.proc.returncode)
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return None
        if info is None:
            return None
        if info.si_code == os.CLD_EXITED:
            return info.si_status, None
        return _status(-info.si_status)

    def reap(self) -> None:
        """Collect the exited child (after which its pid may be reused)."""
        if self.proc.returncode is None:
            self.proc.wait()

    def release(self) -> None:
        self.close_master()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
