"""The workspace server: one Tornado application for the WebSocket API, the preview proxy
beside it on the same listener (see ``listener``), and ``serve`` to run them.

``/workspaces/{workspaceId}/ws`` is the protocol's endpoint (docs/protocol.md); ``/`` is the
dashboard (see ``dashboard``); ``/healthz`` answers without authentication; anything else is a
JSON 404.
SIGTERM and SIGINT close every WebSocket with 1001 and every preview connection, stop the probe
and return 0 within a second.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import sys
import time

import tornado.http1connection
import tornado.httpserver
import tornado.web

from aether import running
from aether.agent.store import AgentStoreError
from aether.attributes.live import LiveRules
from aether.ports.containers import Containers, socket_path
from aether.ports.ebpf import ProbeUnavailable
from aether.ports.facts import PortFacts
from aether.ports.monitor import PortMonitor
from aether.preview.gate import host_pattern
from aether.preview.owner import ProtocolOf
from aether.preview.service import PreviewProxy
from aether.preview.visibility import Visibility
from aether.registry.store import RegistryError
from aether.server.channels import Channel
from aether.server.channels.agent import AgentChannel
from aether.server.channels.config import ConfigChannel
from aether.server.channels.files import FilesChannel
from aether.server.channels.ports import PortsChannel
from aether.server.channels.terminal import TerminalChannel
from aether.server.client import Client, Endpoint
from aether.server.cookie import DASHBOARD_CHANNELS
from aether.server.dashboard import routes as dashboard_routes
from aether.server.dispatch import Dispatcher
from aether.server.hub import Hub
from aether.server.listener import SharedListener, answered
from aether.server.metrics import Metrics, Readings
from aether.server.metrics import routes as metrics_routes
from aether.server.registry_api import RegistryApi
from aether.server.registry_api import routes as registry_routes
from aether.settings import sources
from aether.settings.serve import Settings
from aether.state import StateDir

log = logging.getLogger("aether.server")
access = logging.getLogger("aether.access")

SHUTDOWN_CLOSE_TIMEOUT = 0.5
#: Tornado's defaults let anyone, before authenticating, hold a 100 MB body in memory or keep a
#: half-sent request open for an hour. Nothing here takes a body.
HTTP_LIMITS = {
    "max_body_size": 64 << 10,
    "max_header_size": 16 << 10,
    "idle_connection_timeout": 10.0,  # also the time allowed to send the request headers
    "body_timeout": 10.0,
}


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Access log without the query string: ``?token=`` must never reach a log line. Tornado
    calls it as each response completes, so it also marks the connection answered (see
    ``listener``)."""
    request = handler.request
    answered(request)
    access.info(
        "request",
        extra={
            "method": request.method,
            "path": request.path,
            "status": handler.get_status(),
            "ms": round(request.request_time() * 1000, 2),
            "client": request.remote_ip,
        },
    )


class HealthHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write({"status": "ok"})


class MisdirectedHandler(tornado.web.RequestHandler):
    """A preview host on a connection that began with an API request (see ``listener``)."""

    def prepare(self) -> None:
        self.set_status(421)
        self.set_header("Connection", "close")
        self.finish({"error": "misdirected", "message": "open a new connection for a preview host"})


class PathPreviewHandler(tornado.web.RequestHandler):
    """A path preview on a connection that began with an API request (a browser reuses its
    connections to one origin, and the API and path previews share one): the same URL again
    over a new connection, which the listener hands to the preview proxy."""

    async def prepare(self) -> None:
        if "Host" not in self.request.headers:
            # An HTTP/1.0 request without Host is not taken for a preview by the listener, so
            # the same URL again would come back here: a redirect loop. Say what is missing.
            self.set_status(400)
            self.set_header("Connection", "close")
            self.finish({"error": "bad_request", "message": "a path preview needs a Host header"})
            return
        self.set_status(307)
        self.set_header("Location", self.request.uri)
        self.set_header("Connection", "close")
        connection = self.request.connection
        await self.finish()
        if isinstance(connection, tornado.http1connection.HTTP1Connection):
            connection.close()


class NotFoundHandler(tornado.web.RequestHandler):
    def prepare(self) -> None:
        self.set_status(404)
        self.finish({"error": "not_found", "message": f"no such endpoint: {self.request.path}"})


class WorkspaceServer:
    """The monitor, the clients and the channels, wired together."""

    def __init__(self, settings: Settings, monitor: PortMonitor):
        self.settings = settings
        self.monitor = monitor
        self.state = StateDir(settings.state_dir)
        # Before the stores open their files: a directory made by hand or by an older aether
        # may let others read the token and the agent's history.
        changed, failed = self.state.tighten()
        if changed:
            log.warning("state directory tightened", extra={"path": str(self.state.path), "changed": changed})
        if failed:
            log.warning("state directory left readable by others", extra={"path": str(self.state.path), "failed": failed})
        self.hub = Hub(settings.ping_interval, settings.pong_timeout)
        self.metrics = Metrics(
            Readings(
                backend=lambda: monitor.backend,
                ports_open=lambda: len(monitor.table),
                monitor_stats=lambda: monitor.stats,
                clients=lambda: len(self.hub.clients),
                preview_connections=lambda: len(self.previews.connections) if self.previews is not None else 0,
            )
        )
        self.visibility = Visibility(settings.preview_public_ports)
        self.previews: PreviewProxy | None = None  # made by ``serve``, inside the event loop
        self.registry_changed: list = []  # called with the entries after each change (fleet mode)
        self.registry_api = RegistryApi(
            settings.state_dir / "registry.db", self._registry_changed, lambda: bool(self.hub.clients) or settings.fleet
        )
        # Port attributes from config.json and the workspace's files (read by ``serve``, and
        # again when they change), and what is found of each port off the event path.
        self.rules = LiveRules(settings.workspace_root, self.state.config_path, lambda: self.facts.rules_changed())
        self.facts = PortFacts(
            monitor.table,
            lambda event: self.ports_channel.on_facts(event),
            lambda port, protocol, ms: self.ports_channel.on_ready(port, protocol, ms),
            self.rules,
            registry=self.registry_api.protocol_at,
            containers=Containers(socket_path(settings.docker_socket)),
        )
        self.ports_channel = PortsChannel(
            monitor,
            monitor.table,
            self.hub,
            self.visibility,
            settings.preview_url_for,
            self.state.save_config,
            own_port=settings.port,
            kill_grace=settings.kill_grace,
            sent=self.metrics.port_event,
            facts=self.facts,
        )
        self.channels: dict[str, Channel] = {
            "ports": self.ports_channel,
            "config": ConfigChannel(settings, monitor, self.hub, self.state.save_config, self._registry_entries),
            "files": FilesChannel(settings.workspace_root),
            "terminal": TerminalChannel(settings),
            "agent": AgentChannel(settings),
        }
        self.dispatcher = Dispatcher(self.channels, self.metrics.ws_received, DASHBOARD_CHANNELS)
        self.endpoint = Endpoint(
            token=settings.token,
            workspace_id=settings.workspace_id,
            max_message_bytes=settings.max_message_bytes,
            send_buffer_bytes=settings.send_buffer_bytes,
            write_timeout=settings.write_timeout,
            hub=self.hub,
            receive=self.dispatcher.receive,
            opened=self.on_open,
            closed=self.dispatcher.close,
            counts=self.metrics,
        )

    def application(self) -> tornado.web.Application:
        app = tornado.web.Application(
            [
                (r"/workspaces/([^/]+)/ws", Client, {"endpoint": self.endpoint}),
                (r"/healthz", HealthHandler),
                (r"/(?:abs)?proxy/.*", PathPreviewHandler),
                *registry_routes(self),
                *dashboard_routes(self),
                *metrics_routes(self),
            ],
            default_handler_class=NotFoundHandler,
            log_function=log_request,
        )
        app.add_handlers(f"(?i){host_pattern(self.settings.preview_domain)}$", [(r".*", MisdirectedHandler)])
        return app

    def on_open(self, client: Client) -> None:
        self.dispatcher.open(client)
        self.registry_api.watch()

    def close_channels(self) -> None:
        """At shutdown: end what channels keep beside clients (watches, terminals, agent turns)."""
        for channel in self.channels.values():
            channel.close()

    def close(self) -> None:
        """End everything but the clients and the monitor: the channels (their process trees'
        cgroups are removed), the rules' watches, the port looks, the registry."""
        self.close_channels()
        self.rules.close()
        self.facts.close()
        self.registry_api.close()

    def _registry_entries(self) -> list[dict]:
        return [entry.to_json() for entry in self.registry_api.reader.entries()]

    def _registry_changed(self, entries) -> None:
        """Every client gets the whole registry after any change (it is small)."""
        self.hub.broadcast({"channel": "config", "type": "registry", "ports": [e.to_json() for e in entries]})
        self.facts.rules_changed()  # a port whose entry's protocol changed: its update
        for subscriber in self.registry_changed:
            subscriber(entries)

    def fresh(self, ask: ProtocolOf) -> ProtocolOf:
        """``ask(port)``, after a look at the registry (one ``PRAGMA data_version``, 4 us): the
        preview follows another process's write at once, though no client is connected to make
        the server look every second."""

        def asked(port: int) -> str | None:
            self.registry_api.check()
            return ask(port)

        return asked


def banner(settings: Settings, show_token: bool = True) -> str:
    """What ``serve`` prints on stdout once listening. Under systemd (``$JOURNAL_STREAM``) stdout
    is the journal, which more than root may read and shippers copy: the token is then named by
    its source, never printed."""
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    url = f"ws://{host}:{settings.port}{settings.ws_path}"
    token = settings.token if show_token else "TOKEN"
    shown = f"{settings.token}   (from {settings.token_source})" if show_token else f"in {settings.token_source}"
    return "\n".join(
        [
            f"aether serving workspace {settings.workspace_id} on http://{host}:{settings.port}",
            f"  WebSocket URL: {url}",
            f"  token:         {shown}",
            f'  connect:       wscat -c {url} -s "Bearer, {token}"',
            f'  or:            wscat -c "{url}?token={token}"',
            f"  previews:      {settings.preview_url_pattern}",
            f"  dashboard:     http://{host}:{settings.port}/?token={token}",
        ]
    )


async def serve(settings: Settings) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    monitor = PortMonitor(
        backend=settings.backend,
        ignored=settings.monitor_ignored,
        interval=sources.value("sockdiag_interval"),
        ebpf_buffer=sources.value("ebpf_buffer"),
        ebpf_pages=sources.value("ebpf_pages"),
    )
    try:
        await monitor.start()
    except ProbeUnavailable as exc:
        print(f"aether: eBPF backend unavailable: {exc}", file=sys.stderr)
        return 1
    try:
        server = WorkspaceServer(settings, monitor)
    except (RegistryError, AgentStoreError) as exc:
        monitor.stop()
        print(f"aether: {exc}", file=sys.stderr)
        return 1
    await server.rules.start()
    http = tornado.httpserver.HTTPServer(server.application(), **HTTP_LIMITS)
    previews = server.previews = PreviewProxy(
        settings,
        monitor,
        server.visibility,
        server.registry_api.port_of,
        server.metrics,
        protocol_of=server.facts.protocol_of,
        recheck=server.facts.recheck,
        # Asked first for every upstream decision: the one look at the registry per decision.
        chosen=server.fresh(server.facts.chosen_protocol),
    )
    listener = SharedListener(
        http,
        previews,
        settings.max_connections,
        settings.max_unauthenticated_per_address,
        previews.gate.is_trusted if settings.trusted_proxies else None,
    )
    try:
        listener.listen(settings.port, settings.host)
    except OSError as exc:
        server.close()
        monitor.stop()
        why = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        print(f"aether: cannot listen on {settings.host}:{settings.port}: {why}", file=sys.stderr)
        return 1
    publisher = None
    if settings.fleet:
        from aether.server import fleet

        try:
            publisher = await fleet.start(settings, server)
        except fleet.PrefixTaken as exc:
            listener.stop()
            previews.close_all()
            server.close()
            monitor.stop()
            print(f"aether: fleet mode: {exc}", file=sys.stderr)
            return 1
        server.registry_api.watch()
    preview = {
        "domain": settings.preview_domain,
        "prefix": settings.project_prefix,
        "upstreamHost": settings.preview_upstream_host,
        "workspaceRoot": str(settings.workspace_root),
    }
    announced = running.announce(settings.state_dir, settings.host, settings.port, preview)
    print(banner(settings, show_token=not os.environ.get("JOURNAL_STREAM")), flush=True)
    log.info(
        "serving",
        extra={"host": settings.host, "port": settings.port, "workspace": settings.workspace_id, "backend": monitor.backend},
    )
    try:
        await stop.wait()
    finally:
        running.withdraw(announced)
    started = time.monotonic()
    listener.stop()
    if publisher is not None:
        await publisher.stop()  # gateways answer 503 at once, not after the deadline
    previews.close_all()
    await server.hub.close_all(1001, "server shutting down", SHUTDOWN_CLOSE_TIMEOUT)
    server.close()
    monitor.stop()
    log.info("stopped", extra={"ms": round((time.monotonic() - started) * 1000, 1)})
    return 0
