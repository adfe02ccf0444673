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

What to do with a request, how to reach its upstream and what to count are the owner's
(:mod:`.owner`), reached through the connection's :class:`~.core.Proxy`; the upstream side is
talked to through methods only (see :mod:`.upstream`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import httptools

from aether.preview import headers as h
from aether.preview import pages
from aether.preview.owner import Answer, Forward, Unreachable
from aether.preview.upstream import Upstream

if TYPE_CHECKING:
    from aether.preview.core import Proxy

log = logging.getLogger("aether.preview")

MAX_HEAD_BYTES = 64 << 10
#: Request bytes held while the upstream connection is made or a pipelined request waits.
MAX_BUFFERED = 1 << 20
#: Requests parsed ahead of their turn (HTTP pipelining) before reading pauses.
MAX_QUEUED = 16
HEADER_TIMEOUT = 10.0
KEEPALIVE_TIMEOUT = 75.0


_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


class Cycle:
    """One request and its response. Its upstream reads the request's fields (``head_only``,
    ``upgrade``, ``close``, ``http10``), fixed when the head is parsed; only the browser's side
    writes any."""

    __slots__ = (
        "forward",
        "answer",
        "head_only",
        "upgrade",
        "close",
        "http10",
        "has_body",
        "chunked",
        "body",
        "buffered",
        "complete",
        "upstream",
        "pooled",
        "retried",
        "responded",
        "idempotent",
        "started",
    )

    def __init__(self, method: bytes, upgrade: bool, close: bool, http10: bool, has_body: bool, chunked: bool):
        self.forward: Forward | None = None
        self.answer: Answer | None = None
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
        self.upstream: Upstream | None = None
        self.pooled = False  # its upstream was taken from the pool
        self.retried = False
        self.responded = False  # the app's response head went to the browser
        self.started = 0.0  # when the proxy began on a forwarded request (time.monotonic)


class ClientConnection(asyncio.Protocol):
    """One browser connection to a preview host; see the module docstring."""

    #: Response bytes (or, in a tunnel, the app's bytes) for the browser, called by the
    #: upstream: the transport's own ``write``, bound once as the connection is made.
    send: Callable[[bytes], None]
    #: Set as the connection is made, before anything else here is called.
    transport: asyncio.Transport

    def __init__(self, proxy: Proxy):
        self.proxy = proxy
        self.loop = proxy.loop
        self.client_ip = ""
        self.parser = httptools.HttpRequestParser(self)
        self.queue: collections.deque[Cycle] = collections.deque()
        self.parsing: Cycle | None = None
        self.active: Cycle | None = None
        self.tunnel: Upstream | None = None
        self.tunnel_forward: Forward | None = None  # the request that became the tunnel
        self._connecting: asyncio.Task | None = None
        self.upgrading = False
        self.finished = False  # a request closing the connection was read: ignore the rest
        self.early: list[bytes] = []  # tunnel bytes sent before the app's 101
        self.close_after = False
        self.refusal: tuple[int, bytes] | None = None  # (status, response) due after the requests ahead
        self.closed = False
        self.writing_paused = False
        self._paused: set[str] = set()
        self.in_head = True
        self.head_bytes = 0
        self.head_start = self.last_activity = self.loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._url = b""
        self._headers: h.Headers = []
        self.previous: Forward | None = None  # the last request forwarded: the decider may reuse it

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # a stream's
        self.send = transport.write
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else "unknown"
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.proxy.opened(self)
        self._arm(self.last_activity + HEADER_TIMEOUT)

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.send(data)
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
            rest = data[exc.args[0] :]
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

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.proxy.closed(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._connecting is not None:
            self._connecting.cancel()  # nobody is left to answer
            self._connecting = None
        if self.tunnel is not None:
            if self.tunnel_forward is not None:
                self.proxy.untunneled(self, self.tunnel_forward)
            self.tunnel.close()
            return
        cycle = self.active
        if cycle is not None and cycle.upstream is not None:
            up, cycle.upstream = cycle.upstream, None
            up.abort()  # the browser went away: so does the request

    def pause_writing(self) -> None:
        self.writing_paused = True
        up = self.tunnel or (self.active.upstream if self.active is not None else None)
        if up is not None:
            up.pause()

    def resume_writing(self) -> None:
        self.writing_paused = False
        up = self.tunnel or (self.active.upstream if self.active is not None else None)
        if up is not None:
            up.resume()

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
        decision = self.proxy.decider.decide(method, self._url, self._headers, self.client_ip, upgrade, self.previous)
        close = http10 or not parser.should_keep_alive()
        cycle = Cycle(method, upgrade, close, http10, decision.has_body, decision.chunked)
        if isinstance(decision, Answer):
            cycle.answer = decision
            cycle.close = cycle.close or decision.close
            if decision.status >= 500 and decision.status != 502:
                log.info("preview answered", extra={"status": decision.status, "client": self.client_ip})
        else:
            cycle.forward = self.previous = decision
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
            cycle.upstream.send(data)
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
        forward = cycle.forward
        if forward is None:
            answer = cycle.answer
            assert answer is not None  # a cycle holds one of the two
            self.proxy.sink.response(answer.status)
            self.transport.write(answer.response)
            # Answered from its head: a body still to come would be read as the next request.
            self._done(cycle, cycle.close or (cycle.has_body and not cycle.complete))
            return
        # Not loop.time(): uvloop's counts whole milliseconds.
        cycle.started = time.monotonic()
        refusal = self.proxy.connector.check(forward)
        if refusal is not None:
            self._unreachable(cycle, refusal)
            return
        up = self.proxy.pool.take((forward.address, forward.port))
        if up is not None:
            cycle.pooled = True
            self._attach(cycle, forward, up)
        else:
            self._connecting = self.proxy.spawn(self._connect(cycle))

    async def _connect(self, cycle: Cycle) -> None:
        forward = cycle.forward
        assert forward is not None  # only a forwarded request connects
        key = (forward.address, forward.port)
        pool = self.proxy.pool
        try:
            up = await self.proxy.connector.connect(forward, lambda: Upstream(pool, key))
        except Unreachable as refusal:
            self._unreachable(cycle, refusal)
            return
        except Exception:
            log.exception("preview connect failed")
            self._fail(cycle, 502, "Proxy error", "The preview proxy failed to connect to the app.")
            return
        finally:
            if self._connecting is asyncio.current_task():
                self._connecting = None
        if self.closed or self.active is not cycle:
            up.close()
            return
        self._attach(cycle, forward, up)

    def _unreachable(self, cycle: Cycle, refusal: Unreachable) -> None:
        self._fail(cycle, refusal.status, refusal.title, refusal.text, refusal.refresh, refusal.headers)

    def _attach(self, cycle: Cycle, forward: Forward, up: Upstream) -> None:
        cycle.upstream = up
        up.bind(self, cycle)
        data = forward.head
        if cycle.body:
            data += b"".join(cycle.body)
            cycle.body = []
            cycle.buffered = 0
        up.send(data)
        if self.writing_paused:
            up.pause()
        if self._paused:
            self.resume_reading("buffer")

    # -- what the upstream calls ------------------------------------------------------------

    def touch(self) -> None:
        """The app sent something: the request is alive."""
        self.last_activity = self.loop.time()

    def response_started(self, status: int, close: bool) -> None:
        """The app's response head (``status``, not an informational one) is going to the
        browser; ``close``: the connection closes after this response."""
        cycle = self.active
        assert cycle is not None  # an upstream is bound to the active request only
        cycle.responded = True
        self.close_after = close
        sink = self.proxy.sink
        sink.response(status)
        sink.upstream_latency(time.monotonic() - cycle.started)

    def response_done(self, up: Upstream, keep: bool) -> None:
        """The response from ``up`` is complete; ``keep``: the app keeps its connection open."""
        cycle = self.active
        if cycle is None or cycle.upstream is not up:
            up.release(keep)
            return
        cycle.upstream = None
        # The app answered before the whole request body arrived: its connection is not reused.
        up.release(keep and cycle.complete)
        self._done(cycle, self.close_after or cycle.close or not cycle.complete)

    def upstream_failed(self, up: Upstream, why: str) -> None:
        """``up`` broke off (it is closed already); ``why`` for the log and the page."""
        cycle = self.active
        if cycle is None or cycle.upstream is not up:
            return
        cycle.upstream = None
        if cycle.responded:
            self.transport.abort()  # the response is cut: the browser must not take it as whole
            return
        if cycle.pooled and cycle.idempotent and not cycle.has_body and not cycle.retried:
            # A pooled connection the app closed just as it was reused: try a fresh one.
            cycle.retried = True
            cycle.pooled = False
            self._connecting = self.proxy.spawn(self._connect(cycle))
            return
        if cycle.forward is not None:
            self.proxy.sink.upstream_failed(cycle.forward, why)
            # The connector may know better what the failure means (a port that speaks no HTTP).
            page = self.proxy.connector.explain(cycle.forward, why)
            if page is not None:
                self._fail(cycle, page.status, page.title, page.text, extra=page.headers)
                return
        self._fail(cycle, 502, "Bad gateway", pages.escape(why[0].upper() + why[1:]) + ".")

    def start_tunnel(self, up: Upstream) -> None:
        """The app switched protocols: from now on bytes pass unchanged both ways."""
        cycle = self.active
        assert cycle is not None and cycle.forward is not None  # an upgrade was forwarded
        forward = cycle.forward
        self.tunnel = up
        self.tunnel_forward = forward
        self.active = None
        self.queue.clear()
        if self.early:
            up.send(b"".join(self.early))
            self.early = []
        self.resume_reading("upgrade")
        self.proxy.tunneled(self, forward)

    def close(self) -> None:
        """Close the browser's connection once what was written to it is sent."""
        self.closed = True
        self.transport.close()

    # -- ends -------------------------------------------------------------------------------

    def _fail(self, cycle: Cycle, status: int, title: str, text: str, refresh: int | None = None, extra=()) -> None:
        if self.closed or self.active is not cycle:
            return
        close = cycle.close or not cycle.complete or cycle.upgrade
        self.proxy.sink.response(status)
        body = pages.render(status, title, text, refresh)
        self.transport.write(pages.response(status, body, extra, close=close, head_only=cycle.head_only))
        self._done(cycle, close)

    def _done(self, cycle: Cycle, close: bool) -> None:
        self.active = None
        if self._paused:
            self.resume_reading("upstream")  # that upstream's full buffer is no longer in the way
        if self.queue and self.queue[0] is cycle:
            self.queue.popleft()
        if close:
            self.close()
            return
        if self.queue:
            self._start(self.queue[0])
        elif self.refusal is not None:
            self._send_refusal(*self.refusal)
            return
        if self._paused and len(self.queue) <= MAX_QUEUED:
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
        self.proxy.sink.response(status)
        self.transport.write(response)
        self.close()

    # -- what the proxy calls ---------------------------------------------------------------

    def upstream_forward(self) -> Forward | None:
        """The Forward whose upstream this connection is on now (a tunnel's, or a request's
        with its upstream connection attached), if any."""
        if self.tunnel is not None:
            return self.tunnel_forward
        cycle = self.active
        return cycle.forward if cycle is not None and cycle.upstream is not None else None

    def abort(self) -> None:
        """Reset the browser's connection at once, and the request's upstream connection (a
        tunnel's closes once the browser's is gone)."""
        cycle = self.active
        if cycle is not None and cycle.upstream is not None:
            cycle.upstream.abort()
        self.closed = True
        self.transport.abort()

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
                self.close()
            return
        if cycle.responded:
            self.abort()
            return
        up = cycle.upstream
        if up is not None:
            cycle.upstream = None
            up.abort()
        port = cycle.forward.port if cycle.forward is not None else 0
        self._fail(cycle, 504, "Upstream timeout", f"Port {port} did not answer within {self.proxy.timeout:g} s.")
        if not self.closed and self._timer is None:
            self._arm(self.last_activity + KEEPALIVE_TIMEOUT)
