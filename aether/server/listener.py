"""The server's listening socket, shared by the API and the previews.

Each accepted connection is classified by the ``Host`` of its first request, read with
``MSG_PEEK`` so that nothing is consumed: a preview host, or a path preview (``/proxy/{port}/``,
``/absproxy/{port}/``, :mod:`aether.preview.paths`), goes to the preview proxy (an
asyncio protocol built for throughput), anything else to Tornado's ``HTTPServer`` exactly as
if Tornado had accepted it. Browsers keep one connection per origin, and a preview host is
its own origin, so a connection keeps its kind; a request that changes kind on the way gets
421 from either side.

The connection cap counts everything: connections being classified, the proxy's, and every
stream handed to Tornado until it closes, upgraded WebSockets included (Tornado's own count
forgets those, and counts an upgrading one twice for a moment).

A second cap holds each client address to ``per_address`` connections that have not yet shown
who they are, so one address cannot take every slot with connections that never send a
request (or never finish one). A connection counts from its accept until the first response
on it is complete (:func:`answered`: a WebSocket's 101 comes after its token was checked), or,
for a preview host, until its first request head is whole: the proxy then answers it or
forwards it at once (a public port's preview takes no credentials, so there is nothing else to
wait for). An IPv6 client is counted by its /64, which one host is usually given whole; the
trusted TLS fronts (``exempt``) carry every browser's connections and are not counted.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Protocol

import tornado.httpserver
import tornado.iostream
import tornado.netutil

from aether.preview.paths import is_path_preview

log = logging.getLogger("aether.server")

#: A first request head longer than this goes to Tornado, which refuses it.
MAX_PEEK_BYTES = 64 << 10
#: Time allowed for the first request's Host line (a preview's whole head) to arrive.
CLASSIFY_TIMEOUT = 10.0
_UPPER = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def address_key(ip: str) -> str | bytes:
    """What the per-address cap counts ``ip`` under: an IPv4 address (IPv4-mapped ones too),
    or the first 64 bits of an IPv6 one."""
    if ":" not in ip:
        return ip
    if ip.startswith("::ffff:") and "." in ip:
        return ip[7:]
    try:
        return socket.inet_pton(socket.AF_INET6, ip.partition("%")[0])[:8]
    except OSError:
        return ip


def head_complete(data: bytes) -> bool:
    """Whether the request head at the start of ``data`` has ended (or is past the peek)."""
    return b"\n\r\n" in data or b"\n\n" in data or len(data) >= MAX_PEEK_BYTES


def answered(request) -> None:
    """A response to ``request`` is complete: its connection stops counting as unauthenticated."""
    stream = getattr(request.connection, "stream", None)
    if isinstance(stream, _CountedStream):
        stream.answered()


class _Unauthenticated:
    """One connection's place in its address's count of unauthenticated ones, given back once."""

    __slots__ = ("counts", "key")

    def __init__(self, counts: dict, key):
        self.counts = counts
        self.key = key

    def release(self) -> None:
        key, self.key = self.key, None
        if key is not None:
            left = self.counts[key] - 1
            if left:
                self.counts[key] = left
            else:
                del self.counts[key]


def first_host(data: bytes) -> tuple[bool, bytes | None]:
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


def first_target(data: bytes) -> bytes:
    """The request target of the first request line in ``data`` (empty if there is none)."""
    parts = data.split(b"\n", 1)[0].split(b" ")
    return parts[1] if len(parts) == 3 else b""


class _CountedStream(tornado.iostream.IOStream):
    """An IOStream that tells the listener when it closes, however that happens, and gives its
    place among its address's unauthenticated connections back on its first answer."""

    def __init__(self, sock: socket.socket, on_close: Callable[[], None], pending: _Unauthenticated):
        super().__init__(sock)
        self._on_close: Callable[[], None] | None = on_close
        self.answered = pending.release

    def close(self, exc_info=False) -> None:
        self.answered()
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close()
        super().close(exc_info)


class Previews(Protocol):
    """What takes the preview hosts' connections (:class:`aether.preview.service.PreviewProxy`)."""

    def is_preview(self, host: bytes) -> bool:
        """Whether a connection whose first request names ``host`` is a preview's."""
        ...

    def protocol(self) -> asyncio.Protocol:
        """The protocol for one such connection, which gets its bytes from the start."""
        ...

    def connection_count(self) -> int:
        """Its connections open now (they count towards the listener's cap)."""
        ...


class SharedListener:
    """Accepts, classifies and hands over connections; see the module docstring."""

    def __init__(
        self,
        http: tornado.httpserver.HTTPServer,
        previews: Previews,
        limit: int,
        per_address: int = 0,
        exempt: Callable[[str], bool] | None = None,
    ):
        self.http = http
        self.previews = previews
        self.limit = limit
        self.per_address = per_address  # 0: no cap
        self.exempt = exempt
        #: address key -> connections from it not yet authenticated (see the module docstring)
        self.unauthenticated: dict = {}
        self._refusals = (0.0, 0)  # (when one was last logged, refused since)
        self.api_streams = 0
        self.loop = asyncio.get_running_loop()
        self._sockets: list[socket.socket] = []
        self._stop_accepting: list[Callable[[], None]] = []
        self._classifying: dict[socket.socket, tuple[asyncio.TimerHandle, _Unauthenticated]] = {}
        self._handovers: set[asyncio.Task] = set()

    def listen(self, port: int, host: str) -> None:
        self._sockets = tornado.netutil.bind_sockets(port, host)
        for sock in self._sockets:
            self._stop_accepting.append(tornado.netutil.add_accept_handler(sock, self._accepted))

    def connections(self) -> int:
        return self.api_streams + len(self._classifying) + self.previews.connection_count()

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
        pending = self._count(address[0])
        if pending is None:
            conn.close()
            return
        conn.setblocking(False)
        deadline = self.loop.call_later(CLASSIFY_TIMEOUT, self._drop, conn)
        self._classifying[conn] = (deadline, pending)
        self.loop.add_reader(conn.fileno(), self._classify, conn, address, 0)

    def _count(self, ip: str) -> _Unauthenticated | None:
        """The new connection's place in its address's count; None when that is full."""
        if not self.per_address or (self.exempt is not None and self.exempt(ip)):
            return _Unauthenticated(self.unauthenticated, None)
        key = address_key(ip)
        held = self.unauthenticated.get(key, 0)
        if held >= self.per_address:
            self._refused(ip)
            return None
        self.unauthenticated[key] = held + 1
        return _Unauthenticated(self.unauthenticated, key)

    def _refused(self, ip: str) -> None:
        # One line a second at most: the refusals are what a flood is made of.
        last, since = self._refusals
        now = self.loop.time()
        if now - last < 1.0:
            self._refusals = (last, since + 1)
            return
        self._refusals = (now, 0)
        log.warning(
            "connection refused: too many unauthenticated from one address",
            extra={"client": ip, "cap": self.per_address, "suppressed": since},
        )

    def _drop(self, conn: socket.socket) -> None:
        held = self._classifying.pop(conn, None)
        if held is not None:
            handle, pending = held
            handle.cancel()
            pending.release()
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
        preview = decided and host is not None and (self.previews.is_preview(host) or is_path_preview(first_target(data)))
        self.loop.remove_reader(conn.fileno())
        if not decided or (preview and not head_complete(data)):
            # Peeked bytes stay readable, so the socket would wake us at once: look again a
            # little later. Heads nearly always arrive whole, so this path is rare.
            self.loop.call_later(min(0.001 * 2**attempt, 0.1), self._reclassify, conn, address, attempt + 1)
            return
        handle, pending = self._classifying.pop(conn)
        handle.cancel()
        if preview:
            pending.release()
            task = self.loop.create_task(self._to_preview(conn))
            self._handovers.add(task)
            task.add_done_callback(self._handovers.discard)
        else:
            self.api_streams += 1
            self.http.handle_stream(_CountedStream(conn, self._api_stream_closed, pending), address)

    def _api_stream_closed(self) -> None:
        self.api_streams -= 1

    def _reclassify(self, conn: socket.socket, address, attempt: int) -> None:
        if conn in self._classifying:
            self.loop.add_reader(conn.fileno(), self._classify, conn, address, attempt)

    async def _to_preview(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self.previews.protocol, sock=conn)
        except OSError:
            conn.close()
