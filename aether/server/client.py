"""One client: its WebSocket's authentication, its frames to the dispatcher, and the one way
out to it, :meth:`Client.send`, with a write deadline so a client that stops reading is dropped
alone.

Everything a client is sent goes through ``send``: a message (a dict, encoded there) or a frame
built once for many (``aether.wire.frame``); messages, bytes and error replies are counted
there. A frame goes straight to the socket when nothing is queued before it
(``websocket.send_now``); otherwise Tornado's stream buffers it, and its future resolves once
its bytes reach the socket. A client keeps those unfinished writes in order and arms one timer
for the oldest: if it has not completed after ``write_timeout`` seconds, or the pending charge
exceeds ``MAX_PENDING_BYTES``, the connection is aborted. Nothing is armed while nothing is
pending.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hmac
import logging
import socket
import time
from collections.abc import Callable, MutableMapping
from typing import TYPE_CHECKING, Protocol

import tornado.iostream
import tornado.web
import tornado.websocket

from aether import wire
from aether.server import cookie
from aether.server.websocket import Protocol13, send_now

if TYPE_CHECKING:
    from aether.server.hub import Hub

log = logging.getLogger("aether.server")

#: Unsent bytes after which a client is too slow to keep (a burst of port events is ~100 KB).
#: Each pending frame is charged its size plus ``PENDING_OVERHEAD`` for its future and queue
#: entry, so a flood of tiny replies to a client that reads nothing is bounded too.
MAX_PENDING_BYTES = 4 << 20
PENDING_OVERHEAD = 512
#: A producer that can wait (a terminal's output, a long file read) stops above this much
#: unsent and resumes once it has drained to ``DRAINED_BYTES``: well before the cap above.
BACKLOG_BYTES = 512 << 10
DRAINED_BYTES = 128 << 10


class Counts(Protocol):
    """What is counted of what clients are sent (the metrics)."""

    ws_frames_sent: int
    ws_bytes_sent: int

    @property
    def ws_errors(self) -> MutableMapping[str, int]: ...


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """What every client of the WebSocket endpoint shares: the settings it checks, the hub it
    joins, where its messages go, and what it tells the channels."""

    token: str
    workspace_id: str
    max_message_bytes: int
    send_buffer_bytes: int
    write_timeout: float
    hub: Hub
    receive: Callable[[Client, str | bytes], None]
    opened: Callable[[Client], None]
    closed: Callable[[Client], None]
    counts: Counts


def bearer_token(request) -> str | None:
    """The token from ``Sec-WebSocket-Protocol: Bearer, TOKEN``, else from ``?token=``."""
    offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
    if len(offered) >= 2 and offered[0] == "Bearer" and offered[1]:
        return offered[1]
    values = request.query_arguments.get("token")
    return values[0].decode("utf-8", "replace") if values else None


class Client(tornado.websocket.WebSocketHandler):
    """One WebSocket client of the endpoint; :meth:`send` is the one way out to it."""

    ws_connection: Protocol13 | None  # what get_websocket_protocol makes

    def initialize(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.last_pong = time.monotonic()
        self._pending: collections.deque = collections.deque()
        self._pending_bytes = 0
        self._write_timer: asyncio.TimerHandle | None = None
        self._on_drained: list = []
        #: (channel, type) pairs this client may send; None for all (it showed the token).
        self.allowed: frozenset | None = None

    # -- before the upgrade -------------------------------------------------------------

    def prepare(self) -> None:
        # The credentials first: without them, nothing (not even which workspace ids exist) is
        # told. A token given is the one judged; without one, the dashboard's cookie counts,
        # from a page of this origin only (see ``cookie``).
        endpoint = self.endpoint
        token = bearer_token(self.request)
        if token is not None:
            if not hmac.compare_digest(token.encode(), endpoint.token.encode()):
                raise tornado.web.HTTPError(401)
        elif not cookie.present(self.request, endpoint.token):
            raise tornado.web.HTTPError(401)
        elif not cookie.same_origin(self.request):
            raise tornado.web.HTTPError(403)
        else:
            self.allowed = cookie.DASHBOARD
        if self.path_args[0] != endpoint.workspace_id:
            raise tornado.web.HTTPError(404)

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        # Answer with "Bearer" alone: the token is never echoed back.
        return "Bearer" if "Bearer" in subprotocols else None

    def check_origin(self, origin: str) -> bool:
        # A token proves itself, whatever page sent it: any origin that holds it may connect.
        # Cookie authentication, which a foreign page could ride on, was held to the same
        # origin in ``prepare``.
        return True

    @property
    def max_message_size(self) -> int:
        return self.endpoint.max_message_bytes

    def get_compression_options(self) -> None:
        return None

    def get_websocket_protocol(self) -> Protocol13 | None:
        protocol = super().get_websocket_protocol()
        if protocol is None:
            return None
        assert isinstance(protocol, tornado.websocket.WebSocketProtocol13)  # the one kind Tornado makes
        return Protocol13(self, False, protocol.params)

    def _request_summary(self) -> str:
        # Tornado's version prints the full URI, ?token= included.
        return f"{self.request.method} {self.request.path} ({self.request.remote_ip})"

    def log_exception(self, typ, value, tb) -> None:
        if isinstance(value, tornado.web.HTTPError):
            return
        log.error(
            "uncaught exception",
            exc_info=(typ, value, tb),
            extra={"path": self.request.path, "client": self.request.remote_ip},
        )

    # -- the connection -----------------------------------------------------------------

    def open(self, *args) -> None:
        self.last_pong = time.monotonic()
        assert self.ws_connection is not None  # open comes once the connection is accepted
        stream_socket = self.ws_connection.stream.socket
        if stream_socket is not None:
            stream_socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.endpoint.send_buffer_bytes)
            # Every frame goes out at once. With Nagle's algorithm an answer waits behind an
            # event not yet acknowledged, and clients delay their ACKs up to 40 ms: an idle
            # server's `config get` round trip had a p99 of 45 ms beside other ports' events,
            # 4-12 ms without.
            stream_socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.endpoint.opened(self)
        self.endpoint.hub.add(self)
        log.info("client connected", extra={"client": self.request.remote_ip, "clients": len(self.endpoint.hub.clients)})

    def on_message(self, frame: str | bytes) -> None:
        self.endpoint.receive(self, frame)

    def on_pong(self, data: bytes) -> None:
        self.last_pong = time.monotonic()

    def on_close(self) -> None:
        self.endpoint.hub.remove(self)
        self.endpoint.closed(self)
        self._call_drained()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        log.info(
            "client disconnected",
            extra={"client": self.request.remote_ip, "code": self.close_code, "clients": len(self.endpoint.hub.clients)},
        )

    # -- sending ------------------------------------------------------------------------

    @property
    def backlogged(self) -> bool:
        """Whether a producer that can wait should stop sending until :meth:`when_drained`."""
        return self._pending_bytes > BACKLOG_BYTES

    @property
    def closed(self) -> bool:
        connection = self.ws_connection
        return connection is None or connection.is_closing() or connection.stream.closed()

    def when_drained(self, callback) -> None:
        """Call ``callback()`` once unsent bytes are down to ``DRAINED_BYTES`` or the
        connection has closed (at once if that is so already)."""
        if self.closed or self._pending_bytes <= DRAINED_BYTES:
            callback()
        else:
            self._on_drained.append(callback)

    async def caught_up(self) -> bool:
        """Wait while :attr:`backlogged`; whether the connection is still there to send to.

        Every producer waiting wakes together, and the first to send may fill the backlog
        again: so the check is made again after each wait, just before the caller sends."""
        while self.backlogged and not self.closed:
            drained = asyncio.get_running_loop().create_future()
            self.when_drained(lambda drained=drained: drained.done() or drained.set_result(None))
            await drained
        return not self.closed

    def _call_drained(self) -> None:
        callbacks, self._on_drained = self._on_drained, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("drain callback failed")

    def send(self, message: dict | bytes) -> None:
        """The one way out to this client: ``message``, or a whole frame built once for many
        (``aether.wire.frame``), queued on the connection's stream. What is sent, and every
        error reply, is counted here."""
        connection = self.ws_connection
        if connection is None or connection.is_closing() or connection.stream.closed():
            return
        counts = self.endpoint.counts
        if not isinstance(message, bytes):
            if message.get("type") == "error":
                counts.ws_errors[message["code"]] += 1
            message = wire.frame(message)
        counts.ws_frames_sent += 1
        counts.ws_bytes_sent += len(message)
        stream = connection.stream
        rest = send_now(stream, message)
        if not rest:
            return
        try:
            future = stream.write(rest)
        except tornado.iostream.StreamClosedError:
            return
        size = len(rest) + PENDING_OVERHEAD
        self._pending.append((time.monotonic(), size, future))
        self._pending_bytes += size
        future.add_done_callback(self._written)
        if self._pending_bytes > MAX_PENDING_BYTES:
            self.abort(f"more than {MAX_PENDING_BYTES >> 20} MiB unsent")
        elif self._write_timer is None:
            self._arm_write_timer()

    def send_ping(self) -> None:
        try:
            self.ping(b"")
        except tornado.websocket.WebSocketClosedError:
            pass

    def _written(self, _future=None) -> None:
        pending = self._pending
        while pending and pending[0][2].done():
            _sent, size, future = pending.popleft()
            self._pending_bytes -= size
            if not future.cancelled():
                future.exception()  # retrieved: a closed stream is not an error to report
        if self._on_drained and self._pending_bytes <= DRAINED_BYTES:
            self._call_drained()

    def _arm_write_timer(self) -> None:
        oldest = self._pending[0][0]
        delay = max(0.0, oldest + self.endpoint.write_timeout - time.monotonic())
        self._write_timer = asyncio.get_running_loop().call_later(delay, self._check_writes)

    def _check_writes(self) -> None:
        self._write_timer = None
        self._written()
        if not self._pending:
            return
        if time.monotonic() - self._pending[0][0] >= self.endpoint.write_timeout:
            self.abort(f"a write did not complete in {self.endpoint.write_timeout:g} s")
        else:
            self._arm_write_timer()

    def abort(self, reason: str) -> None:
        """Drop the connection now, without a closing handshake the client would not read."""
        log.warning("dropping client", extra={"client": self.request.remote_ip, "reason": reason})
        connection = self.ws_connection
        if connection is not None and connection.stream is not None:
            connection.stream.close()
