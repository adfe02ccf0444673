"""Prometheus metrics of ``aether gateway``, at ``GET /metrics``.

As in ``aether serve`` (:mod:`aether.server.metrics`), the hot path never calls
prometheus_client: a proxied request adds to the plain counts of :class:`Counters` (a dict
increment and a bisect), and the follower keeps its own as attributes. At scrape time one
collector turns those, the route table's ``counts()`` and the proxy's open connections into
metric families, rendered from a registry of this gateway's own. prometheus_client is imported
at the first scrape.

Label values come from closed sets: HTTP statuses and the follower's reload reasons.
"""

from __future__ import annotations

import collections
import platform
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from aether import __version__
from aether.fleet.follower import Histogram

if TYPE_CHECKING:
    from aether.fleet.follower import Follower

#: Seconds, from the gateway starting on a request (connecting included) to the VM's response
#: head: a LAN hop and the VM's own proxy add well under a millisecond; the rest is the app's.
UPSTREAM_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Counters:
    """What the gateway's proxy counts: responses by status, upstream latency, tunnels closed."""

    def __init__(self) -> None:
        self.responses: collections.defaultdict[int, int] = collections.defaultdict(int)
        self.upstream_latency = Histogram(UPSTREAM_LATENCY_BUCKETS)
        self.upstream_failures = 0
        self.tunnels_closed = 0


def buckets(histogram: Histogram) -> list[tuple[str, int]]:
    """Cumulative (le, count) pairs, ``+Inf`` last, as the exposition wants them."""
    from prometheus_client.utils import floatToGoString

    out, running = [], 0
    for bound, count in zip((*histogram.bounds, float("inf")), histogram.counts):
        running += count
        out.append((floatToGoString(bound), running))
    return out


class Metrics:
    """``render`` gives the exposition of ``counters``, ``follower`` and ``connections()``."""

    def __init__(self, counters: Counters, follower: Follower, connections: Callable[[], int]):
        self.counters = counters
        self.follower = follower
        self.connections = connections
        self._registry: Any = None  # made at the first scrape

    def render(self, accept: str = "") -> tuple[bytes, str]:
        from prometheus_client import CollectorRegistry, ProcessCollector
        from prometheus_client.exposition import choose_encoder

        if self._registry is None:
            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(_Collector(self))
            ProcessCollector(registry=self._registry)
        encoder, content_type = choose_encoder(accept)
        return encoder(self._registry), content_type


class _Collector:
    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self) -> Iterator:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily

        m = self.metrics
        follower, counters = m.follower, m.counters
        workspaces, ports, alive = follower.routes.counts()
        yield InfoMetricFamily(
            "aether_gateway_build",
            "The running aether gateway.",
            value={"version": __version__, "python": platform.python_version()},
        )
        yield GaugeMetricFamily(
            "aether_gateway_routes", "Open ports routed: each is a preview this gateway forwards.", value=ports
        )
        yield GaugeMetricFamily("aether_gateway_workspaces", "Workspaces in the route table, available or not.", value=workspaces)
        yield GaugeMetricFamily(
            "aether_gateway_workspaces_alive",
            "Workspaces available: not stopped, not past their heartbeat deadline.",
            value=alive,
        )
        yield GaugeMetricFamily(
            "aether_gateway_redis_up",
            "1 while Redis answers; 0 while the gateway serves the routes it holds without it.",
            value=int(follower.redis_up),
        )
        reloads = CounterMetricFamily(
            "aether_gateway_reloads",
            "Full loads of the route table, by why (start, reconnect, gap, boot: Redis lost its data, interval).",
            labels=("reason",),
        )
        for reason, count in sorted(follower.reloads.items()):
            reloads.add_metric((reason,), count)
        yield reloads
        yield CounterMetricFamily(
            "aether_gateway_merges",
            "Loads that kept workspaces Redis no longer had, unconfirmed (Redis lost its data).",
            value=follower.merges,
        )
        yield CounterMetricFamily("aether_gateway_stream_entries", "Change stream entries applied.", value=follower.applied)
        yield CounterMetricFamily(
            "aether_gateway_redis_stalls",
            "Liveness checks Redis ran late (no deadline judged for a while after).",
            value=follower.stalls,
        )
        yield GaugeMetricFamily(
            "aether_gateway_last_load_seconds", "How long the last full load took.", value=follower.last_load_seconds
        )
        lag = HistogramMetricFamily(
            "aether_gateway_stream_lag_seconds",
            "From Redis's time in a change's stream id to the change applied to this gateway's table.",
        )
        lag.add_metric((), buckets(follower.lag), follower.lag.total)
        yield lag

        yield GaugeMetricFamily("aether_gateway_connections", "Browser connections to previews open now.", value=m.connections())
        requests = CounterMetricFamily(
            "aether_gateway_requests",
            "Preview requests answered, by the status sent (the VM's, or the gateway's own: 401, 404, 502, 503...).",
            labels=("status",),
        )
        for status, count in sorted(counters.responses.items()):
            requests.add_metric((str(status),), count)
        yield requests
        upstream = HistogramMetricFamily(
            "aether_gateway_upstream_latency_seconds",
            "From the gateway starting on a request (connecting to the VM included) to the VM's response head.",
        )
        upstream.add_metric((), buckets(counters.upstream_latency), counters.upstream_latency.total)
        yield upstream
        yield CounterMetricFamily(
            "aether_gateway_upstream_failures",
            "Requests whose VM could not be reached or broke off before answering.",
            value=counters.upstream_failures,
        )
        yield CounterMetricFamily(
            "aether_gateway_tunnels_closed",
            "Public WebSocket tunnels closed because their port turned private.",
            value=counters.tunnels_closed,
        )
