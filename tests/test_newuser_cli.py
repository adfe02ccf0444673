"""The command line tried as a new user would: ``aether ports list --json`` says ``tcp`` for
a database-like port that hangs up on every HTTP request and ClientHello (PostgreSQL),
rather than null as for a port that has not answered yet."""

from __future__ import annotations

import array
import json
import os
import re
import socket
import subprocess
import sys

import pytest
from support import AETHER, ROOT
from support.waiting import wait_for


def listed(tmp_path) -> dict[int, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AETHER_")}
    env["AETHER_STATE_DIR"] = str(tmp_path / "state")
    env["AETHER_WORKSPACE_ROOT"] = str(tmp_path)
    result = subprocess.run([*AETHER, "ports", "list", "--json"], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    return {row["port"]: row for row in json.loads(result.stdout)}


def test_ports_list_says_tcp_for_ports_that_hang_up(listeners, tmp_path):
    hangs_up = listeners.postgres_like(mode="close").port
    http = listeners.http_server().port
    rows = listed(tmp_path)
    assert rows[hangs_up]["protocol"] == "tcp"
    assert rows[http]["protocol"] == "http"


@pytest.mark.parametrize("human", [False, True], ids=["lines", "human"])
def test_ports_watch_stops_on_sigterm_while_its_reader_reads_nothing(human):
    """``aether ports watch | slow-reader``: the pipe fills. SIGTERM must still stop it (it
    used to sit in a blocking write(), where no signal handler of the loop runs)."""
    held = []
    try:
        for _ in range(300):  # each a line of its own, and a row of every redraw: well over a pipe's 64 KiB
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            held.append(sock)
        proc = subprocess.Popen(
            [*AETHER, "ports", "watch", *(["--human"] if human else []), "--backend", "sockdiag", "--interval", "0.05"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
            env={**os.environ, "COLUMNS": "400"},
        )
        try:
            # Never read: wait until the pipe is full (the process then sits in write() or, fixed,
            # keeps running with its output held back).
            wait_for(lambda: _pipe_full(proc.stdout.fileno()), 20)
            for sock in held[:100]:  # more events, more to write
                sock.close()
            proc.terminate()
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0
    finally:
        for sock in held:
            sock.close()


def test_ports_watch_leaves_a_shared_pipe_blocking():
    """``aether ports watch 2>&1 | reader``: stdout and stderr share one open file description.
    Its non-blocking writes go through a description of its own, so stderr's stays blocking
    (else a log line written while the pipe is full would be lost), and so does the one the
    shell hands on to the next command."""
    proc = subprocess.Popen(
        [*AETHER, "ports", "watch", "--backend", "sockdiag"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        assert proc.stdout.readline()  # running, the first open written
        flags = {fd: _fd_flags(proc.pid, fd) for fd in (1, 2)}
    finally:
        proc.terminate()
        proc.wait(10)
    assert not any(f & os.O_NONBLOCK for f in flags.values()), {fd: oct(f) for fd, f in flags.items()}


def _fd_flags(pid: int, fd: int) -> int:
    with open(f"/proc/{pid}/fdinfo/{fd}") as info:
        return next(int(line.split()[1], 8) for line in info if line.startswith("flags:"))


def _pipe_full(fd: int) -> bool:
    """Whether the pipe's buffer holds (nearly) its capacity."""
    import fcntl
    import termios

    queued = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, queued)
    return queued[0] >= fcntl.fcntl(fd, 1032) - 4096  # F_GETPIPE_SZ


def test_a_killed_servers_runtime_file_is_removed(tmp_path):
    """A server killed with SIGKILL cannot remove its ``serve-PID.json``; the next command
    that reads the runtime directory does, rather than reading it (and every other one ever
    left) again on every call."""
    run = tmp_path / "run"
    (run / "aether").mkdir(parents=True, mode=0o700)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid is free now
    stale = run / "aether" / f"serve-{gone.pid}.json"
    stale.write_text(json.dumps({"pid": gone.pid, "start": "1", "stateDir": str(tmp_path), "host": "127.0.0.1", "port": 1}))
    other = run / "aether" / "notes.txt"
    other.write_text("not ours")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AETHER_")}
    env["XDG_RUNTIME_DIR"] = str(run)
    env["XDG_STATE_HOME"] = env["HOME"] = str(tmp_path / "home")  # never the user's own registry
    result = subprocess.run([*AETHER, "port", "list", "--json"], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    assert not stale.exists() and other.exists()


def test_ports_watch_human_shows_answering_for_ports_open_before_it(listeners):
    """A port open before the watch began has no meaningful ready time (it counts from the
    watch's start); one opened while it watches has its own."""
    before = listeners.http_server().port
    proc = subprocess.Popen(
        [*AETHER, "ports", "watch", "--human", "--backend", "sockdiag", "--interval", "0.05"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "400"},
    )
    os.set_blocking(proc.stdout.fileno(), False)
    seen = bytearray()

    def row(port: int) -> str | None:
        chunk = proc.stdout.read()
        if chunk:
            seen.extend(chunk)
        screen = seen.rsplit(b"\x1b[H\x1b[2J", 1)[-1].decode(errors="replace")
        if not screen.endswith("^C to stop\n"):
            return None
        line = next((line for line in screen.splitlines() if line.startswith(f"{port:>5} ")), None)
        return line if line is not None and "[http" in line else None

    try:
        assert "[http answering]" in wait_for(lambda: row(before), 20)
        after = listeners.http_server().port
        assert re.search(r"\[http ready \d+ ms\]", wait_for(lambda: row(after), 20))
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("args", [["--key", "web"], ["--value", "5173"], ["web", "5173", "--key", "api"]])
def test_port_set_without_what_to_set_is_a_usage_error(tmp_path, args):
    """README: exit 2 for a usage error (1 is a refused operation)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AETHER_")}
    result = subprocess.run(
        [*AETHER, "port", "set", *args, "--state-dir", str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stderr.startswith("aether: ") and "Traceback" not in result.stderr
