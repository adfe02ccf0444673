"""PortMonitor: the open ports of this network namespace, and every change as it happens.

Two backends feed one :class:`~aether.ports.table.PortTable`:

``ebpf``
    The probe's LISTEN records, applied one by one; nothing runs while no port changes.
    A sock_diag snapshot at start-up brings in ports already open. Whenever the probe's view
    may be incomplete (records lost, a socket whose namespace could not be read, a listener
    auto-bound to port 0, an event on a port known only from a snapshot), one coalesced
    resynchronisation diffs the table against a fresh snapshot, so it never silently diverges.
``sockdiag``
    A snapshot every ``interval`` seconds, stretched so that snapshots take at most
    ``cpu_budget`` of a core however many sockets there are.

Subscribers are plain callables taking a :class:`~aether.ports.events.PortEvent`; they run
on the loop's thread, in the order the events happened.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from typing import Callable, Iterable, Optional

from aether.ports import procs, sockdiag
from aether.ports.ebpf import Probe, ProbeUnavailable
from aether.ports.events import CLOSE, OPEN, SKADDR, Listener, PortEvent, PortState
from aether.ports.table import PortTable

log = logging.getLogger("aether.ports")

BACKENDS = ("auto", "ebpf", "sockdiag")
Subscriber = Callable[[PortEvent], None]


class PortMonitor:
    """Watches listening TCP ports; see the module docstring for how."""

    def __init__(
        self,
        backend: str = "auto",
        ignored: Iterable[int] = (),
        interval: float = 0.25,
        cpu_budget: float = 0.03,
        ebpf_buffer: str = "auto",
        ebpf_pages: Optional[int] = None,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        self.requested_backend = backend
        self.backend: Optional[str] = None
        self.backend_reason = ""
        self.interval = interval
        self.cpu_budget = cpu_budget
        self.ebpf_buffer = ebpf_buffer
        self.ebpf_pages = ebpf_pages
        self.table = PortTable(ignored)
        self.stats = {"records": 0, "resyncs": 0, "lost": 0, "snapshot_ms": 0.0}
        self._subscribers: list[Subscriber] = []
        self._closed_waiters: dict[int, list[asyncio.Future]] = {}
        self._probe: Optional[Probe] = None
        self._diag: Optional[sockdiag.DiagSocket] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._netns = procs.net_namespace()
        self._owners: dict[int, Optional[int]] = {}  # inode -> pid, for snapshot sockets
        self._resync_pending = False
        self._poll_handle: Optional[asyncio.TimerHandle] = None
        self._lost_seen = 0

    # -- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Choose and start the backend, then take the start-up snapshot."""
        self._loop = asyncio.get_running_loop()
        self._diag = sockdiag.DiagSocket()
        if self.requested_backend in ("auto", "ebpf"):
            try:
                # bcc compiles for ~0.5 s: keep the loop free meanwhile.
                self._probe = await self._loop.run_in_executor(
                    None, Probe, self.ebpf_buffer, self.ebpf_pages
                )
            except ProbeUnavailable as exc:
                if self.requested_backend == "ebpf":
                    raise
                self.backend_reason = f"eBPF unavailable: {exc}"
        if self._probe is not None:
            self.backend = "ebpf"
            self.backend_reason = self.backend_reason or (
                f"probe on sock:inet_sock_set_state, {self._probe.buffer} buffer of "
                f"{self._probe.pages} pages"
            )
            # Attach before the snapshot: a socket changing in between is then seen by both,
            # and the uncertainty rules below reconcile the two views.
            self._probe.start(self._loop, self._on_records)
            self._resync("start-up")
        else:
            self.backend = "sockdiag"
            if not self.backend_reason:
                self.backend_reason = f"requested; snapshot every {self.interval * 1000:.0f} ms or more"
            self._poll()
        log.info("port monitor started", extra={"backend": self.backend, "reason": self.backend_reason})

    def stop(self) -> None:
        if self._probe is not None:
            self._probe.stop()
            self._probe = None
        if self._poll_handle is not None:
            self._poll_handle.cancel()
            self._poll_handle = None
        if self._diag is not None:
            self._diag.close()
            self._diag = None
        for waiters in self._closed_waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.cancel()
        self._closed_waiters.clear()

    # -- consumers ----------------------------------------------------------------------

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call ``subscriber`` with every event from now on; returns the unsubscribe function."""
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber) if subscriber in self._subscribers else None

    def open_events(self) -> list[PortEvent]:
        """An ``open`` event for every port open now, as a new subscriber should first see."""
        events = []
        for port in self.table.ports():
            event = self.table.open_event(port)
            pid = self._living_pid(port)
            events.append(dataclasses.replace(event, pid=pid, process=procs.process_name(pid)))
        return events

    def ports(self) -> list[PortState]:
        """The ports open now, each with a living holder's pid where one is visible."""
        states = []
        for port in self.table.ports():
            listeners = self.table.listeners(port)
            pid = self._living_pid(port)
            states.append(
                PortState(
                    port,
                    pid,
                    procs.process_name(pid),
                    tuple(sorted({listener.address for listener in listeners})),
                    tuple(sorted({l.pid for l in listeners if procs.is_alive(l.pid)} | ({pid} if pid else set()))),
                )
            )
        return states

    async def wait_closed(self, port: int, timeout: float) -> bool:
        """True once ``port`` is not open (at once if it is not), False after ``timeout``."""
        if port not in self.table:
            return True
        waiter = self._loop.create_future()
        self._closed_waiters.setdefault(port, []).append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
            return True
        except asyncio.TimeoutError:
            return port not in self.table
        finally:
            waiters = self._closed_waiters.get(port, [])
            if waiter in waiters:
                waiters.remove(waiter)

    def set_ignored(self, ignored: Iterable[int]) -> None:
        """Change the ignored ports; ports newly ignored close, ports no longer ignored open."""
        for event in self.table.set_ignored(ignored):
            self._publish(event)
        self._resync("ignored ports changed")

    # -- internals ----------------------------------------------------------------------

    def _publish(self, event: PortEvent) -> None:
        if event.type == OPEN:
            event = dataclasses.replace(event, process=procs.process_name(event.pid))
        elif event.type == CLOSE:
            for waiter in self._closed_waiters.pop(event.port, ()):
                if not waiter.done():
                    waiter.set_result(True)
        for subscriber in list(self._subscribers):
            try:
                subscriber(event)
            except Exception:
                log.exception("port event subscriber failed", extra={"port": event.port})

    def _on_records(self, records) -> None:
        table = self.table
        self.stats["records"] += len(records)
        for record in records:
            port = record.port
            if record.is_listen:
                if port == 0:
                    # listen() without bind(): the port is assigned after the tracepoint fires.
                    self._schedule_resync("auto-bound listener")
                    continue
                netns = procs.net_namespace(record.tgid, record.tid)
                if netns is None:
                    self._schedule_resync("listener exited before its namespace was read")
                    continue
                if netns != self._netns:
                    continue
                if table.is_uncertain(port):
                    self._schedule_resync("event on a port known from a snapshot")
                event = table.add(
                    Listener((SKADDR, record.skaddr), port, record.family, record.address, record.tgid)
                )
            else:
                if table.is_uncertain(port):
                    self._schedule_resync("event on a port known from a snapshot")
                _known, event = table.remove((SKADDR, record.skaddr))
            if event is not None:
                self._publish(event)
        lost = self._probe.lost if self._probe else 0
        if lost != self._lost_seen:
            self.stats["lost"] = lost
            log.warning("probe records lost", extra={"lost": lost - self._lost_seen, "total": lost})
            self._lost_seen = lost
            self._schedule_resync("probe records lost")

    def _schedule_resync(self, reason: str) -> None:
        if not self._resync_pending and self._loop is not None:
            self._resync_pending = True
            self._loop.call_soon(self._resync, reason)

    def _resync(self, reason: str) -> None:
        """Diff the table against a fresh snapshot and publish what differs."""
        self._resync_pending = False
        if self._diag is None:
            return
        started = time.perf_counter()
        raw = self._diag.raw()
        inodes = {entry[3] for entry in raw}
        unknown = inodes - self._owners.keys()
        if unknown:
            owners = procs.socket_owners(unknown)
            for inode in unknown:
                self._owners[inode] = owners.get(inode)
        for inode in self._owners.keys() - inodes:
            del self._owners[inode]
        events = self.table.sync(sockdiag.to_listeners(raw, self._owners))
        self.stats["resyncs"] += 1
        self.stats["snapshot_ms"] = (time.perf_counter() - started) * 1000
        if self.backend == "ebpf" or events:
            log.debug("resync", extra={"reason": reason, "events": len(events), "sockets": len(raw)})
        for event in events:
            self._publish(event)

    def _poll(self) -> None:
        started = time.process_time()
        self._resync("poll")
        spent = time.process_time() - started
        # Stretch the interval so snapshots stay within the CPU budget.
        delay = max(self.interval, spent / self.cpu_budget - spent)
        self._poll_handle = self._loop.call_later(delay, self._poll)

    def _living_pid(self, port: int) -> Optional[int]:
        """The first recorded owner still alive, else a living holder found through /proc."""
        listeners = self.table.listeners(port)
        for listener in listeners:
            if procs.is_alive(listener.pid):
                return listener.pid
        inodes = {listener.inode for listener in listeners if listener.inode}
        if not inodes and self._diag is not None:
            inodes = {entry[3] for entry in self._diag.raw() if entry[1] == port}
        holders = procs.socket_holders(inodes)
        pids = sorted(pid for pids in holders.values() for pid in pids)
        return pids[0] if pids else None
