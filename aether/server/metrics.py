"""Prometheus metrics of ``aether serve``, at ``GET /metrics``.

The hot paths (a port event, a WebSocket message, a proxied request) never call
prometheus_client: they add to plain counts kept here (a dict increment, ~0.2 us; a labelled
prometheus_client Counter costs 0.5-1.7 us and a Histogram 1 us). At scrape time one collector
turns those counts, and what the server knows anyway (open ports, connected clients, the
monitor's resync and loss counters: :class:`Readings`, callables the server gives), into metric
families, rendered by prometheus_client from a registry of this server's own: two servers in
one process never share a metric.

prometheus_client is imported at the first scrape, not at start: beside what the server
imports anyway it adds ~1.4 MiB to the daemon's resident memory (bench/footprint.py, idle
`aether serve`: 39.1 MiB with it imported at start, 37.5 MiB without), which a workspace
nobody scrapes never pays.

Label values come from closed sets: event types and backends, the protocol's channels and
types (anything else is ``unknown``), error codes and HTTP statuses the code can produce.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import platform
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from aether import __version__
from aether.server.registry_api import ApiHandler

if TYPE_CHECKING:
    from aether.server.app import WorkspaceServer

#: Seconds. An eBPF event takes ~0.1 ms from the kernel to the clients, a sock_diag one up to
#: its polling interval; a proxied response head, whatever the app takes (up to the timeout).
EVENT_LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
UPSTREAM_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    """The buckets of one Prometheus histogram; ``observe`` is a bisect and two additions."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        # Bucket "le" holds values <= le: bisect_left finds the first bound not below value.
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative (le, count) pairs, ``+Inf`` last, as the exposition wants them."""
        from prometheus_client.utils import floatToGoString

        out, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            running += count
            out.append((floatToGoString(bound), running))
        return out


@dataclasses.dataclass(frozen=True)
class Readings:
    """What the server knows anyway, read at each scrape."""

    #: The backend watching ports (``ebpf``, ``sockdiag``), None before the monitor started.
    backend: Callable[[], str | None]
    #: TCP ports listening now, ignored ports left out.
    ports_open: Callable[[], int]
    #: The monitor's counters: ``resyncs`` and ``lost``.
    monitor_stats: Callable[[], Mapping[str, float]]
    #: WebSocket clients connected now.
    clients: Callable[[], int]
    #: Browser connections to previews open now.
    preview_connections: Callable[[], int]


class Metrics:
    """What one server counts; ``render`` gives the exposition with what it counted and what
    ``readings`` say."""

    def __init__(self, readings: Readings):
        self.readings = readings
        self.port_events: collections.defaultdict[tuple[str, str], int] = collections.defaultdict(int)  # (type, backend)
        self.port_latency: dict[str, Histogram] = {}  # backend ->
        self.ws_received: collections.defaultdict[tuple[str, str], int] = collections.defaultdict(int)  # (channel, type)
        self.ws_errors: collections.defaultdict[str, int] = collections.defaultdict(int)  # code ->
        self.ws_frames_sent = 0
        self.ws_bytes_sent = 0
        self.preview_responses: collections.defaultdict[int, int] = collections.defaultdict(int)  # status ->
        self.preview_upstream_latency = Histogram(UPSTREAM_LATENCY_BUCKETS)
        self._exposition: Any = None  # prometheus_client's registry, made at the first scrape

    def port_event(self, event, now_ns: int, sent: bool) -> None:
        """Count a port event; when clients got it, the time from when it was seen."""
        self.port_events[(event.type, event.backend)] += 1
        if sent:
            histogram = self.port_latency.get(event.backend)
            if histogram is None:
                histogram = self.port_latency[event.backend] = Histogram(EVENT_LATENCY_BUCKETS)
            histogram.observe((now_ns - event.seen_ns) / 1e9)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition in the format ``accept`` asks for (text by default), and its type."""
        from prometheus_client import CollectorRegistry, ProcessCollector
        from prometheus_client.exposition import choose_encoder

        if self._exposition is None:
            self._exposition = CollectorRegistry(auto_describe=False)
            self._exposition.register(_Collector(self))
            ProcessCollector(registry=self._exposition)
        encoder, content_type = choose_encoder(accept)
        return encoder(self._exposition), content_type


class _Collector:
    """Everything but the process metrics, built afresh at each scrape."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self) -> Iterator:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily

        m, readings = self.metrics, self.metrics.readings
        stats = readings.monitor_stats()
        yield InfoMetricFamily(
            "aether_build",
            "The running aether.",
            value={"version": __version__, "python": platform.python_version(), "backend": readings.backend() or "none"},
        )

        yield GaugeMetricFamily(
            "aether_ports_open", "TCP ports listening now, ignored ports left out.", value=readings.ports_open()
        )
        events = CounterMetricFamily(
            "aether_port_events",
            "Port open, update and close events, by how they were seen "
            "(ebpf: a probe record; sockdiag: a snapshot; config: ignored ports changed; "
            "pidfd: a recorded owner exited).",
            labels=("type", "backend"),
        )
        for (kind, backend), count in sorted(m.port_events.items()):
            events.add_metric((kind, backend), count)
        yield events
        latency = HistogramMetricFamily(
            "aether_port_event_latency_seconds",
            "From the kernel's timestamp of a "
            "port event (eBPF) or the snapshot that found it to its frame handed to "
            "the clients' sockets; events no client was connected for are left out.",
            labels=("backend",),
        )
        for backend, histogram in sorted(m.port_latency.items()):
            latency.add_metric((backend,), histogram.buckets(), histogram.total)
        yield latency
        yield CounterMetricFamily(
            "aether_port_resyncs",
            "Snapshots diffed against the probe's view of the ports "
            "(start-up, lost or uncertain records; sock_diag polls are not counted).",
            value=stats["resyncs"],
        )
        yield CounterMetricFamily(
            "aether_port_events_lost",
            "Probe records the kernel could not deliver (each loss is followed by a resync).",
            value=stats["lost"],
        )

        yield GaugeMetricFamily("aether_websocket_clients", "WebSocket clients connected now.", value=readings.clients())
        received = CounterMetricFamily(
            "aether_ws_messages_received",
            "Client messages, by channel and type (unknown: not one the protocol has).",
            labels=("channel", "type"),
        )
        for (channel, kind), count in sorted(m.ws_received.items()):
            received.add_metric((channel, kind), count)
        yield received
        yield CounterMetricFamily("aether_ws_messages_sent", "Messages sent to clients (one a client).", value=m.ws_frames_sent)
        yield CounterMetricFamily("aether_ws_sent_bytes", "Bytes of the messages sent to clients.", value=m.ws_bytes_sent)
        errors = CounterMetricFamily("aether_ws_errors", "Error replies to client messages, by code.", labels=("code",))
        for code, count in sorted(m.ws_errors.items()):
            errors.add_metric((code,), count)
        yield errors

        yield GaugeMetricFamily(
            "aether_preview_connections", "Browser connections to previews open now.", value=readings.preview_connections()
        )
        responses = CounterMetricFamily(
            "aether_preview_requests",
            "Preview requests answered, by the status sent (the app's, or the proxy's own: 401, 502, 504...).",
            labels=("status",),
        )
        for status, count in sorted(m.preview_responses.items()):
            responses.add_metric((str(status),), count)
        yield responses
        upstream = HistogramMetricFamily(
            "aether_preview_upstream_latency_seconds",
            "From the proxy starting on a request (connection included) to the app's response head.",
        )
        upstream.add_metric((), m.preview_upstream_latency.buckets(), m.preview_upstream_latency.total)
        yield upstream


class MetricsHandler(ApiHandler):
    """``GET /metrics``: the workspace token as ``Authorization: Bearer``, unless
    ``--metrics-public``."""

    def prepare(self) -> None:
        if not self.server.settings.metrics_public:
            super().prepare()

    def get(self) -> None:
        body, content_type = self.server.metrics.render(self.request.headers.get("Accept", ""))
        self.set_header("Content-Type", content_type)
        self.set_header("Cache-Control", "no-store")
        self.finish(body)

    def compute_etag(self) -> None:
        return None  # never the same twice: hashing each scrape would be wasted


def routes(server: WorkspaceServer) -> list:
    return [(r"/metrics", MetricsHandler, {"server": server})]
