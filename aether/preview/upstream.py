"""Connections to the apps being previewed, and the pool that keeps them alive between requests.

An :class:`Upstream` is bound to one browser connection while a request is in flight: it
parses the response with ``httptools``, rewrites its head (:func:`headers.response_head`) and
writes head and body to the browser as they arrive. After a ``101`` both connections become
a byte tunnel. A finished connection the app keeps alive goes back to the :class:`Pool`.

The two sides talk through methods only. The browser's side (:class:`.proxy.ClientConnection`)
calls :meth:`Upstream.bind`, ``send``, ``pause``, ``resume``, ``release``, ``close`` and
``abort``; the upstream calls the browser side's ``touch``, ``send``, ``response_started``,
``response_done``, ``upstream_failed``, ``start_tunnel``, ``close`` and its
``pause_reading``/``resume_reading`` for flow control.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl as ssl_module
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import httptools

from aether.preview import headers as h
from aether.preview import pages
from aether.preview.owner import Unreachable

if TYPE_CHECKING:
    from aether.preview.proxy import ClientConnection, Cycle

log = logging.getLogger("aether.preview")

#: Idle pooled connections per upstream address, and how long one may stay idle.
POOL_SIZE = 64
POOL_IDLE_SECONDS = 30.0
CONNECT_TIMEOUT = 5.0
#: Why, when the app closed the connection before a byte of its response.
NO_ANSWER = (
    "the app closed the connection without answering: it may speak another protocol "
    "than HTTP (a database does this), or it failed on the request (see its log)"
)


async def dial(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], Upstream],
    address: str,
    port: int,
    timeout: float = CONNECT_TIMEOUT,
    name: str | None = None,
    ssl: ssl_module.SSLContext | None = None,
) -> Upstream:
    """A connection made with ``factory`` to ``address``:``port`` within ``timeout`` seconds.

    ``ConnectionRefusedError`` passes through, since what a refusal means is the caller's to
    say (a port that is opening, or one that closed); every other failure raises
    :class:`~.owner.Unreachable` with its page, naming the upstream ``name`` (``port N``).
    With ``ssl`` the connection is TLS (HTTP/1.1 by ALPN), its handshake within ``timeout``."""
    name = name or f"port {port}"
    try:
        async with asyncio.timeout(timeout):
            if ssl is None:
                _, up = await loop.create_connection(factory, address, port)
            else:
                _, up = await loop.create_connection(
                    factory, address, port, ssl=ssl, server_hostname="localhost", ssl_handshake_timeout=timeout
                )
    except ConnectionRefusedError:
        raise
    except TimeoutError:
        raise Unreachable(
            504, "Upstream timeout", f"{name[:1].upper()}{name[1:]} did not accept a connection within {timeout:g} s."
        ) from None
    except ssl_module.SSLError as exc:
        raise Unreachable(
            502,
            pages.TLS_FAILED_TITLE,
            f"{name[:1].upper()}{name[1:]} speaks TLS, but the handshake failed: {pages.escape(exc.reason or str(exc))}.",
        ) from None
    except OSError as exc:
        raise Unreachable(502, "Bad gateway", f"Could not connect to {name}: {pages.escape(exc.strerror or str(exc))}.") from None
    return up


class Upstream(asyncio.Protocol):
    """One connection to an app; see the module docstring."""

    #: Request bytes (or, in a tunnel, the browser's bytes) for the app: the transport's own
    #: ``write``, bound once as the connection is made.
    send: Callable[[bytes], None]
    #: Set as the connection is made, before anything else here is called.
    transport: asyncio.Transport

    def __init__(self, pool: Pool, key: tuple[str, int]):
        self.pool = pool
        self.key = key
        self.parser = httptools.HttpResponseParser(self)
        self.client: ClientConnection | None = None
        self.cycle: Cycle | None = None  # the request being answered (read, never written)
        self.closed = False
        self.tunnel = False
        self.idle_since = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._out: list[bytes] = []  # bytes for the browser, written once per read
        #: The last final response head and its rewrite: (head, no body, close, HTTP/1.0 browser,
        #: the browser's head, chunked_out, until_close, close after it).
        self._memo: tuple | None = None
        self._reset_response()

    def _reset_response(self) -> None:
        self.started = False  # a head went to the browser
        self._raw = b""  # bytes received since the last head, while one is awaited
        self._want_head = True
        self.chunked_out = False
        self.until_close = False  # the app delimits the body by closing
        self.informational = False
        self.finished_early = False  # a body-less response finished at its head
        self._finish_after_read: bool | None = None  # ... once the parser returns: keep-alive?

    # -- what the browser's side calls ------------------------------------------------------

    def bind(self, client: ClientConnection, cycle: Cycle) -> None:
        """Answer ``cycle``'s request (its head and body follow with :meth:`send`) to ``client``."""
        self.client = client
        self.cycle = cycle
        self._reset_response()

    def pause(self) -> None:
        """The browser is not reading: stop reading the app."""
        if not self.closed:
            self.transport.pause_reading()

    def resume(self) -> None:
        if not self.closed:
            self.transport.resume_reading()

    def release(self, keep: bool) -> None:
        """The response is over: back to the pool when ``keep``, else closed."""
        self.client = self.cycle = None
        if self.closed:
            return
        if keep:
            self.transport.resume_reading()  # the browser may have paused it on its last bytes
            self.pool.put(self)
        else:
            self.close()

    def close(self) -> None:
        """Close, after what was sent to the app has gone; the browser's side is told nothing."""
        self.client = self.cycle = None
        if not self.closed:
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        """Reset at once; the browser's side is told nothing."""
        self.client = self.cycle = None
        if not self.closed:
            self.closed = True
            self.transport.abort()

    def usable(self) -> bool:
        return not self.closed and not self.transport.is_closing()

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # a stream's
        self.send = transport.write
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:
            # Bytes from an idle pooled connection: the app broke the framing. Drop it.
            self.abort()
            return
        if self.tunnel:
            client.send(data)
            return
        client.last_activity = client.loop.time()  # client.touch(), inlined: once per read
        if self._want_head:
            self._raw += data
        try:
            self.parser.feed_data(data)
            if self._finish_after_read is not None:
                # Not from inside the parser's callback: finishing may start the browser's next
                # request on this very connection, and this parser must not see its response.
                keep, self._finish_after_read = self._finish_after_read, None
                # httptools cannot be told a HEAD's response has no body: a new one for the next.
                self.parser = httptools.HttpResponseParser(self)
                self._finish(keep=keep)
            elif self._out:
                self._flush()
        except httptools.HttpParserUpgrade as exc:
            rest = data[exc.args[0] :]
            if rest and self.client is not None:
                self.client.send(rest)
        except httptools.HttpParserCallbackError:
            log.exception("preview response handling failed")
            self._fail("the proxy failed while relaying the response")
        except httptools.HttpParserError as exc:
            self._fail(f"the app sent a malformed response: {exc}")

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.pool.discard(self)
        client = self.client
        if client is None:
            return
        if self.tunnel:
            self.client = None
            client.close()
        elif self.until_close and self.started:
            if self.chunked_out:
                self._out.append(h.LAST_CHUNK)
            self._finish(keep=False)
        elif not self.started and not self._raw:
            # Not a byte of an answer: what a port that speaks no HTTP does (PostgreSQL, Redis)
            # as well as an app that failed on the request. Neither is "cut short".
            self._fail(NO_ANSWER)
        else:
            self._fail("the app closed the connection before it finished its response")

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.pause_reading("upstream")

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.resume_reading("upstream")

    # -- httptools callbacks ----------------------------------------------------------------

    def on_headers_complete(self) -> None:
        client = self.client
        if client is None:
            return
        status = self.parser.get_status_code()
        raw = self._raw
        end = raw.find(b"\r\n\r\n")
        if end < 0:
            self._fail("the app sent a response head without CRLF line ends")
            return
        raw_head = raw[:end]
        cycle = self.cycle
        assert cycle is not None  # bound with the client
        no_body = cycle.head_only or status == 204 or status == 304
        close = memo_close = cycle.close or cycle.upgrade
        memo = self._memo
        if memo is not None and memo[0] == raw_head and memo[1] == no_body and memo[2] == close and memo[3] == cycle.http10:
            # The same head as this connection's last response (an app's differ in Date, once
            # a second): the same rewrite, without scanning it again.
            self._want_head = False
            self._raw = b""
            self.chunked_out, self.until_close, close = memo[5], memo[6], memo[7]
            self.started = True
            self._out.append(memo[4])
            client.response_started(status, close)
        else:
            head = h.ResponseHead(raw_head)
            if status < 200 and status != 101:
                self._raw = raw[end + 4 :]  # the final response's head is still to come
                self.informational = True
                self._out.append(head.for_client())
                return
            self._want_head = False
            self._raw = b""
            if status == 101 and not cycle.upgrade:
                self._fail("the app switched protocols on a request that asked for no upgrade")
                return
            if status == 101:
                client.response_started(status, False)
                self._out.append(head.for_client(upgrade=True))
                self._flush()
                self.started = self.tunnel = True
                client.start_tunnel(self)
                return
            http10 = cycle.http10
            if not no_body:
                if head.chunked:
                    self.chunked_out = True
                elif not head.has_length:  # read to the end of the connection
                    self.until_close = True
                    self.chunked_out = True
                if self.chunked_out and http10:
                    # An HTTP/1.0 browser reads to the end of the connection instead.
                    self.chunked_out = False
                    close = True
            out = head.for_client(chunked=self.chunked_out, close=close)
            self._memo = (raw_head, no_body, memo_close, http10, out, self.chunked_out, self.until_close, close)
            self.started = True
            self._out.append(out)
            client.response_started(status, close)
        if no_body:
            self.finished_early = True
            self._finish_after_read = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        if self.client is not None:
            self._out.append(h.chunk(body) if self.chunked_out else body)

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        if self.finished_early or self.tunnel or self.client is None:
            return
        if self.chunked_out:
            self._out.append(h.LAST_CHUNK)
        self._finish(keep=not self.until_close and self.parser.should_keep_alive())

    # -- ends -------------------------------------------------------------------------------

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self.client is not None:
            self.client.send(out[0] if len(out) == 1 else b"".join(out))

    def _finish(self, keep: bool) -> None:
        """The response is whole; the browser's side says whether this connection is kept
        (:meth:`release`)."""
        client = self.client
        self._flush()
        if client is not None:
            client.response_done(self, keep)

    def _fail(self, why: str) -> None:
        self._out = []
        client = self.client
        self.abort()
        if client is not None:
            client.upstream_failed(self, why)

    # -- idle expiry in the pool ------------------------------------------------------------

    def idle(self, loop: asyncio.AbstractEventLoop) -> None:
        """Put in the pool now: closed once idle for ``POOL_IDLE_SECONDS``."""
        self.idle_since = loop.time()
        if self._timer is None:
            self._timer = loop.call_at(self.idle_since + POOL_IDLE_SECONDS, self._idle_check, loop)

    def _idle_check(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        if self.closed or self.client is not None or self.tunnel:
            return
        due = self.idle_since + POOL_IDLE_SECONDS
        if loop.time() >= due:
            self.pool.discard(self)
            self.close()
        else:
            self._timer = loop.call_at(due, self._idle_check, loop)


class Pool:
    """Idle keep-alive connections per (address, port), newest first."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.idle: dict[tuple[str, int], list[Upstream]] = {}

    def take(self, key: tuple[str, int]) -> Upstream | None:
        conns = self.idle.get(key)
        while conns:
            conn = conns.pop()
            if conn.usable():
                return conn
        return None

    def put(self, conn: Upstream) -> None:
        conns = self.idle.setdefault(conn.key, [])
        if len(conns) >= POOL_SIZE:
            conn.close()
            return
        conns.append(conn)
        conn.idle(self.loop)

    def discard(self, conn: Upstream) -> None:
        conns = self.idle.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)

    def close_port(self, port: int) -> None:
        """Close every idle connection to ``port`` (it stopped listening)."""
        for key in [k for k in self.idle if k[1] == port]:
            for conn in self.idle.pop(key):
                conn.close()

    def close_addresses(self, addresses: set[str]) -> None:
        """Close every idle connection to one of ``addresses`` (no longer this host's)."""
        for key in [k for k in self.idle if k[0] in addresses]:
            for conn in self.idle.pop(key):
                conn.close()

    def close_all(self) -> None:
        for conns in self.idle.values():
            for conn in conns:
                conn.close()
        self.idle.clear()
