"""Who holds a port: its process's command line, working directory and start time.

Four ``python3`` rows become four programs: ``python3 -m http.server 8000`` in ``~/site``,
``python3 manage.py runserver`` in ``~/shop``. Everything comes from /proc, read through a
descriptor of the process's own ``/proc/<pid>`` directory: once that is open, every read names
that process or fails, never another one that got its pid after it exited.

The command line is the process's, as it set it: secrets passed as arguments are in it, as
they are for ``ps`` (``/proc/<pid>/cmdline`` is readable by every user). aether shows it to
clients holding its token and never writes it to a log; hiding a port's command from clients
is a matter for attributes.
"""

from __future__ import annotations

import codecs
import dataclasses
import os
import time

#: Arguments kept of a command line. A dev server's is a handful (``node .../vite --port 5173
#: --host``); a Java or Electron one can run to hundreds, of which the first say what it is.
MAX_ARGS = 64
#: Bytes of command line kept, decoded. 1 KiB keeps the whole command of every dev server we
#: ran (the longest, Next.js's ``next-server`` worker, is under 200 bytes) and bounds a port's
#: row: a thousand ports' commands make at most 1 MiB.
MAX_BYTES = 1024
#: Appended to a command line that was cut.
MARKER = "…"

_TICKS = os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass(frozen=True, slots=True)
class Who:
    """A process as a person tells it apart. Any field is None where it cannot be read: the
    command of a kernel thread or a zombie, the working directory of another user's process
    (reading it takes the right to ptrace the process)."""

    pid: int
    #: The arguments, at most :data:`MAX_ARGS` and :data:`MAX_BYTES`; bytes that are not UTF-8
    #: as lone surrogates (``surrogateescape``), as the protocol sends file names.
    argv: tuple[str, ...] | None
    #: Some of the command line was left out.
    truncated: bool
    cwd: str | None
    #: When the process started, milliseconds since the Unix epoch (to the kernel's clock tick,
    #: 10 ms). A process's ports open after it starts (unless it inherited their sockets: a
    #: daemonizing server's master, socket activation): for a port found already open, the
    #: earliest it can have opened, which a restart of the daemon does not change.
    started_ms: int | None
    #: When it started in clock ticks since boot, as /proc says: the process's identity beside
    #: its pid, the same value ``procs.start_time`` gives.
    started_ticks: int | None

    @property
    def command(self) -> str | None:
        """The command line as ``ps -o args`` shows it, arguments joined by spaces (what
        regular expressions on a command line, VS Code's among them, are written against),
        ending in :data:`MARKER` when cut."""
        if self.argv is None:
            return None
        return " ".join(self.argv) + (" " + MARKER if self.truncated else "")

    def to_json(self) -> dict:
        return {"command": self.command, "cwd": self.cwd, "started": self.started_ms}


def who(pid: int | None, started: int | None = None) -> Who | None:
    """The process ``pid``, or None if it is gone (or is no longer the one that started at
    ``started`` clock ticks, when given: a pid reused by another process). Never raises for a
    process that exits meanwhile or a permission refused; costs a few small reads (see
    bench/who.py)."""
    if pid is None or pid <= 0:
        return None
    try:
        fd = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        stat = _read(fd, "stat", 1024)
        if not stat:
            return None
        ticks = _start_ticks(stat)
        if started is not None and ticks != started:
            return None
        argv, truncated = parse_cmdline(_read(fd, "cmdline", MAX_BYTES + 1) or b"")
        try:
            cwd: str | None = os.readlink("cwd", dir_fd=fd)
        except OSError:
            cwd = None
        return Who(pid, argv, truncated, cwd, _epoch_ms(ticks), ticks)
    finally:
        os.close(fd)


def parse_cmdline(raw: bytes, max_args: int = MAX_ARGS, max_bytes: int = MAX_BYTES) -> tuple[tuple[str, ...] | None, bool]:
    """``/proc/<pid>/cmdline`` (arguments each ended by a NUL) as (arguments, cut). None for
    an empty one (a kernel thread, a zombie). A process that rewrote its title (nginx's
    ``nginx: master process ...``) has one argument padded with NULs: the padding goes.
    A cut never splits a UTF-8 character."""
    truncated = len(raw) > max_bytes
    raw = raw[:max_bytes]
    if truncated:
        # Drop a character cut in the middle: an incremental decoder holds back an incomplete
        # sequence at the end, and only that (invalid bytes elsewhere are escaped).
        decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        decoder.decode(raw, final=False)
        raw = raw[: len(raw) - len(decoder.getstate()[0])]
    parts = raw.split(b"\0")
    # The last NUL ends the last argument; further empty ones are a title's padding.
    while parts and parts[-1] == b"":
        parts.pop()
    if len(parts) > max_args:
        parts, truncated = parts[:max_args], True
    if not parts:
        return None, truncated
    return tuple(part.decode("utf-8", "surrogateescape") for part in parts), truncated


def _read(dir_fd: int, name: str, size: int) -> bytes | None:
    """Up to ``size`` bytes in one read: the kernel fills a read of ``stat`` or ``cmdline``
    whole, so a second read for the end of file would be one more system call for nothing."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        return os.read(fd, size)
    except OSError:
        return None
    finally:
        os.close(fd)


def _start_ticks(stat: bytes) -> int | None:
    # Fields after the comm, which is parenthesised and may itself contain ')'.
    try:
        return int(stat[stat.rfind(b")") + 2 :].split()[19])
    except (IndexError, ValueError):
        return None


def _epoch_ms(ticks: int | None) -> int | None:
    """Clock ticks since boot as Unix milliseconds. The kernel counts a start time on the boot
    clock (CLOCK_BOOTTIME, which runs through a suspend); its epoch is now on the wall clock
    less the boot clock, taken afresh each time so that a wall clock set meanwhile is followed."""
    if ticks is None:
        return None
    boot = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    return round((boot + ticks / _TICKS) * 1000)
