"""The server's listening socket, shared by the API and the previews.

Each accepted connection is classified by the ``Host`` of its first request, read with
``MSG_PEEK`` so that nothing is consumed: a preview host goes to the preview proxy (an
asyncio protocol built for throughput), anything else to Tornado's ``HTTPServer`` exactly as
if Tornado had accepted it. Browsers keep one connection per origin, and a preview host is
its own origin, so a connection keeps its kind; a request that changes kind on the way gets
421 from either side.

The connection cap counts everything: connections being classified, the proxy's, and every
stream handed to Tornado until it closes, upgraded WebSockets included (Tornado's own count
forgets those, and counts an upgrading one twice for a moment).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Callable, Optional

import tornado.httpserver
import tornado.iostream
import tornado.netutil

log = logging.getLogger("aether.server")

#: A first request head longer than this goes to Tornado, which refuses it.
MAX_PEEK_BYTES = 64 << 10
#: Time allowed for the first request's Host line to arrive.
CLASSIFY_TIMEOUT = 10.0
_UPPER = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def first_host(data: bytes) -> tuple[bool, Optional[bytes]]:
    """(decided, Host value) from the start of a connection's bytes.

    Undecided while neither the Host line nor the end of the head has arrived; decided with
    None for something that is not an HTTP/1 request, or a head without Host.
    """
    if data and data[0] not in _UPPER:
        return True, None
    lines = data.split(b"\n")
    complete = lines[:-1]  # the last piece may be a partial line
    if not complete:
        return len(data) >= MAX_PEEK_BYTES, None
    if not complete[0].rstrip(b"\r").endswith((b" HTTP/1.1", b" HTTP/1.0")):
        return True, None
    for line in complete[1:]:
        line = line.rstrip(b"\r")
        if not line:
            return True, None  # end of the head, no Host
        if line[:5].lower() == b"host:":
            return True, line[5:].strip(b" \t")
    return len(data) >= MAX_PEEK_BYTES, None


class _CountedStream(tornado.iostream.IOStream):
    """An IOStream that tells the listener when it closes, however that happens."""

    def __init__(self, sock: socket.socket, on_close: Callable[[], None]):
        super().__init__(sock)
        self._on_close: Optional[Callable[[], None]] = on_close

    def close(self, exc_info=False) -> None:
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close()
        super().close(exc_info)


class SharedListener:
    """Accepts, classifies and hands over connections; see the module docstring."""

    def __init__(
        self,
        http: tornado.httpserver.HTTPServer,
        preview_factory: Callable[[], asyncio.Protocol],
        is_preview: Callable[[bytes], bool],
        limit: int,
        preview_connections: Callable[[], int],
    ):
        self.http = http
        self.preview_factory = preview_factory
        self.is_preview = is_preview
        self.limit = limit
        self.preview_connections = preview_connections
        self.api_streams = 0
        self.loop = asyncio.get_running_loop()
        self._sockets: list[socket.socket] = []
        self._stop_accepting: list[Callable[[], None]] = []
        self._classifying: dict[socket.socket, asyncio.TimerHandle] = {}
        self._handovers: set[asyncio.Task] = set()

    def listen(self, port: int, host: str) -> None:
        self._sockets = tornado.netutil.bind_sockets(port, host)
        for sock in self._sockets:
            self._stop_accepting.append(tornado.netutil.add_accept_handler(sock, self._accepted))

    def connections(self) -> int:
        return self.api_streams + len(self._classifying) + self.preview_connections()

    def stop(self) -> None:
        for stop in self._stop_accepting:
            stop()
        for sock in self._sockets:
            sock.close()
        for conn in list(self._classifying):
            self._drop(conn)
        self._stop_accepting, self._sockets = [], []

    # -- per connection ---------------------------------------------------------------------

    def _accepted(self, conn: socket.socket, address) -> None:
        if self.connections() >= self.limit:
            conn.close()
            return
        conn.setblocking(False)
        deadline = self.loop.call_later(CLASSIFY_TIMEOUT, self._drop, conn)
        self._classifying[conn] = deadline
        self.loop.add_reader(conn.fileno(), self._classify, conn, address, 0)

    def _drop(self, conn: socket.socket) -> None:
        handle = self._classifying.pop(conn, None)
        if handle is not None:
            handle.cancel()
            try:
                self.loop.remove_reader(conn.fileno())
            except (ValueError, OSError):
                pass
            conn.close()

    def _classify(self, conn: socket.socket, address, attempt: int) -> None:
        try:
            data = conn.recv(MAX_PEEK_BYTES, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not data:
            self._drop(conn)
            return
        decided, host = first_host(data)
        self.loop.remove_reader(conn.fileno())
        if not decided:
            # Peeked bytes stay readable, so the socket would wake us at once: look again a
            # little later. Heads nearly always arrive whole, so this path is rare.
            self.loop.call_later(min(0.001 * 2**attempt, 0.1), self._reclassify, conn, address, attempt + 1)
            return
        self._classifying.pop(conn).cancel()
        if host is not None and self.is_preview(host):
            task = self.loop.create_task(self._to_preview(conn))
            self._handovers.add(task)
            task.add_done_callback(self._handovers.discard)
        else:
            self.api_streams += 1
            self.http.handle_stream(_CountedStream(conn, self._api_stream_closed), address)

    def _api_stream_closed(self) -> None:
        self.api_streams -= 1

    def _reclassify(self, conn: socket.socket, address, attempt: int) -> None:
        if conn in self._classifying:
            self.loop.add_reader(conn.fileno(), self._classify, conn, address, attempt)

    async def _to_preview(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self.preview_factory, sock=conn)
        except OSError:
            conn.close()
