"""Processes' exits as they happen: a pidfd per process, registered with the event loop.

A pidfd polls readable once its process has exited (a zombie counts), so nothing runs while
no watched process exits, and no pid is ever polled; the one timer, letting go of processes
no longer wanted, is armed only after a change. The monitor watches each socket's
recorded owner: the probe sees no transition when an owner exits while a child holds its
sockets (a daemonizing server's parent), and this is how it learns of it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
from collections.abc import Callable

from aether.ports import procs

log = logging.getLogger("aether.ports")

#: Processes watched at most: one descriptor each. A workspace's listening processes are
#: tens; past this, an owner's exit goes unnoticed until a snapshot replaces its port's sockets,
#: or a new subscriber finds it dead (``PortMonitor.open_events``) and its heir is looked for.
MAX_WATCHED = 4096

#: Seconds a process that no longer owns a port stays watched. One that listens and closes
#: again and again (a dev server's reloads, bench/latency.py) keeps its pidfd: taking and
#: releasing it costs ~25 us a cycle, which put bench/latency.py's close p50 at 0.10 ms where
#: it is 0.06 ms without. One that is done is let go soon after, so that its exit, whenever it
#: comes, wakes nothing.
IDLE_GRACE = 1.0

#: pid -> its start time in clock ticks since boot, or None where it could not be read safely.
Exited = dict[int, int | None]


class ExitWatch:
    """Calls ``on_exits`` with the processes that exited, each batch once the loop is free."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_exits: Callable[[Exited], None]):
        self._loop = loop
        self._on_exits = on_exits
        self._watched: dict[int, tuple[int, int | None]] = {}  # pid -> (pidfd, start time)
        self._exited: Exited = {}
        self._wanted: set[int] = set()
        self._prune: asyncio.TimerHandle | None = None
        self._full_logged = False

    def __contains__(self, pid: int) -> bool:
        return pid in self._watched or pid in self._exited

    def track(self, pids: set[int]) -> None:
        """Watch ``pids``, and, ``IDLE_GRACE`` seconds on, no longer those not among them."""
        self._wanted = pids
        if self._prune is None and self._watched.keys() - pids:
            self._prune = self._loop.call_later(IDLE_GRACE, self._prune_idle)
        for pid in pids:
            if pid in self:
                continue
            if len(self._watched) >= MAX_WATCHED:
                self._prune_idle()  # room from those no longer wanted, before their grace ends
            if len(self._watched) >= MAX_WATCHED:
                if not self._full_logged:
                    self._full_logged = True
                    log.warning("too many owners to watch", extra={"watched": len(self._watched)})
                return
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                self._exit(pid)  # gone before we looked
                continue
            except OSError as exc:
                log.warning("could not watch an owner", extra={"pid": pid, "error": exc.strerror})
                return
            started = procs.start_time(pid)
            if select.select([fd], [], [], 0)[0]:
                # It exited: the /proc entry just read may already be another process's.
                os.close(fd)
                self._exit(pid)
                continue
            self._watched[pid] = (fd, started)  # read while it lived: its own start
            self._loop.add_reader(fd, self._exit, pid)

    def close(self) -> None:
        for pid in list(self._watched):
            self._unwatch(pid)
        self._exited.clear()
        if self._prune is not None:
            self._prune.cancel()
            self._prune = None

    def _prune_idle(self) -> None:
        if self._prune is not None:
            self._prune.cancel()
            self._prune = None
        for pid in self._watched.keys() - self._wanted:
            self._unwatch(pid)

    def _unwatch(self, pid: int) -> int | None:
        fd, started = self._watched.pop(pid)
        self._loop.remove_reader(fd)
        os.close(fd)
        return started

    def _exit(self, pid: int) -> None:
        started = self._unwatch(pid) if pid in self._watched else None
        if self._prune is not None and not self._watched.keys() - self._wanted:
            self._prune.cancel()  # nothing left to let go: no wake-up for it
            self._prune = None
        if not self._exited:
            self._loop.call_soon(self._deliver)
        self._exited[pid] = started

    def _deliver(self) -> None:
        exited, self._exited = self._exited, {}
        if exited:
            self._on_exits(exited)
