"""What a person needs to tell open ports apart, found off the event path: each port's
protocol and when it first answered (:mod:`.detect`), its process's command line and working
directory (:mod:`.who`), the container behind a Docker holder (:mod:`.containers`), and what
the attribute rules say of it (:mod:`aether.attributes`).

What a port speaks is, first to last: a person's choice (:meth:`PortFacts.choose`, until the
port closes), its registry entry's ``protocol`` (a lasting word about this one port, given by
name), an attribute rule's (often a range or a pattern, written for many ports), then what
detection found.

A port event is never held back for any of it: :meth:`PortFacts.seen` only queues the event,
and the lookups start :data:`SETTLE` seconds later, for the ports still open then. What a lookup finds later is
told by ``on_change(update)``, an ``update`` event holding the port's whole state again, and,
the first time a port answers HTTP or completes a TLS handshake, by ``on_ready(port,
protocol, ms)``: not while a person, the registry or an attribute rule says the port speaks ``tcp`` (it is
not previewed as HTTP then), and once no one says so any more. :meth:`PortFacts.fields` gives the extra fields of a port's ``open`` and
``update`` messages from what is known at that moment.

Command lines are read on the loop, a batch of ports a callback (``who`` is a few small reads
of /proc per process, 26 us; a thread would cost more in its hop and in contention for the
interpreter than the reads themselves), so a burst of a thousand opens never holds the loop
for more than a millisecond at a time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Iterable

from aether.attributes.rules import EMPTY, Attributes, Ruleset
from aether.ports import procs
from aether.ports.containers import Container, Containers, is_docker, proxy_target
from aether.ports.detect import HTTP, HTTPS, TCP, Detection, Detector
from aether.ports.events import CLOSE, OPEN, UPDATE, PortEvent
from aether.ports.who import Who, who

log = logging.getLogger("aether.ports")

#: Where a wildcard listener is looked at: its own family's loopback.
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1"}
#: Seconds a port is open before it is looked into. A listener that closes sooner (a test's
#: ephemeral server, a port a program tries and drops) is never connected to nor read; and the
#: work for a burst of opens starts after the burst instead of between its events. A look takes
#: 50 ms at least (its banner wait), so the protocol comes hardly later.
SETTLE = 0.01
#: Command lines read in one loop callback: 32 processes, under 1 ms (26 us each, bench/who.py).
WHO_BATCH = 32


def probe_host(addresses: Iterable[str]) -> str:
    """The address to look at a port on: loopback where it listens on loopback or on every
    address (IPv4 first, as most dev servers bind it), else the first address it is bound to."""
    addresses = list(addresses)
    for wanted in ("127.0.0.1", "0.0.0.0", "::1", "::"):
        if wanted in addresses:
            return _LOOPBACK.get(wanted, wanted)
    for address in addresses:
        if address.startswith("127."):
            return address
    return addresses[0] if addresses else "127.0.0.1"


@dataclasses.dataclass
class _Port:
    opened: float  # time.monotonic() of the open
    pid: int | None = None
    who: Who | None = None
    container: Container | None = None
    detection: Detection | None = None


#: Where ``sources`` says a protocol from the registry came from: the file, and the entry's key.
REGISTRY_FILE = "registry.db"


class PortFacts:
    """The facts of ``table``'s open ports (see the module docstring). ``rules()`` gives the
    attribute rules in force (they change when their files do: call :meth:`rules_changed`);
    ``registry(port)`` the protocol the port's registry entry sets and the entry's key, or None
    (call :meth:`rules_changed` when the registry changes too)."""

    def __init__(
        self,
        table,
        on_change: Callable[[PortEvent], None],
        on_ready: Callable[[int, str, int], None] | None = None,
        rules: Callable[[], Ruleset] = lambda: EMPTY,
        *,
        registry: Callable[[int], tuple[str, str] | None] = lambda port: None,
        detector: Detector | None = None,
        containers: Containers | None = None,
    ):
        self._loop: asyncio.AbstractEventLoop | None = None  # the running one, once there is work
        self._table = table
        self._on_change = on_change
        self._on_ready = on_ready
        self._rules = rules
        self._registry = registry
        self.detector = detector or Detector()
        self.detector.on_result = self._detected
        self.containers = containers or Containers()
        self._ports: dict[int, _Port] = {}
        self._queue: list[PortEvent] = []
        self._flush_pending = False
        self._lookups: dict[int, int] = {}  # port -> owner whose command line is to be read
        self._lookup_pending = False
        self._dirty: dict[int, bool] = {}  # ports to tell, in order: whether before their look
        self._ready: list[Detection] = []
        #: The ready of a port said to be ``tcp`` when it answered, told once nobody says so.
        self._withheld: dict[int, Detection] = {}
        self._naming: set[asyncio.Task] = set()  # containers being asked for
        self._tell_pending = False
        self._closed = False
        #: Attributes and registry protocol last told per port, so that a reload of the rules or
        #: the registry tells only the ports it changed.
        self._told: dict[int, tuple[Attributes, tuple[str, str] | None]] = {}
        #: A person's choice of protocol for a port (the ports channel's ``protocol``), over the
        #: registry's, the attributes' and detection's, until the port closes.
        self._chosen: dict[int, str] = {}
        now = time.monotonic()
        for port in table.ports():
            event = table.open_event(port)
            if event is not None:
                self._queue.append(dataclasses.replace(event, seen_ns=round(now * 1e9)))
        if self._queue:
            self._schedule()

    # -- reading ---------------------------------------------------------------------------

    def protocol_of(self, port: int) -> str | None:
        """``https``, ``http`` or ``tcp``: what a person, the registry or the attributes say the
        port speaks, else what detection found; None while the port is not open or not looked
        at yet."""
        chosen = self._chosen.get(port)
        if chosen is not None:
            return chosen
        state = self._ports.get(port)
        if state is None:
            return None
        said = self._said(port)[0]
        if said is not None:
            return said
        return state.detection.protocol if state.detection is not None else None

    def chosen_protocol(self, port: int) -> str | None:
        """What a person, the registry or an attribute rule says ``port`` speaks (``https``,
        ``http`` or ``tcp``), whatever detection found: None where none says. Known before the
        port is looked at, so the preview uses it without a look of its own."""
        chosen = self._chosen.get(port)
        if chosen is not None:
            return chosen
        if port not in self._ports and self._table.open_event(port) is None:
            return None
        return self._said(port)[0]

    def _said(self, port: int, attrs: Attributes | None = None) -> tuple[str | None, dict | None]:
        """The protocol the registry, else the attributes, set for ``port``, and where it came
        from (a ``sources`` entry); (None, None) where neither sets one."""
        entry = self._registry(port)
        if entry is not None:
            return entry[0], {"file": REGISTRY_FILE, "key": entry[1]}
        attrs = attrs if attrs is not None else self.attributes(port)
        origin = attrs.sources.get("protocol")
        return attrs.protocol, (origin.as_dict() if origin is not None else None)

    def attributes(self, port: int) -> Attributes:
        state = self._ports.get(port)
        argv = state.who.argv if state is not None and state.who is not None else None
        return self._rules().resolve(port, argv)

    def fields(self, port: int, pid: int | None = None) -> dict:
        """The extra fields of ``port``'s ``open`` or ``update`` message (naming ``pid``), as
        known now: a command line read for another owner is not shown for this one."""
        state = self._ports.get(port)
        attrs = self.attributes(port)
        found = state.who if state is not None else None
        if found is not None and pid is not None and found.pid != pid:
            found = None
        detection = state.detection if state is not None else None
        command = attrs.shown_command(found.command) if found is not None else None
        container = state.container if state is not None else None
        sources = attrs.as_dict().get("sources", {})
        said, origin = self._said(port, attrs)
        chosen = self._chosen.get(port)
        protocol = chosen or said or (detection.protocol if detection is not None else None)
        if chosen is not None or origin is None:
            sources.pop("protocol", None)  # a person's choice is no file's
        else:
            sources["protocol"] = origin
        ready = detection.ready if detection is not None and protocol != TCP else None
        return {
            "protocol": protocol,
            "ready": None if ready is None else round(ready * 1000),
            "command": command,
            "cwd": found.cwd if found is not None else None,
            "started": found.started_ms if found is not None else None,
            "container": container.to_json() if container is not None else None,
            "label": attrs.label,
            "onOpen": attrs.on_open,
            "sources": sources,
        }

    # -- what the monitor says -------------------------------------------------------------

    def seen(self, event: PortEvent) -> None:
        """A port event, after (or as) it is sent: queued, looked into once the loop is free."""
        if self._closed:
            return
        if event.type == CLOSE:
            self._chosen.pop(event.port, None)  # now: a choice for the port's next life is kept
        self._queue.append(event)
        self._schedule()

    def choose(self, port: int, protocol: str | None) -> None:
        """A person says what ``port`` speaks (None: what the attributes or detection say
        again), until it closes; an ``update`` tells every client."""
        if protocol is None:
            self._chosen.pop(port, None)
        else:
            self._chosen[port] = protocol
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if port in self._ports or self._table.open_event(port) is not None:
            # At once, even before the port's first look: that look's findings come in a later
            # update, under the choice.
            self._tell(port, before_look=True)
        self._release(port)

    def recheck(self, port: int) -> None:
        """Look at ``port``'s protocol again (a ``tcp`` port the proxy saw answer HTTP)."""
        state = self._ports.get(port)
        if state is not None:
            state.detection = None
            self.detector.recheck(port, probe_host(self._addresses(port)))

    def rules_changed(self) -> None:
        """The rules or the registry changed: every open port whose attributes or registry
        protocol changed gets an ``update``."""
        for port in list(self._ports):
            if self._telling(port) != self._told.get(port):
                self._tell(port)
                self._release(port)

    def _telling(self, port: int) -> tuple[Attributes, tuple[str, str] | None]:
        """What an update of ``port`` tells of its rules and its registry entry."""
        return self.attributes(port), self._registry(port)

    def close(self) -> None:
        self._closed = True
        self._queue.clear()
        self.detector.close()
        for task in self._naming:
            task.cancel()

    # -- internals -------------------------------------------------------------------------

    def _schedule(self) -> None:
        if not self._flush_pending:
            if self._loop is None:
                try:
                    self._loop = asyncio.get_running_loop()
                except RuntimeError:
                    return  # made outside a loop, with ports open: looked at with the next event
            self._flush_pending = True
            self._loop.call_later(SETTLE, self._flush)

    def _addresses(self, port: int) -> tuple[str, ...]:
        event = self._table.open_event(port)
        return event.addresses if event is not None else ()

    def _flush(self) -> None:
        self._flush_pending = False
        if self._closed:
            return
        events, self._queue = self._queue, []
        lookups: dict[int, int] = {}
        for event in events:
            port = event.port
            if event.type == CLOSE:
                self._ports.pop(port, None)
                self._told.pop(port, None)
                self._withheld.pop(port, None)
                self.detector.stop(port)
                lookups.pop(port, None)
                continue
            state = self._ports.get(port)
            if self._table.open_event(port) is None:
                continue  # closed since: its close is further on in the queue
            if event.type == OPEN or state is None:
                opened = event.seen_ns / 1e9 if event.seen_ns else time.monotonic()
                state = self._ports[port] = _Port(opened)
                self._told[port] = self._telling(port)
                self.detector.start(port, probe_host(event.addresses), opened)
            if event.pid != state.pid or state.who is None:
                state.pid = event.pid
                if event.pid is not None:
                    lookups[port] = event.pid
        if lookups:
            self._lookups.update(lookups)
            if not self._lookup_pending:
                self._lookup_pending = True
                assert self._loop is not None  # set by _schedule, which every callback here follows
                self._loop.call_soon(self._lookup)

    def _lookup(self) -> None:
        """Read the command lines of up to :data:`WHO_BATCH` ports, the rest in the next
        callback: on the loop, which costs less than a thread's hop and its contention for the
        interpreter (26 us a process, bench/who.py), and never in the event's own callback."""
        self._lookup_pending = False
        if self._closed:
            return
        assert self._loop is not None  # set by _schedule, which every callback here follows
        ports = list(itertools.islice(self._lookups, WHO_BATCH))
        for port in ports:
            pid = self._lookups.pop(port)
            state = self._ports.get(port)
            if state is None or state.pid != pid:
                continue  # closed, or another owner since: its own lookup answers
            state.who = who(pid)
            if state.who is None:
                continue
            if is_docker(procs.process_name(pid), state.who.argv):
                task = self._loop.create_task(self._container(port, state))
                self._naming.add(task)  # held: the loop keeps only a weak reference to a task
                task.add_done_callback(self._naming.discard)
            self._tell(port)
        if self._lookups:
            self._lookup_pending = True
            self._loop.call_soon(self._lookup)

    async def _container(self, port: int, state: _Port) -> None:
        target = proxy_target(state.who.argv or ()) if state.who is not None else None
        pid = state.pid
        container = await self.containers.awaited(
            port, target, state.opened, lambda: not self._closed and self._ports.get(port) is state and state.pid == pid
        )
        if container is not None and self._ports.get(port) is state:
            state.container = container
            self._tell(port)

    def _detected(self, detection: Detection) -> None:
        state = self._ports.get(detection.port)
        if state is None or self._closed:
            return
        state.detection = detection
        log.info(
            "port protocol",
            extra={"port": detection.port, "protocol": detection.protocol, "reason": detection.reason, **_ms(detection)},
        )
        self._tell(detection.port)
        if detection.protocol in (HTTP, HTTPS):
            self._ready.append(detection)

    def _release(self, port: int) -> None:
        """The withheld ready of ``port``, if no one says it speaks ``tcp`` any more: after its
        update, as any ready (a look since, or a close, made it stale: then nothing)."""
        detection = self._withheld.get(port)
        if detection is not None and self.protocol_of(port) != TCP:
            del self._withheld[port]
            state = self._ports.get(port)
            if state is not None and state.detection is detection:
                self._ready.append(detection)
                self._tell(port)

    def _tell(self, port: int, before_look: bool = False) -> None:
        """An ``update`` for ``port``, once the current callback is done: what several
        lookups found meanwhile is one update. ``before_look``: told though the port has not
        been looked at yet (a choice of protocol)."""
        self._dirty[port] = self._dirty.get(port, False) or before_look
        if not self._tell_pending:
            self._tell_pending = True
            assert self._loop is not None  # set by _schedule, which every callback here follows
            self._loop.call_soon(self._tell_all)

    def _tell_all(self) -> None:
        self._tell_pending = False
        dirty, self._dirty = self._dirty, {}
        ready, self._ready = self._ready, []
        if self._closed:
            return
        for port, before_look in dirty.items():
            event = self._table.open_event(port)
            if event is None or (port not in self._ports and not before_look):
                continue
            self._told[port] = self._telling(port)
            update = dataclasses.replace(event, type=UPDATE, process=procs.process_name(event.pid), seen_ns=time.monotonic_ns())
            try:
                self._on_change(update)
            except Exception:
                log.exception("port facts subscriber failed", extra={"port": port})
        for detection in ready:  # after the update that holds the protocol
            state = self._ports.get(detection.port)
            if state is None or state.detection is not detection or self._on_ready is None:
                continue
            protocol = self.protocol_of(detection.port) or detection.protocol
            if protocol == TCP:
                # Said to speak tcp, it is not previewed as HTTP: ready once no one says so.
                self._withheld[detection.port] = detection
                continue
            try:
                self._on_ready(detection.port, protocol, round(detection.elapsed * 1000))
            except Exception:
                log.exception("port facts subscriber failed", extra={"port": detection.port})


def _ms(detection: Detection) -> dict:
    return {"ms": round(detection.elapsed * 1000)}
