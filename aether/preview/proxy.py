"""Browser connections to previews: requests parsed with ``httptools``, decided by the
:class:`~aether.preview.gate.Gate`, and streamed to an :class:`~aether.preview.upstream.Upstream`.

Bodies are never gathered: each piece goes on as it arrives, and a side whose socket buffer
fills pauses reading on the other (asyncio's flow control), so a 1 GB upload or download
holds a few hundred KB at most. Requests on one connection are answered in order; a
pipelined request waits (with at most ``MAX_BUFFERED`` bytes of it held) for the one before,
and bytes that do not parse after whole requests get their 400 once those are answered.

One timer per connection enforces, lazily, three limits: ``header_timeout`` to send a request
head, ``keepalive_timeout`` between requests, and ``timeout`` without a byte either way while
a request is in flight (504 before the response starts, a reset after). A WebSocket tunnel
has no timer: the app and the browser ping each other.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import time
from typing import TYPE_CHECKING, Optional

import httptools

from aether.preview import headers as h
from aether.preview import pages
from aether.preview.gate import Answer, Forward
from aether.preview.upstream import Upstream

if TYPE_CHECKING:
    from aether.preview.service import PreviewProxy

log = logging.getLogger("aether.preview")

MAX_HEAD_BYTES = 64 << 10
#: Request bytes held while the upstream connection is made or a pipelined request waits.
MAX_BUFFERED = 1 << 20
#: Requests parsed ahead of their turn (HTTP pipelining) before reading pauses.
MAX_QUEUED = 16
#: ``open`` can reach a client a few microseconds before the socket accepts: a refused
#: connect to an open port is retried this long.
CONNECT_RETRY_SECONDS = 0.5
CONNECT_TIMEOUT = 5.0
HEADER_TIMEOUT = 10.0
KEEPALIVE_TIMEOUT = 75.0


_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


class Cycle:
    """One request and its response."""

    __slots__ = ("forward", "answer", "head_only", "upgrade", "close", "http10", "has_body", "chunked",
                 "body", "buffered", "complete", "upstream", "retried", "idempotent", "started")

    def __init__(self, method: bytes, upgrade: bool, close: bool, http10: bool, has_body: bool, chunked: bool):
        self.forward: Optional[Forward] = None
        self.answer: Optional[Answer] = None
        self.head_only = method == b"HEAD"
        self.idempotent = method in _IDEMPOTENT
        self.upgrade = upgrade
        self.close = close
        self.http10 = http10
        self.has_body = has_body
        self.chunked = chunked
        self.body: list[bytes] = []
        self.buffered = 0
        self.complete = False
        self.upstream: Optional[Upstream] = None
        self.retried = False
        self.started = 0.0  # when the proxy began on a forwarded request (time.monotonic)


class ClientConnection(asyncio.Protocol):
    """One browser connection to a preview host; see the module docstring."""

    def __init__(self, proxy: "PreviewProxy"):
        self.proxy = proxy
        self.loop = proxy.loop
        self.transport: Optional[asyncio.Transport] = None
        self.client_ip = ""
        self.parser = httptools.HttpRequestParser(self)
        self.queue: collections.deque[Cycle] = collections.deque()
        self.parsing: Optional[Cycle] = None
        self.active: Optional[Cycle] = None
        self.tunnel: Optional[Upstream] = None
        self.upgrading = False
        self.finished = False  # a request closing the connection was read: ignore the rest
        self.early: list[bytes] = []  # tunnel bytes sent before the app's 101
        self.close_after = False
        self.refusal: Optional[tuple[int, bytes]] = None  # (status, response) due after the requests ahead
        self.closed = False
        self.writing_paused = False
        self._paused: set[str] = set()
        self.in_head = True
        self.head_bytes = 0
        self.head_start = self.last_activity = self.loop.time()
        self._timer: Optional[asyncio.TimerHandle] = None
        self._url = b""
        self._headers: h.Headers = []

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else "unknown"
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.proxy.connections.add(self)
        self._arm(self.last_activity + HEADER_TIMEOUT)

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.transport.write(data)
            return
        self.last_activity = now = self.loop.time()
        if self.upgrading:
            self.early.append(data)
            return
        if self.finished:
            return
        if self.in_head:
            if not self.head_bytes:
                self.head_start = now
            end = data.find(b"\r\n\r\n")
            self.head_bytes += len(data) if end < 0 else end + 4
            if self.head_bytes > MAX_HEAD_BYTES:
                self._refuse(431, "Request head too large", f"The request head exceeds {MAX_HEAD_BYTES >> 10} KiB.")
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.upgrading = True
            self.pause_reading("upgrade")  # until the app answers: nothing more is held
            rest = data[exc.args[0]:]
            if rest:
                self.early.append(rest)
        except httptools.HttpParserCallbackError:
            log.exception("preview request handling failed")
            self._refuse(500, "Proxy error", "The preview proxy failed on this request.")
        except httptools.HttpParserError as exc:
            if self.finished:
                return  # bytes after a last request: not ours to read
            self._refuse(400, "Bad request", f"Malformed request: {pages.escape(str(exc))}.")

    def eof_received(self) -> bool:
        # Browsers never half-close: an end of input is a client that went away, and its
        # request (and upstream connection) go with it.
        return False

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.closed = True
        self.proxy.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.tunnel is not None:
            self.tunnel.client = None
            self.tunnel.closed = True
            self.tunnel.transport.close()
            return
        cycle = self.active
        if cycle is not None and cycle.upstream is not None:
            up, cycle.upstream = cycle.upstream, None
            up.client = None
            up.abort()  # the browser went away: so does the request

    def pause_writing(self) -> None:
        self.writing_paused = True
        up = self.tunnel or (self.active.upstream if self.active is not None else None)
        if up is not None and not up.closed:
            up.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        up = self.tunnel or (self.active.upstream if self.active is not None else None)
        if up is not None and not up.closed:
            up.transport.resume_reading()

    def pause_reading(self, reason: str) -> None:
        if not self._paused and not self.closed:
            self.transport.pause_reading()
        self._paused.add(reason)

    def resume_reading(self, reason: str) -> None:
        if reason in self._paused:
            self._paused.discard(reason)
            if not self._paused and not self.closed:
                self.transport.resume_reading()

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.closed or self.finished:
            return
        self.in_head = False
        self.head_bytes = 0
        parser = self.parser
        method = parser.get_method()
        http10 = parser.get_http_version() != "1.1"
        upgrade = parser.should_upgrade()
        decision = self.proxy.gate.decide(method, self._url, self._headers, self.client_ip, upgrade)
        close = http10 or not parser.should_keep_alive()
        cycle = Cycle(method, upgrade, close, http10, decision.has_body, decision.chunked)
        if isinstance(decision, Answer):
            cycle.answer = decision
            cycle.close = cycle.close or decision.close
            if decision.status >= 500 and decision.status != 502:
                log.info("preview answered", extra={"status": decision.status, "client": self.client_ip})
        else:
            cycle.forward = decision
        self.parsing = cycle
        self.queue.append(cycle)
        if self.active is None:
            self._start(cycle)
        elif len(self.queue) > MAX_QUEUED:
            self.pause_reading("pipeline")

    def on_body(self, body: bytes) -> None:
        cycle = self.parsing
        if cycle is not None and cycle.forward is not None:
            self._send_body(cycle, h.chunk(body) if cycle.chunked else body)

    def on_message_complete(self) -> None:
        cycle, self.parsing = self.parsing, None
        self.in_head = True
        if cycle is None:
            return
        cycle.complete = True
        if cycle.forward is not None and cycle.chunked:
            self._send_body(cycle, h.LAST_CHUNK)
        if cycle.close and not cycle.upgrade:
            self.finished = True
            self.pause_reading("closing")  # nothing after a last request is read

    def _send_body(self, cycle: Cycle, data: bytes) -> None:
        if cycle.upstream is not None:
            cycle.upstream.transport.write(data)
            return
        cycle.body.append(data)
        cycle.buffered += len(data)
        if cycle.buffered > MAX_BUFFERED:
            self.pause_reading("buffer")

    # -- request cycles ---------------------------------------------------------------------

    def _start(self, cycle: Cycle) -> None:
        if self.closed:
            return
        self.active = cycle
        if cycle.answer is not None:
            self.proxy.responses[cycle.answer.status] += 1
            self.transport.write(cycle.answer.response)
            # Answered from its head: a body still to come would be read as the next request.
            self._done(cycle, cycle.close or (cycle.has_body and not cycle.complete))
            return
        forward = cycle.forward
        # Not loop.time(): uvloop's counts whole milliseconds.
        cycle.started = time.monotonic()
        key = (forward.address, forward.port)
        if not self._local(cycle, key):
            return
        up = self.proxy.pool.take(key)
        if up is not None:
            self._attach(cycle, up)
        else:
            self.proxy.spawn(self._connect(cycle, key))

    async def _connect(self, cycle: Cycle, key: tuple[str, int]) -> None:
        address, port = key
        table = self.proxy.gate.monitor.table
        started = self.loop.time()
        while True:
            if not self._local(cycle, key):
                return
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    _, up = await self.loop.create_connection(lambda: Upstream(self.proxy.pool, key), address, port)
                break
            except ConnectionRefusedError:
                self.proxy.gate.forget(port)
                if self.closed:
                    return
                if port in table and self.loop.time() - started < CONNECT_RETRY_SECONDS:
                    await asyncio.sleep(0.005)
                    continue
                if port not in table:
                    self._fail(cycle, 502, "Nothing is listening yet", pages.not_listening_text(port), pages.REFRESH_SECONDS)
                else:
                    self._fail(cycle, 502, "Connection refused", f"Port {port} refused the connection.")
                return
            except TimeoutError:
                self._fail(cycle, 504, "Upstream timeout", f"Port {port} did not accept a connection within {CONNECT_TIMEOUT:g} s.")
                return
            except OSError as exc:
                self._fail(cycle, 502, "Bad gateway", f"Could not connect to port {port}: {pages.escape(exc.strerror or str(exc))}.")
                return
        if self.closed or self.active is not cycle or not self._local(cycle, key):
            up.closed = True
            up.transport.close()
            return
        self._attach(cycle, up)

    def _local(self, cycle: Cycle, key: tuple[str, int]) -> bool:
        """Whether ``key``'s address is still this host's, checked again as the connection is
        taken or made: an address removed since the decision may belong to another host now."""
        if self.proxy.gate.is_local(key[0]):
            return True
        self.proxy.log_failure(key[1], f"{key[0]} is not an address of this host")
        self._fail(cycle, 502, pages.NOT_LOCAL_TITLE, pages.not_local_text(key[1], key[0]))
        return False

    def _attach(self, cycle: Cycle, up: Upstream) -> None:
        cycle.upstream = up
        up.bind(self)
        data = cycle.forward.head
        if cycle.body:
            data += b"".join(cycle.body)
            cycle.body = []
            cycle.buffered = 0
        up.transport.write(data)
        if self.writing_paused:
            up.transport.pause_reading()
        self.resume_reading("buffer")

    def cycle_done(self, up: Upstream) -> None:
        """The response from ``up`` is complete (called by the upstream)."""
        cycle = self.active
        if cycle is None or cycle.upstream is not up:
            return
        cycle.upstream = None
        self._done(cycle, self.close_after or cycle.close or not cycle.complete)

    def upstream_failed(self, up: Upstream, why: str) -> None:
        cycle = self.active
        if cycle is None or cycle.upstream is not up:
            return
        cycle.upstream = None
        if up.started:
            self.transport.abort()  # the response is cut: the browser must not take it as whole
            return
        if up.reused and cycle.idempotent and not cycle.has_body and not cycle.retried:
            # A pooled connection the app closed just as it was reused: try a fresh one.
            cycle.retried = True
            self.proxy.spawn(self._connect(cycle, up.key))
            return
        self.proxy.log_failure(up.key[1], why)
        self._fail(cycle, 502, "Bad gateway", pages.escape(why[0].upper() + why[1:]) + ".")

    def _fail(self, cycle: Cycle, status: int, title: str, text: str, refresh: Optional[int] = None) -> None:
        if self.closed or self.active is not cycle:
            return
        close = cycle.close or not cycle.complete or cycle.upgrade
        self.proxy.responses[status] += 1
        body = pages.render(status, title, text, refresh)
        self.transport.write(pages.response(status, body, close=close, head_only=cycle.head_only))
        self._done(cycle, close)

    def _done(self, cycle: Cycle, close: bool) -> None:
        self.active = None
        self.resume_reading("upstream")  # that upstream's full buffer is no longer in the way
        if self.queue and self.queue[0] is cycle:
            self.queue.popleft()
        if close:
            self.closed = True
            self.transport.close()
            return
        if self.queue:
            self._start(self.queue[0])
        elif self.refusal is not None:
            self._send_refusal(*self.refusal)
            return
        if len(self.queue) <= MAX_QUEUED:
            self.resume_reading("pipeline")

    def _refuse(self, status: int, title: str, text: str) -> None:
        """Answer a request that cannot be parsed or is too large, and close: at once, or after
        the requests read before it when they are whole (pipelined ahead of it); a request
        whose body was being read when the bytes went wrong cannot be finished, and the
        connection is reset."""
        if self.closed:
            return  # answered already (a request refused from its head, its body unread)
        if self.parsing is not None:
            self.abort()
            return
        response = pages.response(status, pages.render(status, title, text), close=True)
        self.finished = True
        if self.active is not None:
            self.refusal = (status, response)
            self.pause_reading("closing")
            return
        self._send_refusal(status, response)

    def _send_refusal(self, status: int, response: bytes) -> None:
        self.proxy.responses[status] += 1
        self.transport.write(response)
        self.closed = True
        self.transport.close()

    def abort(self) -> None:
        cycle = self.active
        if cycle is not None and cycle.upstream is not None:
            cycle.upstream.client = None
            cycle.upstream.abort()
        self.closed = True
        self.transport.abort()

    def start_tunnel(self, up: Upstream) -> None:
        """The app switched protocols: from now on bytes pass unchanged both ways."""
        self.tunnel = up
        self.active = None
        self.queue.clear()
        if self.early:
            up.transport.write(b"".join(self.early))
            self.early = []
        self.resume_reading("upgrade")

    # -- the one timer ----------------------------------------------------------------------

    def _arm(self, due: float) -> None:
        # Whatever the state, look again within the shortest limit: a state change (a request
        # starting, a head beginning) then never waits on a longer one.
        self._timer = self.loop.call_at(min(due, self.loop.time() + self.proxy.tick), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed or self.tunnel is not None:
            return
        now = self.loop.time()
        if self.active is not None:
            due = self.last_activity + self.proxy.timeout
        elif self.in_head and self.head_bytes:
            due = self.head_start + HEADER_TIMEOUT
        else:
            due = self.last_activity + KEEPALIVE_TIMEOUT
        if now < due:
            self._arm(due)
            return
        cycle = self.active
        if cycle is None:
            if self.in_head and self.head_bytes:
                self._refuse(408, "Request timeout", f"The request head did not arrive within {HEADER_TIMEOUT:g} s.")
            else:
                self.closed = True
                self.transport.close()
            return
        up = cycle.upstream
        if up is not None and up.started:
            self.abort()
            return
        if up is not None:
            cycle.upstream = None
            up.client = None
            up.abort()
        port = cycle.forward.port if cycle.forward is not None else 0
        self._fail(cycle, 504, "Upstream timeout", f"Port {port} did not answer within {self.proxy.timeout:g} s.")
        if not self.closed and self._timer is None:
            self._arm(self.last_activity + KEEPALIVE_TIMEOUT)
