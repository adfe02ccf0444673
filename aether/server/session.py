"""One client's WebSocket: authentication, frames to the protocol layer, and sending with a
write deadline so a client that stops reading is dropped alone.

A frame goes straight to the socket when nothing is queued before it (see
:meth:`Session.send_frame`); otherwise Tornado's stream buffers it, and its future resolves once
its bytes reach the socket. A session keeps those unfinished writes in order and arms one timer
for the oldest: if it has not completed after ``write_timeout`` seconds, or the pending charge
exceeds ``MAX_PENDING_BYTES``, the connection is aborted. Nothing is armed while nothing is
pending.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import socket
import struct
import time
from typing import TYPE_CHECKING, Any, Optional, Union

import tornado.iostream
import tornado.web
import tornado.websocket

from aether import wire
from aether.server import cookie

if TYPE_CHECKING:
    from aether.server.app import WorkspaceServer

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
#: After the close frame that fails a connection (1009 for an oversized message, 1007, 1002),
#: what the client still sends is read and dropped for at most this long before the socket
#: closes. Closing with it unread sends a reset, and a reset discards the close frame waiting
#: in the client's receive queue (9 clients of 10 saw no 1009). A 16 MiB message is sent and
#: drained over loopback in ~0.12 s; 2 s is what a client on a slower link gets to stop sending.
LINGER_SECONDS = 2.0


def bearer_token(request) -> Optional[str]:
    """The token from ``Sec-WebSocket-Protocol: Bearer, TOKEN``, else from ``?token=``."""
    offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
    if len(offered) >= 2 and offered[0] == "Bearer" and offered[1]:
        return offered[1]
    values = request.query_arguments.get("token")
    return values[0].decode("utf-8", "replace") if values else None


#: Close codes a client may send (RFC 6455 7.4, and 1012-1014 as IANA registers them); 1004 is
#: reserved, 1005, 1006 and 1015 only ever stand for a missing close frame.
_CLOSE_CODES = frozenset(range(1000, 1004)) | frozenset(range(1007, 1015)) | frozenset(range(3000, 5000))


class _Protocol(tornado.websocket.WebSocketProtocol13):
    """Tornado's protocol, but a client that breaks it is told why, and hears it.

    Tornado drops a text frame that is not UTF-8 by closing the socket without a word, echoes
    any close code, and raises on a close reason that is not UTF-8 (a traceback in the log,
    no close frame). Here those fail the connection with 1007 (not UTF-8) or 1002 (a close
    code no one may send). Failing, like the 1009 of an oversized message, is: the close frame,
    then ``shutdown(SHUT_WR)``, then everything the client still sends read and dropped until
    it closes or ``LINGER_SECONDS`` pass, then the close (Tornado closes at once, and the reset
    that closing with bytes unread sends discards the close frame at the client). The session
    ends at once; only the socket lingers (and counts as a connection)."""

    _lingering = False
    _linger_task: Optional[asyncio.Task] = None

    def close(self, code: Optional[int] = None, reason: Optional[str] = None) -> None:
        if code == 1009 and not self.server_terminated and not self.stream.closed():
            self._lingering = True  # Tornado calls _abort right after
        super().close(code, reason)

    def _fail(self, code: int, reason: str) -> None:
        if not self.server_terminated and not self.stream.closed():
            self._lingering = True
        super().close(code, reason)
        self._abort()

    def _handle_message(self, opcode: int, data: bytes):
        if self.client_terminated or self._frame_compressed:
            return super()._handle_message(opcode, data)
        if opcode == 0x1:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                self._fail(1007, "text frames must be UTF-8")
                return None
            self._message_bytes_in += len(data)
            return self._run_callback(self.handler.on_message, text)
        if opcode == 0x8 and data:
            code = struct.unpack(">H", data[:2])[0] if len(data) >= 2 else None
            if code not in _CLOSE_CODES:
                self._fail(1002, "no such close code")
                return None
            try:
                data[2:].decode("utf-8")
            except UnicodeDecodeError:
                self._fail(1007, "a close reason must be UTF-8")
                return None
        return super()._handle_message(opcode, data)

    def _abort(self) -> None:
        if not self._lingering:
            super()._abort()
            return
        if self._linger_task is not None:
            return  # the linger closes the stream
        self.client_terminated = self.server_terminated = True
        if self._waiting is not None:
            self.stream.io_loop.remove_timeout(self._waiting)
            self._waiting = None
        self._linger_task = asyncio.ensure_future(self._linger(self.stream))

    @staticmethod
    async def _linger(stream: tornado.iostream.IOStream) -> None:
        try:
            async with asyncio.timeout(LINGER_SECONDS):
                await stream.write(b"")  # resolves once the close frame is in the kernel
                stream.socket.shutdown(socket.SHUT_WR)
                while True:
                    await stream.read_bytes(1 << 16, partial=True)
        except (tornado.iostream.StreamClosedError, TimeoutError, OSError):
            pass
        finally:
            stream.close()


class Session(tornado.websocket.WebSocketHandler):
    def initialize(self, server: "WorkspaceServer") -> None:
        self.server = server
        self.last_pong = time.monotonic()
        self._pending: collections.deque = collections.deque()
        self._pending_bytes = 0
        self._write_timer: Optional[asyncio.TimerHandle] = None
        self._on_drained: list = []
        #: (channel, type) pairs this client may send; None for all (it showed the token).
        self.allowed: Optional[frozenset] = None

    # -- before the upgrade -------------------------------------------------------------

    def prepare(self) -> None:
        # The credentials first: without them, nothing (not even which workspace ids exist) is
        # told. A token given is the one judged; without one, the dashboard's cookie counts,
        # from a page of this origin only (see ``cookie``).
        settings = self.server.settings
        token = bearer_token(self.request)
        if token is not None:
            if not hmac.compare_digest(token.encode(), settings.token.encode()):
                raise tornado.web.HTTPError(401)
        elif not cookie.present(self.request, settings.token):
            raise tornado.web.HTTPError(401)
        elif not cookie.same_origin(self.request):
            raise tornado.web.HTTPError(403)
        else:
            self.allowed = cookie.DASHBOARD
        if self.path_args[0] != settings.workspace_id:
            raise tornado.web.HTTPError(404)

    def select_subprotocol(self, subprotocols: list[str]) -> Optional[str]:
        # Answer with "Bearer" alone: the token is never echoed back.
        return "Bearer" if "Bearer" in subprotocols else None

    def check_origin(self, origin: str) -> bool:
        # A token proves itself, whatever page sent it: any origin that holds it may connect.
        # Cookie authentication, which a foreign page could ride on, was held to the same
        # origin in ``prepare``.
        return True

    @property
    def max_message_size(self) -> int:
        return self.server.settings.max_message_bytes

    def get_compression_options(self) -> None:
        return None

    def get_websocket_protocol(self) -> Optional[tornado.websocket.WebSocketProtocol]:
        protocol = super().get_websocket_protocol()
        if protocol is None:
            return None
        return _Protocol(self, False, protocol.params)

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
        stream_socket = self.ws_connection.stream.socket
        if stream_socket is not None:
            stream_socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.server.settings.send_buffer_bytes)
        self.server.on_open(self)
        self.server.hub.add(self)
        log.info("client connected", extra={"client": self.request.remote_ip, "clients": len(self.server.hub.sessions)})

    def on_message(self, frame: Union[str, bytes]) -> None:
        self.server.dispatcher.receive(self, frame)

    def on_pong(self, data: bytes) -> None:
        self.last_pong = time.monotonic()

    def on_close(self) -> None:
        self.server.hub.remove(self)
        self.server.on_close(self)
        self._call_drained()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        log.info(
            "client disconnected",
            extra={"client": self.request.remote_ip, "code": self.close_code, "clients": len(self.server.hub.sessions)},
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
            self.when_drained(lambda: drained.done() or drained.set_result(None))
            await drained
        return not self.closed

    def _call_drained(self) -> None:
        callbacks, self._on_drained = self._on_drained, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("drain callback failed")

    def send(self, message: dict[str, Any]) -> None:
        if message.get("type") == "error":
            self.server.metrics.ws_errors[message["code"]] += 1
        self.send_frame(wire.frame(message))

    def send_frame(self, frame: bytes) -> None:
        """Queue one complete frame (see :func:`aether.wire.text_frame`) on the connection's stream."""
        connection = self.ws_connection
        if connection is None or connection.is_closing() or connection.stream.closed():
            return
        metrics = self.server.metrics
        metrics.ws_frames_sent += 1
        metrics.ws_bytes_sent += len(frame)
        stream = connection.stream
        if not stream.writing():
            # Nothing queued: hand the frame to the kernel now. This is the common case, and it
            # costs one send(), no Future: 1,000 clients get a port event in a fraction of the
            # time IOStream.write takes. What the kernel does not take goes through the stream,
            # which keeps the order.
            try:
                sent = stream.socket.send(frame)
            except BlockingIOError:
                sent = 0
            except OSError:
                return  # the stream notices the dead socket on its own
            if sent == len(frame):
                return
            frame = frame[sent:]
        try:
            future = stream.write(frame)
        except tornado.iostream.StreamClosedError:
            return
        size = len(frame) + PENDING_OVERHEAD
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
        delay = max(0.0, oldest + self.server.settings.write_timeout - time.monotonic())
        self._write_timer = asyncio.get_running_loop().call_later(delay, self._check_writes)

    def _check_writes(self) -> None:
        self._write_timer = None
        self._written()
        if not self._pending:
            return
        if time.monotonic() - self._pending[0][0] >= self.server.settings.write_timeout:
            self.abort(f"a write did not complete in {self.server.settings.write_timeout:g} s")
        else:
            self._arm_write_timer()

    def abort(self, reason: str) -> None:
        """Drop the connection now, without a closing handshake the client would not read."""
        log.warning("dropping client", extra={"client": self.request.remote_ip, "reason": reason})
        connection = self.ws_connection
        if connection is not None and connection.stream is not None:
            connection.stream.close()
