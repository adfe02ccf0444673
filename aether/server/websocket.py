"""The WebSocket itself, below the client: Tornado's protocol held to RFC 6455 where Tornado
lets a broken client through, and frames handed to the socket at once when nothing is queued.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import tornado.iostream
import tornado.websocket

#: After the close frame that fails a connection (1009 for an oversized message, 1007, 1002),
#: what the client still sends is read and dropped for at most this long before the socket
#: closes. Closing with it unread sends a reset, and a reset discards the close frame waiting
#: in the client's receive queue (9 clients of 10 saw no 1009). A 16 MiB message is sent and
#: drained over loopback in ~0.12 s; 2 s is what a client on a slower link gets to stop sending.
LINGER_SECONDS = 2.0


#: Close codes a client may send (RFC 6455 7.4, and 1012-1014 as IANA registers them); 1004 is
#: reserved, 1005, 1006 and 1015 only ever stand for a missing close frame.
_CLOSE_CODES = frozenset(range(1000, 1004)) | frozenset(range(1007, 1015)) | frozenset(range(3000, 5000))


class Protocol13(tornado.websocket.WebSocketProtocol13):
    """Tornado's protocol, but a client that breaks it is told why, and hears it.

    Tornado drops a text frame that is not UTF-8 by closing the socket without a word, echoes
    any close code, and raises on a close reason that is not UTF-8 (a traceback in the log,
    no close frame). Here those fail the connection with 1007 (not UTF-8) or 1002 (a close
    code no one may send). Failing, like the 1009 of an oversized message, is: the close frame,
    then ``shutdown(SHUT_WR)``, then everything the client still sends read and dropped until
    it closes or ``LINGER_SECONDS`` pass, then the close (Tornado closes at once, and the reset
    that closing with bytes unread sends discards the close frame at the client). The client
    ends at once; only the socket lingers (and counts as a connection)."""

    _lingering = False
    _linger_task: asyncio.Task | None = None

    def close(self, code: int | None = None, reason: str | None = None) -> None:
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


def send_now(stream: tornado.iostream.IOStream, frame: bytes) -> bytes:
    """Hand ``frame`` to the kernel now, when nothing is queued before it; what is left for
    the stream to write (``b""`` when nothing is, or the socket is dead, which the stream
    notices on its own).

    This is the common case, and it costs one send(), no Future: 1,000 clients get a port
    event in a fraction of the time IOStream.write takes. What the kernel does not take goes
    through the stream, which keeps the order. A TLS stream's bytes must go through its SSL
    object: there, everything goes through the stream."""
    if stream.writing() or isinstance(stream, tornado.iostream.SSLIOStream):
        return frame
    try:
        sent = stream.socket.send(frame)
    except BlockingIOError:
        return frame
    except OSError:
        return b""
    return frame[sent:] if sent < len(frame) else b""
