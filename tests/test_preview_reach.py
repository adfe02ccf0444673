"""Previews of every dev server, reached every way: TLS upstreams (Python's ssl, nginx with
``ssl``, node's https with a WebSocket), a port that answers but not with HTTP, path previews
(``/proxy/{port}/``, ``/absproxy/{port}/``) from urllib, wget and Node's fetch, and a page on one
preview calling another, private, one with credentials in Chromium (its CORS preflight goes to
the app). A real `aether serve` on the probe; self-signed certificates (conftest's ``cert``)."""

from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from support import ROOT
from support.processes import tool
from support.servers import Server, module_server
from support.waiting import wait_for
from websockets.sync.client import connect as ws_connect

APP = str(ROOT / "tests" / "upstreams" / "app.py")
NODE_PATH = str(ROOT / ".tools" / "node_modules")
PREFIX = "abc123"
PROJECT = "abc123def456"

PROBE_FIXTURES = ("server",)


server = module_server("ebpf", "--project-id", PROJECT)


def host(server: Server, port: int) -> str:
    return f"{port}-{PREFIX}.preview.localhost:{server.port}"


def get(server: Server, port: int, path: str = "/", headers=None, method: str = "GET"):
    """(status, headers, body) of one request to ``port``'s preview host, with the token."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        sent = {"Host": host(server, port), "Authorization": f"Bearer {server.token}", **(headers or {})}
        conn.request(method, path, headers=sent)
        reply = conn.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        conn.close()


def until_proxied(server: Server, port: int, path: str = "/") -> tuple[int, dict, bytes]:
    """The first answer that is not "nothing is listening yet" (the open event has arrived)."""
    return wait_for(lambda: (r := get(server, port, path)) and (b"Nothing is listening" not in r[2]) and r, 10)


@pytest.fixture
def app(listeners):
    def start(port=None):
        return listeners.spawn_on(lambda p: [sys.executable, APP, str(p)], port).port

    return start


# -- TLS upstreams ------------------------------------------------------------------------------

PYTHON_SSL = """
import http.server, ssl, sys
port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        body = ("secure:" + self.path + ":" + (self.headers.get("X-Forwarded-Prefix") or "-")).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
server = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"""

#: node https with a `ws` WebSocket server on it (a dev server's HMR over TLS).
NODE_HTTPS_WS = """
const fs = require('fs');
const WS = require('ws');
const [port, cert, key] = process.argv.slice(1);
const server = require('https').createServer({cert: fs.readFileSync(cert), key: fs.readFileSync(key)},
  (q, s) => s.end('node-tls:' + q.url));
new (WS.WebSocketServer || WS.Server)({server}).on('connection', (ws) => ws.on('message', (d) => ws.send('tls-echo:' + d)));
server.listen(Number(port), '127.0.0.1');
"""


def nginx_ssl(listeners, tmp: Path, cert: tuple[str, str]) -> int:
    nginx = tool("nginx")

    def start(port: int):
        conf = tmp / f"nginx-{port}.conf"
        temps = " ".join(f"{kind}_temp_path {tmp}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        conf.write_text(
            f"daemon off; master_process off; user root; pid {tmp}/nginx-{port}.pid; error_log stderr error;\n"
            f"events {{ worker_connections 64; }}\n"
            f"http {{ access_log off; {temps}\n"
            f"  server {{ listen 127.0.0.1:{port} ssl; ssl_certificate {cert[0]}; ssl_certificate_key {cert[1]};\n"
            f'    return 200 "nginx-tls"; }} }}\n'
        )
        return [nginx, "-c", str(conf), "-p", str(tmp)]

    return listeners.spawn_on(start).port


def test_python_ssl_upstream_is_proxied_over_tls(server, listeners, cert):
    port = listeners.spawn_on(lambda p: [sys.executable, "-c", PYTHON_SSL, str(p), *cert]).port
    status, _, body = until_proxied(server, port, "/hello")
    assert (status, body) == (200, b"secure:/hello:-")
    # Kept alive and pooled: the next request is answered over TLS too.
    assert get(server, port, "/again")[2] == b"secure:/again:-"


def test_nginx_ssl_never_shows_its_plain_http_page(server, listeners, cert, tmp_path):
    port = nginx_ssl(listeners, tmp_path, cert)
    status, _, body = until_proxied(server, port)
    assert b"plain HTTP request" not in body
    assert (status, body) == (200, b"nginx-tls")


def test_node_https_and_its_websocket_over_tls(server, listeners, cert):
    tool("node")
    env = {"NODE_PATH": NODE_PATH, "PATH": "/usr/bin:/bin"}
    port = listeners.spawn_on(lambda p: ["node", "-e", NODE_HTTPS_WS, str(p), *cert], env=env).port
    assert until_proxied(server, port, "/page")[:3:2] == (200, b"node-tls:/page")
    sock = socket.create_connection(("127.0.0.1", server.port))
    headers = {"Authorization": f"Bearer {server.token}"}
    with ws_connect(f"ws://{host(server, port)}/ws", sock=sock, additional_headers=headers, open_timeout=10) as ws:
        ws.send("hi")
        assert ws.recv(timeout=5) == "tls-echo:hi"


VITE = ROOT / ".tools" / "vite" / "node_modules"


def test_vite_with_basic_ssl_and_its_hmr_websocket(server, listeners, tmp_path):
    """Vite's own self-signed HTTPS (@vitejs/plugin-basic-ssl): its page, its client, and the
    HMR WebSocket (Vite's token and subprotocol) through the proxy."""
    tool("node")
    if not (VITE / "vite" / "bin" / "vite.js").exists():
        pytest.fail("vite is not installed in .tools/vite (deploy/setup.sh installs it)")
    root = tmp_path / "vite-app"
    root.mkdir()
    (root / "index.html").write_text('<!doctype html><title>vite-app</title><script type="module" src="/main.js"></script>')
    (root / "main.js").write_text("document.title = 'ran';\n")
    plugin = VITE / "@vitejs" / "plugin-basic-ssl" / "dist" / "index.mjs"
    (root / "vite.config.mjs").write_text(
        f"import basicSsl from {json.dumps(str(plugin))};\n"
        "export default { plugins: [basicSsl()], logLevel: 'silent', clearScreen: false,\n"
        f"  cacheDir: {json.dumps(str(tmp_path / 'vite-cache'))},\n"
        "  server: { host: '127.0.0.1', strictPort: true } };\n"
    )
    vite = [tool("node"), str(VITE / "vite" / "bin" / "vite.js"), "--config", str(root / "vite.config.mjs"), str(root)]
    port = listeners.spawn_on(lambda p: [*vite, "--port", str(p)], env={"PATH": "/usr/bin:/bin"}, cwd=root).port
    status, _, page = until_proxied(server, port)
    assert status == 200 and b"/@vite/client" in page and b"vite-app" in page
    status, _, client = get(server, port, "/@vite/client")
    assert status == 200
    token = re.search(rb'const wsToken = "([^"]+)"', client).group(1).decode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    url = f"ws://{host(server, port)}/?token={token}"
    headers = {"Authorization": f"Bearer {server.token}"}
    with ws_connect(url, sock=sock, subprotocols=["vite-hmr"], additional_headers=headers, open_timeout=10) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "connected"


def test_a_port_that_changes_protocol_is_looked_at_again(server, listeners, cert, app):
    """The protocol found for a port is kept until the port closes: the next server on the
    same number is reached in its own protocol."""
    tls = listeners.spawn_on(lambda p: [sys.executable, "-c", PYTHON_SSL, str(p), *cert])
    port = tls.port
    assert until_proxied(server, port, "/one")[2] == b"secure:/one:-"
    tls.kill()
    tls.wait()
    wait_for(lambda: b"Nothing is listening" in get(server, port)[2], 10)
    assert app(port) == port
    status, _, body = until_proxied(server, port, "/echo")
    assert status == 200 and json.loads(body)["target"] == "/echo"


# -- a port that does not speak HTTP ------------------------------------------------------------


def test_a_port_that_speaks_no_http_gets_its_own_page(server, listeners):
    port = listeners.postgres_like().port
    status, headers, body = until_proxied(server, port)
    assert status == 502 and headers["x-aether-error"] == "not_http"
    assert f"Port {port} answers, but not with HTTP".encode() in body
    assert b"closed the connection" not in body  # not a 502 that blames the app


# -- path previews ------------------------------------------------------------------------------


def test_path_previews_strip_or_keep_their_prefix(server, app):
    port = app()
    base = f"http://127.0.0.1:{server.port}"
    auth = {"Authorization": f"Bearer {server.token}"}

    def echo(path):
        with urllib.request.urlopen(urllib.request.Request(base + path, headers=auth), timeout=10) as reply:
            return json.loads(reply.read())

    seen = wait_for(lambda: _quiet(echo, f"/proxy/{port}/echo?a=1"), 10)
    assert seen["target"] == "/echo?a=1"
    sent = {k.lower(): v for k, v in seen["headers"]}
    assert sent["x-forwarded-prefix"] == f"/proxy/{port}" and "authorization" not in sent
    # No slash after the port: a relative link would leave the prefix, so it is added.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", f"/proxy/{port}?q=1", headers=auth)
    reply = conn.getresponse()
    assert reply.status == 308 and reply.getheader("Location") == f"/proxy/{port}/?q=1"
    conn.close()


def test_absproxy_keeps_the_path_and_reaches_a_tls_upstream(server, listeners, cert):
    port = listeners.spawn_on(lambda p: [sys.executable, "-c", PYTHON_SSL, str(p), *cert]).port
    until_proxied(server, port)
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.port}/absproxy/{port}/x?y", headers={"Authorization": f"Bearer {server.token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert reply.read() == f"secure:/absproxy/{port}/x?y:-".encode()
    request.full_url = f"http://127.0.0.1:{server.port}/proxy/{port}/x?y"
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert reply.read() == f"secure:/x?y:/proxy/{port}".encode()


def _quiet(call, *args):
    try:
        return call(*args)
    except OSError:  # 502 while the open event is on its way
        return None


def test_path_preview_is_private_and_its_token_sets_a_path_cookie(server, app):
    port = app()
    until_proxied(server, port)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", f"/proxy/{port}/echo")
    reply = conn.getresponse()
    assert reply.status == 401 and b"private" in reply.read()
    conn.request("GET", f"/proxy/{port}/echo?token={server.token}")
    reply = conn.getresponse()
    reply.read()
    assert reply.status == 302 and reply.getheader("Location") == f"/proxy/{port}/echo"
    cookie = reply.getheader("Set-Cookie")
    assert f"Path=/proxy/{port};" in cookie and "HttpOnly" in cookie
    pair = cookie.split(";")[0]
    conn.request("GET", f"/proxy/{port}/echo", headers={"Cookie": pair})
    reply = conn.getresponse()
    assert reply.status == 200 and "cookie" not in {k.lower() for k, _ in json.loads(reply.read())["headers"]}
    # The cookie of one path opens that path only.
    other = app()
    until_proxied(server, other)
    conn.request("GET", f"/proxy/{other}/echo", headers={"Cookie": pair})
    reply = conn.getresponse()
    assert reply.status == 401
    conn.close()


def test_urllib_wget_and_node_fetch_reach_a_path_preview(server, app, tmp_path):
    port = app()
    url = f"http://127.0.0.1:{server.port}/proxy/{port}/echo?via=tool"
    auth = f"Authorization: Bearer {server.token}"

    def by_urllib():
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {server.token}"})
        with urllib.request.urlopen(request, timeout=10) as reply:
            return json.loads(reply.read())["target"]

    assert wait_for(lambda: _quiet(by_urllib), 10) == "/echo?via=tool"
    out = subprocess.run([tool("wget"), "-q", "-O", "-", "--header", auth, url], capture_output=True, timeout=30)
    assert out.returncode == 0 and json.loads(out.stdout)["target"] == "/echo?via=tool"
    script = (
        f"fetch({json.dumps(url)}, {{headers: {{Authorization: 'Bearer {server.token}'}}}})"
        ".then(r => r.json()).then(j => console.log(j.target))"
    )
    out = subprocess.run([tool("node"), "-e", script], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "/echo?via=tool", out.stderr
    # The token in the URL, as a browser would open it: urllib follows the redirect with the cookie.
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
    with opener.open(f"http://127.0.0.1:{server.port}/proxy/{port}/echo?token={server.token}", timeout=10) as reply:
        assert json.loads(reply.read())["target"] == "/echo"


def test_path_preview_websocket(server, listeners):
    tool("node")
    env = {"NODE_PATH": NODE_PATH, "PATH": "/usr/bin:/bin"}
    port = listeners.spawn_on(lambda p: ["node", str(ROOT / "tests" / "upstreams" / "ws_app.js"), str(p)], env=env).port
    url = f"ws://127.0.0.1:{server.port}/proxy/{port}/socket"

    def talk():
        try:
            with ws_connect(url, additional_headers={"Authorization": f"Bearer {server.token}"}, open_timeout=5) as ws:
                ws.send("path")
                return ws.recv(timeout=5)
        except Exception:  # 502 while the open event is on its way
            return None

    assert wait_for(talk, 10) == "echo:path"


def read_to_close(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_api_and_path_previews_share_the_origin(server, app):
    """A browser reuses a connection for any path of one origin: each side sends a request of
    the other's back to the same URL, and closes, so it comes again on a new connection."""
    port = app()
    until_proxied(server, port)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            + f"GET /proxy/{port}/echo HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        )
        replies = read_to_close(sock)  # the server closes after the 307
    assert replies.startswith(b"HTTP/1.1 200") and b'"ok"' in replies
    assert b"HTTP/1.1 307 Temporary Redirect\r\n" in replies
    assert f"\r\nLocation: /proxy/{port}/echo\r\n".encode() in replies
    auth = {"Authorization": f"Bearer {server.token}"}
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", f"/proxy/{port}/echo", headers=auth)
    conn.getresponse().read()
    conn.request("GET", "/healthz", headers=auth)
    reply = conn.getresponse()
    reply.read()
    assert reply.status == 307 and reply.getheader("Location") == "/healthz"
    conn.close()


# -- cross-port calls ---------------------------------------------------------------------------

#: An API that allows CORS from the origin in argv[2] with credentials; logs each request's
#: method and whether it carried the app's own cookie.
CORS_APP = """
import http.server, json, sys
port, allowed, log = int(sys.argv[1]), sys.argv[2], sys.argv[3]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def _answer(self, body):
        with open(log, "a") as f:
            f.write(json.dumps({"method": self.command, "path": self.path, "origin": self.headers.get("Origin")}) + "\\n")
        self.send_response(200 if self.command != "OPTIONS" else 204)
        if self.headers.get("Origin") == allowed:
            self.send_header("Access-Control-Allow-Origin", allowed)
            self.send_header("Access-Control-Allow-Credentials", "true")
            self.send_header("Access-Control-Allow-Headers", "x-call")
            self.send_header("Access-Control-Allow-Methods", "PUT, GET")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_OPTIONS(self): self._answer(b"")
    def do_PUT(self): self._answer(b"from-b")
    def do_GET(self): self._answer(b"<!doctype html><title>b</title>")
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"""

PAGE_A = """
import http.server, sys
port = int(sys.argv[1])
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        body = b"<!doctype html><title>a</title>"
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def test_preflight_from_own_preview_origin_goes_to_the_app(server, listeners, tmp_path):
    log = tmp_path / "b.log"
    log.touch()
    a = listeners.spawn_on(lambda p: [sys.executable, "-c", PAGE_A, str(p)]).port
    origin = f"http://{host(server, a)}"
    b = listeners.spawn_on(lambda p: [sys.executable, "-c", CORS_APP, str(p), origin, str(log)]).port
    until_proxied(server, b)

    def preflight(from_origin):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        headers = {"Host": host(server, b), "Origin": from_origin, "Access-Control-Request-Method": "PUT"}
        conn.request("OPTIONS", "/api", headers=headers)
        reply = conn.getresponse()
        reply.read()
        conn.close()
        return reply.status, reply.getheader("Access-Control-Allow-Origin")

    assert preflight(origin) == (204, origin)
    assert preflight("http://evil.example")[0] == 401
    assert preflight(f"http://{a}-other1.preview.localhost:{server.port}")[0] == 401
    # Not a preflight (no Access-Control-Request-Method): still private.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("OPTIONS", "/api", headers={"Host": host(server, b), "Origin": origin})
    assert conn.getresponse().status == 401
    conn.close()
    # The real request is still authenticated.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("PUT", "/api", headers={"Host": host(server, b), "Origin": origin})
    assert conn.getresponse().status == 401
    conn.close()


def test_chromium_page_on_one_port_calls_another_private_port(server, listeners, tmp_path):
    from support.browser import chromium

    log = tmp_path / "b.log"
    log.touch()
    a = listeners.spawn_on(lambda p: [sys.executable, "-c", PAGE_A, str(p)]).port
    origin = f"http://{host(server, a)}"
    b = listeners.spawn_on(lambda p: [sys.executable, "-c", CORS_APP, str(p), origin, str(log)]).port
    until_proxied(server, a)
    until_proxied(server, b)
    driver = chromium(tmp_path / "profile")
    try:
        driver.set_script_timeout(20)
        driver.get(f"http://{host(server, b)}/?token={server.token}")  # B's cookie, as its owner opens it
        driver.get(f"{origin}/?token={server.token}")
        result = driver.execute_async_script(
            """
            const done = arguments[arguments.length - 1];
            fetch(arguments[0], {method: 'PUT', credentials: 'include', headers: {'X-Call': '1'}})
              .then(r => r.text().then(t => done(r.status + ':' + t)), e => done('error:' + e));
            """,
            f"http://{host(server, b)}/api",
        )
    finally:
        driver.quit()
    assert result == "200:from-b"
    seen = [json.loads(line) for line in log.read_text().splitlines()]
    calls = [(line["method"], line["origin"]) for line in seen if line["path"] == "/api"]
    assert calls == [("OPTIONS", origin), ("PUT", origin)]  # the preflight reached the app
