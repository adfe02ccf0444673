"""The ``ports`` channel (seed 000): ``open``/``update``/``close`` to every client, ``kill``,
and ``visibility`` (private or public preview) per port.

An ``update`` is an open port's whole state again, as an ``open`` gives it, once its owner,
process or addresses changed. Each ``open`` says since when the port listens (``opened``, Unix
ms), as this server saw it; a port already listening when the server started has the start
time and ``seenAtStart``.

Each event is encoded once and the same text is written to every session. A new session first
gets an ``open`` for every port already listening; both happen synchronously with the event
loop's other work, so no event can fall between the snapshot and the live stream.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from aether.ports.events import CLOSE, OPEN, PortEvent
from aether.ports.kill import kill_port
from aether.errors import Refusal
from aether.protocol import Message
from aether.server.dispatch import Jobs

if TYPE_CHECKING:
    from aether.server.app import WorkspaceServer
    from aether.server.client import Client

log = logging.getLogger("aether.server")


def _now_ms() -> int:
    return round(time.time() * 1000)


class PortsChannel:
    name = "ports"

    def __init__(self, server: "WorkspaceServer"):
        self.server = server
        self._jobs = Jobs()
        self._in_flight: set[int] = set()
        started = _now_ms()
        #: port -> (when it opened, whether it was open already when the server started)
        self._opened: dict[int, tuple[int, bool]] = {port: (started, True) for port in server.monitor.table.ports()}
        server.monitor.subscribe(self._on_event)

    def message(self, event: PortEvent) -> dict:
        message = event.to_message()
        if event.type != CLOSE:
            message["url"] = self.server.settings.preview_url_for(event.port)
            message["visibility"] = self.server.visibility.of(event.port)
            message["opened"], message["seenAtStart"] = self._opened.get(event.port) or (_now_ms(), False)
        return message

    def _on_event(self, event: PortEvent) -> None:
        if event.type == OPEN:
            self._opened[event.port] = (_now_ms(), False)
        elif event.type == CLOSE:
            self._opened.pop(event.port, None)
        hub = self.server.hub
        hub.broadcast(self.message(event))
        self.server.metrics.port_event(event, time.monotonic_ns(), bool(hub.clients))

    def on_open(self, client: "Client") -> None:
        for event in self.server.monitor.open_events():
            client.send(self.message(event))

    def on_close(self, client: "Client") -> None:
        pass

    def handle(self, client: "Client", message: Message) -> None:
        if message.type == "kill":
            self._jobs.start(self._kill(client, message), message, client.send)
        elif message.type == "visibility":
            self._set_visibility(client, message)

    def _set_visibility(self, client: "Client", message: Message) -> None:
        """Persist, apply, then tell every client; a state dir that cannot be written
        changes nothing."""
        port, value = message.body["port"], message.body["visibility"]
        visibility = self.server.visibility
        public = visibility.changed(port, value)
        try:
            self.server.state.save_config({"preview_public_ports": sorted(public)})
        except OSError as exc:
            raise Refusal("unavailable", f"could not persist the change: {exc.strerror}") from None
        visibility.public = public
        log.info("preview visibility", extra={"port": port, "visibility": value})
        changed = {"channel": self.name, "type": "visibility", "port": port, "visibility": value}
        self.server.hub.announce(changed, client, message.id)

    async def _kill(self, client: "Client", message: Message) -> None:
        port = message.body["port"]
        monitor = self.server.monitor
        if port == self.server.settings.port:
            raise Refusal("forbidden", f"port {port} is the server's own")
        if port in self._in_flight:
            raise Refusal("busy", f"port {port} is being killed already")
        self._in_flight.add(port)
        try:
            result = await kill_port(
                port,
                grace=self.server.settings.kill_grace,
                ignored=monitor.table.ignored,
                wait_closed=monitor.wait_closed,
            )
        finally:
            self._in_flight.discard(port)
        log.info("killed port", extra={"port": port, "pids": result.pids, "escalated": result.escalated})
        if not result.closed:
            raise Refusal("still_open", f"port {port} is still open after SIGKILL")
