"""The port registry: the SQLite store, concurrent writers, allocation, and `aether port`."""

from __future__ import annotations

import http.client
import json
import multiprocessing
import socket
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import AETHER, ROOT
from support.ports import free_port

from aether.registry.store import Registry, RegistryError


def port_cli(state, *args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*AETHER, "port", *args, "--state-dir", str(state)]
        if args[0] != "run"
        else [*AETHER, "port", args[0], "--state-dir", str(state), *args[1:]],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        **kw,
    )


@pytest.fixture
def registry(tmp_path):
    with Registry(tmp_path / "registry.db") as reg:
        yield reg


def test_entries_are_validated_and_ports_unique(registry):
    entry = registry.set("web", 5570, app="shop", label="api", description="REST API")
    assert (entry.key, entry.port, entry.app, entry.label) == ("web", 5570, "shop", "api")
    for key in ("Web", "-web", "", "a" * 64, "web_1", "3000"):
        with pytest.raises(RegistryError):
            registry.set(key, 5571)
    for port in (0, 65536, "x", True):
        with pytest.raises(RegistryError):
            registry.set("other", port)
    with pytest.raises(RegistryError, match="registered to key web"):
        registry.set("other", 5570)
    moved = registry.set("web", 5572)  # an update keeps the fields not given
    assert (moved.port, moved.app, moved.label, moved.description) == (5572, "shop", "api", "REST API")
    assert moved.created == entry.created and moved.updated >= entry.updated
    assert registry.by_port(5570) is None and registry.get("web") == moved
    assert registry.delete("web") and not registry.delete("web") and registry.entries() == []


def test_corrupt_or_newer_database_is_an_error_naming_it(tmp_path):
    path = tmp_path / "registry.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(RegistryError, match=str(path)):
        Registry(path)
    assert path.read_bytes() == b"this is not sqlite" * 100  # never replaced
    result = port_cli(tmp_path, "get", "web")
    assert result.returncode == 1 and str(path) in result.stderr and "Traceback" not in result.stderr
    newer = tmp_path / "newer"
    newer.mkdir()
    with Registry(newer / "registry.db") as reg:
        reg._db.execute("PRAGMA user_version = 99")
    with pytest.raises(RegistryError, match="newer"):
        Registry(newer / "registry.db")


def _writer(path: str, worker: int, count: int) -> None:
    with Registry(path) as reg:
        for i in range(count):
            reg.set(f"w{worker}-k{i}", 10000 + worker * count + i, app=f"app{worker}")
            if i % 50 == 0:
                reg.set(f"shared-{i % 7}", 60000 + (i % 7), description=f"worker {worker}")


def test_concurrent_writers_lose_nothing(tmp_path):
    path = str(tmp_path / "registry.db")
    Registry(path).close()
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_writer, args=(path, w, 500)) for w in range(8)]
    for proc in workers:
        proc.start()
    for proc in workers:
        proc.join(120)
        assert proc.exitcode == 0
    with Registry(path) as reg:
        entries = reg.entries()
    mine = [e for e in entries if e.key.startswith("w")]
    assert len(mine) == 8 * 500
    assert {e.port for e in mine} == set(range(10000, 10000 + 4000))
    assert len({e.port for e in entries}) == len(entries)


@settings(max_examples=150, deadline=None)
@given(
    taken=st.sets(st.integers(5570, 5599), max_size=20),
    avoid=st.sets(st.integers(5570, 5599), max_size=10),
    count=st.integers(1, 6),
)
def test_allocation_is_contiguous_free_and_idempotent(tmp_path_factory, taken, avoid, count):
    with Registry(tmp_path_factory.mktemp("alloc") / "registry.db") as reg:
        for port in taken:
            reg.set(f"taken-{port}", port)
        labels = [f"l{i}" for i in range(count)]
        fits = [s for s in range(5570, 5600 - count + 1) if not set(range(s, s + count)) & (taken | avoid)]
        if not fits:
            with pytest.raises(RegistryError, match="no .* contiguous"):
                reg.allocate("app", labels, 5570, 5599, avoid)
            return
        block = reg.allocate("app", labels, 5570, 5599, avoid)
        ports = [e.port for e in block]
        assert ports == list(range(fits[0], fits[0] + count))  # the first block that fits
        assert not set(ports) & (taken | avoid)
        assert reg.allocate("app", labels, 5570, 5599, avoid) == block  # idempotent
        assert len({e.port for e in reg.entries()}) == len(reg.entries())


def test_cli_set_get_list_delete_and_persistence(tmp_path, listeners):
    port = free_port()
    assert (
        port_cli(tmp_path, "set", "web", str(port), "--app", "shop", "--label", "api", "--description", "the API").returncode == 0
    )
    assert port_cli(tmp_path, "set", "shop-ui", "5599", "--app", "shop", "--label", "ui").returncode == 0
    assert port_cli(tmp_path, "get", "web").stdout == f"{port}\n"
    listeners.http_server(port)
    rows = json.loads(port_cli(tmp_path, "list", "--json").stdout)
    web = next(r for r in rows if r["key"] == "web")
    assert web["listening"] and web["process"] and web["pid"] and web["description"] == "the API"
    assert not next(r for r in rows if r["key"] == "shop-ui")["listening"]
    text = port_cli(tmp_path, "list").stdout
    assert text.startswith(f"shop (api:{port},ui:5599)\n") or text.startswith(f"shop (ui:5599,api:{port})\n")
    # curl localhost:$(aether port get web)
    shell = subprocess.run(
        [
            "bash",
            "-c",
            f"curl -s -o /dev/null -w '%{{http_code}}' localhost:$({' '.join(AETHER)} port get web --state-dir {tmp_path})",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert shell.stdout == "200"
    for bad in (["set", "Bad", "80"], ["set", "x", "70000"], ["get", "nope"], ["delete", "nope"], ["set", "other", str(port)]):
        result = port_cli(tmp_path, *bad)
        assert result.returncode == 1 and result.stderr.startswith("aether: ") and result.stderr.count("\n") == 1, bad
    assert port_cli(tmp_path, "delete", "web").returncode == 0
    assert port_cli(tmp_path, "get", "web").returncode == 1


def test_cli_run_sets_the_ports_from_the_registry(tmp_path):
    port_cli(tmp_path, "set", "shop-api", "5580", "--app", "shop", "--label", "api")
    port_cli(tmp_path, "set", "shop-health", "5581", "--app", "shop", "--label", "health")
    code = "import os; print(os.environ['PORT'], os.environ['PORT_HEALTH'], os.environ['PORT_API'], os.environ['AETHER_APP'])"
    result = port_cli(tmp_path, "run", "shop-api", "--", sys.executable, "-c", code)
    assert result.stdout == "5580 5581 5580 shop\n"
    assert port_cli(tmp_path, "run", "nope", "--", "true").returncode == 1


def test_cli_allocate_skips_listening_bad_and_registered_ports(tmp_path, listeners):
    # 6664-6680 holds the browsers' bad ports 6665-6669 and 6679.
    result = port_cli(tmp_path, "allocate", "game", "--labels", "api,ws", "--range", "6664-6680", "--json")
    ports = [e["port"] for e in json.loads(result.stdout)]
    assert ports == [6670, 6671]
    again = port_cli(tmp_path, "allocate", "game", "--labels", "api,ws", "--range", "6664-6680", "--json")
    assert [e["port"] for e in json.loads(again.stdout)] == ports
    full = port_cli(tmp_path, "allocate", "other", "--labels", "a,b,c,d,e,f,g,h", "--range", "6664-6680")
    assert full.returncode == 1 and "no 8 contiguous free ports" in full.stderr  # 6672-6678 are 7
    # A port bound for UDP, or listening, is skipped: each a free port of its own, alone in its range
    # (a fixed one can be another's, a concurrent run's of this test included).
    busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    busy.bind(("127.0.0.1", 0))
    listening = free_port()
    listeners.http_server(listening)
    try:
        for port in (busy.getsockname()[1], listening):
            taken = port_cli(tmp_path, "allocate", f"x{port}", "--labels", "api", "--range", f"{port}-{port}")
            assert taken.returncode == 1 and f"no 1 contiguous free ports in {port}-{port}" in taken.stderr, port
    finally:
        busy.close()
    default = port_cli(tmp_path, "allocate", "portos", "--labels", "api,health")
    assert default.stdout.startswith("portos (api:55") and default.returncode == 0
    (tmp_path / "config.json").write_text(json.dumps({"port_ranges": {"ml": [7100, 7199, "notebooks"]}}))
    named = port_cli(tmp_path, "allocate", "nb", "--labels", "kernel", "--range", "ml", "--json")
    assert json.loads(named.stdout)[0]["port"] == 7100


def test_cli_check_reports_conflicts(tmp_path, listeners):
    mine, theirs = free_port(), free_port()
    port_cli(tmp_path, "set", "a-api", str(mine), "--app", "a")
    port_cli(tmp_path, "set", "b-api", str(theirs), "--app", "b")
    # App a's process, started through the registry, listens on app b's port.
    code = f"import socket, time; s = socket.socket(); s.bind(('127.0.0.1', {theirs})); s.listen(); time.sleep(60)"
    listeners.spawn(
        [*AETHER, "port", "run", "--state-dir", str(tmp_path), "a-api", "--", sys.executable, "-c", code], theirs, cwd=ROOT
    )
    stray = listeners.http_server().port
    result = port_cli(tmp_path, "check", "--json", "--all")
    found = json.loads(result.stdout)
    kinds = {(f["kind"], f["port"]) for f in found}
    assert ("other_app", theirs) in kinds and ("unregistered", stray) in kinds
    # The process has a-api's PORT but listens elsewhere: a-api's port is not listening.
    assert ("not_listening", mine) in kinds
    assert result.returncode == 1
    assert "unregistered" not in port_cli(tmp_path, "check").stdout


# -- through the server -----------------------------------------------------------------------


#: Fixtures that start `aether serve` on the probe (see conftest).
PROBE_FIXTURES = ("server",)


@pytest.fixture
def server(tmp_path):
    from support.ebpf import need_ebpf
    from support.servers import Server

    need_ebpf()
    srv = Server("ebpf", tmp_path / "state", "--project-id", "abc123def")
    yield srv
    srv.stop()


def api(server, method, path, body=None, token=None):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    headers = {"Authorization": f"Bearer {token or server.token}", "Content-Type": "application/json"}
    conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
    reply = conn.getresponse()
    data = reply.read()
    return reply.status, (json.loads(data) if data else None)


def test_rest_api(server, listeners):
    port = free_port()
    assert api(server, "GET", "/api/ports", token="wrong")[0] == 401
    status, entry = api(server, "PUT", "/api/ports/web", {"port": port, "app": "shop", "label": "api"})
    assert status == 200 and entry["port"] == port and entry["app"] == "shop"
    assert api(server, "PUT", "/api/ports/other", {"port": port})[0] == 409
    assert api(server, "PUT", "/api/ports/Bad", {"port": 5590})[0] == 400
    assert api(server, "PUT", "/api/ports/x", {"port": "nope"})[0] == 400
    # A deep or infinite value is refused as any bad one is, named briefly (no repr of it all).
    deep = "[" * 1000 + "]" * 1000
    for body in (f'{{"port": {deep}}}', '{"port": 1e400}', f'{{"port": 5591, "app": {deep}}}'):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("PUT", "/api/ports/x", body=body, headers={"Authorization": f"Bearer {server.token}"})
        reply = conn.getresponse()
        assert reply.status == 400 and len(json.loads(reply.read())["message"]) < 120
    listeners.http_server(port)
    from support.waiting import wait_for

    rows = wait_for(lambda: [r for r in api(server, "GET", "/api/ports")[1] if r["listening"]], 5)
    assert rows[0]["key"] == "web" and rows[0]["pid"]
    status, block = api(server, "POST", "/api/apps/game/allocate", {"labels": ["api", "ws"]})
    assert status == 200 and [e["port"] for e in block] == [block[0]["port"], block[0]["port"] + 1]
    assert api(server, "POST", "/api/apps/game/allocate", {"labels": ["api", "ws"]})[1] == block
    assert api(server, "POST", "/api/apps/big/allocate", {"labels": [f"l{i}" for i in range(40)]})[0] == 409
    assert api(server, "DELETE", "/api/ports/web")[0] == 204
    assert api(server, "DELETE", "/api/ports/web")[0] == 404
    # The CLI sees what the server wrote: one database.
    assert port_cli(server.state_dir, "get", "game-api").stdout == f"{block[0]['port']}\n"


def test_changes_are_pushed_and_named_previews_follow_the_key(server, listeners):
    import http.client

    from support.clients import recv_until
    from support.waiting import wait_for

    first, second = listeners.http_server().port, listeners.http_server().port
    with server.connect() as ws:
        # A write by the CLI, another process, reaches connected clients.
        assert port_cli(server.state_dir, "set", "docs", str(first)).returncode == 0
        pushed = recv_until(ws, lambda m: m.get("type") == "registry", timeout=5)
        assert pushed["channel"] == "config" and [p["key"] for p in pushed["ports"]] == ["docs"]

        def get(host):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
            conn.request(
                "GET", "/", headers={"Host": f"{host}.preview.localhost:{server.port}", "Authorization": f"Bearer {server.token}"}
            )
            reply = conn.getresponse()
            reply.read()
            return reply.status

        wait_for(lambda: get("docs-abc123") == 200, 5)
        assert get("nokey-abc123") == 404
        # The app moves: the same URL follows it.
        api(server, "PUT", "/api/ports/docs", {"port": second})
        recv_until(ws, lambda m: m.get("type") == "registry" and m["ports"][0]["port"] == second, timeout=5)
        listeners.procs[0].kill()
        wait_for(lambda: get("docs-abc123") == 200, 5)


def test_named_preview_sees_a_cli_write_with_no_client_connected(server, listeners):
    import http.client

    port = listeners.http_server().port
    assert port_cli(server.state_dir, "set", "site", str(port)).returncode == 0
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request(
        "GET", "/", headers={"Host": f"site-abc123.preview.localhost:{server.port}", "Authorization": f"Bearer {server.token}"}
    )
    assert conn.getresponse().status == 200
