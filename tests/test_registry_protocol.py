"""A port's protocol kept in the registry (`aether port set --protocol`, REST `protocol`),
against a real `aether serve`, real listeners and a real WebSocket client: the port's `open`
or `update` says it, with the registry as its source; the preview follows it at once (TLS for
`https`, the not-HTTP page for `tcp`); a person's choice on the ports channel is over it, and
it is over an attribute rule; `auto` gives the port back to detection. A registry file made
before entries had a protocol opens, and gains it."""

from __future__ import annotations

import http.client
import json
import os
import sqlite3
import subprocess
import urllib.parse

import pytest
from support import AETHER, ROOT
from support.clients import opens, port_messages, recv_until
from support.ports import free_port
from support.servers import Server, Watcher
from support.waiting import wait_for

from aether.registry.store import Registry


def port_cli(state, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*AETHER, "port", *args, "--state-dir", str(state)], capture_output=True, text=True, timeout=30, cwd=ROOT
    )


def api(srv: Server, method: str, path: str, body=None) -> tuple[int, dict | None]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    headers = {"Authorization": f"Bearer {srv.token}", "Content-Type": "application/json"}
    conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
    reply = conn.getresponse()
    data = reply.read()
    return reply.status, (json.loads(data) if data else None)


def ask(srv: Server, message: dict) -> tuple[int, str | None, bytes]:
    """The status of the preview of ``message``'s port, its ``X-Aether-Error``, and its body."""
    host = urllib.parse.urlsplit(message["url"]).netloc.split(":")[0]
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    conn.request("GET", "/", headers={"Authorization": f"Bearer {srv.token}", "Host": host})
    reply = conn.getresponse()
    return reply.status, reply.getheader("X-Aether-Error"), reply.read()


def told(ws, port: int, protocol: str | None, source: dict | None) -> dict:
    """The port's next `open` or `update` with ``protocol`` and ``source`` as its protocol's
    `sources` entry (None: no entry)."""
    return port_messages(
        ws,
        port,
        lambda m: m["type"] in ("open", "update") and m["protocol"] == protocol and m["sources"].get("protocol") == source,
    )[-1]


def registry(key: str) -> dict:
    return {"file": "registry.db", "key": key}


def choose(ws, port: int, protocol: str) -> None:
    ws.send(json.dumps({"channel": "ports", "type": "protocol", "port": port, "protocol": protocol, "id": protocol}))
    recv_until(ws, lambda m: m.get("id") == protocol, timeout=10)


def test_a_registry_https_is_told_from_the_open_and_previewed_over_tls(serve, listeners, cert):
    """Registered before the port opens (by another process: the server has pushed the
    registry it read), `https` is in the port's `open` (before any look), named as the
    registry's, and the preview reaches the TLS server at once."""
    srv = serve()
    port = free_port()
    with srv.connect() as ws:
        opens(ws)
        assert port_cli(srv.state_dir, "set", "secure", str(port), "--protocol", "https").returncode == 0
        recv_until(ws, lambda m: m["type"] == "registry" and m["ports"][0]["protocol"] == "https")
        listeners.python_https(cert, port)
        opened = port_messages(ws, port, lambda m: m["type"] == "open")[-1]
        assert (opened["protocol"], opened["sources"].get("protocol")) == ("https", registry("secure"))
        assert ask(srv, opened)[0] == 200  # a plain request would fail the server's handshake
        # Moved to another key, the update names that one.
        assert port_cli(srv.state_dir, "delete", "secure").returncode == 0
        assert api(srv, "PUT", "/api/ports/tls", {"port": port, "protocol": "https"})[0] == 200
        told(ws, port, "https", registry("tls"))
        assert ask(srv, opened)[0] == 200


def test_a_registry_tcp_is_the_not_http_page_and_auto_gives_it_back(serve, listeners):
    """An http.server registered as `tcp` while its preview works: an `update` says `tcp`
    (the registry's), the preview gives the not-HTTP page at once; `--protocol auto` from the
    command line (another process) gives the port back to detection: `http`, no source, 200."""
    srv = serve()
    with srv.connect() as ws:
        opens(ws)
        port = listeners.http_server().port
        seen = port_messages(ws, port, lambda m: m["type"] == "ready")
        assert ask(srv, seen[0])[0] == 200
        assert port_cli(srv.state_dir, "set", "db", str(port), "--protocol", "tcp").returncode == 0
        # The preview does not wait for the server's once-a-second look at the registry.
        assert ask(srv, seen[0])[:2] == (502, "not_http")
        told(ws, port, "tcp", registry("db"))
        shown = json.loads(port_cli(srv.state_dir, "get", "db", "--json").stdout)
        assert shown["protocol"] == "tcp"
        assert "tcp" in port_cli(srv.state_dir, "list").stdout.splitlines()[1].split()
        assert port_cli(srv.state_dir, "set", "--key", "db", "--value", str(port), "--protocol", "auto").returncode == 0
        assert ask(srv, seen[0])[0] == 200
        told(ws, port, "http", None)
        assert json.loads(port_cli(srv.state_dir, "get", "db", "--json").stdout)["protocol"] is None


def test_a_person_is_over_the_registry_and_the_registry_over_a_rule(serve, listeners):
    """A rule in config.json says `tcp`, the registry `http`: the registry's holds (200); a
    person's `tcp` on the ports channel is over both; their `auto` gives it back to the
    registry's; the registry's `auto`, to the rule's."""
    port = free_port()
    srv = serve(config={"ports_attributes": {str(port): {"protocol": "tcp"}}})
    rule = {"file": "config.json", "key": f'ports_attributes["{port}"]'}
    with srv.connect() as ws:
        opens(ws)
        listeners.http_server(port)
        opened = told(ws, port, "tcp", rule)
        assert ask(srv, opened)[:2] == (502, "not_http")
        status, entry = api(srv, "PUT", "/api/ports/web", {"port": port, "protocol": "http"})
        assert status == 200 and entry is not None and entry["protocol"] == "http"
        told(ws, port, "http", registry("web"))
        assert ask(srv, opened)[0] == 200
        choose(ws, port, "tcp")
        told(ws, port, "tcp", None)  # a person's word is no file's
        assert ask(srv, opened)[:2] == (502, "not_http")
        choose(ws, port, "auto")
        told(ws, port, "http", registry("web"))
        assert ask(srv, opened)[0] == 200
        assert api(srv, "PUT", "/api/ports/web", {"port": port, "protocol": "auto"})[1]["protocol"] is None
        told(ws, port, "tcp", rule)
        assert ask(srv, opened)[:2] == (502, "not_http")


def test_a_port_registered_tcp_gets_its_ready_once_the_entry_says_auto(serve, listeners):
    """A port the registry says speaks `tcp` is not previewed as HTTP: it answers HTTP (its
    look finds http) but gets no `ready` until the entry's protocol is cleared; then the
    `update` says `http` and the `ready` comes, with the time of its first answer."""
    srv = serve()
    port = free_port()
    with srv.connect() as ws:
        opens(ws)
        assert api(srv, "PUT", "/api/ports/db", {"port": port, "protocol": "tcp"})[0] == 200
        listeners.http_server(port)
        wait_for(lambda: any(l.get("msg") == "port protocol" and l.get("port") == port for l in srv.log), 30)
        # The look's findings are sent on the server's next turn: a request sent now is answered after them.
        ws.send(json.dumps({"channel": "config", "type": "get", "id": "flush"}))
        seen: list[dict] = []
        recv_until(ws, lambda m: seen.append(m) or m.get("id") == "flush", timeout=10)
        mine = [m for m in seen if m.get("port") == port]
        assert mine and not [m for m in mine if m["type"] == "ready"], mine
        assert (mine[-1]["protocol"], mine[-1]["ready"]) == ("tcp", None)
        assert api(srv, "PUT", "/api/ports/db", {"port": port, "protocol": "auto"})[0] == 200
        after = port_messages(ws, port, lambda m: m["type"] == "ready")
    assert after[-1]["protocol"] == "http"
    assert after[-2]["type"] == "update" and (after[-2]["protocol"], after[-2]["ready"]) == ("http", after[-1]["ms"])


def test_rest_takes_a_protocol_and_refuses_a_bad_one(serve):
    srv = serve()
    port = free_port()
    status, entry = api(srv, "PUT", "/api/ports/web", {"port": port, "label": "api", "protocol": "https"})
    assert status == 200 and entry is not None and entry["protocol"] == "https"
    assert api(srv, "GET", "/api/ports/web")[1]["protocol"] == "https"
    assert api(srv, "PUT", "/api/ports/web", {"port": port, "label": "ui"})[1]["protocol"] == "https"  # kept
    for bad in ("ftp", "", "HTTPS", 443, ["https"], {"p": 1}, True):
        status, answer = api(srv, "PUT", "/api/ports/web", {"port": port, "protocol": bad, "label": "other"})
        assert status == 400 and answer is not None and answer["error"] == "invalid", bad
        assert "protocol" in answer["message"] and len(answer["message"]) < 120
    got = api(srv, "GET", "/api/ports/web")[1]
    assert got is not None and (got["protocol"], got["label"]) == ("https", "ui")  # nothing changed
    # An entry sent back as a GET gave it is taken, as it is.
    assert api(srv, "PUT", "/api/ports/web", got)[1]["protocol"] == "https"
    bad = port_cli(srv.state_dir, "set", "web", str(port), "--protocol", "ftp")
    assert bad.returncode == 1 and bad.stderr.startswith("aether: invalid protocol") and bad.stderr.count("\n") == 1


def test_ports_list_says_the_registry_protocol(tmp_path, listeners):
    """`aether ports list --json` decides as the server does: the entry's `tcp` over the
    port's look (an http.server), named as the registry's; the other port as looked at."""
    named, other = listeners.http_server().port, listeners.http_server().port
    assert port_cli(tmp_path, "set", "db", str(named), "--protocol", "tcp").returncode == 0
    env = {**os.environ, "AETHER_STATE_DIR": str(tmp_path), "AETHER_WORKSPACE_ROOT": str(tmp_path)}
    result = subprocess.run([*AETHER, "ports", "list", "--json"], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    rows = {row["port"]: row for row in json.loads(result.stdout)}
    assert (rows[named]["protocol"], rows[named]["sources"].get("protocol"), rows[named]["names"]) == (
        "tcp",
        registry("db"),
        ["db"],
    )
    assert (rows[other]["protocol"], rows[other]["sources"].get("protocol")) == ("http", None)


def test_ports_watch_says_the_registry_protocol(tmp_path, listeners, backend):
    """`aether ports watch` reads the registry as it starts: a port registered as `tcp` opens
    as `tcp`, named as the registry's, though it answers HTTP."""
    port = free_port()
    assert port_cli(tmp_path, "set", "db", str(port), "--protocol", "tcp").returncode == 0
    watcher = Watcher(backend, env={"AETHER_STATE_DIR": str(tmp_path), "AETHER_WORKSPACE_ROOT": str(tmp_path)}, plain=False)
    try:
        listeners.http_server(port)
        opened = watcher.expect("open", port, timeout=10)
        assert (opened["protocol"], opened["sources"].get("protocol")) == ("tcp", registry("db"))
    finally:
        watcher.stop()


#: The registry's schema before entries had a protocol (version 1), as such a file holds it.
OLD_SCHEMA = """
CREATE TABLE ports (
    key TEXT PRIMARY KEY,
    port INTEGER NOT NULL UNIQUE CHECK (port BETWEEN 1 AND 65535),
    app TEXT,
    label TEXT,
    description TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX ports_app ON ports (app);
PRAGMA user_version = 1;
"""


def test_a_registry_from_before_protocols_opens_and_gains_them(tmp_path):
    path = tmp_path / "registry.db"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SCHEMA)
        db.execute("INSERT INTO ports VALUES ('web', 5570, 'shop', 'api', 'REST API', 1.0, 2.0)")
    db.close()
    got = port_cli(tmp_path, "get", "web", "--json")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) | {"created": None, "updated": None} == {
        "key": "web",
        "port": 5570,
        "app": "shop",
        "label": "api",
        "description": "REST API",
        "created": None,
        "updated": None,
        "protocol": None,
    }
    assert port_cli(tmp_path, "set", "web", "5570", "--protocol", "tcp").returncode == 0
    with Registry(path) as reg:
        entry = reg.get("web")
        assert entry is not None and (entry.protocol, entry.label, entry.description) == ("tcp", "api", "REST API")
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
        # The column keeps its own check: no other value gets in, whoever writes.
        with pytest.raises(sqlite3.IntegrityError):
            db.execute("UPDATE ports SET protocol = 'ftp'")
    db.close()
