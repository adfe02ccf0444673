"""The preview proxy end to end: a real `aether serve`, real apps behind it (python's
http.server, a python app that misbehaves on demand, a node app with a `ws` WebSocket server),
real clients (http.client, raw sockets, the websockets library, Chromium)."""

from __future__ import annotations

import asyncio
import http.client
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from support import ROOT
from support.browser import FLAGS
from support.clients import recv_until
from support.ebpf import need_ebpf
from support.ports import free_port, on_a_free_port
from support.processes import tool
from support.servers import Server, module_server
from support.waiting import until, wait_for
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect

APP = str(ROOT / "tests" / "upstreams" / "app.py")
WS_APP = str(ROOT / "tests" / "upstreams" / "ws_app.js")
NODE_PATH = str(ROOT / ".tools" / "node_modules")
PREFIX = "abc123"
PROJECT = "abc123def456"

#: Fixtures that start `aether serve` on the probe (see conftest).
PROBE_FIXTURES = ("server", "own_server")


server = module_server("ebpf", "--project-id", PROJECT)


@pytest.fixture
def own_server(tmp_path):
    """A server of the test's own, with extra flags."""
    need_ebpf()
    started = []

    def start(*flags):
        started.append(Server("ebpf", tmp_path / f"state{len(started)}", "--project-id", PROJECT, *flags))
        return started[-1]

    yield start
    for srv in started:
        srv.stop()


def host(server: Server, port: int, prefix: str = PREFIX) -> str:
    return f"{port}-{prefix}.preview.localhost:{server.port}"


def request(server: Server, port: int, method="GET", path="/", headers=None, body=None, auth=True, conn=None, chunked=False):
    """One request through the proxy; (status, headers as a list, body)."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    sent = {"Host": host(server, port)}
    if auth:
        sent["Authorization"] = f"Bearer {server.token}"
    sent.update(headers or {})
    conn.request(method, path, body=body, headers=sent, encode_chunked=chunked)
    reply = conn.getresponse()
    data = reply.read()
    if own:
        conn.close()
    return reply.status, reply.getheaders(), data


def echo(server, port, **kw) -> dict:
    status, _, body = request(server, port, path=kw.pop("path", "/echo"), **kw)
    assert status == 200, body
    report = json.loads(body)
    report["h"] = {k.lower(): v for k, v in report["headers"]}
    return report


def raw_exchange(server: Server, data: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)


@pytest.fixture
def app(listeners):
    def start(port=None, bind="127.0.0.1"):
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        return listeners.spawn_on(lambda p: [sys.executable, APP, str(p), bind], port, family).port

    return start


def wait_open(server: Server, port: int) -> None:
    """Until the proxy knows the port (the monitor's open event has been processed)."""
    wait_for(lambda: request(server, port)[0] != 502, 5)


# -- routing --------------------------------------------------------------------------------


def test_routes_by_host_and_the_api_shares_the_listener(server, listeners):
    port = listeners.http_server().port
    wait_open(server, port)
    status, headers, body = request(server, port)
    assert status == 200 and b"Directory listing" in body
    health = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    health.request("GET", "/healthz")
    assert health.getresponse().status == 200


def test_upstream_sees_a_clean_request(server, app):
    port = app()
    wait_open(server, port)
    report = echo(
        server,
        port,
        path="/echo?a=1",
        headers={
            "X-Forwarded-Host": "evil.example",
            "X-Forwarded-For": "10.9.9.9",
            "Forwarded": "for=10.9.9.9;host=evil.example",
            "Connection": "X-Drop-Me",
            "X-Drop-Me": "1",
            "Keep-Alive": "timeout=1",
            "Proxy-Authorization": "Basic eA==",
            "X-Kept": "yes",
        },
    )
    h = report["h"]
    assert report["target"] == "/echo?a=1"
    assert h["host"] == f"localhost:{port}"
    assert h["x-forwarded-host"] == host(server, port)
    assert h["x-forwarded-proto"] == "http"
    assert h["x-forwarded-port"] == str(server.port)
    assert h["x-forwarded-for"] == "10.9.9.9, 127.0.0.1"
    assert h["via"].startswith("1.1 aether-")
    assert h["x-kept"] == "yes"
    for gone in ("authorization", "forwarded", "x-drop-me", "keep-alive", "proxy-authorization"):
        assert gone not in h, gone
    assert server.token not in json.dumps(report)


def test_original_host_passes_when_configured(own_server, app):
    srv = own_server("--preview-upstream-host", "original")
    port = app()
    wait_open(srv, port)
    assert echo(srv, port)["h"]["host"] == host(srv, port)


def test_wrong_prefix_ignored_own_and_closed_ports(server):
    assert request(server, 8080, headers={"Host": host(server, 8080, "zzz999")})[0] == 404
    assert request(server, 22)[0] == 403
    assert request(server, server.port)[0] == 403
    closed = free_port()
    status, headers, body = request(server, closed)
    assert status == 502
    assert b'http-equiv="refresh"' in body and str(closed).encode() in body
    assert dict(headers)["Cache-Control"] == "no-store"


def test_502_page_turns_into_the_app_once_it_listens(server, listeners):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)

    def refused_then_listening(port: int) -> int:
        assert request(server, port, conn=conn)[0] == 502
        listeners.spawn([sys.executable, APP, str(port)], port)  # PortTaken: again, on another
        return port

    port = on_a_free_port(refused_then_listening)
    # The browser's reload comes on the same keep-alive connection.
    wait_for(lambda: request(server, port, path="/echo", conn=conn)[0] == 200, 5)


def test_listener_on_ipv6_loopback_and_specific_address(server, app):
    v6 = app(bind="::1")
    wait_open(server, v6)
    assert echo(server, v6)["method"] == "GET"


def test_steering_attempts_reach_nothing_else(server, app):
    port = app()
    wait_open(server, port)
    auth = f"Authorization: Bearer {server.token}\r\n".encode()
    h = host(server, port).encode()
    # An absolute-form target naming another port. (Connection: close, here and below, where
    # the connection stays open after the answer: the exchange ends when it closes.)
    reply = raw_exchange(
        server, b"GET http://127.0.0.1:22/ HTTP/1.1\r\nHost: " + h + b"\r\n" + auth + b"Connection: close\r\n\r\n"
    )
    assert reply.startswith(b"HTTP/1.1 400")
    # A Host with userinfo-like junk is no preview host: the API side refuses it.
    reply = raw_exchange(server, b"GET /echo HTTP/1.1\r\nHost: " + h + b"@evil\r\n" + auth + b"Connection: close\r\n\r\n")
    assert reply.startswith((b"HTTP/1.1 400", b"HTTP/1.1 404")) and b"peer_port" not in reply
    # Two Host headers.
    reply = raw_exchange(
        server,
        b"GET /echo HTTP/1.1\r\nHost: "
        + h
        + b"\r\nHost: 22-"
        + PREFIX.encode()
        + b".preview.localhost\r\n"
        + auth
        + b"Connection: close\r\n\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 400")
    # A second request on a preview connection naming a non-preview host, reflected escaped.
    reply = raw_exchange(
        server,
        b"GET /echo HTTP/1.1\r\nHost: " + h + b"\r\n" + auth + b"\r\n"
        b"GET /echo HTTP/1.1\r\nHost: <script>x</script>\r\nConnection: close\r\n\r\n",
    )
    assert b"HTTP/1.1 200" in reply and b"HTTP/1.1 421" in reply
    assert b"<script>" not in reply and b"&lt;script&gt;" in reply


# -- authentication -------------------------------------------------------------------------


def test_private_port_token_cookie_flow(server, app):
    port = app()
    wait_open(server, port)
    status, _, body = request(server, port, path="/echo", auth=False)
    assert status == 401 and b"private" in body
    status, headers, _ = request(server, port, path=f"/echo?x=1&token={server.token}&y=2", auth=False)
    assert status == 302
    headers = dict(headers)
    assert headers["Location"] == "/echo?x=1&y=2"
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "Path=/" in cookie and "Domain" not in cookie
    pair = cookie.split(";")[0]
    assert server.token not in pair
    report = echo(server, port, path="/echo?x=1", auth=False, headers={"Cookie": f"app=1; {pair}"})
    assert report["h"]["cookie"] == "app=1"
    assert server.token not in json.dumps(report)
    # The cookie is for that preview host only.
    other = app()
    wait_open(server, other)
    assert request(server, other, path="/echo", auth=False, headers={"Cookie": pair})[0] == 401
    # A wrong token is refused and never redirected.
    assert request(server, port, path="/echo?token=nope", auth=False)[0] == 401


def test_app_authorization_passes_through(server, app):
    port = app()
    wait_open(server, port)
    status, headers, _ = request(server, port, path=f"/?token={server.token}", auth=False)
    pair = dict(headers)["Set-Cookie"].split(";")[0]
    report = echo(server, port, auth=False, headers={"Cookie": pair, "Authorization": "Basic YXBwOnB3"})
    assert report["h"]["authorization"] == "Basic YXBwOnB3"


def test_redirect_cannot_point_off_site(server, app):
    port = app()
    wait_open(server, port)
    status, headers, _ = request(server, port, path=f"//evil.example/?token={server.token}", auth=False)
    assert status == 302 and dict(headers)["Location"] == "/evil.example/"


def test_visibility_public_through_the_ports_channel(server, app):
    port = app()
    with server.connect() as ws:
        opened = recv_until(ws, lambda m: m.get("type") == "open" and m.get("port") == port)
        assert opened["visibility"] == "private"
        wait_open(server, port)
        assert request(server, port, path="/echo", auth=False)[0] == 401
        ws.send(json.dumps({"channel": "ports", "type": "visibility", "port": port, "visibility": "public", "id": "v"}))
        reply = recv_until(ws, lambda m: m.get("type") == "visibility")
        assert reply == {"channel": "ports", "type": "visibility", "port": port, "visibility": "public", "id": "v"}
        assert request(server, port, path="/echo", auth=False)[0] == 200
        saved = json.loads((server.state_dir / "config.json").read_text())
        assert port in saved["preview_public_ports"]
        ws.send(json.dumps({"channel": "ports", "type": "visibility", "port": port, "visibility": "open"}))
        error = recv_until(ws, lambda m: m.get("type") == "error")
        assert error["code"] == "bad_message"
        assert request(server, port, path="/echo", auth=False)[0] == 200
        ws.send(json.dumps({"channel": "ports", "type": "visibility", "port": port, "visibility": "private"}))
        recv_until(ws, lambda m: m.get("type") == "visibility" and m["visibility"] == "private")
        assert request(server, port, path="/echo", auth=False)[0] == 401


# -- proxying -------------------------------------------------------------------------------


def test_keepalive_to_the_client_and_pooled_upstream(server, app):
    port = app()
    wait_open(server, port)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    peers = set()
    for _ in range(5):
        status, _, body = request(server, port, path="/echo", conn=conn)
        peers.add(json.loads(body)["peer_port"])
    assert len(peers) == 1  # one upstream connection served them all
    conn.close()


def test_methods_bodies_and_chunked_uploads(server, app):
    port = app()
    wait_open(server, port)
    for method in ("POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        report = echo(server, port, method=method, body=b"x" * 1000)
        assert (report["method"], report["body"]) == (method, 1000)
    status, headers, body = request(server, port, method="HEAD", path="/echo")
    assert status == 200 and body == b""
    chunks = (b"y" * 5000 for _ in range(3))
    status, _, body = request(
        server, port, method="POST", path="/upload", body=chunks, headers={"Transfer-Encoding": "chunked"}, chunked=True
    )
    assert json.loads(body) == {"received": 15000}


def test_response_headers_hop_by_hop_and_set_cookies(server, app):
    port = app()
    wait_open(server, port)
    status, headers, _ = request(server, port, path="/headers")
    names = [k.lower() for k, _ in headers]
    assert [v for k, v in headers if k.lower() == "set-cookie"] == ["a=1; Path=/", "b=2; Path=/"]
    assert "x-secret" not in names and "keep-alive" not in names and "x-kept" in names


def test_sse_events_arrive_as_they_are_produced(server, app, tmp_path):
    port = app()
    wait_open(server, port)
    flag = tmp_path / "flag"
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", f"/sse?flag={flag}", headers={"Host": host(server, port), "Authorization": f"Bearer {server.token}"})
    reply = conn.getresponse()
    assert reply.getheader("Content-Type") == "text/event-stream"
    # The app sends its second event only once the first has reached us.
    assert reply.fp.read(18) == b"d\r\ndata: first\n\n\r\n"
    flag.write_text("go")
    assert reply.fp.read(24) == b"e\r\ndata: second\n\n\r\n0\r\n\r\n"
    conn.close()


def vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


GIB = 1 << 30


@pytest.mark.slow
def test_one_gigabyte_each_way_in_bounded_memory(server, app):
    port = app()
    wait_open(server, port)
    before = rss(server.proc.pid)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("GET", f"/big?n={GIB}", headers={"Host": host(server, port), "Authorization": f"Bearer {server.token}"})
    reply = conn.getresponse()
    received = 0
    while chunk := reply.read(1 << 20):
        received += len(chunk)
    assert received == GIB
    piece = b"u" * (1 << 20)
    status, _, body = request(
        server,
        port,
        method="POST",
        path="/upload",
        body=(piece for _ in range(1024)),
        headers={"Content-Length": str(GIB)},
        conn=conn,
    )
    assert json.loads(body) == {"received": GIB}
    grown = vm_hwm(server.proc.pid) - before
    assert grown < 100 << 20, f"RSS peak grew by {grown >> 20} MiB"


# -- failures -------------------------------------------------------------------------------


def test_crashing_partial_and_slow_upstreams(own_server, app, tmp_path):
    srv = own_server("--preview-timeout", "1")
    port = app()
    wait_open(srv, port)
    status, _, body = request(srv, port, path="/crash")
    assert status == 502 and b"Traceback" not in body
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    conn.request("GET", "/partial", headers={"Host": host(srv, port), "Authorization": f"Bearer {srv.token}"})
    reply = conn.getresponse()
    with pytest.raises(http.client.IncompleteRead):
        reply.read()
    started = time.monotonic()
    status, _, body = request(srv, port, path=f"/slow?flag={tmp_path / 'unused'}")
    assert status == 504 and time.monotonic() - started < 5
    # The proxy still serves afterwards.
    assert echo(srv, port)["method"] == "GET"


def test_client_going_away_closes_the_upstream(server, app, tmp_path):
    port = app()
    wait_open(server, port)
    reached, flag = tmp_path / "reached", tmp_path / "closed"
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            f"GET /slow?reached={reached}&flag={flag} HTTP/1.1\r\nHost: {host(server, port)}\r\n"
            f"Authorization: Bearer {server.token}\r\n\r\n".encode()
        )
        wait_for(reached.exists, 5)  # the proxy has passed the request on
    wait_for(flag.exists, 5)


def test_loop_back_into_the_proxy_is_stopped(server, app):
    port = app()
    wait_open(server, port)
    # The app forwards the request (headers and all) to its own preview URL, as a dev server's
    # proxy pointed at the wrong target would.
    status, _, body = request(server, port, path=f"/loop?to=127.0.0.1:{server.port}&host={host(server, port)}")
    assert status == 508


def test_malformed_and_oversized_requests(server, app):
    port = app()
    wait_open(server, port)
    h = host(server, port).encode()
    reply = raw_exchange(
        server, b"GET / HTTP/1.1\r\nHost: " + h + b"\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    assert reply.startswith(b"HTTP/1.1 400")
    reply = raw_exchange(server, b"GET / HTTP/1.1\r\nHost: " + h + b"\r\nX-Big: " + b"a" * (70 << 10) + b"\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 431")
    assert request(server, port, path="/echo")[0] == 200


# -- WebSockets -----------------------------------------------------------------------------


@pytest.fixture
def ws_app(listeners, tmp_path):
    node = shutil.which("node") or pytest.fail("node is not installed (deploy/setup.sh installs it)")
    port = free_port()
    out = tmp_path / "node.out"
    listeners.spawn([node, WS_APP, str(port)], port, stdout=out.open("w"), env={**os.environ, "NODE_PATH": NODE_PATH})
    return port, out


def ws_through(server, port, **kw):
    sock = socket.create_connection(("127.0.0.1", server.port))
    return ws_connect(f"ws://{host(server, port)}/socket", sock=sock, **kw)


def test_websocket_end_to_end(server, ws_app):
    port, _ = ws_app
    wait_open(server, port)
    with ws_through(
        server, port, subprotocols=["chat", "hmr"], additional_headers={"Authorization": f"Bearer {server.token}"}
    ) as ws:
        assert ws.subprotocol == "hmr"  # the app chose, from all offered
        ws.send("hello")
        assert ws.recv(timeout=5) == "echo:hello"
        ws.send(b"\x00\x01binary")
        assert ws.recv(timeout=5) == b"echo:\x00\x01binary"
        ws.ping(b"p").wait(5)
        ws.send("close")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
        assert closed.value.rcvd.code == 4001 and closed.value.rcvd.reason == "asked to"


def test_websocket_upgrade_is_authenticated(server, ws_app):
    port, out = ws_app
    wait_open(server, port)
    with pytest.raises(InvalidStatus) as refused:
        ws_through(server, port)
    assert refused.value.response.status_code == 401
    status, headers, _ = request(server, port, path=f"/?token={server.token}", auth=False)
    pair = dict(headers)["Set-Cookie"].split(";")[0]
    # A page of another site carrying the cookie: cross-site WebSocket hijacking.
    with pytest.raises(InvalidStatus) as refused:
        ws_through(server, port, additional_headers={"Cookie": pair}, origin="http://evil.example")
    assert refused.value.response.status_code == 403
    with ws_through(server, port, additional_headers={"Cookie": pair}, origin=f"http://{host(server, port)}") as ws:
        ws.send("same-origin")
        assert ws.recv(timeout=5) == "echo:same-origin"
    seen = [json.loads(line) for line in out.read_text().splitlines() if '"connection"' in line]
    assert len(seen) == 1 and seen[0]["cookie"] is None and seen[0]["authorization"] is None


def test_chromium_loads_a_preview_and_its_websocket(server, ws_app, tmp_path):
    port, out = ws_app
    wait_open(server, port)
    url = f"http://{host(server, port)}/?token={server.token}"
    browser = subprocess.Popen(
        [tool("chromium"), *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        done = wait_for(lambda: [json.loads(l) for l in out.read_text().splitlines() if '"done"' in l], 30)
    finally:
        browser.kill()
        browser.wait()
    assert "got=echo%3Aping" in done[0]["done"] and "protocol=hmr" in done[0]["done"]
    assert done[0]["cookie"] is None  # the preview cookie never reaches the app
    connections = [json.loads(l) for l in out.read_text().splitlines() if '"connection"' in l]
    assert connections and connections[0]["origin"] == f"http://{host(server, port)}"


def test_pipelined_requests_are_answered_in_order(server, app):
    port = app()
    wait_open(server, port)
    head = f"GET /echo?n={{}} HTTP/1.1\r\nHost: {host(server, port)}\r\nAuthorization: Bearer {server.token}\r\n"
    data = "".join(head.format(i) + "\r\n" for i in range(40)) + head.format(40) + "Connection: close\r\n\r\n"
    reply = raw_exchange(server, data.encode())
    targets = [m.decode() for m in re.findall(rb'"target": "([^"]+)"', reply)]
    assert targets == [f"/echo?n={i}" for i in range(41)]


def test_preview_host_on_an_api_connection_is_misdirected(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", "/healthz")
    assert conn.getresponse().read() and True
    conn.request("GET", "/", headers={"Host": host(server, 8080), "Authorization": f"Bearer {server.token}"})
    reply = conn.getresponse()
    assert reply.status == 421 and json.loads(reply.read())["error"] == "misdirected"


def test_framing_cannot_be_stripped_or_confused(server, app):
    """Regressions from review: a Connection header naming Content-Length (request smuggling),
    a close-delimited response, pipelined body-less responses, a large first read."""
    port = app()
    wait_open(server, port)
    h_ = f"Host: {host(server, port)}\r\nAuthorization: Bearer {server.token}\r\n"
    smuggled = b"GET /echo?smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    reply = raw_exchange(
        server,
        (f"POST /echo HTTP/1.1\r\n{h_}Connection: Content-Length, close\r\nContent-Length: {len(smuggled)}\r\n\r\n").encode()
        + smuggled,
    )
    assert reply.count(b"HTTP/1.1 200") == 1 and f'"body": {len(smuggled)}'.encode() in reply
    for _ in range(3):  # the pooled connections answer their own requests only
        assert "smuggled" not in echo(server, port, path="/echo?mine")["target"]
    reply = raw_exchange(
        server,
        (
            f"GET /close HTTP/1.1\r\n{h_}\r\nGET /204 HTTP/1.1\r\n{h_}\r\n"
            f"HEAD /echo HTTP/1.1\r\n{h_}\r\nGET /echo?last HTTP/1.1\r\n{h_}Connection: close\r\n\r\n"
        ).encode(),
    )
    assert b"Transfer-Encoding: chunked\r\n\r\nb\r\nhello-close\r\n0\r\n\r\nHTTP/1.1 204" in reply
    assert reply.count(b"HTTP/1.1 ") == 4
    assert b'"target": "/echo?last"' in reply
    body = b"z" * (200 << 10)
    reply = raw_exchange(
        server, (f"POST /upload HTTP/1.1\r\n{h_}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    )
    assert reply.startswith(b"HTTP/1.1 200") and b'{"received": 204800}' in reply
    reply = raw_exchange(server, (f"POST /upload HTTP/1.1\r\n{h_}Transfer-Encoding: gzip\r\n\r\n").encode())
    assert reply.startswith(b"HTTP/1.1 400")


def read_to_close(sock: socket.socket, timeout: float = 10.0) -> tuple[bytes, bool]:
    """Everything until the peer closes: (bytes, closed cleanly rather than reset)."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        return b"".join(chunks), False
    return b"".join(chunks), True


def test_a_valid_request_pipelined_with_a_malformed_one(server, app):
    port = app()
    wait_open(server, port)
    valid = f"GET /echo?first HTTP/1.1\r\nHost: {host(server, port)}\r\nAuthorization: Bearer {server.token}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(valid.encode() + b"garbage\r\n\r\n")  # one packet
        reply, clean = read_to_close(sock)
    assert reply.startswith(b"HTTP/1.1 200") and b'"target": "/echo?first"' in reply
    assert reply.count(b"HTTP/1.1 ") == 2
    second = reply[reply.rindex(b"HTTP/1.1 ") :]
    assert second.startswith(b"HTTP/1.1 400") and b"Connection: close\r\n" in second and clean
    # Two ahead of the garbage: both answered, in order, then the 400.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(valid.replace("?first", "?a").encode() + valid.replace("?first", "?b").encode() + b"\x00\r\n\r\n")
        reply, clean = read_to_close(sock)
    assert re.findall(rb'"target": "([^"]+)"', reply) == [b"/echo?a", b"/echo?b"]
    assert reply.count(b"HTTP/1.1 200") == 2 and reply.count(b"HTTP/1.1 400") == 1 and clean


def test_a_port_with_leading_zeros_is_no_preview(server, app):
    port = app()
    wait_open(server, port)
    for spelling in (f"0{port}", f"00{port}"):
        status, _, body = request(
            server, port, path="/echo", headers={"Host": f"{spelling}-{PREFIX}.preview.localhost:{server.port}"}
        )
        assert status == 404 and b"without leading zeros" in body, spelling
    assert echo(server, port)["target"] == "/echo"


# -- upstreams off this host ----------------------------------------------------------------
#
# A second network namespace joined by a veth pair stands in for another host on the
# workspace's network: its end of the pair has an address that this namespace reaches by route.

#: Listens on ADDRESS:PORT, prints each accepted connection's peer port, answers 200 "peer".
PEER_SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
print("listening", flush=True)
while True:
    conn, peer = s.accept()
    print("accepted", peer[1], flush=True)
    conn.recv(65536)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\npeer")
    conn.close()
"""

#: Listens on ADDRESS:PORT whether or not the address is this host's (IP_FREEBIND).
FREEBIND_LISTENER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.IPPROTO_IP, 15, 1)  # IP_FREEBIND
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
sys.stdin.read()
"""


def ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True)


@pytest.fixture
def other_host():
    """A namespace NS and a veth pair: HERE (this namespace, NET.1/24) and THERE (in NS,
    NET.2/24); names and subnet unique to the test, all removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    tag = os.urandom(4).hex()
    n = int(tag, 16) % 512  # a /24 in 198.18.0.0/15, the range set aside for tests of networks
    net = f"198.{18 + n // 256}.{n % 256}"
    ns, here, there = f"aether-{tag}", f"ae{tag}h", f"ae{tag}t"
    ip("netns", "add", ns)
    try:
        ip("link", "add", here, "type", "veth", "peer", "name", there, "netns", ns)
        ip("addr", "add", f"{net}.1/24", "dev", here)
        ip("link", "set", here, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "addr", "add", f"{net}.2/24", "dev", there)
        ip("-n", ns, "link", "set", there, "up")
        yield types.SimpleNamespace(ns=ns, here=here, there=there, net=net, tag=tag)
    finally:
        ip("link", "del", here, check=False)
        ip("netns", "del", ns, check=False)


def peer_server(listeners, other_host, address: str, port: int):
    """PEER_SERVER in the other namespace; returns a function giving the next accepted peer port."""
    proc = listeners.spawn(
        ["nsenter", f"--net=/run/netns/{other_host.ns}", sys.executable, "-c", PEER_SERVER, address, str(port)],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout.readline() == b"listening\n"
    return lambda: proc.stdout.readline().split()


def recv_until_bytes(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    return data


def assert_never_reached(accepted, address: str, port: int) -> None:
    """The other host's server accepted nothing before a connection of ours made now, directly."""
    with socket.create_connection((address, port), timeout=5) as sock:
        ours = sock.getsockname()[1]
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(100).endswith(b"peer")  # the test would have seen a proxied connection
    assert accepted() == [b"accepted", str(ours).encode()]


def preview_status(server, port) -> tuple[int, bytes]:
    status, _, body = request(server, port, path="/echo")
    return status, body


def test_a_listener_on_another_hosts_address_is_not_reached(server, listeners, other_host):
    port = free_port()
    remote = f"{other_host.net}.2"
    accepted = peer_server(listeners, other_host, remote, port)
    # Here, a listener on the other host's address: the kernel lets anyone bind it.
    listeners.spawn([sys.executable, "-c", FREEBIND_LISTENER, remote, str(port)], port, stdin=subprocess.PIPE)
    wait_for(lambda: preview_status(server, port)[1].find(b"Nothing listens") < 0, 5)
    status, body = preview_status(server, port)
    assert status == 502
    assert f"Port {port} listens on {remote}, which is not an address of this workspace".encode() in body
    assert b"refresh" not in body
    assert_never_reached(accepted, remote, port)


def test_an_address_taken_from_this_host_is_no_longer_reached(server, app, listeners, other_host, tmp_path):
    """A listener on an address of this host, then the address moves to the other host: the
    listener stays, the preview stops at once, and so do the connections in flight to it."""
    moved = f"{other_host.net}.3"
    ip("addr", "add", f"{moved}/32", "dev", other_host.here)
    port = app(bind=moved)
    wait_open(server, port)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    assert echo(server, port, conn=conn)["method"] == "GET"  # a specific local address is reached
    streaming = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    streaming.sendall(
        f"GET /sse?flag={tmp_path / 'never'} HTTP/1.1\r\nHost: {host(server, port)}\r\n"
        f"Authorization: Bearer {server.token}\r\n\r\n".encode()
    )
    assert b"data: first" in recv_until_bytes(streaming, b"data: first")
    ip("addr", "del", f"{moved}/32", "dev", other_host.here)
    read_to_close(streaming, timeout=5)  # closed by the proxy, not left to time out
    streaming.close()
    ip("-n", other_host.ns, "addr", "add", f"{moved}/32", "dev", other_host.there)
    accepted = peer_server(listeners, other_host, moved, port)
    wait_for(lambda: preview_status(server, port)[0] == 502, 5)
    status, _, body = request(server, port, path="/echo", conn=conn)
    assert status == 502 and f"listens on {moved}, which is not an address".encode() in body
    assert_never_reached(accepted, moved, port)
    # Given back, it is reached again.
    ip("-n", other_host.ns, "addr", "del", f"{moved}/32", "dev", other_host.there)
    ip("addr", "add", f"{moved}/32", "dev", other_host.here)
    wait_for(lambda: preview_status(server, port)[0] == 200, 5)


@pytest.mark.slow
def test_local_addresses_follow_the_kernel(other_host):
    """The set as netlink keeps it: changes as they happen, and a full read again after
    notifications were lost (more of them than the socket buffers while the loop is busy)."""
    from aether.preview.local import LocalAddresses

    # As the kernel spells them (inet_ntop): a group of the tag such as 0a1b is written a1b, and
    # a string compared as written would never be seen.
    base = int(ipaddress.IPv6Address(f"fd00:ae:{other_host.tag[:4]}:{other_host.tag[4:]}::"))
    one = str(ipaddress.IPv6Address(base + 0xFFFF))
    many = [str(ipaddress.IPv6Address(base + i)) for i in range(1, 3001)]

    def batch(verb: str) -> None:
        lines = "".join(f"addr {verb} {a}/128 dev {other_host.here} nodad\n" for a in many)
        subprocess.run(["ip", "-batch", "-"], input=lines.encode(), check=True, capture_output=True)

    async def main() -> None:
        changes = []
        local = LocalAddresses(asyncio.get_running_loop(), lambda added, removed: changes.append((added, removed)))
        local.start()
        try:
            assert {"127.0.0.1", "::1", f"{other_host.net}.1"} <= local.addresses
            assert f"{other_host.net}.2" not in local.addresses  # the other end's
            ip("addr", "add", f"{one}/128", "dev", other_host.here, "nodad")
            await until(lambda: one in local.addresses, 10)
            assert ({one}, set()) in changes
            ip("addr", "del", f"{one}/128", "dev", other_host.here)
            await until(lambda: one not in local.addresses, 10)
            batch("add")  # the loop is held up meanwhile: nothing reads the notifications
            await until(lambda: set(many) <= local.addresses, 10)
            assert local.resyncs >= 1
            batch("del")
            await until(lambda: not set(many) & local.addresses, 10)
            assert {"127.0.0.1", "::1", f"{other_host.net}.1"} <= local.addresses
        finally:
            local.close()

    asyncio.run(main())
