"""`aether serve` with real WebSocket clients (the websockets library and wscat)."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import time

import pytest
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from conftest import ROOT, free_port, proc_comm, raw_upgrade, recv_json, recv_until, wait_for

WSCAT = ROOT / ".tools" / "node_modules" / ".bin" / "wscat"


def opens(ws, expect=(), timeout: float = 10.0) -> dict[int, dict]:
    """The initial open messages, by port. The server sends them on connect, before it reads
    anything: the answer to a request sent now ends them (no waiting for a quiet moment).
    Then, for the ports in ``expect`` (listening, but perhaps not seen yet: the sock_diag
    backend finds a port with its next snapshot), the live opens until each has come."""
    ws.send(json.dumps({"channel": "config", "type": "get", "id": "opens-end"}))
    seen, ended = {}, False
    deadline = time.monotonic() + timeout
    while not ended or not set(expect) <= seen.keys():
        msg = recv_json(ws, max(0.0, deadline - time.monotonic()))
        if msg["channel"] == "ports" and msg["type"] == "open":
            seen[msg["port"]] = msg
        ended = ended or msg.get("id") == "opens-end"
    return seen


@pytest.mark.parametrize("how", ["header", "query"])
def test_both_auth_methods_get_current_ports_with_urls(serve, listeners, how):
    port = free_port()
    http = listeners.http_server(port)
    server = serve()
    with server.connect(how) as ws:
        if how == "header":
            assert ws.subprotocol == "Bearer"
            assert server.token not in str(ws.response.headers)
        current = opens(ws)
    prefix = server.banner[5].split("-", 1)[1].split(".")[0]
    opened = current[port].pop("opened")
    assert isinstance(opened, int) and abs(opened - time.time() * 1000) < 60_000
    assert current[port].pop("seenAtStart") is True  # it listened before the server started
    assert current[port] == {
        "channel": "ports",
        "type": "open",
        "port": port,
        "pid": http.pid,
        "process": proc_comm(http.pid),
        "addresses": ["127.0.0.1"],
        "url": f"http://{port}-{prefix}.preview.localhost:{server.port}",
        "visibility": "private",
    }
    assert 3001 not in current and 22 not in current


@pytest.mark.parametrize(
    "path, headers, status",
    [
        ("/workspaces/ws-test/ws?token=wrong", {}, 401),
        ("/workspaces/ws-test/ws", {}, 401),
        ("/workspaces/ws-test/ws", {"Sec-WebSocket-Protocol": "Bearer, wrong"}, 401),
        ("/workspaces/other/ws?token={token}", {}, 404),
        ("/workspaces/other/ws?token=wrong", {}, 401),  # no token, no hint of which ids exist
    ],
)
def test_refused_upgrades(serve, path, headers, status):
    from websockets.sync.client import connect

    server = serve()
    url = f"ws://127.0.0.1:{server.port}{path.format(token=server.token)}"
    protocols = [p.strip() for p in headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    with pytest.raises(InvalidStatus) as caught:
        connect(url, subprotocols=protocols or None)
    assert caught.value.response.status_code == status


def test_live_open_and_close_in_order(serve, listeners):
    server = serve()
    with server.connect() as ws:
        opens(ws)
        port = free_port()
        node = listeners.node(port)
        msg = recv_until(ws, lambda m: m.get("port") == port)
        assert (msg["type"], msg["pid"], msg["process"]) == ("open", node.pid, "node")
        node.kill()
        assert recv_until(ws, lambda m: m.get("port") == port) == {"channel": "ports", "type": "close", "port": port}


@pytest.mark.parametrize(
    "frame, code, channel",
    [
        ("not json", "bad_json", None),
        ('["a"]', "bad_message", None),
        ('{"type": "get"}', "bad_message", None),
        ('{"channel": "nope", "type": "get"}', "unknown_channel", None),
        ('{"channel": "ports", "type": "nope"}', "unknown_type", "ports"),
        ('{"channel": "ports", "type": "kill", "port": "80"}', "bad_message", "ports"),
        ('{"channel": "terminal", "type": "input", "sessionId": "cli-123", "data": "ls\\n"}', "not_found", "terminal"),
        ('{"channel": "terminal", "type": "nope"}', "unknown_type", "terminal"),
        ('{"channel": "files", "type": "list"}', "bad_message", "files"),
        ('{"channel": "agent", "type": "prompt"}', "bad_message", "agent"),
        ('{"channel": "agent", "type": "prompt", "text": "hi"}', "not_configured", "agent"),
    ],
)
def test_bad_messages_get_errors_and_the_connection_stays(serve, frame, code, channel):
    server = serve()
    with server.connect() as ws:
        opens(ws)
        ws.send(frame)
        reply = recv_until(ws, lambda m: m["type"] == "error")
        assert (reply["channel"], reply["type"], reply["code"]) == (channel, "error", code)
        assert reply["message"]
        ws.send('{"channel": "config", "type": "get", "id": "after"}')
        assert recv_until(ws, lambda m: m["channel"] == "config")["id"] == "after"


def test_oversized_message_closes_1009(serve):
    server = serve("--max-message-bytes", "4096")
    with server.connect() as ws:
        opens(ws)
        ws.send('{"channel": "config", "type": "get", "pad": "' + "x" * 5000 + '"}')
        with pytest.raises(ConnectionClosed) as caught:
            ws.recv(timeout=5)
        assert caught.value.rcvd.code == 1009


def test_kill_python_and_node_servers(serve, listeners):
    server = serve()
    http_port, node_port = free_port(), free_port()
    http = listeners.http_server(http_port)
    node = listeners.node(node_port)
    with server.connect() as ws:
        opens(ws, expect=(http_port, node_port))
        for port, proc in ((http_port, http), (node_port, node)):
            ws.send(json.dumps({"channel": "ports", "type": "kill", "port": port, "id": f"k{port}"}))
            assert recv_until(ws, lambda m: m.get("port") == port) == {"channel": "ports", "type": "close", "port": port}
            assert proc.wait(5) is not None


@pytest.mark.parametrize("case", ["not_open", "ignored", "own_port", "ancestor"])
def test_kill_refusals(serve, case):
    server = serve()
    mine = socket.socket()  # held by this test process, an ancestor of the server
    mine.bind(("127.0.0.1", 0))
    mine.listen()
    port = {"not_open": free_port(), "ignored": 22, "own_port": server.port, "ancestor": mine.getsockname()[1]}[case]
    case = "forbidden" if case in ("own_port", "ancestor") else case
    with server.connect() as ws:
        opens(ws)
        ws.send(json.dumps({"channel": "ports", "type": "kill", "port": port, "id": "k"}))
        reply = recv_until(ws, lambda m: m["type"] == "error")
        assert (reply["type"], reply["code"], reply["id"], reply["port"]) == ("error", case, "k", port)
    assert server.proc.poll() is None
    mine.close()


def test_config_get_set_changed_and_persisted(serve, listeners):
    server = serve()
    port = free_port()
    listeners.http_server(port)
    with server.connect() as a, server.connect("query") as b:
        assert port in opens(a, expect=[port]) and port in opens(b, expect=[port])
        a.send('{"channel": "config", "type": "get", "id": 1}')
        config = recv_until(a, lambda m: m["channel"] == "config")["config"]
        assert config["ignoredPorts"] == [22, 2222, 3001] and config["backend"] in ("ebpf", "sockdiag")
        a.send(json.dumps({"channel": "config", "type": "set", "config": {"ignoredPorts": [22, port]}, "id": 2}))
        for ws in (a, b):
            assert recv_until(ws, lambda m: m.get("port") == port) == {"channel": "ports", "type": "close", "port": port}
            changed = recv_until(ws, lambda m: m["channel"] == "config")
            assert changed["type"] == "changed" and changed["config"]["ignoredPorts"] == [22, port]
        assert changed.get("id") is None and "id" not in changed  # b did not ask
        stored = json.loads((server.state_dir / "config.json").read_text())
        assert stored["ignored_ports"] == [22, port]
        for bad in ({"ignoredPorts": [0]}, {"ignoredPorts": "22"}, {"workspaceId": "x"}, {"nope": 1}, {}):
            a.send(json.dumps({"channel": "config", "type": "set", "config": bad}))
            assert recv_until(a, lambda m: m["channel"] == "config")["code"] == "invalid"
        a.send('{"channel": "config", "type": "get"}')
        assert recv_until(a, lambda m: m["channel"] == "config")["config"]["ignoredPorts"] == [22, port]
    # Persisted: a restarted server keeps the change.
    server.stop()
    restarted = serve("--state-dir", str(server.state_dir))
    with restarted.connect() as ws:
        assert port not in opens(ws)


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(0.2)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if sock.recv(65536) == b"":
                return True
        except socket.timeout:
            continue
        except ConnectionResetError:
            return True
    return False


def _ping_times(sock: socket.socket, seconds: float) -> list[float]:
    """Arrival times of the server's ping frames (opcode 0x9) on a raw connection."""
    sock.settimeout(0.05)
    times, buffer, deadline = [], b"", time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            buffer += sock.recv(65536)
        except socket.timeout:
            continue
        while len(buffer) >= 2:
            length = buffer[1] & 0x7F
            header = 2 + (2 if length == 126 else 8 if length == 127 else 0)
            if length >= 126:
                if len(buffer) < header:
                    break
                length = int.from_bytes(buffer[2:header], "big")
            if len(buffer) < header + length:
                break
            if buffer[0] & 0x0F == 0x9:
                times.append(time.monotonic())
            buffer = buffer[header + length :]
    return times


def test_pings_come_at_the_ping_interval(serve):
    server = serve("--ping-interval", "0.3", "--pong-timeout", "30")
    sock = raw_upgrade(server)
    times = _ping_times(sock, 2.0)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(times) >= 5, times
    assert all(0.25 < gap < 0.45 for gap in gaps), gaps


def test_keepalive_pings_and_drops_silent_clients(serve):
    server = serve("--ping-interval", "0.2", "--pong-timeout", "0.6")
    silent = raw_upgrade(server)  # never answers a ping
    with server.connect() as ws:  # answers pings by itself
        assert _closed_by_server(silent, within=3.0), "a client that never pongs must be dropped"
        time.sleep(1.0)  # well past the pong timeout
        ws.send('{"channel": "config", "type": "get"}')
        assert recv_until(ws, lambda m: m["channel"] == "config")["type"] == "config"
    assert any(line.get("reason") == "no pong for 0.6 s" for line in server.log)


def test_stalled_reader_is_dropped_alone(serve, listeners):
    server = serve("--write-timeout", "0.5", "--send-buffer-bytes", "4096")
    stalled = raw_upgrade(server, rcvbuf=4096)
    with server.connect() as ws:
        opens(ws)
        # Every `changed` broadcast (~400 bytes) also goes to the client that reads nothing.
        started = time.monotonic()
        for i in range(200):
            ws.send(json.dumps({"channel": "config", "type": "set", "config": {"ignoredPorts": [22, 2222, 3001, 40000 + i]}}))
            assert recv_until(ws, lambda m: m["channel"] == "config")["type"] == "changed"
        # Reading the stalled socket would un-stall it: ask the server's log first.
        wait_for(lambda: any(line.get("msg") == "dropping client" for line in server.log), 5)
        # Meanwhile the reading client was answered at once, every time.
        assert time.monotonic() - started < 10
        port = free_port()
        listeners.http_server(port)
        recv_until(ws, lambda m: m.get("port") == port and m["type"] == "open")
    assert any("did not complete in 0.5 s" in line.get("reason", "") for line in server.log)
    assert _closed_by_server(stalled, within=5.0)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_closes_clients_with_1001_and_exits_0(serve, signum):
    server = serve()
    with server.connect() as ws:
        opens(ws)
        started = time.monotonic()
        server.proc.send_signal(signum)
        with pytest.raises(ConnectionClosed) as caught:
            while True:
                ws.recv(timeout=3)
        assert caught.value.rcvd.code == 1001
    assert server.proc.wait(3) == 0
    assert time.monotonic() - started < 1.0


def test_token_never_logged(serve):
    server = serve()
    with server.connect("query") as ws:
        opens(ws)
    with server.connect("header") as ws:
        opens(ws)
    from websockets.sync.client import connect

    with pytest.raises(InvalidStatus):
        connect(f"{server.url}?token=wrong-{server.token}")
    # A malformed header: Tornado's own logger prints such a request whole.
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        raw.sendall(f"GET {server.url} HTTP/1.1\r\nSec-WebSocket-Protocol: Bearer, {server.token}\x01\r\n\r\n".encode())
        raw.settimeout(5)
        raw.recv(1024)
    time.sleep(0.2)
    server.stop()
    stderr = "".join(server.raw_stderr)
    assert server.token not in stderr
    assert any(line.get("logger") == "aether.access" and line.get("status") == 401 for line in server.log)


def test_port_in_use_is_one_clear_line(serve):
    server = serve()
    result = subprocess.run(
        [*__import__("conftest").AETHER, "serve", "--port", str(server.port), "--state-dir", str(server.state_dir)],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{server.port}: address already in use" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("how", ["header", "query"])
def test_wscat_connects_both_ways(serve, how):
    if not WSCAT.exists():
        pytest.fail("wscat is missing: deploy/setup.sh installs it into .tools/")
    server = serve()
    if how == "header":
        args = ["-c", server.url, "-s", f"Bearer, {server.token}"]  # seed 001's command, as given
    else:
        args = ["-c", f"{server.url}?token={server.token}"]
    # wscat quits at once when its stdin ends: keep it open until wscat is done.
    proc = subprocess.Popen(
        [str(WSCAT), *args, "-x", '{"channel":"config","type":"get","id":"w"}', "-w", "1"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    out = proc.stdout.read()  # until wscat exits, -w 1 after its message
    err = proc.stderr.read()
    proc.wait(10)
    proc.stdin.close()
    replies = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert any(r.get("type") == "config" and r.get("id") == "w" for r in replies), (out, err)
    assert any(r.get("type") == "open" and "url" in r for r in replies)


def test_connection_cap_counts_websockets(serve):
    server = serve("--max-connections", "3")
    with contextlib.ExitStack() as held:
        for _ in range(3):
            held.enter_context(server.connect())
        # Closed at once: the client notices while reading the response or still writing.
        with pytest.raises((InvalidHandshake, ConnectionClosed)):
            with server.connect(open_timeout=3):
                pass
    time.sleep(0.3)
    with server.connect() as ws:  # room again once they are gone
        ws.send('{"channel": "config", "type": "get"}')
        assert recv_until(ws, lambda m: m["channel"] == "config")["type"] == "config"
