"""deploy/nginx/aether.conf, the TLS front, rendered by deploy/render-nginx.sh with a wildcard
certificate from a CA made here by openssl, checked by `nginx -t`, then run on loopback in front
of a real `aether serve` and real apps. Every client verifies the certificate against that CA
and connects to 127.0.0.1 with the host name as SNI, as a browser resolving *.localhost does."""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from support import ROOT
from support.certs import EC_KEY
from support.clients import recv_until
from support.listeners import Listeners
from support.ports import PortTaken, free_port, on_a_free_port
from support.processes import terminate, tool
from support.servers import Server
from support.waiting import wait_for
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

RENDER = ROOT / "deploy" / "render-nginx.sh"
APP = str(ROOT / "tests" / "upstreams" / "app.py")
WS_APP = str(ROOT / "tests" / "upstreams" / "ws_app.js")
API_HOST = "aether.localhost"
DOMAIN = "preview.localhost"
PROJECT = "abc123def456"


def make_certificates(tmp: Path) -> None:
    """A CA, and a certificate it signs for the API host and *.DOMAIN (EC keys: fast)."""
    openssl = tool("openssl")
    key = EC_KEY
    run = lambda *args: subprocess.run([openssl, *args], cwd=tmp, check=True, capture_output=True)  # noqa: E731
    run(
        "req",
        "-x509",
        *key,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=aether test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    )
    run("req", *key, "-keyout", "server.key", "-out", "server.csr", "-subj", f"/CN={API_HOST}")
    (tmp / "ext.cnf").write_text(f"subjectAltName=DNS:{API_HOST},DNS:*.{DOMAIN}\nextendedKeyUsage=serverAuth\n")
    run(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    )


def render(tmp: Path, upstream: int, https: int, http: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            "bash",
            str(RENDER),
            "--api-host",
            API_HOST,
            "--preview-domain",
            DOMAIN,
            "--cert",
            str(tmp / "server.pem"),
            "--key",
            str(tmp / "server.key"),
            "--upstream",
            f"127.0.0.1:{upstream}",
            "--https-listen",
            f"127.0.0.1:{https}",
            "--http-listen",
            f"127.0.0.1:{http}",
            "--access-log",
            str(tmp / "access.log"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


def main_conf(tmp: Path) -> Path:
    """nginx.conf around the rendered file, as Debian's includes conf.d/ in http {} (with its
    gzip on, here for event streams too); its own pid, logs and temporary paths."""
    conf = tmp / "nginx.conf"
    temps = " ".join(f"{kind}_temp_path {tmp}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf.write_text(
        f"daemon off; master_process on; worker_processes 1; user root;\n"
        f"pid {tmp}/nginx.pid; error_log stderr error;\n"
        f"events {{ worker_connections 256; }}\n"
        f"http {{ access_log off; sendfile on; tcp_nopush on; gzip on; gzip_types text/event-stream application/json;\n"
        f"  {temps} include {tmp}/aether.conf; }}\n"
    )
    return conf


@pytest.fixture(scope="module")
def front(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("front")
    listeners = Listeners(tmp)
    make_certificates(tmp)
    web = listeners.http_server().port
    sse = listeners.spawn_on(lambda port: [sys.executable, APP, str(port)]).port
    upload = listeners.spawn_on(lambda port: [sys.executable, APP, str(port)]).port
    node = tool("node")
    hmr_out = tmp / "node.out"
    hmr = listeners.spawn_on(
        lambda port: [node, WS_APP, str(port)],
        stdout=hmr_out.open("w"),
        env={**os.environ, "NODE_PATH": str(ROOT / ".tools" / "node_modules")},
    ).port

    def start_front(https: int):
        plain = free_port()
        server = Server(
            "sockdiag",
            tmp / "state",
            "--project-id",
            PROJECT,
            "--preview-domain",
            DOMAIN,
            "--preview-url",
            f"https://{{port}}-{{prefix}}.{{domain}}:{https}",
            "--trusted-proxies",
            "127.0.0.1,::1",
        )
        rendered = render(tmp, server.port, https, plain)
        assert rendered.returncode == 0, rendered.stderr
        (tmp / "aether.conf").write_text(rendered.stdout)
        conf = main_conf(tmp)
        try:
            nginx = listeners.spawn([tool("nginx"), "-c", str(conf), "-p", str(tmp)], https)
        except PortTaken:  # either of the front's ports: try both again, with the server that names them
            server.stop()
            raise
        return server, conf, nginx, https, plain

    server, conf, nginx, https, plain = on_a_free_port(start_front)
    ctx = ssl.create_default_context(cafile=str(tmp / "ca.pem"))
    yield SimpleNamespace(
        tmp=tmp,
        conf=conf,
        https=https,
        plain=plain,
        server=server,
        ctx=ctx,
        web=web,
        sse=sse,
        upload=upload,
        hmr=hmr,
        hmr_out=hmr_out,
    )
    # SIGTERM: nginx's fast shutdown. After a SIGKILL its workers would wait out open connections.
    terminate(nginx)
    server.stop()
    listeners.stop_all()


def preview_host(front, port: int) -> str:
    return f"{port}-abc123.{DOMAIN}"


def tls(front, host: str) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", front.https), timeout=5)
    return front.ctx.wrap_socket(sock, server_hostname=host)


def https_request(front, host: str, path: str, headers: dict | None = None) -> http.client.HTTPResponse:
    """GET over TLS; the Host header carries the port, as a browser's does."""
    conn = http.client.HTTPConnection(host, front.https, timeout=5)
    conn.sock = tls(front, host)
    conn.request("GET", path, headers=headers or {})
    return conn.getresponse()


def bearer(front) -> dict:
    return {"Authorization": f"Bearer {front.server.token}"}


def test_rendered_config_passes_nginx_own_test(front):
    result = subprocess.run(
        [tool("nginx"), "-t", "-c", str(front.conf), "-p", str(front.tmp)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and "test is successful" in result.stderr, result.stderr


@pytest.mark.parametrize(
    "flag, value",
    [("--api-host", "Aether.Example.com"), ("--preview-domain", "x;y"), ("--cert", "relative.pem"), ("--upstream", "3001")],
)
def test_render_refuses_bad_values(tmp_path, flag, value):
    args = {"--api-host": API_HOST, "--preview-domain": DOMAIN, "--cert": "/c.pem", "--key": "/k.pem"}
    args[flag] = value
    result = subprocess.run(
        ["bash", str(RENDER), *(x for pair in args.items() for x in pair)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2 and result.stdout == "" and value in result.stderr


def test_api_over_tls_with_the_wildcard_certificate(front):
    response = https_request(front, API_HOST, "/healthz")
    assert (response.status, json.loads(response.read())) == (200, {"status": "ok"})
    with pytest.raises(ssl.SSLCertVerificationError):
        tls(front, "other.localhost")  # the certificate names only the API host and previews


def test_http_redirects_to_https(front):
    conn = http.client.HTTPConnection("127.0.0.1", front.plain, timeout=5)
    conn.request("GET", "/healthz?x=1", headers={"Host": f"{API_HOST}:{front.plain}"})
    response = conn.getresponse()
    assert response.status == 301
    assert response.headers["Location"] == f"https://{API_HOST}:{front.https}/healthz?x=1"


def test_websocket_api_over_wss_gets_the_https_preview_urls(front):
    server = front.server
    sock = socket.create_connection(("127.0.0.1", front.https), timeout=5)
    with ws_connect(
        f"wss://{API_HOST}:{front.https}/workspaces/ws-test/ws",
        sock=sock,
        ssl=front.ctx,
        server_hostname=API_HOST,
        subprotocols=["Bearer", server.token],
    ) as ws:
        assert ws.subprotocol == "Bearer"
        opened = recv_until(ws, lambda m: m.get("type") == "open" and m.get("port") == front.web)
        assert opened["url"] == f"https://{preview_host(front, front.web)}:{front.https}"
        ws.send('{"channel": "config", "type": "get", "id": 1}')
        config = recv_until(ws, lambda m: m.get("id") == 1)
        assert config["config"]["previewUrl"] == f"https://{{port}}-abc123.{DOMAIN}:{front.https}"


def test_preview_token_redirect_and_cookie_behind_tls(front):
    host = preview_host(front, front.web)
    assert https_request(front, host, "/").status == 401
    response = https_request(front, host, f"/?token={front.server.token}")
    response.read()
    # Relative: the browser stays on https://HOST:PORT, which aether never sees.
    assert (response.status, response.headers["Location"]) == (302, "/")
    # The front is trusted (--trusted-proxies): it says the browser is on https.
    assert "; Secure" in response.headers["Set-Cookie"]
    cookie = response.headers["Set-Cookie"].split(";")[0]
    page = https_request(front, host, "/", {"Cookie": cookie})
    assert page.status == 200 and b"Directory listing" in page.read()


def test_preview_stream_is_not_buffered(front):
    """An event reaches the browser while the app still holds the response open: the second
    is written only once the client has the first (the app waits for a flag file)."""
    flag = front.tmp / "sse.flag"
    # As a browser asks: nginx's gzip (on in Debian's nginx.conf) would hold the event back.
    headers = {**bearer(front), "Accept-Encoding": "gzip, deflate, br"}
    response = https_request(front, preview_host(front, front.sse), f"/sse?flag={flag}", headers)
    assert response.status == 200 and response.headers["Content-Type"] == "text/event-stream"
    assert response.headers["Content-Encoding"] is None
    assert response.readline() == b"data: first\n"  # within the socket's 5 s; the app waits 10 s
    assert not flag.exists()
    flag.write_text("go")
    assert response.readline() == b"\n" and response.readline() == b"data: second\n"


def test_preview_upload_is_streamed_and_not_capped(front):
    """The app is reached while the body is still on its way (nginx does not spool it first),
    and a body above nginx's default 1 MiB cap goes through."""
    host, size = preview_host(front, front.upload), 3 << 20
    sock = tls(front, host)
    sock.sendall(
        f"POST /upload HTTP/1.1\r\nHost: {host}:{front.https}\r\nAuthorization: Bearer {front.server.token}\r\n"
        f"Content-Length: {size}\r\n\r\n".encode()
        + b"x" * (size // 2)
    )

    def app_reached():
        return any(c.raddr and c.raddr.port == front.upload and c.status == "ESTABLISHED" for c in psutil.net_connections("tcp"))

    wait_for(app_reached, 5)  # the app's only client is this upload's
    sock.sendall(b"x" * (size - size // 2))
    response = http.client.HTTPResponse(sock)
    response.begin()
    assert (response.status, json.loads(response.read())) == (200, {"received": size})
    sock.close()


def test_preview_echo_sees_the_forwarded_chain(front):
    host = preview_host(front, front.sse)
    response = https_request(front, host, "/echo", bearer(front))
    headers = {k.lower(): v for k, v in json.loads(response.read())["headers"]}
    assert headers["host"] == f"localhost:{front.sse}"  # aether's default for dev servers
    assert headers["x-forwarded-host"] == f"{host}:{front.https}"
    assert headers["x-forwarded-for"] == "127.0.0.1, 127.0.0.1"  # the client, then nginx
    # What the browser's connection was, from the trusted front: https on the front's port.
    assert (headers["x-forwarded-proto"], headers["x-forwarded-port"]) == ("https", str(front.https))
    assert "authorization" not in headers


def test_forwarded_proto_from_an_untrusted_client_is_replaced(front, tmp_path):
    """Straight to an aether that trusts no front, a client's X-Forwarded-Proto is not passed
    on: the app hears what aether saw, and the preview cookie is not Secure."""
    untrusted = Server("sockdiag", tmp_path / "state", "--project-id", PROJECT, "--preview-domain", DOMAIN)
    try:
        host = f"{front.sse}-abc123.{DOMAIN}:{untrusted.port}"
        forged = {
            "Authorization": f"Bearer {untrusted.token}",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Port": "443",
            "Host": host,
        }
        conn = http.client.HTTPConnection("127.0.0.1", untrusted.port, timeout=5)
        conn.request("GET", "/echo", headers=forged)
        headers = {k.lower(): v for k, v in json.loads(conn.getresponse().read())["headers"]}
        assert (headers["x-forwarded-proto"], headers["x-forwarded-port"]) == ("http", str(untrusted.port))
        conn.request("GET", f"/?token={untrusted.token}", headers={"Host": host, "X-Forwarded-Proto": "https"})
        response = conn.getresponse()
        response.read()
        assert response.status == 302 and "Secure" not in response.headers["Set-Cookie"]
    finally:
        untrusted.stop()


def test_preview_websocket_through_tls_with_the_cookie(front):
    """An HMR socket: Upgrade through nginx and aether, the cookie and a same-origin check."""
    host = preview_host(front, front.hmr)
    response = https_request(front, host, f"/?token={front.server.token}")
    cookie = response.headers["Set-Cookie"].split(";")[0]

    def connect(origin: str):
        sock = socket.create_connection(("127.0.0.1", front.https), timeout=5)
        return ws_connect(
            f"wss://{host}:{front.https}/socket",
            sock=sock,
            ssl=front.ctx,
            server_hostname=host,
            subprotocols=["hmr"],
            origin=origin,
            additional_headers={"Cookie": cookie},
        )

    with pytest.raises(InvalidStatus) as refused:
        connect("https://evil.example")
    assert refused.value.response.status_code == 403
    with connect(f"https://{host}:{front.https}") as ws:
        assert ws.subprotocol == "hmr"
        ws.send("hot update")
        assert ws.recv(timeout=5) == "echo:hot update"


def test_access_log_keeps_no_token_or_grant(front):
    """`?token=` and `?aether_grant=` open the API and previews: nginx's log must not keep them."""
    host = preview_host(front, front.web)
    https_request(front, host, f"/?token={front.server.token}&keep=1").read()
    https_request(front, host, "/?aether_grant=123.abc").read()
    https_request(front, API_HOST, f"/?token={front.server.token}").read()

    def logged():
        text = (front.tmp / "access.log").read_text()
        return text.count("GET / HTTP") >= 3 and text

    text = wait_for(logged, 5)
    assert front.server.token not in text and "aether_grant" not in text and "keep=1" not in text
    assert host.split(":")[0] in text and API_HOST in text
