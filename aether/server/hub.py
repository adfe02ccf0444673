"""The connected sessions: broadcast, keepalive, and closing them all at shutdown.

Keepalive is ours, not Tornado's: Tornado 6.5+ clamps ``websocket_ping_timeout`` to the ping
interval, and seed 001 wants pings every 45 s with a 120 s pong timeout. One timer serves every
session, set for the next ping or the earliest pong deadline, whichever comes first; none runs
while no client is connected.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from aether.wire import text_frame, with_id

if TYPE_CHECKING:
    from aether.server.session import Session

log = logging.getLogger("aether.server")


class Hub:
    def __init__(self, ping_interval: float, pong_timeout: float):
        self.sessions: set["Session"] = set()
        self.ping_interval = ping_interval
        self.pong_timeout = pong_timeout
        self._last_ping = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._closed = asyncio.Event()

    def add(self, session: "Session") -> None:
        self.sessions.add(session)
        self._closed.clear()
        if self._timer is None:
            self._last_ping = time.monotonic()
            self._schedule()

    def remove(self, session: "Session") -> None:
        self.sessions.discard(session)
        if not self.sessions:
            self._closed.set()
            # No session, no timer: an idle server with no clients is never woken.
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def announce(self, message: dict, sender=None, id=None) -> None:
        """``message`` to every session; ``sender`` gets it with its request's ``id``."""
        for session in list(self.sessions):
            session.send(with_id(message, id) if session is sender else message)

    def broadcast(self, text: str) -> None:
        frame = text_frame(text)
        for session in list(self.sessions):
            session.send_frame(frame)

    def _schedule(self) -> None:
        # Wake at whichever comes first: the next ping, or the earliest pong deadline.
        now = time.monotonic()
        due = self._last_ping + self.ping_interval
        if self.sessions:
            due = min(due, min(s.last_pong for s in self.sessions) + self.pong_timeout)
        self._timer = asyncio.get_running_loop().call_later(max(0.001, due - now), self._tick)

    def _tick(self) -> None:
        now = time.monotonic()
        ping = now >= self._last_ping + self.ping_interval - 1e-3
        if ping:
            self._last_ping = now
        for session in list(self.sessions):
            if now - session.last_pong > self.pong_timeout:
                session.abort(f"no pong for {self.pong_timeout:g} s")
            elif ping:
                session.send_ping()
        self._timer = None
        if self.sessions:
            self._schedule()

    async def close_all(self, code: int, reason: str, timeout: float) -> None:
        """Close every session with ``code``; wait up to ``timeout`` for them to finish."""
        for session in list(self.sessions):
            session.close(code, reason)
        if self.sessions:
            try:
                await asyncio.wait_for(self._closed.wait(), timeout)
            except asyncio.TimeoutError:
                for session in list(self.sessions):
                    session.abort("did not close in time at shutdown")
