"""A fleet gateway's own Python per request, without sockets or Redis, as proxy_python.py measures
a workspace's proxy: the real :class:`aether.fleet.gateway.Gateway` (its gate, connector and
sink) over a route table loaded with one workspace, with in-memory transports on both sides,
fed the bytes of wrk's 1 KB GET (or Chromium's head) and nginx's response, one request after
another on one keep-alive connection with a pooled upstream connection. The event loop's and
the kernel's share are left out: ``gateway_profile.py`` shows those.

    .venv/bin/python bench/gateway_python.py [--requests 200000] [--browser] [--targets N]
        [--credential none|bearer|cookie] [--tree TREE] [--profile]

``--targets N``: the requests cycle through N paths (a page's assets on one connection);
``--tree``: another checkout's aether is measured instead (a baseline, run one after the other).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from common import CHROMIUM_LINES, NGINX_1K, MemoryTransport, cpu_per_request

HERE = Path(__file__).resolve().parents[1]
TOKEN = "secret"
PREFIX = "abc123"
HOST = b"8080-abc123.fleet.localhost"
WRK = b"GET /1k.html HTTP/1.1\r\nHost: " + HOST + b"\r\nCREDENTIAL\r\n"
BROWSER = b"GET /1k.html HTTP/1.1\r\nHost: " + HOST + b"\r\n" + CHROMIUM_LINES + b"CREDENTIAL\r\n"


async def measure(requests: int, head: bytes, credential: str, targets: int, profile: bool) -> None:
    from aether.fleet import auth, blob
    from aether.fleet import routes as r
    from aether.fleet.gate import Gate
    from aether.fleet.gateway import Gateway
    from aether.fleet.metrics import Counters
    from aether.preview.upstream import Upstream

    keys = auth.FleetKeys([b"k" * 32])
    verifier = auth.verifier(keys, TOKEN, PREFIX)
    raw = blob.encode(
        prefix=PREFIX,
        project=PREFIX + "-project",
        workspace="ws",
        address="127.0.0.1:3001",
        epoch="0123456789abcdef",
        started=1,
        dead_after=3_600_000,
        verifier=verifier,
        alive=True,
        ports={8080: "public" if credential == "none" else "private"},
        public=(8080,) if credential == "none" else (),
        names={},
    )
    routes = r.Routes()
    now_ms = int(time.time() * 1000)
    routes.load(r.Snapshot(1, b"1-0", b"boot", now_ms, {PREFIX.encode(): raw}, {PREFIX.encode(): now_ms + 3_600_000}))
    gateway = Gateway(routes, Gate(routes, keys, "fleet.localhost"), Counters(), 30.0)
    if credential == "bearer":
        line = b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
    elif credential == "cookie":
        line = b"Cookie: theme=dark; aether_fleet=" + auth.mint_cookie(keys, HOST, verifier.encode()) + b"\r\n"
    else:
        line = b""
    heads = [head.replace(b"CREDENTIAL", line).replace(b"/1k.html", b"/%d.js" % n if n else b"/1k.html") for n in range(targets)]
    up_side, browser_side = MemoryTransport(), MemoryTransport()
    up = Upstream(gateway.proxy.pool, ("127.0.0.1", 3001))
    up.connection_made(up_side)
    gateway.proxy.pool.put(up)
    client = gateway.protocol()
    client.connection_made(browser_side)
    turn = [0]

    def one():
        client.data_received(heads[turn[0] % targets])
        turn[0] += 1
        up.data_received(NGINX_1K)

    for _ in range(1000):
        one()
    assert up_side.written and up_side.written[-1].startswith(b"GET /"), browser_side.written[:1]
    assert b"X-Aether-Fleet: v1 " in up_side.written[-1], up_side.written[-1]
    assert b"".join(browser_side.written[-2:]).endswith(b"x" * 1024), browser_side.written[-2:]
    up_side.written.clear()
    browser_side.written.clear()
    rounds = cpu_per_request(one, browser_side, up_side, requests, profile)
    print(
        f"{min(rounds) * 1e6:.2f} us of Python (CPU) per request, best of 5 rounds of {requests // 5:,} "
        f"(median {sorted(rounds)[2] * 1e6:.2f}), {len(heads[0])}-byte request head, credential {credential}, "
        f"{targets} target(s)"
    )
    gateway.close_all()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--browser", action="store_true", help="Chromium's request head instead of wrk's")
    parser.add_argument("--credential", choices=("none", "bearer", "cookie"), default="none")
    parser.add_argument("--targets", type=int, default=1, help="paths the requests cycle through")
    parser.add_argument("--tree", type=Path, default=HERE, help="the checkout whose aether is measured")
    parser.add_argument("--profile", action="store_true", help="under cProfile, the top functions printed")
    args = parser.parse_args()
    sys.path.insert(0, str(args.tree.resolve()))
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(measure(args.requests, BROWSER if args.browser else WRK, args.credential, args.targets, args.profile))


if __name__ == "__main__":
    sys.exit(main())
