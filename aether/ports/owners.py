"""The owners of the monitor's sockets: who holds each, and who takes over when one exits.

Which process holds a socket inode is known only by reading every process's descriptors
(``/proc/PID/fd``): 11-16 ms with ~180 processes and ~800 descriptors, 0.3 s with 40,000
sockets open. On the event loop, that stalled every client for as long; here
:class:`OwnerSearch` runs it in the loop's executor, one search at a time (requests made
meanwhile wait for the next, which takes them all), and hands back what it found on the loop's
thread. :class:`Owners` applies that to what the kernel says then (a fresh snapshot) and to the
table as it is by then, never to what they were when the search began.

:class:`Owners` also keeps the owners' side of the table current: each recorded owner's
pidfd is watched (:class:`~aether.ports.exits.ExitWatch`), and when one exits, the sockets
that outlive it (a daemonizing server's parent, after listen() and fork()) pass to the owner
among their living holders, an ``update``. A snapshot socket's owner is remembered by inode
until the socket goes; one looked for and not found (another user's, another namespace's) is
remembered as such, and not looked for again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable

from aether.ports import procs
from aether.ports.events import INODE, PortEvent
from aether.ports.exits import Exited, ExitWatch
from aether.ports.table import PortTable

log = logging.getLogger("aether.ports")


@dataclasses.dataclass
class Found:
    """What one search found: every inode it looked for, the living processes holding each
    (an inode held by none is absent: another user's, another namespace's, or closed), each
    inode's owner among them, and the exits it was made for."""

    ticket: int
    searched: set[int]
    holders: dict[int, list[int]]
    owners: dict[int, int | None]
    exited: Exited


@dataclasses.dataclass
class _Request:
    ticket: int
    inodes: set[int] = dataclasses.field(default_factory=set)
    hints: set[int] = dataclasses.field(default_factory=set)
    exited: Exited = dataclasses.field(default_factory=dict)


def search(inodes: set[int], hints: Iterable[int], exited: Exited) -> tuple[dict, dict]:
    """(living holders, owner) of each inode found. The ``hints`` processes are read first;
    then, for sockets that outlived an owner, the processes started since it did, where a
    daemon's master and workers are (finding them costs ~1.5 ms with ~180 processes); then
    every process for the rest."""
    first = list(dict.fromkeys(hints))
    starts = list(exited.values())
    if starts and None not in starts:
        first += procs.younger(min(start for start in starts if start is not None))  # all of them, as checked
    holders = procs.find_holders(inodes, first)
    living = {inode: [pid for pid in pids if procs.is_alive(pid)] for inode, pids in holders.items()}
    living = {inode: pids for inode, pids in living.items() if pids}
    return living, {inode: procs.owner(pids) for inode, pids in living.items()}


class OwnerSearch:
    """Runs :func:`search` in ``loop``'s executor, one at a time; calls ``on_found`` with
    each :class:`Found` on the loop's thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_found: Callable[[Found], None]):
        self._loop = loop
        self._on_found = on_found
        self._running: _Request | None = None
        self._next: _Request | None = None
        self._tickets = 0
        self._closed = False

    @property
    def idle(self) -> bool:
        return self._running is None and self._next is None

    def request(self, inodes: Iterable[int], hints: Iterable[int] = (), exited: Exited | None = None) -> int:
        """Look for the holders of ``inodes`` (and, with ``exited``, say which exits it was
        for); the ticket of the :class:`Found` that will answer."""
        inodes, hints = set(inodes), set(hints)
        running = self._running
        if running is not None and not exited and inodes <= running.inodes and hints <= running.hints:
            return running.ticket  # the search under way answers this already
        if self._next is None:
            self._tickets += 1
            self._next = _Request(self._tickets)
        request = self._next
        request.inodes |= inodes
        request.hints |= hints
        for pid, started in (exited or {}).items():
            # The earliest start bounds where their children can be; an unknown one, nothing.
            known = request.exited.get(pid, started)
            request.exited[pid] = None if known is None or started is None else min(known, started)
        if self._running is None:
            self._start()
        return request.ticket

    def close(self) -> None:
        self._closed = True
        self._next = None

    def _start(self) -> None:
        request, self._next = self._next, None
        assert request is not None  # started only with a request waiting
        try:
            future = self._loop.run_in_executor(None, search, request.inodes, request.hints, request.exited)
        except RuntimeError:  # the loop is shutting down: nothing would apply the answer
            self._closed = True
            return
        self._running = request
        future.add_done_callback(self._done)

    def _done(self, future: asyncio.Future) -> None:
        request, self._running = self._running, None
        assert request is not None  # the search _start ran
        if self._closed:
            return
        try:
            holders, owners = future.result()
        except Exception:
            # /proc reads fail by returning nothing; anything else is a bug: say so, and let
            # the caller carry on as if nothing had been found.
            log.exception("owner search failed")
            holders, owners = {}, {}
        try:
            self._on_found(Found(request.ticket, request.inodes, holders, owners, request.exited))
        finally:
            if self._next is not None and not self._closed:
                self._start()


class Owners:
    """The owners of ``table``'s sockets, kept current on ``loop`` (see the module docstring).
    ``raw`` takes a sock_diag snapshot; ``publish(event, seen_ns, backend)`` tells subscribers;
    ``on_found(ticket)`` runs once each search's findings are applied."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        table: PortTable,
        raw: Callable[[], list],
        publish: Callable[[PortEvent, int, str], None],
        on_found: Callable[[int], None],
    ):
        self._loop = loop
        self._table = table
        self._raw = raw
        self._publish = publish
        self._on_found = on_found
        #: inode -> owner of every socket in the last snapshot, None where none was found
        self.by_inode: dict[int, int | None] = {}
        self._search = OwnerSearch(loop, self._found)
        self._exits = ExitWatch(loop, self.exited)  # the recorded owners' pidfds
        self._watch_pending = False
        self._gone: set[int] = set()  # owners whose exit is handled, still recorded (closing)
        self._exit_tickets: dict[int, int] = {}  # ticket -> when the exits it searches for were seen
        self._waiters: dict[int, list[asyncio.Future]] = {}  # ticket -> find() calls awaiting it
        self._closed = False

    @property
    def idle(self) -> bool:
        """No search running or waiting to run."""
        return self._search.idle

    def close(self) -> None:
        self._closed = True
        self._search.close()
        self._exits.close()
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.cancel()
        self._waiters.clear()

    # -- a snapshot's sockets -----------------------------------------------------------

    def unknown(self, inodes: set[int], hints: set[int]) -> set[int]:
        """Of a snapshot's socket inodes, those of no known owner. Sockets gone are forgotten;
        those the ``hints`` processes hold (the tasks records named) are found on the loop,
        reading those processes' descriptors only (~8 us each): an auto-bound listener opens
        at once."""
        for inode in self.by_inode.keys() - inodes:
            del self.by_inode[inode]
        unknown = inodes - self.by_inode.keys()
        if unknown and hints:
            for inode, pids in procs.socket_holders(unknown, hints).items():
                self.by_inode[inode] = procs.owner(pids)
            unknown -= self.by_inode.keys()
        return unknown

    def request(self, inodes: set[int], hints: Iterable[int] = frozenset()) -> int:
        """Look for the owners of ``inodes`` off the loop; the ticket ``on_found`` will get."""
        return self._search.request(inodes, hints)

    async def find(self, inodes: set[int]) -> None:
        """Look for the owners of ``inodes`` off the loop, and return once they are known
        (those of the sockets still open)."""
        waiter = self._loop.create_future()
        self._waiters.setdefault(self.request(inodes), []).append(waiter)
        await waiter

    # -- the recorded owners ------------------------------------------------------------

    def watch(self) -> None:
        """Watch the owners the table records, once the current batch is done."""
        # After the batch, not inside it: an event is never held back by pidfd bookkeeping,
        # and a burst from one process costs one look at the table's owners.
        if not self._watch_pending and not self._closed:
            self._watch_pending = True
            self._loop.call_soon(self._sync_watches)

    def _sync_watches(self) -> None:
        """Watch every owner the table records, but those whose exit is handled already."""
        self._watch_pending = False
        if self._closed:
            return
        pids = self._table.pids()
        self._gone &= pids
        self._exits.track(pids - self._gone)

    def unnoticed(self, pid: int | None) -> bool:
        """For a recorded owner found dead: its exit is neither handled nor about to be (it
        was not watched: too many owners)."""
        return pid is not None and pid not in self._gone and pid not in self._exits

    def exited(self, exited: Exited) -> None:
        """Owners exited: their sockets that live on (shared with a child) get the owner
        among their living holders, and their ports an ``update``, once a search has found
        them. A socket that closed with its owner is left to its close record or the next
        snapshot, and needs no search."""
        if self._closed:
            return
        dead = exited.keys()
        self._gone |= dead
        for inode in [inode for inode, pid in self.by_inode.items() if pid in dead]:
            del self.by_inode[inode]  # unknown again; found by the search if its port is open
        ports = self._table.ports_of(dead)
        if not ports:
            return
        inodes = {row[3] for row in self._raw() if row[1] in ports}
        if not inodes:
            return  # closed with their owner: nothing to look for
        ticket = self._search.request(inodes, exited=exited)
        self._exit_tickets.setdefault(ticket, time.monotonic_ns())
        log.debug("owners exited", extra={"pids": sorted(dead)[:16], "ports": len(ports)})

    def _found(self, found: Found) -> None:
        """A search ended: its findings, applied to the kernel's sockets and the table as they
        are now."""
        if self._closed:
            return
        raw = self._raw()
        present = {row[3] for row in raw}
        for inode in found.searched & present:
            self.by_inode[inode] = found.owners.get(inode)  # None: not found, not looked for again
        seen_ns = self._exit_tickets.pop(found.ticket, None)
        if seen_ns is not None:
            self._inherit(found, raw, seen_ns)
        for waiter in self._waiters.pop(found.ticket, ()):
            if not waiter.done():
                waiter.set_result(None)
        self._on_found(found.ticket)

    def _inherit(self, found: Found, raw: list, seen_ns: int) -> None:
        dead = found.exited.keys()
        ports = self._table.ports_of(dead)
        by_port: dict[int, set[int]] = {}
        for _family, port, _address, inode in raw:
            if port in ports:
                by_port.setdefault(port, set()).update(found.holders.get(inode, ()))
        for port in sorted(by_port):  # a port whose sockets closed is left to its close
            listeners = self._table.listeners(port)
            # As PortMonitor.open_events names it: another recorded owner still alive, else
            # the owner among the port's living holders (living still: the search took a while).
            heir = next((l.pid for l in listeners if l.pid not in dead and procs.is_alive(l.pid)), None)
            heir = heir or procs.owner(pid for pid in by_port.get(port, ()) if procs.is_alive(pid))
            pids = {}
            for listener in listeners:
                if listener.pid not in dead:
                    continue
                if listener.key[0] == INODE:
                    # A snapshot's socket: its own holders decide, as the next snapshot will.
                    assert listener.inode is not None  # keyed by it
                    own = found.owners.get(listener.inode)
                    pid = own if procs.is_alive(own) else heir
                    if listener.inode in self.by_inode:
                        self.by_inode[listener.inode] = pid
                else:
                    pid = heir
                pids[listener.key] = pid
            self._gone.discard(heir)  # an owner again: its exit is yet to come
            event = self._table.set_pids(port, pids)
            if event is not None:
                self._publish(event, seen_ns, "pidfd")
        self.watch()  # the heirs
