"""The preview proxy's own Python per request, without sockets: a workspace's real proxy
(``PreviewProxy``: its gate, connector and sink) with in-memory transports on both sides, fed
the bytes of wrk's 1 KB GET and nginx's response, one request after another on one keep-alive
connection with a pooled upstream connection. What is left out is the event loop's and the
kernel's share (reads, writes, epoll): ``proxy_profile.py`` shows those.

    .venv/bin/python bench/proxy_python.py [--requests 200000] [--browser] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import CHROMIUM_LINES, NGINX_1K, MemoryTransport, cpu_per_request  # noqa: E402

from aether.ports.events import Listener  # noqa: E402
from aether.ports.table import PortTable  # noqa: E402
from aether.preview.service import PreviewProxy  # noqa: E402
from aether.preview.upstream import Upstream  # noqa: E402
from aether.preview.visibility import Visibility  # noqa: E402
from aether.server.metrics import Metrics  # noqa: E402

TOKEN = "secret"
HOST = b"8080-abc123.preview.localhost:3001"
WRK = b"GET /1k.html HTTP/1.1\r\nHost: " + HOST + b"\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n\r\n"
# What Chromium sends for a page: a dozen headers, the preview cookie among them.
BROWSER = (
    b"GET /1k.html HTTP/1.1\r\nHost: " + HOST + b"\r\n" + CHROMIUM_LINES + b"Cookie: theme=dark; aether_preview=COOKIE\r\n\r\n"
)


async def measure(requests: int, request: bytes, profile: bool) -> None:
    table = PortTable((22, 3001))
    table.add(Listener(("sk", 0), 8080, socket.AF_INET, "127.0.0.1"))
    monitor = types.SimpleNamespace(table=table, subscribe=lambda callback: lambda: None)
    settings = types.SimpleNamespace(
        token=TOKEN,
        project_prefix="abc123",
        preview_domain="preview.localhost",
        preview_upstream_host="localhost",
        port=3001,
        trusted_proxies=(),
        preview_timeout=30.0,
    )
    preview = PreviewProxy(settings, monitor, Visibility(), lambda key: None, Metrics(None))
    request = request.replace(b"COOKIE", preview.gate.cookie_value(HOST.partition(b":")[0]))
    up_side, browser_side = MemoryTransport(), MemoryTransport()
    up = Upstream(preview.proxy.pool, ("127.0.0.1", 8080))
    up.connection_made(up_side)
    preview.proxy.pool.put(up)
    client = preview.protocol()
    client.connection_made(browser_side)

    def one():
        client.data_received(request)
        up.data_received(NGINX_1K)

    for _ in range(1000):
        one()
    assert up_side.written[-1].startswith(b"GET /1k.html HTTP/1.1\r\nHost: localhost:8080\r\n"), up_side.written[-1]
    assert b"".join(browser_side.written[-2:]).endswith(b"x" * 1024) and browser_side.written[-1], browser_side.written[-2:]
    up_side.written.clear()
    browser_side.written.clear()
    rounds = cpu_per_request(one, browser_side, up_side, requests, profile)
    print(
        f"{min(rounds) * 1e6:.2f} us of Python (CPU) per request, best of 5 rounds of {requests // 5:,} "
        f"(median {sorted(rounds)[2] * 1e6:.2f}), {len(request)}-byte request head"
    )
    preview.close_all()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--browser", action="store_true", help="Chromium's request head instead of wrk's")
    parser.add_argument("--profile", action="store_true", help="under cProfile, the top functions printed")
    args = parser.parse_args()
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(measure(args.requests, BROWSER if args.browser else WRK, args.profile))


if __name__ == "__main__":
    sys.exit(main())
