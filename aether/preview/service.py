"""The preview proxy of one workspace: what the connections share."""

from __future__ import annotations

import asyncio
import logging

from aether.ports.events import CLOSE, PortEvent
from aether.preview.gate import Gate
from aether.preview.local import LocalAddresses
from aether.preview.proxy import HEADER_TIMEOUT, ClientConnection
from aether.preview.upstream import Pool
from aether.preview.visibility import Visibility

log = logging.getLogger("aether.preview")


class PreviewProxy:
    """The preview proxy of one workspace: the gate, the upstream pool and the connections."""

    def __init__(self, settings, monitor, visibility: Visibility, named, metrics):
        self.loop = asyncio.get_running_loop()
        # Counted by the connections, read at scrape time (aether.server.metrics).
        self.responses = metrics.preview_responses
        self.upstream_latency = metrics.preview_upstream_latency
        self.local = LocalAddresses(self.loop, self._on_addresses)
        self.gate = Gate(settings, monitor, visibility, named, self.local.addresses)
        self.pool = Pool(self.loop)
        self.timeout = settings.preview_timeout
        self.tick = min(HEADER_TIMEOUT, self.timeout)
        self.connections: set[ClientConnection] = set()
        self._tasks: set[asyncio.Task] = set()
        self._failures: dict[int, tuple[float, int]] = {}  # port -> (last logged, suppressed since)
        self._unsubscribe = monitor.subscribe(self._on_event)
        try:
            self.local.start()
        except OSError as exc:
            log.error("local addresses unavailable; previews reach loopback only", extra={"error": str(exc)})

    def protocol(self) -> ClientConnection:
        return ClientConnection(self)

    def log_failure(self, port: int, why: str) -> None:
        """One line per port per second at most: an app crashing under load must not flood
        the log; the lines left out are counted in the next one."""
        now = self.loop.time()
        last, suppressed = self._failures.get(port, (0.0, 0))
        if now - last < 1.0:
            self._failures[port] = (last, suppressed + 1)
            return
        self._failures[port] = (now, 0)
        log.info("preview upstream failed", extra={"port": port, "why": why, "suppressed": suppressed})

    def spawn(self, coro) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_event(self, event: PortEvent) -> None:
        self.gate.forget(event.port)
        if event.type == CLOSE:
            self.pool.close_port(event.port)

    def _on_addresses(self, added: set[str], removed: set[str]) -> None:
        """This host's addresses changed: choose upstreams again, and drop every connection to
        an address it no longer has (its packets would now leave for whoever has it)."""
        self.gate.forget_all()
        if not removed:
            return
        self.pool.close_addresses(removed)
        for conn in list(self.connections):
            up = conn.tunnel or (conn.active.upstream if conn.active is not None else None)
            if up is not None and up.key[0] in removed:
                conn.abort()

    def close_all(self) -> None:
        self._unsubscribe()
        self.local.close()
        for conn in list(self.connections):
            conn.abort()
        for task in list(self._tasks):
            task.cancel()
        self.pool.close_all()
