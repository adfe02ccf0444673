"""The command line as a person uses it: ``port set --key --value``, ``port check`` (``--all``,
and a ``port run`` command that never listened on its PORT), registry commands that find the
running server's state directory, ``ports list`` with registry names and commands, ``ports
watch --human``, and ``ports kill`` refusing any aether server's listener.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from support import AETHER, ROOT
from support.ports import free_port
from support.servers import Server
from support.waiting import wait_for


def aether(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*AETHER, *args], capture_output=True, text=True, timeout=30, cwd=ROOT, env={**os.environ, **(env or {})}, **kw
    )


@pytest.fixture
def runtime(tmp_path):
    """A runtime directory of this test's own, and an environment naming it (no AETHER_STATE_DIR)."""
    path = tmp_path / "run"
    path.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if k != "AETHER_STATE_DIR"}
    env["XDG_RUNTIME_DIR"] = str(path)
    return env


def test_port_set_with_key_and_value(tmp_path):
    state = str(tmp_path)
    assert aether("port", "set", "--key", "web", "--value", "5173", "--state-dir", state).returncode == 0
    assert aether("port", "get", "web", "--state-dir", state).stdout.strip() == "5173"
    assert aether("port", "set", "api", "--value", "8000", "--state-dir", state).returncode == 0
    clash = aether("port", "set", "api", "8001", "--value", "8002", "--state-dir", state)
    assert clash.returncode == 2 and "two ports given" in clash.stderr  # a usage error (README)
    missing = aether("port", "set", "--key", "db", "--state-dir", state)
    assert missing.returncode == 2 and "needs a port" in missing.stderr and "Traceback" not in missing.stderr
    assert aether("port", "get", "api", "--state-dir", state).stdout.strip() == "8000"


def test_check_lists_unregistered_only_with_all_and_warns_of_a_run_that_never_listened(tmp_path, listeners):
    state = str(tmp_path)
    port = free_port()
    assert aether("port", "set", "web", str(port), "--state-dir", state).returncode == 0
    # Started for web, but it ignores $PORT: nothing listens on web's port.
    idle = subprocess.Popen(
        [*AETHER, "port", "run", "--state-dir", state, "web", "--", sys.executable, "-c", "import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        stray = listeners.http_server().port

        def found(*flags):
            result = aether("port", "check", "--json", *flags, "--state-dir", state)
            return result, {(item["kind"], item["port"]) for item in json.loads(result.stdout)}

        def warned():
            result, kinds = found()
            return (result, kinds) if ("not_listening", port) in kinds else None

        result, kinds = wait_for(warned, 10)
        assert not any(kind == "unregistered" for kind, _ in kinds)
        assert result.returncode == 0  # a warning, not a conflict
        text = aether("port", "check", "--state-dir", state).stdout
        assert f"not_listening: pid {idle.pid} was started by aether port run web with PORT={port}" in text
        _, every = found("--all")
        assert ("unregistered", stray) in every and ("not_listening", port) in every
    finally:
        idle.kill()
        idle.wait()
    assert ("not_listening", port) not in found()[1]


@pytest.mark.ebpf
def test_registry_commands_find_the_running_server(tmp_path, runtime):
    server = Server("auto", tmp_path / "state", env=runtime)
    try:
        assert len(list((tmp_path / "run" / "aether").glob("serve-*.json"))) == 1
        assert aether("port", "set", "web", "5173", env=runtime).returncode == 0
        # The server's registry got it: its REST API says so.
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        conn.request("GET", "/api/ports/web", headers={"Authorization": f"Bearer {server.token}"})
        assert json.loads(conn.getresponse().read())["port"] == 5173
        conn.close()

        # `ports list` names the port's registry entries and gives its command line.
        site_port = free_port()
        site = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(site_port), "--bind", "127.0.0.1", "--directory", str(tmp_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert aether("port", "set", "docs", str(site_port), env=runtime).returncode == 0

            def listed():
                rows = json.loads(aether("ports", "list", "--json", env=runtime).stdout)
                return next((r for r in rows if r["port"] == site_port), None)

            row = wait_for(listed, 10)
            assert row["names"] == ["docs"] and row["command"].endswith(
                f"http.server {site_port} --bind 127.0.0.1 --directory {tmp_path}"
            )
            table = aether("ports", "list", env={**runtime, "COLUMNS": "400"}).stdout.splitlines()
            assert table[0].split() == ["PORT", "PID", "PROCESS", "NAMES", "ADDRESSES", "COMMAND"]
            line = next(line for line in table if line.split()[0] == str(site_port))
            assert " docs " in line and "http.server" in line
        finally:
            site.kill()
            site.wait()

        # Two servers: the commands say so and take neither.
        other = Server("sockdiag", tmp_path / "other", env=runtime)
        try:
            both = aether("port", "get", "web", env={**runtime, "HOME": str(tmp_path / "home")})
            assert "several aether servers run" in both.stderr and both.returncode == 1
        finally:
            other.stop()
    finally:
        server.stop()
    assert not list((tmp_path / "run" / "aether").glob("serve-*.json"))


def test_ports_kill_refuses_an_aether_server(tmp_path, runtime):
    server = Server("sockdiag", tmp_path / "state", env=runtime)
    try:
        result = aether("ports", "kill", str(server.port), "--json")
        assert result.returncode == 1
        answer = json.loads(result.stdout)
        assert answer["error"] == "forbidden" and "an aether server" in answer["message"]
        assert server.proc.poll() is None
    finally:
        server.stop()


def test_ports_watch_human_is_a_live_table(tmp_path, listeners):
    proc = subprocess.Popen(
        [*AETHER, "ports", "watch", "--human", "--backend", "sockdiag", "--interval", "0.05"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "400"},
    )
    os.set_blocking(proc.stdout.fileno(), False)
    seen = bytearray()

    def screen_has(text: str) -> bool:
        chunk = proc.stdout.read()
        if chunk:
            seen.extend(chunk)
        last = seen.rsplit(b"\x1b[H\x1b[2J", 1)[-1].decode(errors="replace")
        return text in last and last.endswith("^C to stop\n")

    try:
        wait_for(lambda: screen_has("PORT"), 20)
        served = listeners.http_server()
        wait_for(lambda: screen_has(f"\n{served.port:>5} "), 10)
        assert "http.server" in seen.rsplit(b"\x1b[H\x1b[2J", 1)[-1].decode()
        served.kill()
        served.wait()
        wait_for(lambda: screen_has("PORT") and f"\n{served.port:>5} " not in seen.rsplit(b"\x1b[H\x1b[2J", 1)[-1].decode(), 10)
    finally:
        proc.terminate()
        proc.wait(10)
