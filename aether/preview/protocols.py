"""Which protocol the proxy speaks to a port: TLS to an ``https`` one, plain HTTP to an
``http`` one, and none to a ``tcp`` one (the browser gets a page saying so).

What a person, the registry or an attribute rule chose (the owner's ``chosen``) is used as it is, without a
look: a chosen ``tcp`` is the not-HTTP page at once, with no connection to the port. Else the
owner's ``protocol_of`` (the ports table's detection, with its overrides) is asked: a dict
lookup. Where it has no answer yet (the port's detection has not finished, or the
proxy runs without one), the port is looked at here, once, with the ports' own
:class:`~aether.ports.detect.Detector`, and the verdict is kept until a listener of that port
changes (it closed, or another socket took the number). A look that finds nothing yet (the
port refused, or has not answered) is not kept: the request goes as plain HTTP, as it always
did, and the next one looks again.

TLS is chosen before any request is sent, so an HTTPS server never sees a plain request
(nginx's "The plain HTTP request was sent to HTTPS port" page cannot show). The context
verifies nothing: the upstream is one of this workspace's own listeners, reached over
loopback or an address of its own, and a dev server's certificate is self-signed.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Hashable

from aether.ports.detect import HTTP, HTTPS, TCP, Detector, client_context

#: Seconds an on-demand look waits for a port's answer before the request goes as plain
#: HTTP: a TLS server answers the probe within milliseconds (an alert, a 400, or a close), so
#: only a plain server that holds requests (a dev server's first compile) waits this long.
LOOK_WAIT = 2.0


class UpstreamProtocols:
    """The protocol for each port; see the module docstring. ``identity(port)``: what the
    port's listeners are now (their socket keys), so a verdict is dropped when they change;
    ``recheck(port)``: the owner's detection said ``tcp`` and a look here found HTTP."""

    def __init__(
        self,
        protocol_of: Callable[[int], str | None] | None,
        identity: Callable[[int], Hashable],
        detector: Detector | None = None,
        recheck: Callable[[int], None] | None = None,
        chosen: Callable[[int], str | None] | None = None,
    ):
        self.protocol_of = protocol_of
        self.chosen = chosen
        self.recheck = recheck
        self.identity = identity
        # No wait for a banner: a browser is asking for this port over HTTP, so sending it the
        # probe is what the request would do anyway, and a speaks-first server's banner still
        # arrives as the probe's answer (not HTTP: tcp). The 50 ms wait was the whole of a new
        # port's first preview request (listen() -> first 200: p50 60 ms, 4 ms without).
        self.detector = detector or Detector(banner_wait=0.0)
        self._found: dict[int, tuple[Hashable, str]] = {}  # port -> (listeners, protocol)
        self._looking: dict[tuple[int, Hashable], asyncio.Future] = {}
        self._context: ssl.SSLContext | None = None

    def known(self, port: int) -> str | None:
        """The port's protocol without looking: the one chosen, else the owner's, else a
        verdict kept here.

        The owner's detected ``tcp`` is looked at once more here before a page says the port
        speaks no HTTP: its detection gives up on a port that has not answered for a minute, and
        a dev server's first compile can take longer. A chosen ``tcp`` is not: a person said so."""
        if self.chosen is not None:
            chosen = self.chosen(port)
            if chosen is not None:
                return chosen
        if self.protocol_of is not None:
            protocol = self.protocol_of(port)
            if protocol in (HTTP, HTTPS):
                return protocol
        found = self._found.get(port)
        return found[1] if found is not None and found[0] == self.identity(port) else None

    async def protocol(self, port: int, address: str) -> str:
        """``https``, ``http`` or ``tcp``; ``http`` while nothing better is known."""
        protocol = self.known(port)
        if protocol is not None:
            return protocol
        identity = self.identity(port)
        key = (port, identity)
        looking = self._looking.get(key)
        if looking is None:
            # One look per port at a time: a page's dozen first requests share it.
            looking = self._looking[key] = asyncio.ensure_future(self._look(port, address, identity))
            looking.add_done_callback(lambda _: self._looking.pop(key, None))
        return await asyncio.shield(looking)

    async def _look(self, port: int, address: str, identity: Hashable) -> str:
        look = await self.detector.look(address, port, LOOK_WAIT)
        if look.protocol is None:
            # A port that hangs up on every look (PostgreSQL, Redis) still gets the request: an
            # app that closes on ``OPTIONS *`` alone answers it, and one that closes on it too
            # gets the not-HTTP page then (:meth:`tcp_after_hangup`).
            return HTTP
        if identity == self.identity(port):
            self._found[port] = (identity, look.protocol)
            if look.protocol != TCP and self.recheck is not None and self.protocol_of is not None:
                if self.protocol_of(port) == TCP:
                    self.recheck(port)  # the owner's detection is behind: it looks again
        return look.protocol

    def tcp_after_hangup(self, port: int) -> bool:
        """The app closed a request's connection without a byte: whether that is a port
        that speaks no HTTP (its detection found it hangs up on every look), so that the
        page says so rather than blaming the app."""
        return self.protocol_of is not None and self.protocol_of(port) == TCP

    def forget(self, port: int) -> None:
        """The port closed: its next listener is looked at afresh."""
        self._found.pop(port, None)

    def context(self) -> ssl.SSLContext:
        """The client context for TLS upstreams (no verification; ALPN ``http/1.1``)."""
        if self._context is None:
            self._context = client_context()
        return self._context

    def ssl_for(self, protocol: str) -> ssl.SSLContext | None:
        return self.context() if protocol == HTTPS else None
