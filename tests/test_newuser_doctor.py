"""``aether doctor --preview PORT`` tried as a new user would: it must judge the request the
preview proxy really sends (``Host: localhost:PORT`` by default, the preview host with
``--preview-upstream-host original``), and name the host to allow; and a listener on an
address of this host's own interfaces, which the proxy reaches, is not "unreachable"."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys

import pytest
from support import AETHER, ROOT
from support.ebpf import need_ebpf
from support.netns import Host
from support.servers import Server

#: ``python - PORT ALLOWED``: Django's answer to a Host not in ALLOWED (comma-separated host
#: names, ports left out as Django compares them), 200 otherwise.
DJANGO = """
import http.server, sys
port, allowed = int(sys.argv[1]), sys.argv[2].split(",")
address = sys.argv[3] if len(sys.argv) > 3 else "127.0.0.1"
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        host = self.headers["Host"]
        name = host.rsplit(":", 1)[0]
        if name in allowed:
            status, text = 200, "ok"
        else:
            status, text = 400, (f"DisallowedHost at /\\nInvalid HTTP_HOST header: '{host}'. "
                                 f"You may need to add '{name}' to ALLOWED_HOSTS.")
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer((address, port), H).serve_forever()
"""


def doctor(*args: str, env: dict | None = None) -> tuple[int, dict]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("AETHER_")}
    result = subprocess.run(
        [*AETHER, "doctor", "--json", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**environment, **(env or {})},
    )
    assert "Traceback" not in result.stderr, result.stderr
    report = json.loads(result.stdout)
    return result.returncode, {check["name"]: check for check in report["checks"]}


def django(listeners, allowed: str, address: str = "127.0.0.1", wrap: tuple = ()):
    return listeners.spawn_on(lambda p: [*wrap, sys.executable, "-c", DJANGO, str(p), allowed, address])


def test_an_app_that_allows_the_host_the_proxy_sends_passes(listeners, tmp_path):
    """Django's default with DEBUG (``.localhost``, 127.0.0.1): the proxy's ``Host:
    localhost:PORT`` is allowed, so the preview works, whatever the preview host is."""
    app = django(listeners, "localhost")
    status, checks = doctor("--preview", str(app.port), "--state-dir", str(tmp_path / "state"))
    assert checks["host"]["verdict"] == "ok", checks["host"]
    assert status == 0


def test_an_app_that_refuses_localhost_is_told_to_allow_localhost(listeners, tmp_path):
    app = django(listeners, "example.com")
    status, checks = doctor("--preview", str(app.port), "--state-dir", str(tmp_path / "state"))
    assert status == 1 and checks["host"]["verdict"] == "fail"
    assert "localhost" in checks["host"]["detail"]
    # The setting that makes the preview work: the host the app was sent.
    assert "ALLOWED_HOSTS = ['localhost']" in checks["host"]["fix"], checks["host"]["fix"]


def test_with_the_original_host_the_preview_domain_is_what_to_allow(listeners, tmp_path):
    app = django(listeners, "localhost")
    env = {"AETHER_PREVIEW_UPSTREAM_HOST": "original"}
    status, checks = doctor("--preview", str(app.port), "--state-dir", str(tmp_path / "state"), env=env)
    assert status == 1 and checks["host"]["verdict"] == "fail"
    assert "ALLOWED_HOSTS = ['.preview.localhost']" in checks["host"]["fix"], checks["host"]["fix"]


def test_a_listener_on_an_address_of_this_host_is_reachable(listeners, tmp_path):
    """Bound to an address of one of this host's interfaces (not loopback): the proxy
    connects to that address, so the preview works and the doctor must not say otherwise."""
    other = Host()
    try:
        address = other.gateway  # this side of the veth pair: an address of this host
        app = django(listeners, "localhost", address)
        status, checks = doctor("--preview", str(app.port), "--state-dir", str(tmp_path / "state"))
        assert checks["address"]["verdict"] == "ok", checks["address"]
        assert checks["host"]["verdict"] == "ok" and status == 0
    finally:
        other.remove()


def test_port_taken_by_an_app_points_to_the_preview_check(listeners, tmp_path):
    """``--port N`` is the server's port; a person asking about an app's port there is shown
    the command that explains its preview."""
    app = django(listeners, "localhost")
    _, checks = doctor("--port", str(app.port), "--state-dir", str(tmp_path / "state"))
    assert checks["port"]["verdict"] == "fail"
    assert f"aether doctor --preview {app.port}" in checks["port"]["fix"]


VITE = ROOT / ".tools" / "vite" / "node_modules" / "vite" / "bin" / "vite.js"


@pytest.mark.ebpf
def test_doctor_uses_the_running_servers_preview_settings(listeners, tmp_path):
    """A server started with ``--preview-domain preview.example.com --preview-upstream-host
    original``: real Vite blocks that host. ``aether doctor --preview`` with no flags must
    judge the preview that server serves, not the defaults'."""
    need_ebpf()
    node = shutil.which("node") or pytest.fail("node is not installed (deploy/setup.sh installs it)")
    if not VITE.exists():
        pytest.fail("vite is not installed in .tools/vite (deploy/setup.sh installs it)")
    app = tmp_path / "app"
    app.mkdir()
    (app / "index.html").write_text("<!doctype html><title>app</title>")
    config = app / "vite.config.mjs"
    config.write_text(f"export default {{ logLevel: 'silent', cacheDir: {json.dumps(str(tmp_path / 'cache'))} }};\n")
    vite = listeners.spawn_on(
        lambda p: [node, str(VITE), "--config", str(config), "--port", str(p), "--strictPort", str(app)],
        env={"PATH": "/usr/bin:/bin"},
        cwd=app,
    )
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AETHER_")}
    env["XDG_RUNTIME_DIR"] = str(run)
    args = ("--project-id", "abc123def456", "--preview-domain", "preview.example.com", "--preview-upstream-host", "original")
    server = Server("ebpf", tmp_path / "state", *args, env=env)
    try:
        # What the proxy serves: Vite's own refusal.
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request(
            "GET", "/", headers={"Host": f"{vite.port}-abc123.preview.example.com", "Authorization": f"Bearer {server.token}"}
        )
        reply = conn.getresponse()
        assert reply.status == 403 and b"Blocked request" in reply.read()
        conn.close()
        status, checks = doctor("--preview", str(vite.port), env={"XDG_RUNTIME_DIR": str(run)})
    finally:
        server.stop()
    assert status == 1 and checks["host"]["verdict"] == "fail", checks
    assert "Vite" in checks["host"]["detail"] and f"{vite.port}-abc123.preview.example.com" in checks["host"]["detail"]
    assert "allowedHosts: ['.preview.example.com']" in checks["host"]["fix"]


def test_a_rule_that_sets_the_wrong_protocol_is_named(listeners, tmp_path):
    """config.json says https for a port that serves plain HTTP: the proxy speaks TLS to it
    and fails, so the doctor must say so, and which rule it is."""
    app = django(listeners, "localhost")
    state = tmp_path / "state"
    state.mkdir()
    (state / "config.json").write_text(json.dumps({"ports_attributes": {str(app.port): {"protocol": "https"}}}))
    status, checks = doctor("--preview", str(app.port), "--state-dir", str(state), env={"AETHER_WORKSPACE_ROOT": str(tmp_path)})
    assert status == 1 and checks["protocol"]["verdict"] == "fail", checks
    assert "https" in checks["protocol"]["detail"] and "config.json" in checks["protocol"]["detail"]
    assert f'ports_attributes["{app.port}"]' in checks["protocol"]["detail"]


def test_a_registry_entry_that_sets_the_wrong_protocol_is_named_over_the_rules(listeners, tmp_path):
    """The registry says tcp for a port that serves HTTP (and a rule says https): the proxy
    follows the entry, and shows the not-HTTP page; the doctor names the entry, with the
    command that fixes it."""
    app = django(listeners, "localhost")
    state = tmp_path / "state"
    state.mkdir()
    (state / "config.json").write_text(json.dumps({"ports_attributes": {str(app.port): {"protocol": "https"}}}))
    env = {"AETHER_WORKSPACE_ROOT": str(tmp_path), "AETHER_STATE_DIR": str(state)}
    subprocess.run(
        [*AETHER, "port", "set", "web", str(app.port), "--protocol", "tcp"], check=True, cwd=ROOT, env={**os.environ, **env}
    )
    status, checks = doctor("--preview", str(app.port), "--state-dir", str(state), env=env)
    assert status == 1 and checks["protocol"]["verdict"] == "fail", checks
    assert "the registry entry web sets protocol tcp" in checks["protocol"]["detail"]
    assert f"aether port set web {app.port} --protocol http" in checks["protocol"]["fix"]


def test_doctor_says_when_it_cannot_tell_which_server_to_check(tmp_path):
    """Two servers run: the doctor cannot know which one is meant, and says so (as ``aether
    port`` does) rather than silently checking the defaults."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AETHER_")}
    env["XDG_RUNTIME_DIR"] = str(run)
    first = Server("sockdiag", tmp_path / "one", env=env)
    try:
        second = Server("sockdiag", tmp_path / "two", env=env)
        try:
            result = subprocess.run(
                [*AETHER, "doctor", "--json", "--preview", str(first.port)],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=ROOT,
                env=env,
            )
        finally:
            second.stop()
    finally:
        first.stop()
    assert "several aether servers run" in result.stderr and "--state-dir" in result.stderr, result.stderr
