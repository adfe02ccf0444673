"""The connected clients: broadcast, keepalive, and closing them all at shutdown.

Keepalive is ours, not Tornado's: Tornado 6.5+ clamps ``websocket_ping_timeout`` to the ping
interval, and the protocol wants pings every 45 s with a 120 s pong timeout. One timer serves
every client, set for the next ping or the earliest pong deadline, whichever comes first; none
runs while no client is connected.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from aether.wire import frame, with_id

if TYPE_CHECKING:
    from aether.server.client import Client

log = logging.getLogger("aether.server")


class Hub:
    def __init__(self, ping_interval: float, pong_timeout: float):
        self.clients: set[Client] = set()
        self.ping_interval = ping_interval
        self.pong_timeout = pong_timeout
        self._last_ping = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._closed = asyncio.Event()

    def add(self, client: Client) -> None:
        self.clients.add(client)
        self._closed.clear()
        if self._timer is None:
            self._last_ping = time.monotonic()
            self._schedule()

    def remove(self, client: Client) -> None:
        self.clients.discard(client)
        if not self.clients:
            self._closed.set()
            # No client, no timer: an idle server with no clients is never woken.
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def announce(self, message: dict, sender=None, id=None) -> None:
        """``message`` to every client; ``sender`` gets it with its request's ``id``."""
        built = frame(message)
        for client in list(self.clients):
            client.send(frame(with_id(message, id)) if client is sender and id is not None else built)

    def broadcast(self, message: dict) -> None:
        """``message`` to every client, encoded once."""
        built = frame(message)
        for client in list(self.clients):
            client.send(built)

    def _schedule(self) -> None:
        # Wake at whichever comes first: the next ping, or the earliest pong deadline.
        now = time.monotonic()
        due = self._last_ping + self.ping_interval
        if self.clients:
            due = min(due, min(c.last_pong for c in self.clients) + self.pong_timeout)
        self._timer = asyncio.get_running_loop().call_later(max(0.001, due - now), self._tick)

    def _tick(self) -> None:
        now = time.monotonic()
        ping = now >= self._last_ping + self.ping_interval - 1e-3
        if ping:
            self._last_ping = now
        for client in list(self.clients):
            if now - client.last_pong > self.pong_timeout:
                client.abort(f"no pong for {self.pong_timeout:g} s")
            elif ping:
                client.send_ping()
        self._timer = None
        if self.clients:
            self._schedule()

    async def close_all(self, code: int, reason: str, timeout: float) -> None:
        """Close every client with ``code``; wait up to ``timeout`` for them to finish."""
        for client in list(self.clients):
            client.close(code, reason)
        if self.clients:
            try:
                await asyncio.wait_for(self._closed.wait(), timeout)
            except TimeoutError:
                for client in list(self.clients):
                    client.abort("did not close in time at shutdown")
