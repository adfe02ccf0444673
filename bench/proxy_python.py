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
import cProfile
import pstats
import socket
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
    b"GET /1k.html HTTP/1.1\r\nHost: " + HOST + b"\r\nConnection: keep-alive\r\n"
    b'sec-ch-ua: "Chromium";v="120", "Not?A_Brand";v="24"\r\nsec-ch-ua-mobile: ?0\r\n'
    b'sec-ch-ua-platform: "Linux"\r\nUpgrade-Insecure-Requests: 1\r\n'
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8\r\n"
    b"Sec-Fetch-Site: none\r\nSec-Fetch-Mode: navigate\r\nSec-Fetch-User: ?1\r\nSec-Fetch-Dest: document\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\nAccept-Language: en-US,en;q=0.9\r\n"
    b"Cookie: theme=dark; aether_preview=COOKIE\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 07 Dec 2026 16:50:29 GMT\r\n"
    b"Content-Type: text/html\r\nContent-Length: 1024\r\nLast-Modified: Mon, 07 Dec 2026 16:50:00 GMT\r\n"
    b'Connection: keep-alive\r\nETag: "6753a1b8-400"\r\nAccept-Ranges: bytes\r\n\r\n' + b"x" * 1024
)


class Transport:
    """What a protocol needs of an ``asyncio`` transport; writes are kept for the checks."""

    def __init__(self):
        self.written: list[bytes] = []
        self.closed = False
        self.write = self.written.append

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def is_closing(self):
        return False

    def close(self):
        self.closed = True

    abort = close


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
    up_side, browser_side = Transport(), Transport()
    up = Upstream(preview.proxy.pool, ("127.0.0.1", 8080))
    up.connection_made(up_side)
    preview.proxy.pool.put(up)
    client = preview.protocol()
    client.connection_made(browser_side)

    def one():
        client.data_received(request)
        up.data_received(RESPONSE)

    for _ in range(1000):
        one()
    assert up_side.written[-1].startswith(b"GET /1k.html HTTP/1.1\r\nHost: localhost:8080\r\n"), up_side.written[-1]
    assert b"".join(browser_side.written[-2:]).endswith(b"x" * 1024) and browser_side.written[-1], browser_side.written[-2:]
    up_side.written.clear()
    browser_side.written.clear()
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    # CPU time, not wall time: other processes taking the CPU meanwhile do not count.
    rounds = []
    for _ in range(5):
        started = time.process_time()
        for _ in range(requests // 5):
            one()
            if len(browser_side.written) > 1000:
                browser_side.written.clear()
                up_side.written.clear()
        rounds.append((time.process_time() - started) / (requests // 5))
        assert not browser_side.closed
    if profiler:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
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
