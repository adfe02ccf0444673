"""``aether doctor --preview PORT`` against real listeners that fail as dev servers do: none,
one bound to an address the proxy cannot reach, one that speaks no HTTP, and tiny servers
that refuse the preview's Host with Vite's and Django's own words; and ``aether doctor`` with no
flags finding the running server, whose port is then ok.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from support import AETHER, ROOT
from support.ports import free_port
from support.servers import Server

#: ``python - PORT BODY STATUS``: answers every request with STATUS and BODY, as Vite (403,
#: "Blocked request. This host ... is not allowed.") and Django (400, DisallowedHost) do for
#: a Host they do not allow; "-" as BODY answers 200.
REFUSING = """
import http.server, sys
port, body, status = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        host = self.headers["Host"]
        text = ("ok" if body == "-" else body.replace("HOST", host)).encode()
        self.send_response(200 if body == "-" else status)
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""
VITE = (
    'Blocked request. This host ("HOST") is not allowed.\n'
    'To allow this host, add "HOST" to `server.allowedHosts` in vite.config.js.'
)
DJANGO = "DisallowedHost at /\nInvalid HTTP_HOST header: 'HOST'. You may need to add 'HOST' to ALLOWED_HOSTS."


def doctor_preview(port: int, env: dict | None = None) -> tuple[int, dict]:
    result = subprocess.run(
        [*AETHER, "doctor", "--json", "--preview", str(port)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    assert "Traceback" not in result.stderr, result.stderr
    report = json.loads(result.stdout)
    return result.returncode, {check["name"]: check for check in report["checks"]}


def serving(listeners, body: str, status: int):
    return listeners.spawn_on(lambda p: [sys.executable, "-c", REFUSING, str(p), body, str(status)])


def test_nothing_listens():
    status, checks = doctor_preview(free_port())
    assert status == 1 and checks["listening"]["verdict"] == "fail" and "nothing listens" in checks["listening"]["detail"]


def test_vite_and_django_refusing_the_host(listeners):
    vite = serving(listeners, VITE, 403)
    status, checks = doctor_preview(vite.port)
    assert status == 1 and checks["host"]["verdict"] == "fail"
    assert "Vite refuses the preview's Host" in checks["host"]["detail"]
    assert "server.allowedHosts" in checks["host"]["fix"]
    django = serving(listeners, DJANGO, 400)
    status, checks = doctor_preview(django.port)
    assert status == 1 and "Django" in checks["host"]["detail"] and "ALLOWED_HOSTS" in checks["host"]["fix"]
    fine = serving(listeners, "-", 200)
    status, checks = doctor_preview(fine.port)
    assert status == 0 and checks["host"]["verdict"] == "ok" and checks["protocol"]["verdict"] == "ok"


def test_no_http_and_an_unreachable_address(listeners, tmp_path):
    raw = socket.create_server(("127.0.0.1", 0))  # accepts, then says nothing and closes
    try:
        status, checks = doctor_preview(raw.getsockname()[1])
    finally:
        raw.close()
    assert status == 1 and checks["protocol"]["verdict"] == "fail"
    assert "it has no web page to preview" in checks["protocol"]["detail"]
    # A listener on an address that is not loopback (IP_FREEBIND: one the host need not
    # have, TEST-NET-1): the preview, which connects over loopback, cannot reach it.
    far = socket.socket()
    far.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_FREEBIND", 15), 1)
    far.bind(("192.0.2.7", 0))
    far.listen()
    try:
        status, checks = doctor_preview(far.getsockname()[1])
    finally:
        far.close()
    assert status == 1 and checks["address"]["verdict"] == "fail" and "192.0.2.7 only" in checks["address"]["detail"]


def test_doctor_without_flags_checks_the_running_server(tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if k not in ("AETHER_STATE_DIR", "AETHER_PORT")}
    env["XDG_RUNTIME_DIR"] = str(run)
    server = Server("sockdiag", tmp_path / "state", env=env)
    try:
        result = subprocess.run([*AETHER, "doctor", "--json"], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    finally:
        server.stop()
    checks = {check["name"]: check for check in json.loads(result.stdout)["checks"]}
    assert checks["port"]["verdict"] == "ok" and checks["port"]["detail"].endswith("that is aether itself")
    assert f":{server.port} is taken" in checks["port"]["detail"]
    assert str(tmp_path / "state") in checks["state-dir"]["detail"]
