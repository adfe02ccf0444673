"""The ``ports`` channel (seed 000): ``open``/``close`` to every client, and ``kill``.

Each event is encoded once and the same text is written to every session. A new session first
gets an ``open`` for every port already listening; both happen synchronously with the event
loop's other work, so no event can fall between the snapshot and the live stream.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from aether.ports.events import OPEN, PortEvent
from aether.ports.kill import KillRefused, kill_port
from aether.server.protocol import Message, ProtocolError, encode

if TYPE_CHECKING:
    from aether.server.app import WorkspaceServer
    from aether.server.session import Session

log = logging.getLogger("aether.server")


class PortsChannel:
    name = "ports"

    def __init__(self, server: "WorkspaceServer"):
        self.server = server
        self._kills: set[asyncio.Task] = set()
        server.monitor.subscribe(self._on_event)

    def message(self, event: PortEvent) -> dict:
        message = event.to_message()
        if event.type == OPEN:
            message["url"] = self.server.settings.preview_url_for(event.port)
        return message

    def _on_event(self, event: PortEvent) -> None:
        self.server.hub.broadcast(encode(self.message(event)))

    def on_open(self, session: "Session") -> None:
        for event in self.server.monitor.open_events():
            session.send(self.message(event))

    def handle(self, session: "Session", message: Message) -> None:
        if message.type == "kill":
            task = asyncio.ensure_future(self._kill(session, message))
            self._kills.add(task)
            task.add_done_callback(self._kills.discard)

    async def _kill(self, session: "Session", message: Message) -> None:
        port = message.body["port"]
        monitor = self.server.monitor
        try:
            result = await kill_port(
                port,
                grace=self.server.settings.kill_grace,
                ignored=monitor.table.ignored,
                wait_closed=monitor.wait_closed,
            )
        except KillRefused as exc:
            error = ProtocolError(exc.code, exc.message, self.name, message.id).to_message()
            session.send({**error, "port": port})
            return
        log.info("killed port", extra={"port": port, "pids": result.pids, "escalated": result.escalated})
        if not result.closed:
            error = ProtocolError("still_open", f"port {port} is still open after SIGKILL", self.name, message.id)
            session.send({**error.to_message(), "port": port})
