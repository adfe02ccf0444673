"""`aether ports list` and `aether ports kill` as whole processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from support import AETHER, ROOT
from support.ports import free_port, kernel_listening_ports
from support.processes import aether, proc_comm

IGNORES_TERM = """
import signal, socket, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
s = socket.socket(); s.bind(("127.0.0.1", {port})); s.listen()
sys.stdin.readline()
"""


def test_list_json_and_table(listeners):
    server = listeners.http_server()
    port = server.port
    result = aether("ports", "list", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["port"]: row for row in json.loads(result.stdout)}
    assert {key: rows[port][key] for key in ("port", "pid", "process", "addresses", "pids")} == {
        "port": port,
        "pid": server.pid,
        "process": proc_comm(server.pid),
        "addresses": ["127.0.0.1"],
        "pids": [server.pid],
    }
    assert rows[port]["names"] == []
    # And what an open carries beside it: who the process is, what the port speaks.
    assert rows[port]["protocol"] == "http" and rows[port]["cwd"] == os.getcwd()
    assert rows[port]["command"] == f"{sys.executable} -m http.server {port} --bind 127.0.0.1"
    table = aether("ports", "list").stdout.splitlines()
    assert table[0].split() == ["PORT", "PID", "PROCESS", "NAMES", "ADDRESSES", "COMMAND"]
    assert [str(port), str(server.pid), proc_comm(server.pid), "-", "127.0.0.1"] in [line.split()[:5] for line in table]


def test_list_leaves_out_ignored_ports(listeners):
    port = listeners.http_server().port
    rows = json.loads(aether("ports", "list", "--json", "--ignore", str(port)).stdout)
    assert port not in {row["port"] for row in rows}


def test_bad_ignore_list_is_a_usage_error():
    result = aether("ports", "list", "--ignore", "22,http")
    assert result.returncode == 2
    assert result.stderr == 'aether: --ignore must be port numbers (1-65535), not "http"\n'


def test_kill_http_server(listeners):
    server = listeners.http_server()
    port = server.port
    result = aether("ports", "kill", str(port), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "port": port,
        "pids": [server.pid],
        "signal": "SIGTERM",
        "escalated": False,
        "closed": True,
    }
    assert port not in kernel_listening_ports()
    assert server.wait(2) is not None


def test_kill_node_server(listeners):
    node = listeners.node()
    port = node.port
    result = aether("ports", "kill", str(port))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"port {port}: SIGTERM to {node.pid}; closed"


def test_kill_escalates_to_sigkill_after_grace(listeners):
    port = free_port()
    proc = listeners.python(IGNORES_TERM.format(port=port), port, stdin=subprocess.PIPE)
    result = aether("ports", "kill", str(port), "--grace", "0.3", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["escalated"] is True and out["closed"] is True
    assert proc.wait(2) == -9


def test_kill_signals_every_forked_holder(listeners):
    port = free_port()
    code = f"""
import os, socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", {port})); s.listen()
if os.fork() == 0:
    time.sleep(60); os._exit(0)
time.sleep(60)
"""
    listeners.python(code, port)
    result = aether("ports", "kill", str(port), "--json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["pids"]) == 2
    assert port not in kernel_listening_ports()


@pytest.mark.parametrize(
    "case, message",
    [
        ("not_open", "is not open"),
        ("ignored", "is ignored"),
        ("own", "the caller's own process"),
        ("bad_signal", "unknown signal"),
    ],
)
def test_kill_refusals(listeners, case, message):
    port = free_port()
    if case == "not_open":
        result = aether("ports", "kill", str(port))
    elif case == "ignored":
        port = listeners.http_server().port
        result = aether("ports", "kill", str(port), "--ignore", str(port))
    elif case == "bad_signal":
        port = listeners.http_server().port
        result = aether("ports", "kill", str(port), "--signal", "NOPE")
    else:
        # The caller listens on the port itself and asks aether to kill it.
        code = f"""
import socket, subprocess, sys
s = socket.socket(); s.bind(("127.0.0.1", {port})); s.listen()
r = subprocess.run({AETHER!r} + ["ports", "kill", "{port}", "--json"], capture_output=True, text=True, cwd={str(ROOT)!r})
print(r.returncode); print(r.stdout, end=""); print(r.stderr, end="", file=sys.stderr)
"""
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
        code_line, json_line = result.stdout.splitlines()[:2]
        assert code_line == "1"
        assert json.loads(json_line)["error"] == "forbidden"
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    if case != "own":
        assert result.returncode == 1


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_kill_refuses_pid_1():
    """In a fresh PID namespace the listener is pid 1; aether run there must refuse it."""
    port = free_port()
    code = f"""
import socket, subprocess, sys
s = socket.socket(); s.bind(("127.0.0.1", {port})); s.listen()
r = subprocess.run({AETHER!r} + ["ports", "kill", "{port}", "--json"], capture_output=True, text=True, cwd={str(ROOT)!r})
print(r.returncode); print(r.stdout, end="")
"""
    result = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
    )
    lines = result.stdout.splitlines()
    assert lines[0] == "1", result
    out = json.loads(lines[1])
    assert out["error"] == "forbidden" and "pid 1" in out["message"]


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--log-level", "loud", "ports", "list"], {}, '--log-level must be debug, info, warning or error, not "loud"'),
        (["ports", "list"], {"AETHER_LOG_LEVEL": "loud"}, "AETHER_LOG_LEVEL must be debug, info, warning or error"),
        (["ports", "watch"], {"AETHER_EBPF_PAGES": "3"}, "AETHER_EBPF_PAGES must be a power of two"),
        (["ports", "watch"], {"AETHER_EBPF_BUFFER": "ringg"}, "AETHER_EBPF_BUFFER must be"),
        (["ports", "watch"], {"AETHER_BACKEND": "magic"}, "AETHER_BACKEND must be"),
        (["ports", "watch"], {"AETHER_SOCKDIAG_INTERVAL": "-1"}, "AETHER_SOCKDIAG_INTERVAL must be"),
        (["ports", "list"], {"AETHER_IGNORED_PORTS": "22,0"}, 'AETHER_IGNORED_PORTS must be port numbers (1-65535), not "0"'),
    ],
)
def test_bad_settings_are_one_clear_line(args, env, message):
    result = aether(*args, env={**os.environ, **env})
    assert result.returncode == 2
    assert result.stderr.strip() == f"aether: {result.stderr.strip()[8:]}"
    assert message in result.stderr and "Traceback" not in result.stderr


def test_kill_protects_the_callers_ancestors(listeners):
    """A listener that runs `sh -c 'aether ports kill PORT'` is the caller's grandparent."""
    port = free_port()
    code = f"""
import socket, subprocess, sys
s = socket.socket(); s.bind(("127.0.0.1", {port})); s.listen()
cmd = " ".join({AETHER!r}) + " ports kill {port}"
r = subprocess.run(["sh", "-c", cmd + "; echo exit=$?"], capture_output=True, text=True, cwd={str(ROOT)!r})
print(r.stdout, end=""); print(r.stderr, end="")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert "exit=1" in result.stdout
    assert "the caller's own process" in result.stdout


def test_kill_signals_only_pids_that_still_hold_the_socket(listeners, monkeypatch):
    """A holder found, then gone and its pid reused before the signal: the process that has
    the pid now is never signalled (a stranger stands in for it), nor is a pid that is free."""
    import asyncio

    from aether.ports import kill, procs

    server = listeners.http_server()
    port = server.port
    stranger = listeners.spawn(["sleep", "60"])
    exited = subprocess.Popen(["true"])
    exited.wait()
    found = procs.port_holders

    def stale(raw, ports=None):
        held = found(raw, ports)
        return {p: sorted([*pids, stranger.pid, exited.pid]) for p, pids in held.items()}

    monkeypatch.setattr(procs, "port_holders", stale)
    result = asyncio.run(kill.kill_port(port, grace=5))
    assert (result.pids, result.closed, result.escalated) == ([server.pid], True, False)
    assert server.wait(2) is not None
    assert stranger.poll() is None
