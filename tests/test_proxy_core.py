"""The preview proxy's core with an owner of the test's own: no workspace, no monitor, no gate.

The owner forwards every request (its decider), connects with its own policy, and counts
into its own sink; behind the proxy run a real http.server (the misbehaving test app, in a
thread) and a real ``websockets`` echo server, in front of it real clients (http.client and
``websockets``). What a workspace adds to the proxy is tested end to end in test_preview.py.
"""

from __future__ import annotations

import asyncio
import collections
import http.client
import importlib.util
import json
import socket
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from support.waiting import until
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed

from aether.preview import headers as h
from aether.preview.core import Proxy
from aether.preview.owner import Forward, Unreachable
from aether.preview.upstream import dial

ROOT = Path(__file__).resolve().parents[1]
#: All the core may import of aether: a gateway builds it without a workspace.
CORE = {
    "aether",
    "aether.preview",
    "aether.preview.core",
    "aether.preview.proxy",
    "aether.preview.upstream",
    "aether.preview.owner",
    "aether.preview.headers",
    "aether.preview.pages",
}
DEADLINE = 10.0


def _test_app():
    spec = importlib.util.spec_from_file_location("upstream_app", ROOT / "tests" / "upstreams" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Handler


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Owner:
    """Forwards ``/ws/...`` to the WebSocket server (tagged by path), ``/down`` to a closed
    port, anything else to the HTTP app; refuses with ``refuse`` when it is set."""

    def __init__(self, app_port: int, ws_port: int):
        self.app_port, self.ws_port, self.down_port = app_port, ws_port, _closed_port()
        self.refuse: Unreachable | None = None
        self.responses: collections.Counter[int] = collections.Counter()
        self.latencies: list[float] = []
        self.failures: list[tuple[bytes, str]] = []

    def decide(self, method, target, headers, client_ip, upgrade, previous=None):
        head = h.RequestHead(headers)
        path = target.partition(b"?")[0]
        port = self.ws_port if path.startswith(b"/ws/") else self.down_port if path == b"/down" else self.app_port
        upstream = head.upstream(
            method,
            target,
            host=b"app.test",
            client_ip=client_ip,
            forwarded_host=b"front.test",
            forwarded_port=b"80",
            proto=b"http",
            via=b"1.1 test-owner",
            upgrade=upgrade,
        )
        forward = Forward(port, "127.0.0.1", upstream, tag=path if upgrade else None)
        forward.has_body, forward.chunked = head.has_body, head.chunked
        return forward

    def check(self, forward):
        return self.refuse

    async def connect(self, forward, factory):
        try:
            return await dial(asyncio.get_running_loop(), factory, forward.address, forward.port)
        except ConnectionRefusedError:
            raise Unreachable(503, "Owner says down", "Nothing answers there.", refresh=7) from None

    def explain(self, forward, why):
        return None

    def response(self, status):
        self.responses[status] += 1

    def upstream_latency(self, seconds):
        self.latencies.append(seconds)

    def upstream_failed(self, forward, why):
        self.failures.append((forward.head.split(b" ")[1], why))


async def _echo(ws):
    async for message in ws:
        await ws.send(message)


def _run(scenario):
    """Run ``scenario(proxy, owner, port)`` against a proxy on a loopback port, the apps behind it."""
    app = ThreadingHTTPServer(("127.0.0.1", 0), _test_app())
    thread = threading.Thread(target=app.serve_forever, args=(0.05,), daemon=True)
    thread.start()

    async def main():
        async with ws_serve(_echo, "127.0.0.1", 0) as ws_server:
            owner = Owner(app.server_address[1], ws_server.sockets[0].getsockname()[1])
            proxy = Proxy(owner, owner, owner, timeout=DEADLINE)
            server = await asyncio.get_running_loop().create_server(proxy.protocol, "127.0.0.1", 0)
            try:
                async with asyncio.timeout(DEADLINE * 3):
                    await scenario(proxy, owner, server.sockets[0].getsockname()[1])
            finally:
                proxy.close_all()
                server.close()

    try:
        asyncio.run(main())
    finally:
        app.shutdown()
        app.server_close()


def _get(conn: http.client.HTTPConnection, path: str):
    conn.request("GET", path)
    reply = conn.getresponse()
    return reply.status, dict(reply.getheaders()), reply.read()


def test_the_core_imports_nothing_of_a_workspace():
    """proxy.py, upstream.py and core.py stand without the gate, the monitor, visibility or the
    server: what they need comes from their owner."""
    code = "import sys, aether.preview.core; print('\\n'.join(m for m in sys.modules if m.startswith('aether')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert set(out.split()) <= CORE, set(out.split()) - CORE


def test_a_request_passes_with_the_owners_head_and_counts():
    async def scenario(proxy, owner, port):
        def requests():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE)
            first = _get(conn, "/echo/one")
            second = _get(conn, "/echo/two")
            conn.close()
            return first, second

        (status1, _, body1), (status2, _, body2) = await asyncio.to_thread(requests)
        assert (status1, status2) == (200, 200)
        one, two = json.loads(body1), json.loads(body2)
        assert one["target"] == "/echo/one"
        seen = {name.lower(): value for name, value in one["headers"]}
        assert seen["host"] == "app.test" and seen["x-forwarded-host"] == "front.test"
        assert seen["via"] == "1.1 test-owner"
        assert one["peer_port"] == two["peer_port"]  # the second went over the pooled connection
        assert owner.responses == {200: 2}
        assert len(owner.latencies) == 2 and all(0 < s < DEADLINE for s in owner.latencies)
        # The client's connection ends once the proxy reads its close; another aether on the
        # host may look at the proxy's new port meanwhile, and its look ends as soon.
        await until(lambda: not proxy.connections, DEADLINE)

    _run(scenario)


def test_the_owner_decides_how_to_connect_and_hears_of_failures():
    async def scenario(proxy, owner, port):
        def requests():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE)
            down = _get(conn, "/down")
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE)
            crash = _get(conn, "/crash")
            conn.close()
            owner.refuse = Unreachable(502, "Refused by the owner", "Not this one.")
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE)
            refused = _get(conn, "/echo")
            conn.close()
            return down, crash, refused

        down, crash, refused = await asyncio.to_thread(requests)
        assert down[0] == 503 and b"Owner says down" in down[2] and b"Nothing answers there." in down[2]
        assert crash[0] == 502
        assert [target for target, _ in owner.failures] == [b"/crash"]
        assert "closed the connection" in owner.failures[0][1]
        assert refused[0] == 502 and b"Refused by the owner" in refused[2]
        assert owner.responses == {503: 1, 502: 2}

    _run(scenario)


def test_tunnels_pass_and_close_by_tag():
    async def scenario(proxy, owner, port):
        async with ws_connect(f"ws://127.0.0.1:{port}/ws/a") as a, ws_connect(f"ws://127.0.0.1:{port}/ws/b") as b:
            for ws, text in ((a, "through a"), (b, "through b")):
                await ws.send(text)
                assert await ws.recv() == text
            assert owner.responses == {101: 2}
            assert len(proxy.tunnels(b"/ws/a")) == 1 and len(proxy.tunnels(b"/ws/b")) == 1

            assert proxy.close_tunnels(b"/ws/a") == 1
            with pytest.raises(ConnectionClosed):
                await a.recv()
            assert proxy.tunnels(b"/ws/a") == []
            await b.send("still open")
            assert await b.recv() == "still open"
            assert proxy.close_tunnels(b"/ws/a") == 0
        while proxy.tunnels(b"/ws/b"):  # b's client closed: its tunnel leaves the index
            await asyncio.sleep(0.01)

    _run(scenario)
