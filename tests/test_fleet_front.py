"""deploy/nginx/aether-fleet.conf, rendered by `deploy/render-nginx.sh --fleet` with a certificate
made here, passes `nginx -t` and runs on loopback in front of two real `aether gateway` processes
(a real Redis; the workspace's address is an app that echoes what it hears, standing in for a
VM). Through TLS: the preview answers, the app hears the front's https word via the gateway, the
`?token=` cookie is Secure, and with one gateway SIGKILLed every request still answers."""

from __future__ import annotations

import http.client
import json
import re
import secrets
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import ROOT
from support.certs import self_signed
from support.fleet import DOMAIN, Gateway
from support.ports import free_port
from support.processes import tool
from support.redis import RedisServer
from support.waiting import wait_for

from aether.fleet import auth, blob, keys

RENDER = ROOT / "deploy" / "render-nginx.sh"
TOKEN = "front-token"

# An app that answers every request with the headers it got, as JSON.
ECHO = r"""
import http.server, json, sys
class Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Echo).serve_forever()
"""


def claim(redis: RedisServer, key_file: Path, prefix: str, app: int, visibility: str) -> None:
    epoch = secrets.token_hex(8)
    raw = blob.encode(
        prefix=prefix,
        project=prefix + "-front",
        workspace="ws-front",
        address=f"127.0.0.1:{app}",
        epoch=epoch,
        started=int(time.time() * 1000),
        dead_after=3_600_000,
        verifier=auth.verifier(auth.FleetKeys.load(str(key_file)), TOKEN, prefix),
        alive=True,
        ports={8000: visibility},
        public=(8000,) if visibility == "public" else (),
        names={},
    )
    args = [prefix, prefix + "-front", epoch, raw, 3_600_000, "front-boot", keys.STREAM_MAXLEN]
    redis.client().register_script(keys.CLAIM)(keys=keys.CHANGE_KEYS, args=args)


@pytest.fixture
def front(tmp_path, listeners):
    cert, key = self_signed(tmp_path, f"*.{DOMAIN}", alt_names=(f"*.{DOMAIN}",))
    key_file = tmp_path / "fleet.key"
    key_file.write_text(secrets.token_hex(32))
    key_file.chmod(0o600)
    with RedisServer() as redis:
        app_port = free_port()
        listeners.spawn([sys.executable, "-c", ECHO, str(app_port)], app_port)
        claim(redis, key_file, "pub001", app_port, "public")
        claim(redis, key_file, "prv001", app_port, "private")
        gateways = [Gateway(redis.url, str(key_file), "--trusted-proxies", "127.0.0.1") for _ in range(2)]
        try:
            https, plain = free_port(), free_port()
            rendered = subprocess.run(
                ["bash", str(RENDER), "--fleet", "--preview-domain", DOMAIN, "--cert", cert,
                 "--key", key, *(a for g in gateways for a in ("--upstream", f"127.0.0.1:{g.port}")),
                 "--https-listen", f"127.0.0.1:{https}", "--http-listen", f"127.0.0.1:{plain}",
                 "--access-log", str(tmp_path / "access.log")],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert rendered.returncode == 0, rendered.stderr
            (tmp_path / "aether-fleet.conf").write_text(rendered.stdout)
            temps = " ".join(f"{k}_temp_path {tmp_path}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
            conf = tmp_path / "nginx.conf"
            conf.write_text(
                f"daemon off; worker_processes 1; user root; pid {tmp_path}/nginx.pid; error_log stderr error;\n"
                f"events {{ worker_connections 256; }}\n"
                f"http {{ access_log off; gzip on; {temps} include {tmp_path}/aether-fleet.conf; }}\n"
            )
            checked = subprocess.run([tool("nginx"), "-t", "-c", str(conf), "-p", str(tmp_path)], capture_output=True, text=True)
            assert checked.returncode == 0, checked.stderr
            listeners.spawn([tool("nginx"), "-c", str(conf), "-p", str(tmp_path)], https, stderr=subprocess.DEVNULL)
            yield type("Front", (), {"https": https, "gateways": gateways, "conf": rendered.stdout, "cert": Path(cert)})
        finally:
            for gateway in gateways:
                gateway.stop()


def get(front, host: str, target: str = "/", headers: dict | None = None):
    context = ssl.create_default_context(cafile=str(front.cert))
    sock = socket.create_connection(("127.0.0.1", front.https), timeout=10)
    conn = http.client.HTTPSConnection(host, front.https, context=context, timeout=10)
    conn.sock = context.wrap_socket(sock, server_hostname=host)
    try:
        conn.request("GET", target, headers={"Host": f"{host}:{front.https}", **(headers or {})})
        response = conn.getresponse()
        return response.status, response, response.read()
    finally:
        conn.close()


def test_rendered_front_lists_every_gateway_and_no_api_host(front):
    upstreams = [line.split()[1] for line in front.conf.splitlines() if line.strip().startswith("server 127.0.0.1:")]
    assert upstreams == [f"127.0.0.1:{g.port}" for g in front.gateways]
    assert not re.search(r"@[A-Z_]+@", front.conf) and "unused.invalid" not in front.conf
    assert "server_name *.fleet.test;" in front.conf and "X-Forwarded-Port" in front.conf


def test_previews_through_tls_and_gateways_and_one_gateway_down(front):
    host = f"8000-pub001.{DOMAIN}"
    status, _, body = get(front, host)
    assert status == 200, body
    heard = json.loads(body)
    # The front's word, believed by the gateway (a trusted proxy) and passed on, signed.
    assert heard["x-forwarded-proto"] == "https" and heard["x-forwarded-port"] == str(front.https)
    assert heard["host"] == f"{host}:{front.https}" and "x-aether-fleet" in heard

    status, response, _ = get(front, f"8000-prv001.{DOMAIN}", f"/?token={TOKEN}")
    assert status == 302 and response.getheader("Location").startswith("/")
    assert "Secure" in response.getheader("Set-Cookie") and "token" not in response.getheader("Location")
    assert get(front, f"8000-prv001.{DOMAIN}")[0] == 401

    front.gateways[0].kill()
    statuses = [get(front, host)[0] for _ in range(10)]
    assert statuses == [200] * 10, statuses
    wait_for(lambda: front.gateways[1].status(host) == 200)
