"""A keep-alive connection's next request may be forwarded by its last decision (the gate's
route): never once something that decision read has changed. Each change is made between two
requests on one connection of a real client (http.client) to a real `aether serve`, and the
second request must see it: a visibility, the ignored ports, a port closing, a port moving to
another address, a registry key moving to another port, a credential in the target (the token,
a grant, a used grant), another cookie."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys

import pytest
from support import AETHER, ROOT
from support.clients import recv_until
from support.servers import Server, module_server
from support.waiting import wait_for

from aether.preview import grant

PREFIX = "abc123"
PROJECT = "abc123def456"

#: An app that answers every request with its own address and the target it got, keep-alive.
WHO = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = f"{sys.argv[1]}:{sys.argv[2]} {self.path} {self.headers.get('Authorization')}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Handler).serve_forever()
"""


server = module_server("ebpf", "--project-id", PROJECT)


@pytest.fixture
def app(listeners):
    """``start(port=None, bind=...)``: a WHO app listening; its port."""

    def start(port=None, bind="127.0.0.1"):
        return listeners.spawn_on(lambda p: [sys.executable, "-c", WHO, bind, str(p)], port).port

    return start


class Client:
    """One keep-alive connection to the proxy, for one preview host; it must stay one."""

    def __init__(self, server: Server, host: str, **headers: str):
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        self.host = f"{host}.preview.localhost:{server.port}"
        self.headers = headers
        self.sock = None

    def get(self, path: str = "/", **headers: str) -> tuple[int, dict, str]:
        self.conn.request("GET", path, headers={"Host": self.host, **self.headers, **headers})
        reply = self.conn.getresponse()
        body = reply.read().decode()
        if self.sock is None:
            self.sock = self.conn.sock
        # http.client reconnects silently: a second connection would not test the first's route.
        assert self.conn.sock is self.sock or self.conn.sock is None, "the proxy closed the keep-alive connection"
        return reply.status, dict(reply.getheaders()), body

    def close(self) -> None:
        self.conn.close()


def bearer(server: Server) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.token}"}


def proxied(server: Server, port: int) -> None:
    """Until the proxy knows ``port`` (asked on a connection of its own)."""

    def ok() -> bool:
        client = Client(server, f"{port}-{PREFIX}", **bearer(server))
        try:
            return client.get()[0] == 200
        finally:
            client.close()

    wait_for(ok, 5)


def send(ws, message: dict) -> dict:
    ws.send(json.dumps({**message, "id": "m"}))
    return recv_until(ws, lambda m: m.get("id") == "m")


def test_repeated_heads_reach_the_app_as_sent_each_time(server, app):
    port = app()
    proxied(server, port)
    client = Client(server, f"{port}-{PREFIX}", **bearer(server))
    # The same head but its target: each target arrives, and the token never does.
    for path in ("/a", "/a", "/b?x=1", "/a", "/b?x=1"):
        status, _, body = client.get(path)
        assert (status, body) == (200, f"127.0.0.1:{port} {path} None")
    client.close()


def test_a_port_made_private_refuses_the_next_request(server, app):
    port = app()
    proxied(server, port)
    with server.connect() as ws:
        assert send(ws, {"channel": "ports", "type": "visibility", "port": port, "visibility": "public"})["type"] == "visibility"
        client = Client(server, f"{port}-{PREFIX}")
        assert client.get()[0] == 200
        assert client.get()[0] == 200
        send(ws, {"channel": "ports", "type": "visibility", "port": port, "visibility": "private"})
        status, headers, _ = client.get()
        assert status == 401 and "WWW-Authenticate" in headers
        client.close()


def test_a_port_made_public_needs_no_credential_on_the_next_request(server, app):
    port = app()
    proxied(server, port)
    with server.connect() as ws:
        client = Client(server, f"{port}-{PREFIX}")
        assert client.get()[0] == 401
        send(ws, {"channel": "ports", "type": "visibility", "port": port, "visibility": "public"})
        assert client.get()[0] == 200
        send(ws, {"channel": "ports", "type": "visibility", "port": port, "visibility": "private"})
        assert client.get()[0] == 401
        client.close()


def test_an_ignored_port_is_refused_on_the_next_request(server, app):
    port = app()
    proxied(server, port)
    with server.connect() as ws:
        before = send(ws, {"channel": "config", "type": "get"})["config"]["ignoredPorts"]
        client = Client(server, f"{port}-{PREFIX}", **bearer(server))
        assert client.get()[0] == 200
        assert client.get()[0] == 200
        try:
            assert (
                send(ws, {"channel": "config", "type": "set", "config": {"ignoredPorts": [*before, port]}})["type"] == "changed"
            )
            status, _, body = client.get()
            assert status == 403 and "ignored" in body
        finally:
            send(ws, {"channel": "config", "type": "set", "config": {"ignoredPorts": before}})
        client.close()


def test_a_closed_port_is_refused_on_the_next_request(server, listeners, app):
    port = app()
    proxied(server, port)
    with server.connect() as ws:
        client = Client(server, f"{port}-{PREFIX}", **bearer(server))
        assert client.get()[0] == 200
        assert client.get()[0] == 200
        listeners.procs[-1].kill()
        recv_until(ws, lambda m: m.get("type") == "close" and m.get("port") == port)
        status, _, body = client.get()
        assert status == 502 and "Nothing is listening" in body


def test_a_port_that_moves_to_another_address_is_reached_there(server, listeners, app):
    port = app()
    proxied(server, port)
    with server.connect() as ws:
        client = Client(server, f"{port}-{PREFIX}", **bearer(server))
        assert client.get()[2].startswith(f"127.0.0.1:{port} ")
        listeners.procs[-1].kill()
        recv_until(ws, lambda m: m.get("type") == "close" and m.get("port") == port)
        app(port, bind="127.0.0.2")
        recv_until(ws, lambda m: m.get("type") == "open" and m.get("port") == port)
        status, _, body = client.get()
        assert status == 200 and body.startswith(f"127.0.0.2:{port} "), body
        client.close()


def port_cli(server: Server, *args: str) -> None:
    done = subprocess.run(
        [*AETHER, "port", *args, "--state-dir", str(server.state_dir)], capture_output=True, text=True, timeout=30, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr


def test_a_registry_key_that_moves_is_followed_on_the_next_request(server, app):
    first, second = app(), app()
    proxied(server, first)
    proxied(server, second)
    port_cli(server, "set", "follow", str(first))
    client = Client(server, f"follow-{PREFIX}", **bearer(server))
    wait_for(lambda: client.get()[0] == 200, 5)
    assert client.get()[2].startswith(f"127.0.0.1:{first} ")
    # Another process's write: no event reaches the proxy, the key is looked up again.
    port_cli(server, "set", "follow", str(second))
    assert client.get()[2].startswith(f"127.0.0.1:{second} ")
    client.close()


def test_a_token_or_grant_in_the_target_is_taken_after_a_forwarded_request(server, app):
    port = app()
    proxied(server, port)
    name = f"{port}-{PREFIX}.preview.localhost".encode()
    client = Client(server, f"{port}-{PREFIX}", **bearer(server))
    assert client.get("/page")[0] == 200
    status, headers, _ = client.get(f"/page?token={server.token}")
    assert status == 302 and headers["Location"] == "/page" and "aether_preview=" in headers["Set-Cookie"]
    assert client.get("/page")[0] == 200
    given = grant.mint(server.token.encode(), name).decode()
    status, headers, _ = client.get(f"/page?aether_grant={given}")
    assert status == 302 and headers["Location"] == "/page" and "aether_preview=" in headers["Set-Cookie"]
    # Used once: the same grant again is no credential (the bearer token still is).
    status, headers, body = client.get(f"/page?aether_grant={given}")
    assert status == 200 and "Set-Cookie" not in headers and given in body
    client.close()
    anonymous = Client(server, f"{port}-{PREFIX}")
    assert anonymous.get(f"/page?aether_grant={given}")[0] == 401
    fresh = grant.mint(server.token.encode(), name).decode()
    status, headers, _ = anonymous.get(f"/page?aether_grant={fresh}")
    assert status == 302
    cookie = headers["Set-Cookie"].partition(";")[0]
    assert anonymous.get("/page", Cookie=cookie)[0] == 200
    assert anonymous.get("/page", Cookie=cookie)[0] == 200
    assert anonymous.get(f"/page?aether_grant={fresh}", Cookie="theme=dark")[0] == 401
    anonymous.close()


def test_another_cookie_is_decided_again(server, app):
    port = app()
    proxied(server, port)
    client = Client(server, f"{port}-{PREFIX}")
    status, headers, _ = client.get(f"/?token={server.token}")
    cookie = headers["Set-Cookie"].partition(";")[0]
    assert client.get("/", Cookie=cookie)[0] == 200
    assert client.get("/", Cookie=cookie)[0] == 200
    assert client.get("/", Cookie=cookie[:-1] + ("0" if cookie[-1] != "0" else "1"))[0] == 401
    assert client.get("/")[0] == 401
    assert client.get("/", Cookie=cookie)[0] == 200
    client.close()
