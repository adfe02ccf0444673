"""GET /metrics of a real `aether serve`: authentication, and each family moving when real
listeners, WebSocket clients and preview requests make it move. The exposition is read with
prometheus_client's own parser.

Other tests on the host open and close ports meanwhile, so port counts are compared with
the kernel's (retried until both agree) or as deltas that concurrent events cannot fake."""

from __future__ import annotations

import asyncio
import http.client
import json
import platform
import socket
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import ROOT
from support.clients import recv_until
from support.ebpf import need_ebpf
from support.ports import free_port, kernel_listening_ports
from support.servers import Server
from support.waiting import until, wait_for

from aether import __version__
from aether.ports.monitor import PortMonitor

PROJECT = "feed42beef"


def get(server: Server, path: str = "/metrics", headers: dict | None = None) -> tuple[int, dict, str]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read().decode()
    finally:
        conn.close()


def scrape(server: Server, auth: bool = True) -> dict[tuple, float]:
    """Every sample, keyed by (name, sorted label pairs)."""
    status, headers, body = get(server, headers={"Authorization": f"Bearer {server.token}"} if auth else {})
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict, name: str) -> float:
    """A family's samples summed over their labels (0 when it has none yet)."""
    return sum(v for (n, _), v in samples.items() if n == name)


def test_metrics_needs_the_workspace_token(workspace_server):
    server = workspace_server()
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": server.token},
        {"Authorization": f"Basic {server.token}"},
    ):
        status, reply_headers, body = get(server, headers=headers)
        assert status == 401, headers
        assert json.loads(body)["error"] == "unauthorized"
        assert reply_headers["www-authenticate"].startswith("Bearer")
    # The query string is not a way in: a scrape URL would carry the token into access logs.
    assert get(server, f"/metrics?token={server.token}")[0] == 401
    samples = scrape(server)
    assert value(samples, "aether_build_info", backend="sockdiag", python=platform.python_version(), version=__version__) == 1
    assert value(samples, "process_resident_memory_bytes") > 0
    assert server.token not in "".join(server.raw_stderr)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_metrics_public_serves_without_the_token(workspace_server, how):
    server = workspace_server("--metrics-public") if how == "flag" else workspace_server(env={"AETHER_METRICS_PUBLIC": "1"})
    samples = scrape(server, auth=False)
    assert value(samples, "aether_websocket_clients") == 0
    assert scrape(server)  # the token still works too


def test_openmetrics_when_asked(workspace_server):
    server = workspace_server()
    status, headers, body = get(
        server, headers={"Authorization": f"Bearer {server.token}", "Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert status == 200 and headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")


def test_port_events_counted_with_their_latency(serve, listeners, backend):
    server = serve()
    ignored = {22, 2222, 3001, server.port}

    def ports_open_agrees() -> bool:
        # Both sides move with other tests' listeners: retried until they are seen agreeing.
        return value(scrape(server), "aether_ports_open") == len(kernel_listening_ports() - ignored)

    with server.connect() as ws:
        wait_for(lambda: value(scrape(server), "aether_websocket_clients") == 1)
        before = scrape(server)
        http = listeners.http_server()
        port = http.port
        recv_until(ws, lambda m: m.get("port") == port and m["type"] == "open")
        wait_for(ports_open_agrees)
        http.kill()
        http.wait()
        recv_until(ws, lambda m: m.get("port") == port and m["type"] == "close")
        after = scrape(server)
        wait_for(ports_open_agrees)

    for kind in ("open", "close"):
        delta = value(after, "aether_port_events_total", type=kind, backend=backend) - value(
            before, "aether_port_events_total", type=kind, backend=backend
        )
        assert delta >= 1, (kind, backend)
    # With a client connected throughout, every event counted was also timed, whoever caused it.
    events = total(after, "aether_port_events_total") - total(before, "aether_port_events_total")
    timed = total(after, "aether_port_event_latency_seconds_count") - total(before, "aether_port_event_latency_seconds_count")
    assert events == timed >= 2
    count = value(after, "aether_port_event_latency_seconds_count", backend=backend)
    assert value(after, "aether_port_event_latency_seconds_bucket", backend=backend, le="+Inf") == count
    seconds = value(after, "aether_port_event_latency_seconds_sum", backend=backend) - value(
        before, "aether_port_event_latency_seconds_sum", backend=backend
    )
    timed_here = count - value(before, "aether_port_event_latency_seconds_count", backend=backend)
    # eBPF: ~0.1 ms each; sock_diag: the snapshot's own time (it is timed from the snapshot).
    assert 0 < seconds / timed_here < (0.05 if backend == "ebpf" else 0.5)
    assert value(after, "aether_port_resyncs_total") >= (1 if backend == "ebpf" else 0)
    assert ("aether_port_events_lost_total", ()) in after
    wait_for(lambda: value(scrape(server), "aether_websocket_clients") == 0)


@pytest.mark.ebpf
def test_ebpf_events_carry_the_kernels_timestamp():
    """Stamped in the kernel at listen(), on CLOCK_MONOTONIC (time.monotonic_ns): not when
    the loop, held busy meanwhile, got to the record."""
    need_ebpf()

    async def main():
        monitor = PortMonitor(backend="ebpf")
        await monitor.start()
        seen = []
        monitor.subscribe(lambda event: seen.append((event, time.monotonic_ns())))
        port = free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))
                before = time.monotonic_ns()
                s.listen()
                listened = time.monotonic_ns()
                time.sleep(0.05)  # the loop is held: the record waits in the ring buffer
                await until(lambda: any(e.port == port for e, _ in seen), interval=0.001)
        finally:
            monitor.stop()
        event, delivered = next((e, t) for e, t in seen if e.port == port)
        assert event.backend == "ebpf"
        assert before <= event.seen_ns <= listened
        assert delivered - listened >= 50_000_000

    asyncio.run(main())


def test_messages_and_errors_counted(workspace_server):
    server = workspace_server()
    with server.connect() as ws:
        for frame in (
            '{"channel":"ports","type":"kill","port":"x","id":1}',
            "not json",
            '{"channel":"ports","type":"nope"}',
            '{"channel":"bogus","type":"kill"}',
            '{"channel":"config","type":"get","id":2}',
        ):
            ws.send(frame)
        replies = [recv_until(ws, lambda m: m["channel"] != "ports" or m["type"] == "error") for _ in range(5)]
        assert [r.get("code") for r in replies] == ["bad_message", "bad_json", "unknown_type", "unknown_channel", None]
        samples = scrape(server)
        assert value(samples, "aether_websocket_clients") == 1
    received = "aether_ws_messages_received_total"
    assert value(samples, received, channel="ports", type="kill") == 1  # malformed, but its type is known
    assert value(samples, received, channel="ports", type="unknown") == 1
    assert value(samples, received, channel="unknown", type="unknown") == 2
    assert value(samples, received, channel="config", type="get") == 1
    for code in ("bad_message", "bad_json", "unknown_type", "unknown_channel"):
        assert value(samples, "aether_ws_errors_total", code=code) == 1, code
    assert total(samples, "aether_ws_errors_total") == 4
    assert value(samples, "aether_ws_messages_sent_total") >= 5
    assert value(samples, "aether_ws_sent_bytes_total") > 100


def test_preview_requests_by_status_and_upstream_latency(workspace_server, listeners):
    port = listeners.http_server().port
    server = workspace_server("--project-id", PROJECT)  # its start-up snapshot has the app
    preview = f"{port}-{PROJECT[:6]}.preview.localhost:{server.port}"
    auth = {"Host": preview, "Authorization": f"Bearer {server.token}"}
    statuses = [
        get(server, "/", auth)[0],
        get(server, "/", auth)[0],
        get(server, "/", {"Host": preview})[0],
        get(server, "/missing", auth)[0],
    ]
    assert statuses == [200, 200, 401, 404]
    not_listening = f"{free_port()}-{PROJECT[:6]}.preview.localhost:{server.port}"
    assert get(server, "/", {"Host": not_listening, "Authorization": auth["Authorization"]})[0] == 502
    samples = scrape(server)
    requests = "aether_preview_requests_total"
    assert {k[1][0][1]: v for k, v in samples.items() if k[0] == requests} == {"200": 2, "401": 1, "404": 1, "502": 1}
    # The app's answers (200, 200, 404) were timed; the proxy's own (401, 502) were not.
    assert value(samples, "aether_preview_upstream_latency_seconds_count") == 3
    assert 0 < value(samples, "aether_preview_upstream_latency_seconds_sum") < 3
    assert value(samples, "aether_preview_upstream_latency_seconds_bucket", le="+Inf") == 3


def test_prometheus_client_waits_for_the_first_scrape():
    """The server with its metrics made imports no prometheus_client until something scrapes;
    the scrape reads what the readings say at that moment."""
    code = """
import sys
import aether.server.app
from aether.server.metrics import Metrics, Readings
now = {"ports": 3}
metrics = Metrics(Readings(backend=lambda: "ebpf", ports_open=lambda: now["ports"],
                           monitor_stats=lambda: {"resyncs": 2, "lost": 1}, clients=lambda: 4,
                           preview_connections=lambda: 5))
print("prometheus_client" in sys.modules)
now["ports"] = 7
sys.stdout.write(metrics.render()[0].decode())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    imported, body = done.stdout.split("\n", 1)
    assert imported == "False"
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }
    assert value(samples, "aether_ports_open") == 7
    assert value(samples, "aether_websocket_clients") == 4
    assert value(samples, "aether_preview_connections") == 5
    assert (value(samples, "aether_port_resyncs_total"), value(samples, "aether_port_events_lost_total")) == (2, 1)
    assert value(samples, "aether_build_info", backend="ebpf", python=platform.python_version(), version=__version__) == 1
