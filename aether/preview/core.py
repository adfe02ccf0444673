"""The preview proxy without its owner: the browser connections, the pool of app connections,
and the owner's three parts (:mod:`.owner`) they use. Nothing here knows where it runs.

Its owner builds one :class:`Proxy` with a decider, a connector and a sink, gives
:meth:`Proxy.protocol` to whatever accepts browser connections, and tells it what changes
below it: an upstream gone (:meth:`Proxy.abort_upstreams`, and the :attr:`Proxy.pool`'s
``close_*``), the tunnels of one tag to end (:meth:`Proxy.close_tunnels`), shutdown
(:meth:`Proxy.close_all`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Hashable

from aether.preview.owner import Connector, Decider, Forward, Sink
from aether.preview.proxy import HEADER_TIMEOUT, ClientConnection
from aether.preview.upstream import Pool


class Proxy:
    """Browser connections and their upstreams, for one owner; see the module docstring."""

    def __init__(self, decider: Decider, connector: Connector, sink: Sink, timeout: float):
        """``timeout``: seconds without a byte either way while a request is in flight (504
        before its response starts, a reset after)."""
        self.loop = asyncio.get_running_loop()
        self.decider = decider
        self.connector = connector
        self.sink = sink
        self.pool = Pool(self.loop)
        self.timeout = timeout
        self.tick = min(HEADER_TIMEOUT, timeout)
        self.connections: set[ClientConnection] = set()
        self._tunnels: dict[Hashable, set[ClientConnection]] = {}  # Forward.tag -> its tunnels
        self._tasks: set[asyncio.Task] = set()

    def protocol(self) -> ClientConnection:
        """A new browser connection (an ``asyncio`` protocol factory)."""
        return ClientConnection(self)

    def spawn(self, coro: Coroutine) -> asyncio.Task:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- what the connections call ----------------------------------------------------------

    def opened(self, conn: ClientConnection) -> None:
        self.connections.add(conn)

    def tunneled(self, conn: ClientConnection, forward: Forward) -> None:
        """``conn`` became a tunnel to ``forward``'s upstream."""
        if forward.tag is not None:
            self._tunnels.setdefault(forward.tag, set()).add(conn)

    def untunneled(self, conn: ClientConnection, forward: Forward) -> None:
        """``conn``, a tunnel to ``forward``'s upstream, closed."""
        tunnels = self._tunnels.get(forward.tag)
        if tunnels is not None:
            tunnels.discard(conn)
            if not tunnels:
                del self._tunnels[forward.tag]

    def closed(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)

    # -- what the owner calls ---------------------------------------------------------------

    def tunnels(self, tag: Hashable) -> list[ClientConnection]:
        """The open WebSocket (or other upgraded) tunnels whose Forward carried ``tag``."""
        return list(self._tunnels.get(tag, ()))

    def close_tunnels(self, tag: Hashable) -> int:
        """Reset every tunnel whose Forward carried ``tag`` (what it reaches is no longer the
        browser's to use); how many there were."""
        tunnels = self._tunnels.pop(tag, ())
        for conn in list(tunnels):
            conn.abort()
        return len(tunnels)

    def abort_upstreams(self, reaches: Callable[[Forward], bool]) -> None:
        """Reset every browser connection whose upstream (a request's, or a tunnel's) was
        chosen by a Forward that ``reaches`` accepts."""
        for conn in list(self.connections):
            forward = conn.upstream_forward()
            if forward is not None and reaches(forward):
                conn.abort()

    def close_all(self) -> None:
        """At shutdown: every connection and task ends."""
        for conn in list(self.connections):
            conn.abort()
        for task in list(self._tasks):
            task.cancel()
        self.pool.close_all()
