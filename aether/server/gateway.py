"""The process of ``aether gateway``: its listener, its own endpoints and its signals, around
:class:`aether.fleet.gateway.Gateway` (the proxy's owner) and the fleet's follower.

The listener is the server's :class:`~.listener.SharedListener`: preview hosts of the domain go
to the gateway's proxy, any other host to a small Tornado application:

- ``GET /healthz``: 200 ``{"status": "ok"|"degraded", "redis": "up"|"down", ...}`` (degraded:
  Redis is down and the routes held are served), 503 ``starting`` before the first load;
- ``GET /metrics``: Prometheus text (:mod:`aether.fleet.metrics`), with ``Authorization:
  Bearer`` and the token of ``--metrics-token-file``, or to anyone with ``--metrics-public``
  (403 with neither);
- anything else: 404 JSON.

Access lines are logged at debug level (load balancers ask for ``/healthz`` every second),
never with a query string. SIGTERM and SIGINT stop accepting, close every connection, stop the
follower and return 0 within a second.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import hmac
import logging
import signal
import sys
import time
from typing import TYPE_CHECKING

import tornado.httpserver
import tornado.web

from aether.server.listener import SharedListener, answered

if TYPE_CHECKING:
    from aether.fleet.follower import Follower
    from aether.fleet.metrics import Metrics
    from aether.settings.gateway import GatewaySettings

log = logging.getLogger("aether.fleet")
access = logging.getLogger("aether.access")

#: Time allowed, at shutdown, for the gateway's own HTTP connections to close.
SHUTDOWN_TIMEOUT = 0.5

#: Nothing here takes a body; a request head has no reason to be long or slow.
HTTP_LIMITS = {"max_body_size": 4 << 10, "max_header_size": 16 << 10, "idle_connection_timeout": 10.0, "body_timeout": 10.0}


def _log(handler: tornado.web.RequestHandler) -> None:
    request = handler.request
    answered(request)  # the listener stops counting the connection as unauthenticated
    access.debug(
        "request",
        extra={
            "method": request.method,
            "path": request.path,
            "status": handler.get_status(),
            "ms": round(request.request_time() * 1000, 2),
            "client": request.remote_ip,
        },
    )


class _Json(tornado.web.RequestHandler):
    def fail(self, status: int, code: str, message: str) -> None:
        self.set_status(status)
        self.finish({"error": code, "message": message})

    def write_error(self, status_code: int, **kwargs) -> None:
        self.finish({"error": "http_error", "message": self._reason})

    def compute_etag(self) -> None:
        return None


class HealthHandler(_Json):
    def initialize(self, follower: Follower) -> None:
        self.follower = follower

    def get(self) -> None:
        body = self.follower.health()
        self.set_header("Cache-Control", "no-store")
        self.set_status(503 if body["status"] == "starting" else 200)
        self.finish(body)


class MetricsHandler(_Json):
    def initialize(self, metrics: Metrics, token: str | None, public: bool) -> None:
        self.metrics, self.token, self.public = metrics, token, public

    def prepare(self) -> None:
        if self.public:
            return
        if self.token is None:
            self.fail(403, "forbidden", "metrics are off: start the gateway with --metrics-token-file or --metrics-public")
            return
        scheme, _, given = self.request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            self.set_header("WWW-Authenticate", 'Bearer realm="aether gateway"')
            self.fail(401, "unauthorized", "send Authorization: Bearer with the metrics token")

    def get(self) -> None:
        body, content_type = self.metrics.render(self.request.headers.get("Accept", ""))
        self.set_header("Content-Type", content_type)
        self.set_header("Cache-Control", "no-store")
        self.finish(body)


class NotFoundHandler(_Json):
    def prepare(self) -> None:
        self.fail(404, "not_found", f"no such endpoint: {self.request.path}; previews are on the hosts of the preview domain")


def application(follower: Follower, metrics: Metrics, token: str | None, public: bool) -> tornado.web.Application:
    return tornado.web.Application(
        [
            (r"/healthz", HealthHandler, {"follower": follower}),
            (r"/metrics", MetricsHandler, {"metrics": metrics, "token": token, "public": public}),
        ],
        default_handler_class=NotFoundHandler,
        log_function=_log,
    )


def run(args: argparse.Namespace) -> int:
    from aether import log as logs
    from aether.cli import loop_factory
    from aether.settings.gateway import resolve

    try:
        settings = resolve(args)
    except ValueError as exc:  # a fleet key file that cannot be used too (KeyFileError)
        print(f"aether: {exc}", file=sys.stderr)
        return 2
    if settings.metrics_token:
        logs.redact(settings.metrics_token)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(serve(settings))


async def serve(settings: GatewaySettings) -> int:
    from aether.fleet import connection
    from aether.fleet import routes as r
    from aether.fleet.follower import Follower
    from aether.fleet.gate import Gate
    from aether.fleet.gateway import Gateway
    from aether.fleet.metrics import Counters, Metrics

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    routes = r.Routes()
    follower = Follower(
        settings.redis, routes, liveness_interval=settings.liveness_interval, reload_interval=settings.reload_interval
    )
    gate = Gate(routes, settings.keys, settings.preview_domain, settings.trusted_proxies)
    counters = Counters()
    gateway = Gateway(routes, gate, counters, settings.preview_timeout)
    metrics = Metrics(counters, follower, gateway.connection_count)
    http = tornado.httpserver.HTTPServer(
        application(follower, metrics, settings.metrics_token, settings.metrics_public), **HTTP_LIMITS
    )
    listener = SharedListener(
        http,
        gateway,
        settings.max_connections,
        settings.max_unauthenticated_per_address,
        gate.is_trusted if settings.trusted_proxies else None,
    )
    # The table first: a gateway that answered before it would call every workspace unknown.
    # A Redis that is down leaves it empty (5 s at most), loaded once Redis is back.
    await follower.start()
    try:
        listener.listen(settings.port, settings.host)
    except OSError as exc:
        await follower.stop()
        why = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        print(f"aether: cannot listen on {settings.host}:{settings.port}: {why}", file=sys.stderr)
        return 1
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    print(f"aether gateway on http://{host}:{settings.port}: previews of *.{settings.preview_domain}", flush=True)
    workspaces, ports, alive = routes.counts()
    log.info(
        "gateway serving",
        extra={
            "host": settings.host,
            "port": settings.port,
            "domain": settings.preview_domain,
            "redis": connection.describe(settings.redis),
            "redis_up": follower.redis_up,
            "workspaces": workspaces,
            "alive": alive,
            "ports": ports,
        },
    )
    await stop.wait()
    started = time.monotonic()
    listener.stop()
    gateway.close_all()
    try:
        await asyncio.wait_for(http.close_all_connections(), SHUTDOWN_TIMEOUT)
    except TimeoutError:
        pass
    await follower.stop()
    log.info("gateway stopped", extra={"ms": round((time.monotonic() - started) * 1000, 1)})
    return 0
