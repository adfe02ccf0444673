"""What the preview proxy needs from whoever runs it: three small protocols, and the two
decisions one of them returns. No I/O.

The proxy (:mod:`.core`, :mod:`.proxy`, :mod:`.upstream`) moves bytes between browsers and
apps, and knows nothing of where it runs. Its owner gives it:

- a :class:`Decider`, which says what to do with each request head: :class:`Forward` it to an
  upstream, or :class:`Answer` it here;
- a :class:`Connector`, which says whether a Forward's upstream may still be used and makes
  new connections to it, with the owner's own policy (retries, what a refusal means);
- a :class:`Sink`, which counts responses and upstream latency and logs upstream failures.

A workspace's previews are one owner (:mod:`.service`); a gateway routing to other hosts is
another, with its own decider, connections and counters.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from aether.preview.headers import Headers
    from aether.preview.upstream import Upstream


class Forward:
    """Send ``head`` (then the body) to ``address``:``port``. ``tag`` names what the request
    reaches, for its owner (None: nothing to name); the proxy keeps the WebSocket tunnels of
    each tag so that its owner can close them (:meth:`.core.Proxy.close_tunnels`). ``memo`` is
    the decider's own, for its next decision on the same connection (see :class:`Decider`)."""

    __slots__ = ("port", "address", "head", "has_body", "chunked", "tag", "memo")

    def __init__(self, port: int, address: str, head: bytes, tag: Hashable | None = None):
        self.has_body = self.chunked = False
        self.port = port
        self.address = address
        self.head = head
        self.tag = tag
        self.memo: object = None


class Answer:
    """Answer with ``response`` (complete bytes); ``close`` the connection afterwards."""

    __slots__ = ("status", "response", "close", "has_body", "chunked")

    def __init__(self, status: int, response: bytes, close: bool = False):
        self.has_body = self.chunked = False
        self.status = status
        self.response = response
        self.close = close


class Unreachable(Exception):
    """A Forward's upstream cannot be used: the browser gets this page (``refresh``: seconds
    after which it reloads itself)."""

    def __init__(self, status: int, title: str, text: str, refresh: int | None = None, headers: tuple = ()):
        super().__init__(status, title)
        self.status = status
        self.title = title
        self.text = text  # HTML, escaped already
        self.refresh = refresh
        self.headers = headers  # (name, value) pairs for the page's response: its code, say


class ProtocolOf(Protocol):
    def __call__(self, port: int) -> str | None:
        """A port's protocol, ``https``, ``http`` or ``tcp``, or None while it is not known
        (not open, not detected yet). A lookup: never blocks, never raises."""
        ...


class Decider(Protocol):
    def decide(
        self,
        method: bytes,
        target: bytes,
        headers: Headers,
        client_ip: str,
        upgrade: bool,
        previous: Forward | None = None,
    ) -> Forward | Answer:
        """What to do with the request whose head is ``method``, ``target`` and ``headers``
        (in the order received), from ``client_ip``; ``upgrade``: it asks for one. Sets the
        decision's ``has_body`` and ``chunked`` from the head's framing. ``previous``: the last
        Forward decided on the same connection, whose ``memo`` the decider may reuse (it must
        never outlive a change of what the decision read)."""
        ...


class Connector(Protocol):
    def check(self, forward: Forward) -> Unreachable | None:
        """Whether ``forward``'s upstream may still be used, asked when its request starts
        (which may be a while after its decision, behind pipelined requests), before a pooled
        connection is taken or a new one made: None, or why not."""
        ...

    async def connect(self, forward: Forward, factory: Callable[[], Upstream]) -> Upstream:
        """A new connection to ``forward``'s upstream, made with ``factory`` (see
        :func:`.upstream.dial`); raises :class:`Unreachable`. Cancelled when the browser goes
        away meanwhile."""
        ...

    def explain(self, forward: Forward, why: str) -> Unreachable | None:
        """What a failure of ``forward``'s upstream (``why``, the proxy's words) means, where
        the owner knows better than the proxy (a port that speaks no HTTP): the page to show,
        or None for the proxy's own 502."""
        ...


class Sink(Protocol):
    def response(self, status: int) -> None:
        """A response went to a browser: an app's (its status as the app sent it, ``101``
        included) or the proxy's own page."""
        ...

    def upstream_latency(self, seconds: float) -> None:
        """From the proxy starting on a forwarded request (connecting included) to the app's
        response head."""
        ...

    def upstream_failed(self, forward: Forward, why: str) -> None:
        """An app's connection failed before its response began (the browser gets a 502);
        ``why`` is a sentence for the log, without its final stop."""
        ...
