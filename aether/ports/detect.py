"""What a port speaks (``https``, ``http`` or ``tcp``) and when it first answers, found once
per port by connecting to it, off the event path.

One look at a port:

1. Connect, and listen first for :data:`BANNER_WAIT`: a server that speaks first (SSH, SMTP,
   MySQL) is not HTTP, and is sent nothing.
2. Send ``OPTIONS * HTTP/1.1``: the one request that names no resource, so no application
   route runs (a ``GET /`` or ``HEAD /`` runs the page's handler, and makes a dev server
   compile it). Any status line but ``400`` is ``http``.
3. Only when that answer could come from a TLS server (a ``400``, which nginx and Go send to
   plain HTTP on a TLS port; a TLS alert record; the connection closed with no answer), open a
   second connection and send a TLS ClientHello: a TLS record in reply is ``https``. TLS is
   not tried first because plain HTTP dev servers far outnumber TLS ones, and several print
   every bad request to the developer's terminal: Python's http.server and Flask's the
   ClientHello's bytes, Django's ``runserver`` "You're accessing the development server over
   HTTPS". TLS servers take a plain request more quietly: nginx logs a 400 in its access log,
   Go's a handshake error. (A plain nginx answers ``OPTIONS *`` with a 400 too, and so gets
   the ClientHello as well, and answers it with another 400.)
4. Anything else in reply is ``tcp``: the port answers, but not with HTTP.

A port that does not answer is not ready yet: a dev server still compiling holds the
request, and answers it once it can. The look keeps waiting on that one connection (up to
:data:`REFRESH`, then on a fresh one), so the time from the port's open to its answer, the
``ready`` time, is when the server answered. A refused or closed connection is tried again
with backoff. :data:`DEADLINE` after the open it gives up: ``tcp``, never answered.

A port that took the connection, waited through the banner wait, read the request and then
closed cleanly without a byte (and then did the same to the ClientHello, or waited on it) is
a ``hangup``: PostgreSQL does this ("invalid length of startup packet"), and Redis to a
request with a ``Host:`` line. :data:`HANGUPS` of them in a row are ``tcp`` at once, rather
than a minute of looks, each a line in the server's log. A forwarder whose far end is not up
yet (docker-proxy, ``ssh -L``, ``kubectl port-forward``) closes without reading the request,
inside the banner wait or a round trip after it: the unread bytes make that close a reset,
and a reset stays ``closed``, not ready yet.

Each look holds one of a bounded number of connections (:data:`MAX_CONNECTIONS`); a burst
of opens waits its turn. Everything runs on the loop: a look is a few small reads and writes
and at most one TLS handshake. During 1,000 looks at once no loop callback took 2 ms of CPU
(bench/detect.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
import time
from collections.abc import Callable

log = logging.getLogger("aether.ports")

HTTPS = "https"
HTTP = "http"
TCP = "tcp"
PROTOCOLS = (HTTPS, HTTP, TCP)

#: Seconds to listen for a banner before sending anything. Servers that speak first do so as
#: they accept, well under a millisecond on loopback; one that takes longer still answers the
#: request with its banner, and is found the same. Every look pays this once.
BANNER_WAIT = 0.05
#: Seconds for a connection to be accepted by the kernel (the listener's backlog answers it,
#: busy application or not; a full backlog drops it, and the look is tried again).
CONNECT_TIMEOUT = 2.0
#: Seconds for a TLS server to answer a ClientHello. It does as soon as it reads it (an
#: ``https`` verdict, connection and handshake included, took 4 to 15 ms more than an ``http``
#: one for Python's ssl, nginx and node on a loaded 2-vCPU VM: bench/detect.py), and this
#: look comes after the server has shown that it reads (it answered the plain request, or
#: closed).
TLS_TIMEOUT = 2.0
#: Seconds one connection waits for its answer before a fresh one is tried in its place: a
#: server that accepted it in a bad state may still answer a new one.
REFRESH = 10.0
#: Seconds after the port's open when a port that never answered is given up on as ``tcp``.
#: Dev servers listen before their first compile: Next.js's and webpack's hold requests until
#: it is done, seconds to tens of seconds on a large app.
DEADLINE = 60.0
#: Backoff between looks that found the port refusing or closing without an answer (a
#: container's proxy whose application has not started): doubling, up to the cap. With the cap
#: at 5 s, a server that always closes (PostgreSQL closes on bytes it cannot parse) is looked
#: at 16 times before the deadline.
FIRST_RETRY = 0.1
MAX_RETRY = 5.0
#: Looks in a row that ended in a hang-up after the request (see the module docstring) before
#: the port is ``tcp``: with the backoff, about 0.3 s of retries, so that a listener caught
#: in a passing bad state is looked at again, while PostgreSQL's log gets 6 lines, not 32.
HANGUPS = 3
#: Probe connections held at once across all ports. A burst of opens is looked at this many
#: at a time; a port that does not answer holds one for up to :data:`REFRESH`.
MAX_CONNECTIONS = 32
#: Bytes read of an answer: enough for a status line, or a banner to show.
ANSWER_BYTES = 64

#: The probe. ``Connection: close`` so that the server ends it; the User-Agent says who asks,
#: for the application's log.
REQUEST = b"OPTIONS * HTTP/1.1\r\nHost: localhost\r\nUser-Agent: aether-port-check\r\nConnection: close\r\n\r\n"

_TLS_HANDSHAKE = 0x16
_TLS_ALERT = 0x15


@dataclasses.dataclass(frozen=True, slots=True)
class Look:
    """What one look found: a protocol, or None if the port is not ready yet; ``reason``:
    ``tls``, ``tls-alert``, ``http``, ``banner``, ``answer`` (bytes that are not HTTP),
    ``closed`` (closed without an answer), ``hangup`` (closed without an answer after it had
    held the connection and read the request), ``silent``, ``refused``."""

    protocol: str | None
    reason: str
    status: int | None = None
    #: The first bytes of a non-HTTP answer or banner (for a page saying what answered).
    sample: bytes = b""


@dataclasses.dataclass(frozen=True, slots=True)
class Detection:
    """A port's protocol, and when it answered."""

    port: int
    protocol: str
    #: Seconds from the port's open to the look's verdict.
    elapsed: float
    reason: str
    attempts: int
    status: int | None = None
    sample: bytes = b""

    @property
    def ready(self) -> float | None:
        """Seconds from the port's open to its first HTTP answer or TLS handshake; None for a
        port that does not speak HTTP or never answered."""
        return self.elapsed if self.protocol in (HTTP, HTTPS) else None

    def to_json(self) -> dict:
        ready = self.ready
        return {
            "port": self.port,
            "protocol": self.protocol,
            "ready": None if ready is None else round(ready * 1000),
            "reason": self.reason,
        }


def _cancelled() -> None:
    """Raise CancelledError if this task was asked to stop. Python 3.11's ``wait_for`` can
    swallow a cancellation that lands as its awaitable finishes; a look loop that went on
    would then hold up the loop's shutdown until its deadline."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def local_source(host: str) -> tuple[str, int] | None:
    """Where a look at ``host`` is made from: loopback needs nothing; any other address is
    bound as the connection's own source first, which the kernel allows only for an address
    this host has. A listener bound (IP_FREEBIND) to another host's address is then refused
    a look, EADDRNOTAVAIL, rather than a connection leaving for that host."""
    if host.startswith("127.") or host == "::1":
        return None
    return (host, 0)


def client_context() -> ssl.SSLContext:
    """TLS to one of the workspace's own listeners: a dev server's certificate is self-signed,
    or for another name, so nothing is verified. No CA store is loaded (that is ~10 ms)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context


def classify_answer(data: bytes) -> tuple[str, int | None]:
    """The first bytes a port sent back: ``http`` and its status, ``tls`` for a TLS record
    (an alert to a plain request), else ``answer``."""
    if data.startswith(b"HTTP/1.") or (data and b"HTTP/1.".startswith(data)):
        status = data[9:12]
        return "http", int(status) if len(status) == 3 and status.isdigit() else None
    if len(data) >= 2 and data[0] in (_TLS_HANDSHAKE, _TLS_ALERT) and data[1] == 3:
        return "tls", None
    return "answer", None


def needs_tls(plain: Look) -> bool:
    """Whether the answer to the plain request could have come from a TLS server: a ``400``,
    a TLS record, or the connection closed without a word."""
    return plain.reason in ("tls", "closed", "hangup") or (plain.reason == "http" and plain.status == 400)


def combine(plain: Look, tls: Look) -> Look:
    """One look's verdict from the plain request's answer and the ClientHello's."""
    if tls.protocol == HTTPS:
        return tls
    if plain.reason == "http":  # a 400 from a plain HTTP server
        return plain
    if plain.reason == "tls":  # a TLS record to plain HTTP, and then no handshake
        return Look(TCP, "answer", sample=plain.sample)
    # Closed on the plain request: whatever answered the ClientHello, if anything. A hang-up
    # that then closes on the ClientHello too, or waits on it for more (Redis: no TLS server
    # is silent to a ClientHello), is a hang-up; one that refuses it may be changing state.
    # So may a port that reset the request and then answers the ClientHello with bytes that
    # are not TLS: a forwarder whose app came up between the two (Python's http.server
    # answers a ClientHello with an HTML page), to be looked at again, not ``tcp``.
    if tls.protocol == TCP and plain.reason == "closed":
        return Look(None, "closed")
    if tls.protocol is not None:
        return tls
    if plain.reason == "hangup" and tls.reason in ("closed", "hangup", "silent"):
        return Look(None, "hangup")
    return Look(None, "closed")


class Detector:
    """Finds each open port's protocol once; ``on_result(detection)`` when found.

    ``start(port, host, opened)`` when a port opens (``opened``: ``time.monotonic()`` of the
    open, a port event's ``seen_ns / 1e9``; not ``loop.time()``, which uvloop counts in whole
    milliseconds from the start of the loop's iteration), ``stop(port)`` when it closes,
    ``recheck`` to look again (a port found ``tcp`` that the proxy saw answer HTTP)."""

    def __init__(
        self,
        on_result: Callable[[Detection], None] | None = None,
        *,
        max_connections: int = MAX_CONNECTIONS,
        deadline: float = DEADLINE,
        banner_wait: float = BANNER_WAIT,
        refresh: float = REFRESH,
        tls_timeout: float = TLS_TIMEOUT,
    ):
        self.on_result = on_result
        self.deadline = deadline
        self.banner_wait = banner_wait
        self.refresh = refresh
        self.tls_timeout = tls_timeout
        self._slots = asyncio.Semaphore(max_connections)
        self._tasks: dict[int, asyncio.Task] = {}
        self._context: ssl.SSLContext | None = None
        #: Probe connections open now, and the most there were at once (for tests, metrics).
        self.connections = 0
        self.peak_connections = 0

    # -- per port ------------------------------------------------------------------------

    def start(self, port: int, host: str, opened: float | None = None) -> None:
        if port in self._tasks:
            return
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._run(port, host, time.monotonic() if opened is None else opened))
        self._tasks[port] = task

    def stop(self, port: int) -> None:
        task = self._tasks.pop(port, None)
        if task is not None:
            task.cancel()

    def recheck(self, port: int, host: str) -> None:
        self.stop(port)
        self.start(port, host)

    def pending(self) -> set[int]:
        return set(self._tasks)

    def close(self) -> None:
        for port in list(self._tasks):
            self.stop(port)

    async def _run(self, port: int, host: str, opened: float) -> None:
        try:
            detection = await self.detect(host, port, opened)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not take the port's other work down
            log.exception("port detection failed", extra={"port": port})
            return
        finally:
            if self._tasks.get(port) is asyncio.current_task():
                del self._tasks[port]
        if self.on_result is not None:
            self.on_result(detection)

    # -- the looks -----------------------------------------------------------------------

    async def detect(self, host: str, port: int, opened: float | None = None) -> Detection:
        """Look until the port answers or :data:`DEADLINE` after ``opened`` passes."""
        opened = time.monotonic() if opened is None else opened
        end = opened + self.deadline
        delay, attempts, closed, hangups = FIRST_RETRY, 0, False, 0
        while True:
            async with self._slots:
                # Measured once a connection is free: a look that waited its turn past the
                # deadline waits no more.
                look = await self.look(host, port, max(0.0, min(self.refresh, end - time.monotonic())))
            attempts += 1
            _cancelled()
            now = time.monotonic()
            if look.protocol is not None:
                return Detection(port, look.protocol, now - opened, look.reason, attempts, look.status, look.sample)
            closed = closed or look.reason in ("closed", "hangup")
            hangups = hangups + 1 if look.reason == "hangup" else 0
            pause = 0.0 if look.reason == "silent" else delay
            if now + pause >= end or hangups >= HANGUPS:
                return Detection(port, TCP, now - opened, "closed" if closed else look.reason, attempts)
            if pause:
                await asyncio.sleep(pause)
                delay = min(delay * 2, MAX_RETRY)
            _cancelled()

    async def look(self, host: str, port: int, wait: float = REFRESH) -> Look:
        """One look (see the module docstring), waiting up to ``wait`` seconds for an answer."""
        plain = await self._plain(host, port, wait)
        if not needs_tls(plain):
            return plain
        return combine(plain, await self._tls(host, port))

    async def _open(self, host: str, port: int):
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, local_addr=local_source(host)), CONNECT_TIMEOUT
            )
        except (TimeoutError, OSError):
            return None
        self.connections += 1
        self.peak_connections = max(self.peak_connections, self.connections)
        return reader, writer

    def _close(self, writer: asyncio.StreamWriter) -> None:
        self.connections -= 1
        writer.close()

    async def _plain(self, host: str, port: int, wait: float) -> Look:
        opened = await self._open(host, port)
        if opened is None:
            return Look(None, "refused")
        reader, writer = opened
        try:
            banner = None
            try:
                if self.banner_wait > 0:  # 0: the caller sends its request anyway (the preview)
                    banner = await asyncio.wait_for(reader.read(ANSWER_BYTES), self.banner_wait)
            except TimeoutError:
                pass
            except OSError:
                return Look(None, "closed")
            if banner is not None:
                # Closed as soon as accepted, or a server that speaks first.
                return Look(TCP, "banner", sample=banner) if banner else Look(None, "closed")
            try:
                _send(writer, REQUEST)
            except OSError:
                return Look(None, "closed")
            data = bytearray()
            reset = False
            try:
                await asyncio.wait_for(self._read_answer(reader, data), wait)
            except TimeoutError:
                if not data:
                    return Look(None, "silent")
            except OSError:
                reset = True
            if not data:
                # Held through the banner wait, read the request, then hung up. A reset says
                # the request was never read (closing a socket with unread bytes sends RST):
                # a forwarder whose far end is not up yet (docker-proxy, ssh -L, kubectl
                # port-forward) closes so, after a round trip, and is not ready yet, as is a
                # close with a banner wait of 0 (it may have come before the request).
                return Look(None, "hangup" if self.banner_wait > 0 and not reset else "closed")
            kind, status = classify_answer(bytes(data))
            if kind == "http":
                return Look(HTTP, "http", status)
            return Look(TCP if kind == "answer" else None, kind, sample=bytes(data))
        finally:
            self._close(writer)

    @staticmethod
    async def _read_answer(reader: asyncio.StreamReader, data: bytearray) -> None:
        """Into ``data``, up to a status line's worth, or whatever came before the server
        closed (kept if the wait ends first)."""
        while len(data) < 12:
            chunk = await reader.read(ANSWER_BYTES - len(data))
            if not chunk:
                break
            data += chunk

    async def _tls(self, host: str, port: int) -> Look:
        """A TLS handshake over memory buffers, so that the reply's first bytes can be seen
        before OpenSSL judges them: a record is TLS, whatever follows."""
        opened = await self._open(host, port)
        if opened is None:
            return Look(None, "refused")
        reader, writer = opened
        if self._context is None:
            self._context = client_context()
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self._context.wrap_bio(incoming, outgoing, server_hostname="localhost")
        first = b""
        try:
            async with asyncio.timeout(self.tls_timeout):
                while True:
                    try:
                        tls.do_handshake()
                        done = True
                    except ssl.SSLWantReadError:
                        done = False
                    except ssl.SSLError:
                        # Refused by a TLS server (an alert, no shared cipher): still TLS.
                        return Look(HTTPS, "tls-alert") if classify_answer(first)[0] == "tls" else self._not_tls(first)
                    if outgoing.pending:
                        _send(writer, outgoing.read())
                    if done:
                        self._goodbye(tls, outgoing, writer)
                        return Look(HTTPS, "tls")
                    chunk = await reader.read(16384)
                    if not chunk:
                        return self._not_tls(first)
                    if not first:
                        first = chunk[:ANSWER_BYTES]
                        if classify_answer(first)[0] != "tls":
                            return self._not_tls(first)
                    incoming.write(chunk)
        except TimeoutError:
            return Look(HTTPS, "tls") if first else Look(None, "silent")
        except OSError:
            return self._not_tls(first)
        finally:
            self._close(writer)

    @staticmethod
    def _not_tls(first: bytes) -> Look:
        if not first:
            return Look(None, "closed")
        kind, status = classify_answer(first)
        return Look(HTTP, "http", status) if kind == "http" else Look(TCP, "answer", sample=first)

    @staticmethod
    def _goodbye(tls: ssl.SSLObject, outgoing: ssl.MemoryBIO, writer: asyncio.StreamWriter) -> None:
        """close_notify, so that the server sees a clean end rather than an error."""
        try:
            tls.unwrap()
        except ssl.SSLError:
            pass
        if outgoing.pending and not writer.is_closing():
            writer.write(outgoing.read())


def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
    """``data`` to the port; ConnectionResetError where its connection has closed while the
    look waited (reset by the port as the wait ended: uvloop's write then raises RuntimeError)."""
    if writer.is_closing():
        raise ConnectionResetError("the connection was closed")
    writer.write(data)
