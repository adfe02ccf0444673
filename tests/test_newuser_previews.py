"""Previews tried as a new user would, with the servers a workspace really runs: a real
``redis-server`` and a PostgreSQL-like server (one that reads the request and hangs up
without a word, as PostgreSQL does with bytes that are not a startup packet) get the page
that says they speak no HTTP, not one that blames the app; and a port whose rule says
``https`` but that speaks plain HTTP gets a page saying the rule is wrong. A real `aether
serve` on the probe."""

from __future__ import annotations

import http.client
import json
import socket
import sys

import pytest
from support.clients import recv_until
from support.ebpf import need_ebpf
from support.ports import free_port
from support.redis import RedisServer
from support.servers import Server
from support.waiting import wait_for
from websockets.sync.client import connect

PREFIX = "abc123"
PROJECT = "abc123def456"

PROBE_FIXTURES = ("server",)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    need_ebpf()
    srv = Server("ebpf", tmp_path_factory.mktemp("newuser"), "--project-id", PROJECT)
    yield srv
    srv.stop()


def get(server: Server, port: int, path: str = "/") -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        headers = {"Host": f"{port}-{PREFIX}.preview.localhost:{server.port}", "Authorization": f"Bearer {server.token}"}
        conn.request("GET", path, headers=headers)
        reply = conn.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        conn.close()


def not_http_page(server: Server, port: int) -> tuple[int, dict, bytes] | None:
    reply = get(server, port)
    return reply if reply[1].get("x-aether-error") == "not_http" else None


def test_a_server_that_hangs_up_on_http_gets_the_not_http_page(server, listeners):
    port = listeners.postgres_like(mode="close").port
    # Well before the detection's 60 s deadline: a few looks that each end in a hang-up.
    status, _, body = wait_for(lambda: not_http_page(server, port), 15, interval=0.2)
    assert status == 502 and f"Port {port} answers, but not with HTTP".encode() in body
    assert b"closed the connection before it finished" not in body


def test_redis_gets_the_not_http_page(server):
    with RedisServer() as redis:
        status, _, body = wait_for(lambda: not_http_page(server, redis.port), 15, interval=0.2)
        assert status == 502 and f"Port {redis.port} answers, but not with HTTP".encode() in body


def test_a_hang_up_before_the_verdict_does_not_blame_the_app(server, listeners):
    """The first request, before any verdict: the page says the port closed without an answer
    and what that may mean, not that the app cut its response short."""
    port = listeners.postgres_like(mode="close").port
    status, headers, body = get(server, port)
    assert status == 502
    if headers.get("x-aether-error") != "not_http":
        assert b"closed the connection before it finished" not in body
        assert b"without answering" in body


def test_the_channel_says_tcp_soon_for_a_server_that_hangs_up(server, listeners):
    with connect(server.url, subprotocols=["Bearer", server.token], open_timeout=10) as ws:
        port = listeners.postgres_like(mode="close").port
        # Well before the 60 s deadline of a port that never answers.
        found = recv_until(ws, lambda m: m.get("port") == port and m.get("protocol") == "tcp", timeout=15)
        assert found["ready"] is None


@pytest.mark.ebpf
def test_a_rule_that_says_https_for_a_plain_port_is_named_on_its_page(tmp_path, listeners):
    """A range rule (``"5170-5180": {"protocol": "https"}``) that also covers a plain HTTP
    port: the page must not say the port speaks TLS; it says the port is set to https."""
    need_ebpf()
    port = free_port()
    state = tmp_path / "state"
    state.mkdir()
    (state / "config.json").write_text(json.dumps({"ports_attributes": {str(port): {"protocol": "https"}}}))
    srv = Server("ebpf", state, "--project-id", PROJECT)
    try:
        listeners.http_server(port)
        status, _, body = wait_for(lambda: (r := get(srv, port)) and b"Nothing is listening" not in r[2] and r, 10)
        assert status == 502
        assert b"speaks TLS" not in body, body
        assert b"set to https" in body and b"plain HTTP" in body, body
    finally:
        srv.stop()


def test_a_path_preview_without_host_is_not_a_redirect_to_itself(server):
    """HTTP/1.0 without Host (old tools, hand-written requests): the listener cannot take it
    for a preview, so the API answers it; a 307 to the same URL would loop forever."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /proxy/8000/ HTTP/1.0\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    status = int(reply.split(b" ", 2)[1])
    assert status != 307 and b"Location: /proxy/8000/" not in reply, reply
    assert status == 400 and b"Host" in reply


#: ``python - PORT``: hangs up on ``OPTIONS *`` (and on anything that is not a GET), answers a
#: GET: an HTTP app that the looks take for one that speaks no HTTP.
HANGS_UP_ON_OPTIONS = """
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
def serve(c):
    c.settimeout(5)
    try:
        data = c.recv(65536)
        if data.startswith(b"GET "):
            c.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 5\\r\\nConnection: close\\r\\n\\r\\nhello")
    except OSError:
        pass
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def test_an_app_that_hangs_up_only_on_the_look_is_still_previewed(server, listeners):
    """The looks end in hang-ups, so the port is ``tcp``; a real GET is still sent, and its
    answer shown: only a request that gets no byte either is the not-HTTP page."""
    with connect(server.url, subprotocols=["Bearer", server.token], open_timeout=10) as ws:
        port = listeners.spawn_on(lambda p: [sys.executable, "-c", HANGS_UP_ON_OPTIONS, str(p)]).port
        recv_until(ws, lambda m: m.get("port") == port and m.get("protocol") == "tcp", timeout=15)
    status, _, body = get(server, port)
    assert (status, body) == (200, b"hello")


def _put(server: Server, key: str, body: bytes) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("PUT", f"/api/ports/{key}", body=body, headers={"Authorization": f"Bearer {server.token}"})
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read() or b"{}")
    finally:
        conn.close()


def test_the_registry_refuses_what_it_would_not_keep(server):
    """A port 8050.5 was kept as 8050, and a field the registry does not have (a user trying
    ``visibility``) was dropped with a 200: both are refused, as is a protocol it does not know,
    and nothing is written."""
    status, reply = _put(server, "odd", b'{"port": 8050.5}')
    assert status == 400 and reply["error"] == "invalid", reply
    status, reply = _put(server, "odd", b'{"port": 8050, "visibility": "public"}')
    assert status == 400 and reply["error"] == "invalid" and "visibility" in reply["message"], reply
    status, reply = _put(server, "odd", b'{"port": 8050, "protocol": "wss"}')
    assert status == 400 and reply["error"] == "invalid" and "protocol" in reply["message"], reply
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/api/ports/odd", headers={"Authorization": f"Bearer {server.token}"})
    assert conn.getresponse().status == 404
    conn.close()
    # What a GET gives back is accepted as it is (a read-modify-write client).
    status, entry = _put(server, "fine", b'{"port": 8051, "label": "web"}')
    assert status == 200
    entry["description"] = "again"
    status, again = _put(server, "fine", json.dumps(entry).encode())
    assert status == 200 and again["description"] == "again" and again["port"] == 8051
