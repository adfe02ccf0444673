"""``aether gateway``: one of any number of stateless gateways of a fleet.

It holds the whole route table in memory (:class:`~.routes.Routes`, kept equal to Redis by a
:class:`~.follower.Follower`) and proxies each preview request to the VM that owns its prefix,
with the preview proxy's core (:class:`aether.preview.core.Proxy`). :class:`Gateway` is that
proxy's owner:

- its decider is :class:`~.gate.Gate`, which decides from the table alone and signs what it
  forwards;
- as connector it dials the VM's advertised address; a VM that refuses, does not answer or
  cannot be reached is the gateway's own 503 "workspace unavailable" page, which reloads
  itself (the VM's heartbeat deadline will say so to every gateway within seconds);
- as sink it counts responses and upstream latency for ``/metrics`` and logs failures, one
  line per workspace per second at most.

When a stream entry or a load turns a public port private, the tunnels (WebSockets) admitted
to it without a credential are closed.

The process around it (the listener, the gateway's own ``/healthz`` and ``/metrics``, signals)
is :mod:`aether.server.gateway`: Tornado and the listener are the server's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aether.fleet import routes as r
from aether.fleet.gate import RETRY_AFTER, FleetForward, Gate
from aether.fleet.metrics import Counters
from aether.preview.core import Proxy
from aether.preview.owner import Forward, Unreachable
from aether.preview.proxy import ClientConnection
from aether.preview.upstream import Upstream, dial

log = logging.getLogger("aether.fleet")

#: A VM on the gateways' network accepts a connection in well under a millisecond: one that
#: has not within 2 s is not answering, and the browser gets the self-refreshing 503 rather
#: than waiting out the proxy's 5 s.
CONNECT_TIMEOUT = 2.0


def unavailable() -> Unreachable:
    return Unreachable(
        503,
        "Workspace unavailable",
        "This workspace is not answering. This page reloads itself and shows the preview as soon as the workspace is back.",
        RETRY_AFTER,
        (("Retry-After", str(RETRY_AFTER)),),
    )


class Gateway:
    """The proxy's owner (connector and sink), and the listener's preview side."""

    def __init__(self, routes: r.Routes, gate: Gate, counters: Counters, timeout: float):
        self.loop = asyncio.get_running_loop()
        self.routes = routes
        self.gate = gate
        self.counters = counters
        self.proxy = Proxy(gate, self, self, timeout)
        self._failures: dict[str, tuple[float, int]] = {}  # prefix -> (last logged, suppressed since)
        routes.on_change = self.on_change
        routes.on_dead = self.on_dead

    # -- what the listener uses -------------------------------------------------------------

    def is_preview(self, host: bytes) -> bool:
        return self.gate.is_preview_host(host)

    def protocol(self) -> ClientConnection:
        return self.proxy.protocol()

    def connection_count(self) -> int:
        return len(self.proxy.connections)

    # -- the connector ----------------------------------------------------------------------

    def check(self, forward: Forward) -> Unreachable | None:
        return None  # decided from the table a moment ago; a VM gone since refuses the connection

    async def connect(self, forward: Forward, factory: Callable[[], Upstream]) -> Upstream:
        try:
            return await dial(
                self.loop,
                factory,
                forward.address,
                forward.port,
                CONNECT_TIMEOUT,
                name=f"the workspace's address {forward.address}:{forward.port}",
            )
        except ConnectionRefusedError:
            self._failed(forward, "the workspace's address refused the connection")
        except Unreachable as refusal:
            self._failed(forward, refusal.text.rstrip("."))
        raise unavailable()

    def explain(self, forward: Forward, why: str) -> Unreachable | None:
        return None  # the VM's aether explains its own ports; here a failure is the VM's

    # -- the sink ---------------------------------------------------------------------------

    def response(self, status: int) -> None:
        self.counters.responses[status] += 1

    def upstream_latency(self, seconds: float) -> None:
        self.counters.upstream_latency.observe(seconds)

    def upstream_failed(self, forward: Forward, why: str) -> None:
        self._failed(forward, why)

    def _failed(self, forward: Forward, why: str) -> None:
        """One line per workspace per second at most: a VM going away under load must not
        flood the log; the lines left out are counted in the next one."""
        assert isinstance(forward, FleetForward)  # the proxy hands back what the gate decided
        self.counters.upstream_failures += 1
        now = self.loop.time()
        last, suppressed = self._failures.get(forward.prefix, (0.0, 0))
        if now - last < 1.0:
            self._failures[forward.prefix] = (last, suppressed + 1)
            return
        if len(self._failures) > 4096:
            self._failures.clear()
        self._failures[forward.prefix] = (now, 0)
        log.info(
            "fleet upstream failed",
            extra={
                "prefix": forward.prefix,
                "port": forward.app_port,
                "address": f"{forward.address}:{forward.port}",
                "why": why,
                "suppressed": suppressed,
            },
        )

    # -- what changes in the table ----------------------------------------------------------

    def on_change(self, prefix: str, old, new) -> None:
        """A workspace's record changed: the public tunnels of ports no longer public close
        (credentialed ones stay: the credential still opens the port)."""
        for port in r.became_private(old, new):
            closed = self.proxy.close_tunnels((prefix, port))
            if closed:
                self.counters.tunnels_closed += closed
                log.info(
                    "fleet tunnels closed: the port is no longer public",
                    extra={"prefix": prefix, "port": port, "tunnels": closed},
                )

    def on_dead(self, prefix: str) -> None:
        """A workspace's deadline passed: its VM is gone or cut off, so what waits on it (a
        request in flight, a tunnel, an idle connection) would wait out the proxy's timeout.
        They end now; the next request is the 503."""
        self.proxy.abort_upstreams(lambda forward: getattr(forward, "prefix", None) == prefix)
        ws = self.routes.workspaces.get(prefix)
        if ws is not None:
            self.proxy.pool.close_addresses({ws.host})

    def close_all(self) -> None:
        self.proxy.close_all()
