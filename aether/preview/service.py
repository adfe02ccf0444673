"""The preview proxy of one workspace: the owner (:mod:`.owner`) of a :class:`~.core.Proxy`.

Its decider is the workspace's :class:`~.gate.Gate`. As connector it keeps upstreams on this
host (loopback or an address of its own interfaces, :mod:`.local`, checked again as each
request starts and as each connection is made), speaks TLS to an ``https`` port and answers
for a port that speaks no HTTP (:mod:`.protocols`), and retries a refused connection while the
port is open. As sink it counts into the server's metrics and logs each port's failures.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aether.ports.detect import HTTPS, TCP
from aether.ports.events import CLOSE, PortEvent
from aether.preview import pages
from aether.preview.core import Proxy
from aether.preview.gate import Gate
from aether.preview.local import LocalAddresses, is_local
from aether.preview.owner import Forward, ProtocolOf, Unreachable
from aether.preview.protocols import UpstreamProtocols
from aether.preview.proxy import ClientConnection
from aether.preview.upstream import NO_ANSWER, Upstream, dial
from aether.preview.visibility import Visibility

log = logging.getLogger("aether.preview")

#: ``open`` can reach a client a few microseconds before the socket accepts: a refused
#: connect to an open port is retried this long.
CONNECT_RETRY_SECONDS = 0.5


class PreviewProxy:
    """The preview proxy of one workspace: the gate, the proxy and its connections."""

    def __init__(
        self,
        settings,
        monitor,
        visibility: Visibility,
        named,
        metrics,
        protocol_of: ProtocolOf | None = None,
        recheck: Callable[[int], None] | None = None,
        chosen: ProtocolOf | None = None,
    ):
        self.loop = asyncio.get_running_loop()
        self.monitor = monitor
        # Counted by the connections, read at scrape time (aether.server.metrics).
        self._responses = metrics.preview_responses
        self._latency = metrics.preview_upstream_latency
        self.local = LocalAddresses(self.loop, self._on_addresses)
        self.gate = Gate(settings, monitor, visibility, named, self.local.addresses)
        self.protocols = UpstreamProtocols(protocol_of, self._listeners_of, recheck=recheck, chosen=chosen)
        self.proxy = Proxy(self.gate, self, self, settings.preview_timeout)
        self.connections: set[ClientConnection] = self.proxy.connections
        self._failures: dict[int, tuple[float, int]] = {}  # port -> (last logged, suppressed since)
        self._unsubscribe = monitor.subscribe(self._on_event)
        try:
            self.local.start()
        except OSError as exc:
            log.error("local addresses unavailable; previews reach loopback only", extra={"error": str(exc)})

    # -- what the listener uses -------------------------------------------------------------

    def protocol(self) -> ClientConnection:
        return self.proxy.protocol()

    def is_preview(self, host: bytes) -> bool:
        """Whether a connection whose first request names ``host`` is a preview's."""
        return self.gate.preview_host(host) is not None

    def connection_count(self) -> int:
        return len(self.proxy.connections)

    # -- the connector ----------------------------------------------------------------------

    def check(self, forward: Forward) -> Unreachable | None:
        """An upstream must still be this host's: an address removed since the decision may
        belong to another host now."""
        if is_local(forward.address, self.local.addresses):
            return None
        self.log_failure(forward.port, f"{forward.address} is not an address of this host")
        return Unreachable(502, pages.NOT_LOCAL_TITLE, pages.not_local_text(forward.port, forward.address))

    async def connect(self, forward: Forward, factory: Callable[[], Upstream]) -> Upstream:
        port = forward.port
        table = self.monitor.table
        started = self.loop.time()
        while True:
            refusal = self.check(forward)
            if refusal is not None:
                raise refusal
            protocol = await self.protocols.protocol(port, forward.address)
            if protocol == TCP:
                self.log_failure(port, "the port does not speak HTTP")
                raise Unreachable(
                    502, pages.NOT_HTTP_TITLE, pages.not_http_text(port), headers=(("X-Aether-Error", pages.NOT_HTTP_CODE),)
                )
            try:
                up = await dial(self.loop, factory, forward.address, port, ssl=self.protocols.ssl_for(protocol))
                break
            except Unreachable as exc:
                chosen = self.protocols.chosen(port) if self.protocols.chosen is not None else None
                if chosen == HTTPS and exc.title == pages.TLS_FAILED_TITLE:
                    # A rule, the registry or a person said https; the port did not answer TLS. The page says
                    # whose word that was, not that the port speaks TLS.
                    self.log_failure(port, "set to https, but the port does not speak TLS")
                    raise Unreachable(502, pages.TLS_FAILED_TITLE, pages.chosen_https_text(port)) from None
                raise
            except ConnectionRefusedError:
                self.gate.forget(port)
                if port in table and self.loop.time() - started < CONNECT_RETRY_SECONDS:
                    await asyncio.sleep(0.005)
                    continue
                if port not in table:
                    raise Unreachable(
                        502, "Nothing is listening yet", pages.not_listening_text(port), pages.REFRESH_SECONDS
                    ) from None
                raise Unreachable(502, "Connection refused", f"Port {port} refused the connection.") from None
        refusal = self.check(forward)
        if refusal is not None:
            up.close()
            raise refusal
        return up

    def explain(self, forward: Forward, why: str) -> Unreachable | None:
        """The page for an upstream that failed with ``why``, where it is not the app's fault:
        a port that hangs up on HTTP (PostgreSQL, Redis) speaks no HTTP."""
        if why == NO_ANSWER and self.protocols.tcp_after_hangup(forward.port):
            port = forward.port
            return Unreachable(
                502, pages.NOT_HTTP_TITLE, pages.not_http_text(port), headers=(("X-Aether-Error", pages.NOT_HTTP_CODE),)
            )
        return None

    # -- the sink ---------------------------------------------------------------------------

    def response(self, status: int) -> None:
        self._responses[status] += 1

    def upstream_latency(self, seconds: float) -> None:
        self._latency.observe(seconds)

    def upstream_failed(self, forward: Forward, why: str) -> None:
        self.log_failure(forward.port, why)

    def log_failure(self, port: int, why: str) -> None:
        """One line per port per second at most: an app crashing under load must not flood
        the log; the lines left out are counted in the next one."""
        now = self.loop.time()
        last, suppressed = self._failures.get(port, (0.0, 0))
        if now - last < 1.0:
            self._failures[port] = (last, suppressed + 1)
            return
        self._failures[port] = (now, 0)
        log.info("preview upstream failed", extra={"port": port, "why": why, "suppressed": suppressed})

    # -- what changes below -----------------------------------------------------------------

    def _on_event(self, event: PortEvent) -> None:
        self.gate.forget(event.port)
        if event.type == CLOSE:
            self.protocols.forget(event.port)
            self.proxy.pool.close_port(event.port)

    def _listeners_of(self, port: int) -> tuple:
        return tuple(sorted(str(listener.key) for listener in self.monitor.table.listeners(port)))

    def _on_addresses(self, added: set[str], removed: set[str]) -> None:
        """This host's addresses changed: choose upstreams again, and drop every connection to
        an address it no longer has (its packets would now leave for whoever has it)."""
        self.gate.forget_all()
        if not removed:
            return
        self.proxy.pool.close_addresses(removed)
        self.proxy.abort_upstreams(lambda forward: forward.address in removed)

    def close_all(self) -> None:
        self._unsubscribe()
        self.local.close()
        self.proxy.close_all()
