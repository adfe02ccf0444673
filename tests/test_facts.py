"""What `aether serve` tells of each port beyond its owner, with real listeners on both
backends: the protocol (`http`, `https`, `tcp`) as an `update` after the `open`, and `ready`
with the time since the open; the command line and working directory (four http.servers told
apart); the attributes from config.json, devcontainer.json and .gitpod.yml (label, onOpen,
visibility, protocol override, hidden and redacted command lines), and again after those files
change. Certificates are self-signed (conftest's ``cert``)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from support.clients import opens, port_messages, recv_until
from support.ports import free_port
from support.processes import tool
from support.servers import Server, Watcher

PY = sys.executable


@pytest.fixture
def workspace(tmp_path) -> Path:
    root = tmp_path / "workspace"
    root.mkdir()
    return root


@pytest.fixture
def server(backend, tmp_path, workspace):
    """``start(config=None)``: `aether serve` on ``backend``, rooted in ``workspace``, with
    ``config`` written to its config.json first."""
    servers = []

    def start(config: dict | None = None) -> Server:
        state = tmp_path / f"state{len(servers)}"
        if config is not None:
            state.mkdir(mode=0o700)
            (state / "config.json").write_text(json.dumps(config))
        started = Server(backend, state, "--workspace-root", str(workspace))
        servers.append(started)
        return started

    yield start
    for started in servers:
        started.stop()


def latest(ws, ports, until, timeout: float = 30.0) -> dict[int, dict]:
    """For each of ``ports``, its first message that satisfies ``until``, whatever order the
    ports' messages come in."""
    found: dict[int, dict] = {}

    def matched(message: dict) -> bool:
        port = message.get("port")
        if port in ports and port not in found and until(message):
            found[port] = message
        return len(found) == len(ports)

    recv_until(ws, matched, timeout=timeout)
    return found


def protocol_told(ws, port: int, timeout: float = 30.0) -> tuple[dict, list[dict]]:
    """The port's `open`, and its messages up to the one carrying a protocol."""
    seen = port_messages(ws, port, lambda m: m.get("protocol") is not None, timeout)
    return seen[0], seen


#: Listens, and serves HTTP only after 1.5 s (a dev server's first compile).
SLOW = """
import http.server, socket, sys, time
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), http.server.SimpleHTTPRequestHandler)
time.sleep(1.5)
server.serve_forever()
"""


def test_http_server_open_names_its_command_and_cwd_then_protocol_and_ready(server, listeners, workspace):
    srv = server()
    site = workspace / "site"
    site.mkdir()
    with srv.connect() as ws:
        opens(ws)
        proc = listeners.spawn_on(
            lambda p: [PY, "-m", "http.server", str(p), "--bind", "127.0.0.1"],
            cwd=site,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port = proc.port
        seen = port_messages(ws, port, lambda m: m["type"] == "ready")
    opened = seen[0]
    assert opened["type"] == "open" and opened["pid"] == proc.pid
    # The open is sent at once: the protocol is not known yet, and comes in an update.
    assert opened["protocol"] is None and opened["ready"] is None
    told = [m for m in seen if m["type"] == "update" and m["protocol"] is not None][-1]
    assert told["protocol"] == "http" and told["ready"] >= 0
    assert told["command"] == f"{PY} -m http.server {port} --bind 127.0.0.1"
    assert told["cwd"] == str(site) and told["started"] > 0
    ready = seen[-1]
    assert ready == {"channel": "ports", "type": "ready", "port": port, "protocol": "http", "ms": ready["ms"]}
    assert ready["ms"] >= 0
    # A client connecting now gets everything in its open.
    with srv.connect() as ws:
        first = recv_until(ws, lambda m: m.get("port") == port)
    assert (first["type"], first["protocol"], first["command"], first["cwd"]) == ("open", "http", told["command"], str(site))
    assert first["ready"] == told["ready"]


@pytest.mark.parametrize("kind", ["python", "node", "nginx"])
def test_tls_servers_are_https_and_ready(server, listeners, cert, tmp_path, kind):
    srv = server()
    certificate, key = cert
    with srv.connect() as ws:
        opens(ws)
        if kind == "python":
            proc = listeners.python_https(cert)
        elif kind == "node":
            proc = listeners.node_https(cert)
        else:

            def nginx(p: int) -> list[str]:
                conf = tmp_path / f"nginx-ssl-{p}.conf"
                conf.write_text(
                    f"""daemon off; master_process off; pid {tmp_path}/nginx-{p}.pid; error_log stderr error;
events {{ worker_connections 64; }}
http {{ access_log off; client_body_temp_path {tmp_path}/body; proxy_temp_path {tmp_path}/proxy;
  fastcgi_temp_path {tmp_path}/fcgi; uwsgi_temp_path {tmp_path}/uwsgi; scgi_temp_path {tmp_path}/scgi;
  server {{ listen 127.0.0.1:{p} ssl; ssl_certificate {certificate}; ssl_certificate_key {key}; return 200 "ok"; }} }}
"""
                )
                return [tool("nginx"), "-c", str(conf), "-p", str(tmp_path)]

            proc = listeners.spawn_on(nginx)
        seen = port_messages(ws, proc.port, lambda m: m["type"] == "ready")
    assert seen[-1]["protocol"] == "https"
    assert [m["protocol"] for m in seen if m["type"] == "update" and m["protocol"]][-1] == "https"


def test_raw_tcp_server_is_tcp_and_never_ready(server, listeners):
    srv = server()
    with srv.connect() as ws:
        opens(ws)
        proc = listeners.postgres_like()
        _open, seen = protocol_told(ws, proc.port)
        assert seen[-1]["type"] == "update" and seen[-1]["protocol"] == "tcp"
        assert seen[-1]["ready"] is None
        # No ready for it: a port opened after it is told, and nothing more of this one came.
        later = listeners.http_server()
        between = port_messages(ws, later.port, lambda m: m["type"] == "ready")
        assert between
    assert all(m["type"] != "ready" for m in seen)


def test_slow_server_is_ready_once_it_answers_with_the_time_it_took(server, listeners, backend):
    srv = server()
    with srv.connect() as ws:
        opens(ws)
        proc = listeners.spawn_on(lambda p: [PY, "-c", SLOW, str(p)], stderr=subprocess.DEVNULL)
        seen = port_messages(ws, proc.port, lambda m: m["type"] == "ready")
    # It listened, then slept 1.5 s before it accepted: its first answer came that much after
    # the listen (the probe sees the listen itself; sock_diag, at its next snapshot, 250 ms on).
    assert seen[-1]["ms"] >= (1400 if backend == "ebpf" else 1000)
    assert seen[0]["type"] == "open" and seen[0]["ready"] is None


def test_four_http_servers_in_four_directories_are_told_apart(server, listeners, workspace):
    srv = server()
    dirs = []
    for name in ("blog", "shop", "docs", "api"):
        (workspace / name).mkdir()
        dirs.append(workspace / name)
    with srv.connect() as ws:
        opens(ws)
        procs = [
            listeners.spawn_on(
                lambda p: [PY, "-m", "http.server", str(p)], cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            for d in dirs
        ]
        rows = latest(ws, {proc.port for proc in procs}, lambda m: m.get("cwd") is not None)
    assert len({row["process"] for row in rows.values()}) == 1  # four rows of one program name
    assert sorted(row["cwd"] for row in rows.values()) == sorted(str(d) for d in dirs)
    assert len({(row["command"], row["cwd"]) for row in rows.values()}) == 4


def test_attributes_from_every_file_and_their_sources(server, listeners, workspace):
    http = [listeners.http_server() for _ in range(3)]
    a, b, c = (proc.port for proc in http)
    (workspace / ".devcontainer").mkdir()
    (workspace / ".devcontainer" / "devcontainer.json").write_text(
        f"""{{
  // JSON with comments, as the Dev Containers tools read it
  "portsAttributes": {{
    "{b}": {{"label": "from devcontainer", "onAutoForward": "openBrowser"}},
    "{a}": {{"label": "shadowed by config.json", "onAutoForward": "silent"}},
  }},
}}"""
    )
    (workspace / ".gitpod.yml").write_text(f"ports:\n  - port: {c}\n    name: from gitpod\n    onOpen: ignore-completely\n")
    config = {"ports_attributes": {str(a): {"label": "from config", "visibility": "public", "protocol": "https"}}}
    srv = server(config)
    with srv.connect() as ws:
        rows = latest(ws, {a, b, c}, lambda m: m.get("label") is not None)
    assert (rows[a]["label"], rows[a]["onOpen"], rows[a]["visibility"]) == ("from config", "silent", "public")
    assert rows[a]["sources"]["label"] == {"file": "config.json", "key": f'ports_attributes["{a}"]'}
    assert rows[a]["sources"]["onOpen"]["file"] == ".devcontainer/devcontainer.json"
    assert rows[b]["label"] == "from devcontainer" and rows[b]["onOpen"] == "open" and rows[b]["visibility"] == "private"
    assert rows[c]["label"] == "from gitpod" and rows[c]["onOpen"] == "ignore"
    assert rows[c]["sources"]["label"]["file"] == ".gitpod.yml"
    # The protocol the rule gives wins over what detection finds.
    with srv.connect() as ws:
        first = recv_until(ws, lambda m: m.get("port") == a, timeout=10)
    assert first["protocol"] == "https"
    # The rule's visibility is the preview's: public, without a token (a private one is 401).
    host = urllib.parse.urlsplit(first["url"]).netloc.split(":")[0]
    for port, public in ((a, True), (b, False)):
        request = urllib.request.Request(f"http://127.0.0.1:{srv.port}/", headers={"Host": host.replace(str(a), str(port))})
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                status = answer.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        assert (status != 401) == public, (port, status)


def test_rules_follow_their_files(server, listeners, workspace):
    proc = listeners.http_server()
    port = proc.port
    srv = server()
    with srv.connect() as ws:
        first = recv_until(ws, lambda m: m.get("port") == port, timeout=10)
        assert first["label"] is None
        (workspace / ".gitpod.yml").write_text(f"ports:\n  - port: {port}\n    name: web\n")
        assert port_messages(ws, port, lambda m: m.get("label") == "web")[-1]["sources"]["label"]["file"] == ".gitpod.yml"
        # A devcontainer.json made later, in a directory made later, is followed too.
        (workspace / ".devcontainer").mkdir()
        (workspace / ".devcontainer" / "devcontainer.json").write_text(
            json.dumps({"portsAttributes": {str(port): {"label": "dc"}}})
        )
        port_messages(ws, port, lambda m: m.get("label") == "dc")
        # And config.json, in the state directory, first of all.
        config = srv.state_dir / "config.json"
        data = json.loads(config.read_text()) if config.exists() else {}
        data["ports_attributes"] = {"http\\.server": {"label": "mine", "on_open": "notify"}}
        tmp = config.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.rename(config)
        told = port_messages(ws, port, lambda m: m.get("label") == "mine")[-1]
        assert told["onOpen"] == "notify" and told["sources"]["label"]["file"] == "config.json"
        (workspace / ".gitpod.yml").unlink()
        config.write_text(json.dumps({}))
        port_messages(ws, port, lambda m: m.get("label") == "dc")


def test_command_lines_hidden_and_redacted(server, listeners):
    secret = "hunter2"
    code = "import socket, sys, time; s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); time.sleep(600)"
    config = {
        "ports_attributes": {
            "--requirepass": {"redact": ["--requirepass"], "label": "redacted"},
            "--hide-me": {"hide_command": True, "label": "hidden"},
        }
    }
    srv = server(config)
    with srv.connect() as ws:
        opens(ws)
        redacted = listeners.spawn_on(lambda p: [PY, "-c", code, str(p), "--requirepass", secret])
        hidden = listeners.spawn_on(lambda p: [PY, "-c", code, str(p), "--hide-me"])
        rows = latest(ws, {redacted.port, hidden.port}, lambda m: m.get("label") in ("redacted", "hidden"))
        one, two = rows[redacted.port], rows[hidden.port]
    assert one["command"].endswith("--requirepass ***") and secret not in json.dumps(one)
    assert two["command"] is None and two["cwd"] is not None
    assert secret not in "".join(srv.raw_stderr)


def test_open_is_not_held_back_by_lookups(server, listeners):
    """The open comes before anything a lookup finds: its command and protocol are unknown."""
    srv = server()
    with srv.connect() as ws:
        opens(ws)
        proc = listeners.http_server()
        seen = port_messages(ws, proc.port, lambda m: m["type"] == "ready")
    assert seen[0]["type"] == "open" and seen[0]["command"] is None and seen[0]["protocol"] is None


def test_ports_watch_carries_the_same_fields_and_ready(backend, listeners, workspace, tmp_path):
    (workspace / ".gitpod.yml").write_text("ports:\n  - port: 1-65535\n    name: any port\n")
    env = {"AETHER_WORKSPACE_ROOT": str(workspace), "AETHER_STATE_DIR": str(tmp_path / "state")}
    watcher = Watcher(backend, env=env, plain=False)
    try:
        proc = listeners.http_server()
        seen = []
        while not seen or seen[-1]["type"] != "ready":
            message = watcher.next(timeout=30)
            if message["port"] == proc.port:
                seen.append(message)
    finally:
        watcher.stop()
    assert seen[0]["type"] == "open" and seen[0]["label"] == "any port" and seen[0]["command"] is None
    told = [m for m in seen if m["type"] == "update"][-1]
    assert told["protocol"] == "http" and "http.server" in told["command"] and told["cwd"] is not None
    assert seen[-1]["protocol"] == "http" and seen[-1]["ms"] >= 0


def test_a_person_chooses_a_ports_protocol_and_the_preview_follows(server, listeners):
    """`protocol` on the ports channel: every client hears it and the port's `update`; the
    preview speaks what was chosen (TLS to a plain server fails its handshake); `auto` gives
    back what detection found; a port not open, or a value not offered, changes nothing."""
    srv = server()
    port = listeners.http_server().port
    headers = {"Authorization": f"Bearer {srv.token}"}

    def preview() -> int:
        request = urllib.request.Request(f"http://127.0.0.1:{srv.port}/", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status
        except urllib.error.HTTPError as exc:
            return exc.code

    with srv.connect() as ws, srv.connect() as other:
        opened, _ = protocol_told(ws, port)
        headers["Host"] = urllib.parse.urlsplit(opened["url"]).netloc.split(":")[0]
        assert preview() == 200
        ws.send(json.dumps({"channel": "ports", "type": "protocol", "port": port, "protocol": "https", "id": "p"}))
        told = recv_until(ws, lambda m: m.get("id") == "p", timeout=10)
        assert told == {"channel": "ports", "type": "protocol", "port": port, "protocol": "https", "id": "p"}
        seen = port_messages(other, port, lambda m: m["type"] == "update" and m["protocol"] == "https")
        assert {"channel": "ports", "type": "protocol", "port": port, "protocol": "https"} in seen
        assert preview() == 502  # TLS to a plain HTTP server: the handshake fails
        ws.send(json.dumps({"channel": "ports", "type": "protocol", "port": port, "protocol": "auto", "id": "a"}))
        recv_until(ws, lambda m: m.get("id") == "a", timeout=10)
        port_messages(other, port, lambda m: m["type"] == "update" and m["protocol"] == "http")
        assert preview() == 200
        closed = free_port()
        for body, code in (
            ({"port": closed, "protocol": "http"}, "not_open"),
            ({"port": port, "protocol": "ftp"}, "bad_message"),
        ):
            ws.send(json.dumps({"channel": "ports", "type": "protocol", "id": "x", **body}))
            reply = recv_until(ws, lambda m: m.get("id") == "x", timeout=10)
            assert (reply["type"], reply["code"]) == ("error", code), reply
        assert preview() == 200
