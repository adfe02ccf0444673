"""The ``ports`` channel (the wire form of the monitor's events, docs/protocol.md):
``open``/``update``/``close`` to every client, ``kill``, and ``visibility`` (private or public
preview) per port.

An ``update`` is an open port's whole state again, as an ``open`` gives it, once its owner,
process or addresses changed. Each ``open`` says since when the port listens (``opened``, Unix
ms), as this server saw it; a port already listening when the server started has the start
time and ``seenAtStart``, and, when its owner is known, ``started``: when that process
started (Unix ms), a lower bound of the opening that a restart of this server does not lose
(read here for such a port until the facts' own read of its owner has it).

Each ``open`` and ``update`` also carries what :class:`~aether.ports.facts.PortFacts` knows of
the port then (protocol, command line, working directory, attributes); what it learns later is
an ``update``, and a port's first HTTP answer or TLS handshake is a ``ready``. The rules'
visibility is a port's initial one, as it opens.

Each event is encoded once and the same frame is written to every client. A new client first
gets an ``open`` for every port already listening; both happen synchronously with the event
loop's other work, so no event can fall between the snapshot and the live stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import TYPE_CHECKING, Protocol

from aether.errors import Refusal
from aether.ports import procs
from aether.ports.events import CLOSE, OPEN, PortEvent
from aether.ports.facts import PortFacts
from aether.ports.kill import kill_port
from aether.preview.visibility import Visibility
from aether.protocol import Message
from aether.server.channels import Audience, Channel, SaveConfig
from aether.server.dispatch import Jobs

if TYPE_CHECKING:
    from aether.server.client import Client

log = logging.getLogger("aether.server")


class Monitor(Protocol):
    """What the channel uses of the port monitor."""

    def open_events(self) -> list[PortEvent]: ...

    def subscribe(self, subscriber: Callable[[PortEvent], None]) -> Callable[[], None]: ...

    def wait_closed(self, port: int, timeout: float) -> Awaitable[bool]: ...

    def catch_up(self) -> None:
        """Take in the port events the kernel has given and the loop has not read yet."""


class OpenPorts(Protocol):
    """What the channel reads of the monitor's table: the ports open now, the ports ignored."""

    @property
    def ignored(self) -> Collection[int]: ...

    def ports(self) -> Iterable[int]: ...


def _now_ms() -> int:
    return round(time.time() * 1000)


class PortsChannel(Channel):
    """``own_port`` is the server's (never killed); ``sent(event, now_ns, anyone)`` counts an
    event broadcast (to ``anyone`` connected)."""

    name = "ports"

    def __init__(
        self,
        monitor: Monitor,
        table: OpenPorts,
        clients: Audience,
        visibility: Visibility,
        preview_url: Callable[[int], str],
        save_config: SaveConfig,
        own_port: int,
        kill_grace: float,
        sent: Callable[[PortEvent, int, bool], None],
        facts: PortFacts | None = None,
    ):
        self.monitor, self.table, self.clients, self.visibility = monitor, table, clients, visibility
        self.preview_url, self.save_config, self.sent = preview_url, save_config, sent
        self.own_port, self.kill_grace = own_port, kill_grace
        self.facts = facts
        self.handlers = {"kill": self._kill, "visibility": self._set_visibility, "protocol": self._set_protocol}
        self._jobs = Jobs()
        self._in_flight: set[int] = set()
        started = _now_ms()
        #: port -> (when it opened, whether it was open already when the server started)
        self._opened: dict[int, tuple[int, bool]] = {port: (started, True) for port in table.ports()}
        self._started_cache: dict[int | None, int | None] = {}
        monitor.subscribe(self._on_event)

    def message(self, event: PortEvent) -> dict:
        message = event.to_message()
        if event.type != CLOSE:
            message["url"] = self.preview_url(event.port)
            message["visibility"] = self.visibility.of(event.port)
            message["opened"], message["seenAtStart"] = self._opened.get(event.port) or (_now_ms(), False)
            if self.facts is not None:
                message.update(self.facts.fields(event.port, event.pid))
            if message["seenAtStart"] and message.get("started") is None:
                message["started"] = self._owner_started(event.pid)
        return message

    def _owner_started(self, pid: int | None) -> int | None:
        # Only for ports open before this server: never on a new port's path. Cached by pid.
        if pid not in self._started_cache:
            self._started_cache[pid] = procs.started_ms(pid)
        return self._started_cache[pid]

    def _on_event(self, event: PortEvent) -> None:
        if event.type == OPEN:
            self._opened[event.port] = (_now_ms(), False)
            if self.facts is not None:
                self.visibility.rule(event.port, self.facts.attributes(event.port).visibility)
        elif event.type == CLOSE:
            self._opened.pop(event.port, None)
            self.visibility.closed(event.port)
        self.clients.broadcast(self.message(event))
        self.sent(event, time.monotonic_ns(), bool(self.clients.clients))
        if self.facts is not None:
            self.facts.seen(event)  # after the event is sent: lookups never delay it

    def on_facts(self, event: PortEvent) -> None:
        """An ``update`` from what the facts found (a command line, a protocol, new rules)."""
        if event.port not in self._opened:
            return
        if self.facts is not None:
            self.visibility.rule(event.port, self.facts.attributes(event.port).visibility)
        self.clients.broadcast(self.message(event))

    def on_ready(self, port: int, protocol: str, ms: int) -> None:
        self.clients.broadcast({"channel": self.name, "type": "ready", "port": port, "protocol": protocol, "ms": ms})

    def on_open(self, client: Client) -> None:
        for event in self.monitor.open_events():
            client.send(self.message(event))

    def close(self) -> None:
        self._jobs.cancel()

    def _set_visibility(self, client: Client, message: Message) -> None:
        """Persist, apply, then tell every client; a state dir that cannot be written
        changes nothing."""
        port, value = message.body["port"], message.body["visibility"]
        public = self.visibility.changed(port, value)
        try:
            self.save_config({"preview_public_ports": sorted(public)})
        except OSError as exc:
            raise Refusal("unavailable", f"could not persist the change: {exc.strerror}") from None
        self.visibility.choose(port, value)
        log.info("preview visibility", extra={"port": port, "visibility": value})
        changed = {"channel": self.name, "type": "visibility", "port": port, "visibility": value}
        self.clients.announce(changed, client, message.id)

    def _set_protocol(self, client: Client, message: Message) -> None:
        """What an open port speaks, as a person says (``auto``: as found again), until it
        closes: the preview follows it at once, and every client gets ``protocol`` then the
        port's ``update``."""
        port, value = message.body["port"], message.body["protocol"]
        if self.facts is None:
            raise Refusal("unavailable", "this server does not look into ports")
        if port not in self._opened:
            self.monitor.catch_up()  # its open may be waiting behind this frame
        if port not in self._opened:
            raise Refusal("not_open", f"port {port} is not open")
        self.facts.choose(port, None if value == "auto" else value)
        log.info("port protocol chosen", extra={"port": port, "protocol": value})
        changed = {"channel": self.name, "type": "protocol", "port": port, "protocol": value}
        self.clients.announce(changed, client, message.id)

    def _kill(self, client: Client, message: Message) -> None:
        self._jobs.start(self._killing(message), message, client.send)

    async def _killing(self, message: Message) -> None:
        port = message.body["port"]
        if port == self.own_port:
            raise Refusal("forbidden", f"port {port} is the server's own")
        if port in self._in_flight:
            raise Refusal("busy", f"port {port} is being killed already")
        self._in_flight.add(port)
        try:
            result = await kill_port(
                port, grace=self.kill_grace, ignored=self.table.ignored, wait_closed=self.monitor.wait_closed
            )
        finally:
            self._in_flight.discard(port)
        log.info("killed port", extra={"port": port, "pids": result.pids, "escalated": result.escalated})
        if not result.closed:
            raise Refusal("still_open", f"port {port} is still open after SIGKILL")
