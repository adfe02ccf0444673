"""A keep-alive connection through a gateway may be forwarded by its last decision (the fleet
gate's kept route): never once something that decision read has changed. Each change is made
between two requests on one connection of a real client (http.client) to a real ``aether
gateway``, against a real ``redis-server`` and a workspace published by a real publisher in a
process of its own (a VM's aether, as far as Redis and the gateway can tell), and the second
request must see it: a port turned private, closed, the workspace stopped, its VM SIGKILLed (its
deadline passes, its record stays), another credential or none, another Host. The workspace's
advertised address is an app on loopback that answers every request with what it received."""

from __future__ import annotations

import http.client
import json
import os
import select
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from support import ROOT
from support.fleet import DOMAIN, Gateway
from support.redis import RedisServer
from support.waiting import wait_for

from aether.fleet import auth
from aether.preview import headers as h

TOKEN = "keepalive-token"

#: A workspace's publisher: its ports from each line of stdin ({"port": "public"|"private"|
#: "closed public"}), published at once; "ok" once Redis has it.
PUBLISHER = r"""
import asyncio, json, sys
from aether.fleet import auth
from aether.fleet.publisher import Identity, Publisher

class State:
    given = {}
    def ports(self): return {p: v for p, v in self.given.items() if v != "closed public"}
    def public(self): return [p for p, v in self.given.items() if v != "private"]
    def names(self): return {}

async def main():
    url, key_file, prefix, address, token = sys.argv[1:6]
    keys = auth.FleetKeys.load(key_file)
    state = State()
    state.given = {int(p): v for p, v in json.loads(sys.argv[6]).items()}
    identity = Identity(prefix, prefix + "-project", "ws-" + prefix, address, auth.verifier(keys, token, prefix))
    pub = Publisher(url, identity, state, heartbeat=0.2, dead_after=1.0)
    await pub.start()
    print("ok", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        seq = pub.seq
        state.given = {int(p): v for p, v in json.loads(line).items()}
        pub.changed()
        deadline = loop.time() + 20  # the parent gives up after 30 s; say why before
        while pub.seq == seq and loop.time() < deadline:
            await asyncio.sleep(0.005)  # the publisher has no event for a change written
        print("ok" if pub.seq != seq else "the change was not published in 20 s", flush=True)

asyncio.run(main())
"""


class Publisher:
    """PUBLISHER in a process of its own."""

    def __init__(self, redis: RedisServer, key_file: str, prefix: str, address: str, ports: dict):
        args = [redis.url, key_file, prefix, address, TOKEN, json.dumps(ports)]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PUBLISHER, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT
        )
        self._buffer = b""
        self._ok()

    def _ok(self) -> None:
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([self.proc.stdout], [], [], 30)
            data = os.read(self.proc.stdout.fileno(), 100) if ready else b""
            if not data:
                self.kill()
                raise AssertionError(f"the publisher did not answer: {self._buffer!r}")
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        if line != b"ok":
            self.kill()
            raise AssertionError(f"the publisher did not answer: {line!r}")

    def ports(self, ports: dict) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(ports).encode() + b"\n")
        self.proc.stdin.flush()
        self._ok()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


class App(BaseHTTPRequestHandler):
    """The workspace's VM, as far as the gateway can tell: it answers with what it received."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = json.dumps({"path": self.path, "headers": [[k, v] for k, v in self.headers.items()]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """(redis, key file, gateway, the app's address)."""
    key_file = tmp_path_factory.mktemp("keepalive") / "fleet.key"
    key_file.write_text(os.urandom(32).hex())
    key_file.chmod(0o600)
    redis = RedisServer().start()
    app = ThreadingHTTPServer(("127.0.0.1", 0), App)
    threading.Thread(target=app.serve_forever, daemon=True).start()
    gateway = Gateway(redis.url, str(key_file), "--liveness-interval", "0.05")
    try:
        yield redis, str(key_file), gateway, f"127.0.0.1:{app.server_address[1]}"
    finally:
        gateway.stop()
        app.shutdown()
        redis.close()


_prefixes = iter(f"ka{n:04d}" for n in range(1, 10_000))


@pytest.fixture
def workspace(fleet):
    """``start(ports)``: a workspace of a new prefix published with ``ports``: (publisher, prefix)."""
    redis, key_file, gateway, address = fleet
    started: list[Publisher] = []

    def start(ports: dict) -> tuple[Publisher, str]:
        prefix = next(_prefixes)
        started.append(Publisher(redis, key_file, prefix, address, ports))
        return started[-1], prefix

    yield start
    for publisher in started:
        publisher.kill()


class Client:
    """One keep-alive connection to the gateway; it must stay one."""

    def __init__(self, gateway: Gateway, host: str, **headers: str):
        self.conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
        self.host = host
        self.headers = headers
        self.sock = None

    def get(self, path: str = "/", host: str | None = None, **headers: str) -> tuple[int, dict, bytes]:
        self.conn.request("GET", path, headers={"Host": host or self.host, **self.headers, **headers})
        reply = self.conn.getresponse()
        body = reply.read()
        if self.sock is None:
            self.sock = self.conn.sock
        # http.client reconnects silently: a second connection would not test the first's route.
        assert self.conn.sock is self.sock or self.conn.sock is None, "the gateway closed the keep-alive connection"
        return reply.status, dict(reply.getheaders()), body

    def close(self) -> None:
        self.conn.close()


def seen(gateway: Gateway, host: str, status: int, **headers: str) -> None:
    """Until the gateway answers ``status`` for ``host`` (asked on connections of their own)."""
    wait_for(lambda: gateway.status(host, headers=headers or None) == status, 10)


def test_each_target_reaches_the_vm_signed_for_itself(fleet, workspace):
    _, key_file, gateway, _ = fleet
    keys = auth.FleetKeys.load(key_file)
    _, prefix = workspace({8000: "public"})
    host = f"8000-{prefix}.{DOMAIN}"
    seen(gateway, host, 200)
    client = Client(gateway, host)
    for path in ("/a", "/a", "/b?x=1", "/a", "/b?x=1"):
        status, _, body = client.get(path)
        got = json.loads(body)
        assert status == 200 and got["path"] == path
        pairs = [(name.encode(), value.encode()) for name, value in got["headers"]]
        assert auth.verify_head(keys, b"GET", path.encode(), h.RequestHead(pairs)) == b"public", path
    client.close()


def test_a_port_turned_private_or_closed_is_seen_on_the_next_request(fleet, workspace):
    _, _, gateway, _ = fleet
    publisher, prefix = workspace({8000: "public", 8001: "public"})
    host = f"8000-{prefix}.{DOMAIN}"
    seen(gateway, host, 200)
    client = Client(gateway, host)
    assert client.get()[0] == 200 and client.get()[0] == 200
    publisher.ports({8000: "private", 8001: "public"})
    seen(gateway, host, 401)
    status, headers, _ = client.get()
    assert status == 401 and "WWW-Authenticate" in headers
    publisher.ports({8000: "public", 8001: "public"})
    seen(gateway, host, 200)
    assert client.get()[0] == 200 and client.get()[0] == 200
    publisher.ports({8000: "closed public", 8001: "public"})
    seen(gateway, host, 502)
    status, _, body = client.get()
    assert status == 502 and b"Nothing is listening" in body
    other = Client(gateway, f"8001-{prefix}.{DOMAIN}")
    assert other.get()[0] == 200 and other.get()[0] == 200
    publisher.ports({8000: "closed public"})  # closed, and no longer public: asked for a credential first
    seen(gateway, f"8001-{prefix}.{DOMAIN}", 401)
    assert other.get()[0] == 401
    client.close()
    other.close()


def test_a_vm_killed_is_503_on_the_next_request_though_its_record_is_unchanged(fleet, workspace):
    _, _, gateway, _ = fleet
    publisher, prefix = workspace({8000: "public"})
    host = f"8000-{prefix}.{DOMAIN}"
    seen(gateway, host, 200)
    client = Client(gateway, host)
    assert client.get()[0] == 200 and client.get()[0] == 200
    publisher.kill()  # no stop written: the record says alive until its deadline passes
    seen(gateway, host, 503)
    status, headers, _ = client.get()
    assert status == 503 and headers.get("Retry-After") == "2"
    client.close()


def test_a_credential_is_kept_only_while_the_same_bytes_come(fleet, workspace):
    _, _, gateway, _ = fleet
    _, prefix = workspace({8000: "private"})
    host = f"8000-{prefix}.{DOMAIN}"
    seen(gateway, host, 200, Authorization=f"Bearer {TOKEN}")
    client = Client(gateway, host)
    bearer = f"Bearer {TOKEN}"
    assert client.get(Authorization=bearer)[0] == 200 and client.get(Authorization=bearer)[0] == 200
    assert client.get(Authorization=bearer + "x")[0] == 401
    assert client.get(Authorization="Bearer other")[0] == 401
    assert client.get()[0] == 401
    assert client.get(Authorization=bearer)[0] == 200
    # The token in the target, with the same header lines: the cookie it sets (a redirect).
    status, headers, _ = client.get(f"/page?token={TOKEN}", Authorization=bearer)
    assert status == 302 and headers["Location"] == "/page"
    # The cookie: kept while the same cookie comes, another one decided afresh.
    cookie = headers["Set-Cookie"].partition(";")[0]
    assert client.get("/page", Cookie=cookie)[0] == 200 and client.get("/page", Cookie=cookie)[0] == 200
    assert client.get("/page", Cookie=cookie[:-1] + ("A" if cookie[-1] != "A" else "B"))[0] == 401
    assert client.get("/page", Cookie="theme=dark")[0] == 401
    assert client.get("/page")[0] == 401
    assert client.get("/page", Cookie=cookie)[0] == 200
    client.close()


def test_another_host_on_the_connection_is_decided_for_that_host(fleet, workspace):
    _, _, gateway, _ = fleet
    _, prefix = workspace({8000: "public", 8001: "private"})
    host = f"8000-{prefix}.{DOMAIN}"
    seen(gateway, host, 200)
    client = Client(gateway, host)
    assert client.get()[0] == 200 and client.get()[0] == 200
    assert client.get(host=f"8001-{prefix}.{DOMAIN}")[0] == 401
    assert client.get(host=f"8002-{prefix}.{DOMAIN}")[0] == 401
    status, _, body = client.get(host=f"127.0.0.1:{gateway.port}")
    assert status == 404 and b"Not a preview host" in body
    assert client.get()[0] == 200
    client.close()
