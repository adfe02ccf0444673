"""The ``aether gateway`` process on loopback against a real ``redis-server``: its own endpoints
(``/healthz``, ``/metrics`` and its token), its answers for hosts it cannot route, its refusals
of settings it cannot use, a clean stop; and ``aether serve``'s fleet settings. The requests it
forwards to VMs are tested end to end in test_fleet_e2e.py."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys

import pytest
from support import AETHER, ROOT
from support.fleet import DOMAIN, Gateway
from support.processes import terminate
from support.redis import RedisServer


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "fleet.key"
    path.write_text(os.urandom(32).hex())
    path.chmod(0o600)
    return str(path)


def request(gateway: Gateway, host: str, path: str = "/", headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host, **(headers or {})})
        response = conn.getresponse()
        return response.status, response, response.read()
    finally:
        conn.close()


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*AETHER, *args], capture_output=True, text=True, cwd=ROOT, timeout=30)


def test_its_endpoints_and_a_clean_stop(redis_server, key_file, tmp_path):
    token_file = tmp_path / "metrics.token"
    token_file.write_text("s3cret-metrics\n")
    gateway = Gateway(redis_server.url, key_file, "--metrics-token-file", str(token_file), public=False)
    try:
        own = f"127.0.0.1:{gateway.port}"
        status, response, body = request(gateway, own, "/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok" and json.loads(body)["redis"] == "up"
        status, response, _ = request(gateway, own, "/metrics")
        assert status == 401 and response.getheader("WWW-Authenticate").startswith("Bearer")
        assert request(gateway, own, "/metrics", {"Authorization": "Bearer wrong"})[0] == 401
        status, _, body = request(gateway, own, "/metrics", {"Authorization": "Bearer s3cret-metrics"})
        assert status == 200 and b"aether_gateway_redis_up 1.0" in body
        status, _, body = request(gateway, own, "/nothing")
        assert status == 404 and json.loads(body)["error"] == "not_found"
        # Preview hosts it cannot route: its own pages.
        status, _, body = request(gateway, f"3000-nosuch.{DOMAIN}")
        assert status == 404 and b"No such workspace" in body
        status, _, body = request(gateway, f"03000-nosuch.{DOMAIN}")
        assert status == 404 and b"No such preview" in body
        assert not any("s3cret-metrics" in line for line in gateway.log)
    finally:
        assert terminate(gateway.proc) == 0
    assert any('"gateway stopped"' in line for line in gateway.log)


def test_settings_it_cannot_use_are_refused(key_file, tmp_path):
    loose = tmp_path / "loose.key"
    loose.write_text(os.urandom(32).hex())
    loose.chmod(0o644)
    short = tmp_path / "short.key"
    short.write_text("abc")
    short.chmod(0o600)
    cases = [
        (["gateway", "--fleet-key-file", key_file], "needs --redis"),
        (["gateway", "--redis", "redis://127.0.0.1:1/0"], "needs --fleet-key-file"),
        (["gateway", "--redis", "http://x", "--fleet-key-file", key_file], "redis"),
        (["gateway", "--redis", "redis://127.0.0.1:1/0", "--fleet-key-file", str(loose)], str(loose)),
        (["gateway", "--redis", "redis://127.0.0.1:1/0", "--fleet-key-file", str(short)], "holds 3 bytes"),
        (["gateway", "--redis", "redis://127.0.0.1:1/0", "--fleet-key-file", str(tmp_path / "none")], "none"),
    ]
    for argv, message in cases:
        out = run(*argv)
        assert out.returncode == 2, (argv, out.stderr)
        assert message in out.stderr and "Traceback" not in out.stderr, (argv, out.stderr)
        assert out.stderr.count("\n") == 1, out.stderr


@pytest.mark.slow  # five starts of aether serve
def test_serve_fleet_settings_are_checked_together(key_file, tmp_path):
    base = ["serve", "--backend", "sockdiag", "--state-dir", str(tmp_path / "state"), "--port", "1"]
    fleet = ["--fleet-redis", "redis://127.0.0.1:1/0"]
    cases = [
        ([*fleet, "--fleet-key-file", key_file], "--fleet-advertise"),
        ([*fleet, "--fleet-advertise", "10.0.0.5:3001"], "--fleet-key-file"),
        ([*fleet, "--fleet-advertise", "10.0.0.5", "--fleet-key-file", key_file], "HOST:PORT"),
        (
            [*fleet, "--fleet-advertise", "10.0.0.5:3001", "--fleet-key-file", key_file, "--fleet-heartbeat", "3"],
            "--fleet-heartbeat",
        ),
        (["--fleet-redis", "http://x", "--fleet-advertise", "10.0.0.5:3001", "--fleet-key-file", key_file], "redis"),
    ]
    for argv, message in cases:
        out = run(*base, *argv)
        assert out.returncode == 2, (argv, out.stderr)
        assert message in out.stderr and "Traceback" not in out.stderr, (argv, out.stderr)


def test_serve_without_fleet_mode_never_imports_redis(tmp_path):
    code = (
        "import argparse, sys\n"
        "from aether.settings import serve\n"
        "import aether.server.app, aether.preview.service\n"
        "p = argparse.ArgumentParser(); serve.add_arguments(p)\n"
        f"s = serve.resolve(p.parse_args(['--state-dir', {str(tmp_path / 'state')!r}]))\n"
        "print(s.fleet, 'redis' in sys.modules, s.fleet_keys)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert out.stdout.split() == ["False", "False", "None"], out.stderr
