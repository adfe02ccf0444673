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

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from aether.ports.events import CLOSE, OPEN, PortEvent
from aether.ports.kill import KillRefused, kill_port
from aether.server.protocol import Message, ProtocolError, encode

if TYPE_CHECKING:
    from aether.server.app import WorkspaceServer
    from aether.server.session import Session

log = logging.getLogger("aether.server")


def _now_ms() -> int:
    return round(time.time() * 1000)


class PortsChannel:
    name = "ports"

    def __init__(self, server: "WorkspaceServer"):
        self.server = server
        self._kills: set[asyncio.Task] = set()
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
        hub.broadcast(encode(self.message(event)))
        self.server.metrics.port_event(event, time.monotonic_ns(), bool(hub.sessions))

    def on_open(self, session: "Session") -> None:
        for event in self.server.monitor.open_events():
            session.send(self.message(event))

    def on_close(self, session: "Session") -> None:
        pass

    def handle(self, session: "Session", message: Message) -> None:
        if message.type == "kill":
            task = asyncio.ensure_future(self._kill(session, message))
            self._kills.add(task)
            task.add_done_callback(self._kills.discard)
        elif message.type == "visibility":
            self._set_visibility(session, message)

    def _set_visibility(self, session: "Session", message: Message) -> None:
        """Persist, apply, then tell every client; a state dir that cannot be written
        changes nothing."""
        port, value = message.body["port"], message.body["visibility"]
        visibility = self.server.visibility
        public = visibility.changed(port, value)
        try:
            self.server.state.save_config({"preview_public_ports": sorted(public)})
        except OSError as exc:
            raise ProtocolError("unavailable", f"could not persist the change: {exc.strerror}", self.name, message.id) from None
        visibility.public = public
        log.info("preview visibility", extra={"port": port, "visibility": value})
        changed = {"channel": self.name, "type": "visibility", "port": port, "visibility": value}
        self.server.hub.announce(changed, session, message.id)

    def _refuse(self, session: "Session", message: Message, code: str, text: str) -> None:
        error = ProtocolError(code, text, self.name, message.id).to_message()
        session.send({**error, "port": message.body["port"]})

    async def _kill(self, session: "Session", message: Message) -> None:
        port = message.body["port"]
        monitor = self.server.monitor
        if port == self.server.settings.port:
            self._refuse(session, message, "forbidden", f"port {port} is the server's own")
            return
        if port in self._in_flight:
            self._refuse(session, message, "busy", f"port {port} is being killed already")
            return
        self._in_flight.add(port)
        try:
            result = await kill_port(
                port,
                grace=self.server.settings.kill_grace,
                ignored=monitor.table.ignored,
                wait_closed=monitor.wait_closed,
            )
        except KillRefused as exc:
            self._refuse(session, message, exc.code, exc.message)
            return
        except Exception:
            log.exception("kill failed", extra={"port": port})
            self._refuse(session, message, "internal", f"the server failed to kill port {port}")
            return
        finally:
            self._in_flight.discard(port)
        log.info("killed port", extra={"port": port, "pids": result.pids, "escalated": result.escalated})
        if not result.closed:
            self._refuse(session, message, "still_open", f"port {port} is still open after SIGKILL")
