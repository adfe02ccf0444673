"""A protocol chosen for a port, by the ports channel's `protocol` message or by an attribute
rule, against a real `aether serve` and real listeners: the preview uses it as it is, without a
look of its own (a chosen `tcp` is the not-HTTP page with no connection to the port), and the
choice's `update` goes out at once, even for a port not looked at yet, and stays under what
the port's look finds later. A port said to speak `tcp` gets no `ready` though it answers HTTP,
until no one says so."""

from __future__ import annotations

import json
import os
import signal
import sys
import urllib.error
import urllib.parse
import urllib.request

import pytest
from support.clients import opens, port_messages, recv_until
from support.ebpf import need_ebpf
from support.ports import free_port
from support.servers import Server
from support.waiting import wait_for

#: An HTTP server on argv[1] that answers every GET with how many connections it accepted.
COUNTING = """
import http.server, sys
accepted = 0
class Server(http.server.ThreadingHTTPServer):
    def verify_request(self, request, address):
        global accepted
        accepted += 1
        return True
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = str(accepted).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
Server(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


@pytest.fixture
def serve(tmp_path):
    """``serve(backend, config=None)``: `aether serve` on ``backend``, with ``config`` as its
    config.json."""
    servers = []

    def start(backend: str, config: dict | None = None) -> Server:
        state = tmp_path / f"state{len(servers)}"
        if config is not None:
            state.mkdir(mode=0o700)
            (state / "config.json").write_text(json.dumps(config))
        started = Server(backend, state)
        servers.append(started)
        return started

    yield start
    for started in servers:
        started.stop()


def accepted(port: int) -> int:
    """The counting server's connections so far, this one's included."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as answer:
        return int(answer.read())


def counting(listeners, port: int | None = None):
    return listeners.spawn_on(lambda p: [sys.executable, "-c", COUNTING, str(p)], port)


def ask(srv: Server, opened: dict) -> tuple[int, str | None]:
    """The status of the preview of ``opened``'s port, and its ``X-Aether-Error``."""
    host = urllib.parse.urlsplit(opened["url"]).netloc.split(":")[0]
    headers = {"Authorization": f"Bearer {srv.token}", "Host": host}
    request = urllib.request.Request(f"http://127.0.0.1:{srv.port}/", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.headers.get("X-Aether-Error")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("X-Aether-Error")


def without_connecting(port: int, call):
    """``call()``'s answer, and that the port accepted no connection meanwhile."""
    before = accepted(port)
    answer = call()
    assert accepted(port) == before + 1, "the preview connected to the port"
    return answer


def choose(ws, port: int, protocol: str) -> None:
    ws.send(json.dumps({"channel": "ports", "type": "protocol", "port": port, "protocol": protocol, "id": protocol}))


def looked(srv: Server, port: int, timeout: float = 30.0) -> dict:
    """The server's log line of what ``port``'s look found (it is written before the look's
    update and any ``ready`` are sent, on the next turn of the server's loop: a request sent
    after this is answered after them)."""
    return wait_for(
        lambda: next((l for l in srv.log if l.get("msg") == "port protocol" and l.get("port") == port), None), timeout
    )


def test_a_chosen_tcp_is_the_not_http_page_without_connecting(serve, backend, listeners):
    srv = serve(backend)
    port = counting(listeners).port
    with srv.connect() as ws:
        seen = port_messages(ws, port, lambda m: m["type"] == "ready")  # its look is done
        assert ask(srv, seen[0]) == (200, None)  # http, as found
        choose(ws, port, "tcp")
        recv_until(ws, lambda m: m.get("id") == "tcp", timeout=10)
        assert without_connecting(port, lambda: ask(srv, seen[0])) == (502, "not_http")
        for protocol in ("http", "auto"):  # plain HTTP again: the port is reached
            choose(ws, port, protocol)
            recv_until(ws, lambda m, p=protocol: m.get("id") == p, timeout=10)
            assert ask(srv, seen[0]) == (200, None)


def test_a_rules_tcp_and_https_hold_from_the_open(serve, backend, listeners):
    """An attribute rule's protocol holds from the port's open, before any look: `tcp` is the
    not-HTTP page with no connection to the port, `https` is TLS (a plain server fails the
    handshake)."""
    tcp_port, https_port = free_port(), free_port()
    rules = {str(tcp_port): {"protocol": "tcp"}, str(https_port): {"protocol": "https"}}
    srv = serve(backend, {"ports_attributes": rules})
    with srv.connect() as ws:
        opens(ws)
        counting(listeners, tcp_port)
        opened = port_messages(ws, tcp_port, lambda m: m["type"] == "open")[-1]
        assert ask(srv, opened) == (502, "not_http")
        assert looked(srv, tcp_port)["protocol"] == "http"  # the port's own look is done
        assert without_connecting(tcp_port, lambda: ask(srv, opened)) == (502, "not_http")
        counting(listeners, https_port)
        opened = port_messages(ws, https_port, lambda m: m["type"] == "open")[-1]
        assert ask(srv, opened) == (502, None)  # TLS to a plain HTTP server: the handshake fails


@pytest.mark.ebpf
def test_a_choice_before_the_first_look_is_told_at_once_and_kept(serve, listeners):
    """The server is held (SIGSTOP) while a port opens and a client chooses its protocol, so
    that it takes in both at once, well inside the 10 ms before the port's first look: the
    choice's `update` comes before the look's (it has no command line yet), and what the look
    finds later (the command line, plain HTTP) keeps the chosen protocol."""
    need_ebpf()  # the probe's record is read as the server resumes; sock_diag's next snapshot may be later
    srv = serve("ebpf")
    port = free_port()
    with srv.connect() as ws:
        opens(ws)
        os.kill(srv.proc.pid, signal.SIGSTOP)
        try:
            counting(listeners, port)
            choose(ws, port, "tcp")
        finally:
            os.kill(srv.proc.pid, signal.SIGCONT)
        assert looked(srv, port)["protocol"] == "http"
        choose(ws, port, "auto")  # given back: the look's http, and the ready held back till now
        seen = port_messages(ws, port, lambda m: m["type"] == "ready")
    assert seen[0]["type"] == "open", seen[0]
    at = next(i for i, m in enumerate(seen) if m.get("id") == "tcp")
    assert seen[at] == {"channel": "ports", "type": "protocol", "port": port, "protocol": "tcp", "id": "tcp"}
    assert all(m["command"] is None for m in seen[:at] if m["type"] != "protocol"), "looked at before the choice"
    back = next(i for i, m in enumerate(seen) if m.get("id") == "auto")
    updates = [m for m in seen[at + 1 : back] if m["type"] == "update"]
    assert updates and updates[0]["command"] is None, "the choice's update waited for the port's look"
    assert [(m["protocol"], m["ready"]) for m in updates] == [("tcp", None)] * len(updates)
    assert any(m["command"] is not None for m in updates)  # the look came, under the choice
    assert seen[-1]["protocol"] == "http" and seen[-2]["type"] == "update" and seen[-2]["ready"] == seen[-1]["ms"]


@pytest.mark.parametrize("withdrawn", ["by a choice", "from config.json"])
def test_a_port_chosen_tcp_gets_no_ready_until_the_choice_goes(serve, backend, listeners, withdrawn):
    """A port a rule says speaks `tcp` is not previewed as HTTP: though it answers HTTP (its
    look finds http), it gets no `ready`, and its `ready` field stays null, while its twin,
    opened after it with no rule, gets its `ready`. Once nothing says `tcp` any more (a
    person chooses `http` over the rule, or the rule leaves config.json), the `ready` comes,
    with the time of the port's first answer."""
    chosen, twin = free_port(), free_port()
    srv = serve(backend, {"ports_attributes": {str(chosen): {"protocol": "tcp"}}})
    with srv.connect() as ws:
        opens(ws)
        listeners.http_server(chosen)
        listeners.http_server(twin)
        seen: list[dict] = []
        recv_until(ws, lambda m: seen.append(m) or (m["type"] == "ready" and m["port"] == twin), timeout=30)
        assert looked(srv, chosen)["protocol"] == "http"
        seen += _until_answered(ws)
        mine = [m for m in seen if m.get("port") == chosen]
        assert mine and not [m for m in mine if m["type"] == "ready"], mine
        assert [(m["protocol"], m["ready"]) for m in mine if m["type"] in ("open", "update")][-1] == ("tcp", None)
        if withdrawn == "by a choice":
            choose(ws, chosen, "http")
        else:
            config = srv.state_dir / "config.json"
            config.with_suffix(".tmp").write_text(json.dumps({"ports_attributes": {}}))
            config.with_suffix(".tmp").rename(config)
        after = port_messages(ws, chosen, lambda m: m["type"] == "ready")
    ready = after[-1]
    assert ready == {"channel": "ports", "type": "ready", "port": chosen, "protocol": "http", "ms": ready["ms"]}
    assert after[-2]["type"] == "update" and (after[-2]["protocol"], after[-2]["ready"]) == ("http", ready["ms"])


def _until_answered(ws) -> list[dict]:
    """The messages up to the answer to a request sent now (what the server sent before it)."""
    ws.send(json.dumps({"channel": "config", "type": "get", "id": "flush"}))
    seen: list[dict] = []
    recv_until(ws, lambda m: seen.append(m) or m.get("id") == "flush", timeout=10)
    return seen
