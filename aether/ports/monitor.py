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

Both keep each open port's state current, not only its opening: a socket on another address
is an ``update`` (from the probe's record, or the next snapshot), and so is a new owner. The
process recorded as a socket's owner can exit while another holds the socket (a daemonizing
server's parent, after listen() and fork()); the probe sees no transition then, so each
recorded owner's pidfd is registered with the loop, and when it polls readable (the process
exited) the holders of its ports' sockets are read again: no polling, and nothing runs while
no owner exits.

Who holds a socket is found by reading every process's descriptors, which takes milliseconds
to a third of a second: never on the loop (:mod:`aether.ports.owners`). A resync holds back
the ports whose owner could change what it does and is not known yet, and the resync after
the search, on a fresh snapshot, applies them; an owner's exit is applied to the table as it
is once its search ends. A new subscriber's ``open`` events say what the table knows at once;
an owner found later is an ``update`` to every subscriber.

Subscribers are plain callables taking a :class:`~aether.ports.events.PortEvent`; they run
on the loop's thread, in the order the events happened.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable

from aether.ports import BACKENDS, procs, sockdiag
from aether.ports.ebpf import Probe, ProbeUnavailable
from aether.ports.events import CLOSE, SKADDR, Listener, PortEvent, PortState
from aether.ports.exits import Exited
from aether.ports.owners import Owners
from aether.ports.table import PortTable

log = logging.getLogger("aether.ports")

_ORPHAN_CLOSES = 4096
_SETTLE = 0.05  # seconds of quiet after lost records before a final resync
Subscriber = Callable[[PortEvent], None]


class PortMonitor:
    """Watches listening TCP ports; see the module docstring for how."""

    def __init__(
        self,
        backend: str = "auto",
        ignored: Iterable[int] = (),
        interval: float = 0.25,
        cpu_budget: float = 0.02,
        ebpf_buffer: str = "auto",
        ebpf_pages: int | None = None,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        self.requested_backend = backend
        self.backend: str | None = None
        self.backend_reason = ""
        self.interval = interval
        self.cpu_budget = cpu_budget
        self.ebpf_buffer = ebpf_buffer
        self.ebpf_pages = ebpf_pages
        self.table = PortTable(ignored)
        # resyncs: snapshots diffed against the table but for sock_diag's polls, start-up's included.
        self.stats = {"records": 0, "resyncs": 0, "polls": 0, "lost": 0, "snapshot_ms": 0.0}
        self._subscribers: list[Subscriber] = []
        self._closed_waiters: dict[int, list[asyncio.Future]] = {}
        self._probe: Probe | None = None
        self._diag: sockdiag.DiagSocket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._netns = procs.net_namespace()
        self._owners: Owners | None = None
        self._resync_pending = False
        # Ports a resync held back until their sockets' owners are found: port -> when first
        # seen; and the searches for them -> (whether the resync trusted the probe, the ports).
        self._held: dict[int, int] = {}
        self._resync_tickets: dict[int, tuple[bool, set[int]]] = {}
        self._resync_hints: set[int] = set()
        self._resync_ports: set[int] = set()  # the ports whose records asked for it, for the log
        self._resync_trust = True
        self._batch_netns: dict | None = None
        self._batch_names: dict | None = None
        self._lossy_until = 0.0
        self._settle_handle: asyncio.TimerHandle | None = None
        # skaddr -> ts of closes for sockets not in the table, oldest first (bounded).
        self._orphan_closes: dict[int, int] = {}
        self._poll_handle: asyncio.TimerHandle | None = None
        self._poll_cost: float | None = None  # smoothed CPU seconds of one poll
        self._lost_seen = 0

    # -- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Choose and start the backend, then take the start-up snapshot."""
        self._loop = asyncio.get_running_loop()
        self._diag = sockdiag.DiagSocket()
        self._owners = Owners(self._loop, self.table, self._diag.raw, self._publish, self._on_found)
        if self.requested_backend in ("auto", "ebpf"):
            try:
                # A compile (in a helper process, or by bcc in this one for perf buffers) takes
                # ~0.3-0.5 s, a cached probe ~3 ms: keep the loop free meanwhile.
                probe = await self._loop.run_in_executor(None, Probe, self.ebpf_buffer, self.ebpf_pages)
                try:
                    # Attach before the snapshot: a socket changing in between is then seen
                    # by both, and the uncertainty rules reconcile the two views.
                    probe.start(self._loop, self._on_records)
                except Exception as exc:
                    probe.stop()
                    raise ProbeUnavailable(f"could not attach the probe's buffers: {exc}") from exc
                self._probe = probe
            except ProbeUnavailable as exc:
                if self.requested_backend == "ebpf":
                    self.stop()
                    raise
                self.backend_reason = f"eBPF unavailable: {exc}"
        if self._probe is not None:
            self.backend = "ebpf"
            self.backend_reason = f"probe on sock:inet_sock_set_state, {self._probe.buffer} buffer of {self._probe.pages} pages"
            await self._owners.find({row[3] for row in self._diag.raw()})
            self._resync("start-up")
        else:
            self.backend = "sockdiag"
            if not self.backend_reason:
                self.backend_reason = f"requested; snapshot every {self.interval * 1000:.0f} ms or more"
            await self._owners.find({row[3] for row in self._diag.raw()})
            self._poll()
        log.info("port monitor started", extra={"backend": self.backend, "reason": self.backend_reason})

    def stop(self) -> None:
        if self._probe is not None:
            self._probe.stop()
            self._probe = None
        for handle in (self._poll_handle, self._settle_handle):
            if handle is not None:
                handle.cancel()
        self._poll_handle = self._settle_handle = None
        if self._owners is not None:
            self._owners.close()
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
        """An ``open`` event for every port open now, as a new subscriber should first see:
        the first recorded owner still alive, else what the table records. Nothing here reads
        more than a pid's own /proc entries: a recorded owner that died unnoticed (too many
        to watch) is handled as an exit, whose search runs off the loop and whose finding
        every subscriber gets as an ``update``."""
        events = []
        unnoticed: Exited = {}
        for port in self.table.ports():
            event = self.table.open_event(port)
            assert event is not None  # a port of the table's
            listeners = self.table.listeners(port)
            pid = next((l.pid for l in listeners if procs.is_alive(l.pid)), None)
            if pid is None:
                pid = event.pid
                if self._owners is not None:
                    unnoticed.update((l.pid, None) for l in listeners if l.pid is not None and self._owners.unnoticed(l.pid))
            events.append(dataclasses.replace(event, pid=pid, process=procs.process_name(pid)))
        if unnoticed:
            assert self._owners is not None  # it found them
            self._owners.exited(unnoticed)
        return events

    def catch_up(self) -> None:
        """Take in what the probe holds now, before its reader's turn comes: a client asking
        about a port it just saw listen is answered as the kernel stands, not as the loop has
        got to (both can be ready in one wake-up, the client's frame read first). sock_diag
        answers at its next snapshot."""
        if self._probe is not None:
            self._probe.drain()

    @property
    def settled(self) -> bool:
        """No owner search running or waiting to run, and no port held back for one."""
        return not self._held and (self._owners is None or self._owners.idle)

    def ports(self) -> list[PortState]:
        """The ports open now, each with its owner and every living holder's pid."""
        raw = self._diag.raw() if self._diag is not None else []
        recorded = {port: [l.pid for l in self.table.listeners(port)] for port in self.table.ports()}
        return procs.port_states(raw, self.table.ports(), recorded)

    async def wait_closed(self, port: int, timeout: float) -> bool:
        """True once ``port`` is not open (at once if it is not), False after ``timeout``."""
        if port not in self.table:
            return True
        assert self._loop is not None  # a port is open only once started
        waiter = self._loop.create_future()
        self._closed_waiters.setdefault(port, []).append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
            return True
        except TimeoutError:
            return port not in self.table
        finally:
            waiters = self._closed_waiters.get(port, [])
            if waiter in waiters:
                waiters.remove(waiter)

    def set_ignored(self, ignored: Iterable[int]) -> None:
        """Change the ignored ports; ports newly ignored close, ports no longer ignored open."""
        now = time.monotonic_ns()
        for event in self.table.set_ignored(ignored):
            self._publish(event, now, "config")
        self._resync("ignored ports changed")

    # -- internals ----------------------------------------------------------------------

    def _publish(self, event: PortEvent, seen_ns: int, backend: str) -> None:
        """Tell every subscriber, the event stamped with when and how it was seen."""
        if event.type != CLOSE:
            names = self._batch_names
            if names is None:
                name = procs.process_name(event.pid)
            elif event.pid in names:
                name = names[event.pid]
            else:
                name = names[event.pid] = procs.process_name(event.pid)
            event = dataclasses.replace(event, process=name, seen_ns=seen_ns, backend=backend)
        else:
            for waiter in self._closed_waiters.pop(event.port, ()):
                if not waiter.done():
                    waiter.set_result(True)
            event = PortEvent(CLOSE, event.port, seen_ns=seen_ns, backend=backend)  # all a close holds
        for subscriber in list(self._subscribers):
            try:
                subscriber(event)
            except Exception:
                log.exception("port event subscriber failed", extra={"port": event.port})

    def _on_records(self, records) -> None:
        assert self._loop is not None  # records come once started
        self.stats["records"] += len(records)
        # A burst comes from few processes: read each one's namespace and name once a batch.
        self._batch_netns, self._batch_names = {}, {}
        try:
            for record in records:
                if record.is_listen:
                    self._on_listen(record)
                elif record.is_close:
                    self._on_close(record)
        except Exception:
            # A record we could not apply must not leave the table wrong: start again from
            # the kernel's truth.
            log.exception("probe record not applied")
            self._schedule_resync("record not applied", trust_probe=False)
        finally:
            self._batch_netns = self._batch_names = None
        self._watch()
        lost = self._probe.lost if self._probe else 0
        now = self._loop.time()
        if lost != self._lost_seen:
            self.stats["lost"] = lost
            log.warning("probe records lost", extra={"lost": lost - self._lost_seen, "total": lost})
            self._lost_seen = lost
            self._schedule_resync("probe records lost", trust_probe=False)
            self._lossy_until = now + 1.0
        if now < self._lossy_until:
            # Around losses, records can also arrive late or never (perf buffers report a
            # loss only when the CPU's buffer next has room): once the burst has been quiet
            # for a moment, compare with the kernel's truth once more.
            if self._settle_handle is not None:
                self._settle_handle.cancel()
            self._settle_handle = self._loop.call_later(_SETTLE, self._settle)

    def _on_listen(self, record) -> None:
        port, table = record.port, self.table
        if port == 0:
            # listen() without bind(): the port is chosen, and the socket hashed, just after
            # the tracepoint fires; give the listener's syscall a moment to finish.
            self._schedule_resync("auto-bound listener", record.tgid, delay=0.002)
            return
        task = (record.tgid, record.tid)
        assert self._batch_netns is not None  # set for the batch by _on_records
        netns = self._batch_netns.get(task)
        if netns is None:
            netns = self._batch_netns[task] = procs.net_namespace(record.tgid, record.tid)
        if netns is None:
            self._schedule_resync("listener exited before its namespace was read", delay=0.002, port=port)
            return
        if netns != self._netns:
            return
        key = (SKADDR, record.skaddr)
        if self._orphan_closes.get(record.skaddr, -1) > record.ts_ns:
            return  # its close came first (perf buffers of two CPUs): it is long gone
        # A live address names one socket: one the table knows re-listened after its close was lost.
        _known, event = table.remove(key)
        if event is not None:
            self._publish(event, record.ts_ns, "ebpf")
        if table.is_uncertain(port):
            self._schedule_resync("listen on a port known from a snapshot", record.tgid, port=port)
        event = table.add(Listener(key, port, record.family, record.address, record.tgid))
        if event is not None:
            self._publish(event, record.ts_ns, "ebpf")

    def _on_close(self, record) -> None:
        known, event = self.table.remove((SKADDR, record.skaddr))
        if event is not None:
            self._publish(event, record.ts_ns, "ebpf")
        if not known:
            self._orphan_closes[record.skaddr] = record.ts_ns
            if len(self._orphan_closes) > _ORPHAN_CLOSES:
                del self._orphan_closes[next(iter(self._orphan_closes))]
        if self.table.is_uncertain(record.port) or (not known and record.port in self.table):
            # Either a socket known only by inode closed, or one of another namespace did.
            self._schedule_resync("close on a port not fully known to the probe", port=record.port)

    def _settle(self) -> None:
        self._settle_handle = None
        self._schedule_resync("settling after lost records", trust_probe=False)

    def _schedule_resync(
        self,
        reason: str,
        hint_pid: int | None = None,
        trust_probe: bool = True,
        delay: float = 0.0,
        port: int | None = None,
    ) -> None:
        if hint_pid:
            self._resync_hints.add(hint_pid)
        if port is not None:
            self._resync_ports.add(port)
        self._resync_trust = self._resync_trust and trust_probe
        if not self._resync_pending and self._loop is not None:
            self._resync_pending = True
            self._loop.call_later(delay, self._resync, reason)

    def _resync(self, reason: str) -> None:
        """Diff the table against a fresh snapshot and publish what differs.

        Sockets whose owner is not known yet are looked for among the processes the records
        named (their descriptors only, on the loop: an auto-bound listener opens at once),
        else off the loop. Their ports are held back meanwhile, as the table has them (if at
        all), and the resync that follows the search, on a snapshot of its own, applies
        them: a port opens with its owner, and nothing is applied from a stale snapshot."""
        if self._diag is None:
            return
        self._resync_pending = False
        hints, self._resync_hints = self._resync_hints, set()
        ports, self._resync_ports = self._resync_ports, set()
        trust, self._resync_trust = self._resync_trust, True
        started = time.perf_counter()
        seen_ns = time.monotonic_ns()
        raw = self._diag.raw()
        owners = self._owners
        assert owners is not None  # made with _diag, in start
        unknown = owners.unknown({entry[3] for entry in raw}, hints)
        held: set[int] = set()
        if unknown:
            sockets = collections.Counter(port for _family, port, _address, _inode in raw)
            # Only where an owner can change what the sync does: not for a port whose probe
            # sockets the sync keeps (a port the records opened, not lost since).
            held = {
                port
                for _family, port, _address, inode in raw
                if inode in unknown and not self.table.keeps(port, sockets[port], trust)
            }
        snapshot = [l for l in sockdiag.to_listeners(raw, owners.by_inode) if l.port not in held]
        if held:
            snapshot += [listener for port in held for listener in self.table.listeners(port)]
            wanted = {inode for _family, port, _address, inode in raw if port in held and inode in unknown}
            ticket = owners.request(wanted, hints)
            was_trust, was_held = self._resync_tickets.get(ticket, (True, set()))
            self._resync_tickets[ticket] = (was_trust and trust, was_held | held)
        events = self.table.sync(snapshot, trust_probe=trust)
        self.stats["polls" if reason == "poll" else "resyncs"] += 1
        self.stats["snapshot_ms"] = (time.perf_counter() - started) * 1000
        if self.backend == "ebpf" or events:
            extra = {"reason": reason, "events": len(events), "sockets": len(raw)}
            if ports:
                extra["ports"] = sorted(ports)[:16]  # bounded: a burst can name thousands
            if held:
                extra["held"] = len(held)
            log.debug("resync", extra=extra)
        for event in events:
            self._publish(event, self._held.get(event.port, seen_ns), "sockdiag")
        self._held = {port: self._held.get(port, seen_ns) for port in held}  # when they were first seen
        self._watch()

    def _poll(self) -> None:
        # The loop's own CPU: an owner search in the executor is not the snapshot's cost.
        started = time.thread_time()
        try:
            self._resync("poll")
        except Exception:
            log.exception("sock_diag snapshot failed")
        finally:
            spent = time.thread_time() - started
            # Stretch the interval so snapshots stay within the CPU budget, by their smoothed
            # cost. The first poll, start-up's, is not a steady cost.
            if self._poll_cost is None:
                self._poll_cost = 0.0
            else:
                self._poll_cost = spent if not self._poll_cost else 0.7 * self._poll_cost + 0.3 * spent
            delay = max(self.interval, self._poll_cost / self.cpu_budget - self._poll_cost)
            if self._diag is not None:
                assert self._loop is not None  # set with _diag, in start
                self._poll_handle = self._loop.call_later(delay, self._poll)

    # -- owners ---------------------------------------------------------------------------

    def _watch(self) -> None:
        if self._owners is not None:
            self._owners.watch()

    def _on_found(self, ticket: int) -> None:
        """An owner search's findings are applied: the ports held back for it, on a fresh
        snapshot."""
        waited = self._resync_tickets.pop(ticket, None)
        if waited is not None:
            trust, held = waited
            self._resync_ports |= held  # for the log: what the resync is for
            self._schedule_resync("owners found", trust_probe=trust)
