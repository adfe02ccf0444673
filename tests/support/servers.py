"""`aether serve` and `aether ports watch` in subprocesses, their output collected by threads."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
from pathlib import Path

import pytest

from support import AETHER, ROOT
from support.ebpf import need_ebpf, note_backend
from support.ports import PortTaken, on_a_free_port
from support.processes import terminate

#: Seconds a server or watcher has to start: its first start on a fresh machine compiles the probe.
START_TIMEOUT = 20

#: Lines of `aether serve`'s banner (aether.server.app.banner).
BANNER_LINES = 7


class Server:
    """`aether serve` in a subprocess, on a free port (or ``port``) with its own state dir;
    ``wrap`` is a command that runs it (a sandbox), ending with its argv. On a port of its own
    choosing, a start that finds the port taken is tried again on another."""

    def __init__(
        self, backend: str, state_dir: Path, *args: str, env: dict | None = None, port: int | None = None, wrap: tuple = ()
    ):
        self.state_dir = state_dir
        note_backend(backend)

        def start(chosen: int) -> None:
            self.port = chosen
            cmd = [
                *wrap,
                *AETHER,
                "--log-level",
                "debug",
                "serve",
                "--port",
                str(chosen),
                "--backend",
                backend,
                "--state-dir",
                str(state_dir),
                "--workspace-id",
                "ws-test",
                *args,
            ]
            self._start(cmd, env)

        if port is None:
            on_a_free_port(start)
        else:
            try:
                start(port)
            except PortTaken:
                raise AssertionError(f"port {port} was taken by another process: {self.raw_stderr}") from None
        self.token = self.banner[2].split()[1]
        self.url = f"ws://127.0.0.1:{self.port}/workspaces/ws-test/ws"

    def _start(self, cmd: list[str], env: dict | None) -> None:
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, cwd=ROOT
        )
        self.banner: list[str] = []
        self.log: list[dict] = []
        self.raw_stderr: list[str] = []
        serving = threading.Event()
        ended = threading.Event()

        def read_stderr():
            for raw in self.proc.stderr:
                self.raw_stderr.append(raw)
                try:
                    line = json.loads(raw)
                except ValueError:
                    continue
                self.log.append(line)
                if line.get("msg") == "serving":
                    serving.set()
                    ended.set()
            ended.set()  # it exited before serving

        self._stderr = threading.Thread(target=read_stderr, daemon=True)
        self._stderr.start()
        for _ in range(BANNER_LINES):
            self.banner.append(self.proc.stdout.readline().rstrip("\n"))
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()
        ended.wait(START_TIMEOUT)
        if serving.is_set():
            return
        self.stop()
        if any("address already in use" in line for line in self.raw_stderr):
            raise PortTaken(self.port)
        raise AssertionError(f"server did not start: {self.banner} {self.raw_stderr}")

    def connect(self, how: str = "header", **kw):
        """A ``websockets`` client. It reads whatever comes, however much (``max_queue=None``):
        by default websockets stops reading behind 16 unread messages, and then answers no
        ping and hears no close frame, so a test's outcome would hang on how many ports the
        host's snapshot holds. A test of a client that pauses passes ``max_queue=16``."""
        from websockets.sync.client import connect

        kw.setdefault("max_queue", None)
        if how == "header":
            return connect(self.url, subprotocols=["Bearer", self.token], **kw)
        return connect(f"{self.url}?token={self.token}", **kw)

    def stop(self) -> int:
        """Stop it; its exit status. Its log is whole once this returns."""
        status = terminate(self.proc)
        self._stderr.join(5)
        return status


def module_server(backend: str, *args: str):
    """A module-scoped fixture: one `aether serve` on ``backend`` with ``*args``, in a fresh
    state dir, for every test of the module that takes it (assign it to the fixture's name:
    ``server = module_server("ebpf", "--project-id", PROJECT)``). On "ebpf" it needs the
    probe (and the module lists the fixture in ``PROBE_FIXTURES``)."""

    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory):
        if backend == "ebpf":
            need_ebpf()
        server = Server(backend, tmp_path_factory.mktemp("server"), *args)
        yield server
        server.stop()

    return fixture


class Watcher:
    """`aether ports watch` in a subprocess; its JSON lines collected by a thread. ``wrap`` is
    a command that runs it (``nsenter`` into a namespace), ending with its argv."""

    def __init__(self, backend: str, *args: str, env: dict | None = None, wrap: tuple = (), plain: bool = True):
        note_backend(backend)
        # ``plain``: the monitor's events alone (what else is found of a port is test_facts.py's).
        cmd = [*AETHER, "--log-level", "debug", "ports", "watch", *(["--plain"] if plain else []), "--backend", backend]
        if backend == "sockdiag":
            cmd += ["--interval", "0.05"]
        self.proc = subprocess.Popen(
            [*wrap, *cmd, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
            cwd=ROOT,
        )
        self.lines: queue.Queue[dict] = queue.Queue()
        self.seen: list[dict] = []
        self.log: list[dict] = []
        self._ready = threading.Event()
        self._started = False
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        self._ready.wait(START_TIMEOUT)
        if not self._started:
            self.stop()
            raise AssertionError(f"watch did not start: {self.log}")

    def _read_stdout(self):
        for raw in self.proc.stdout:
            self.lines.put(json.loads(raw))

    def _read_stderr(self):
        for raw in self.proc.stderr:
            try:
                line = json.loads(raw)
            except ValueError:
                line = {"msg": raw.decode(errors="replace")}
            self.log.append(line)
            if line.get("msg") == "port monitor started":
                self._started = True
                self._ready.set()
        self._ready.set()  # it exited before starting

    def next(self, timeout: float = 5.0) -> dict:
        msg = self.lines.get(timeout=timeout)
        self.seen.append(msg)
        return msg

    def expect(self, type_: str, port: int, timeout: float = 5.0) -> dict:
        """The next message about ``port``; it must be of ``type_``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                msg = self.next(max(0.0, remaining))
            except queue.Empty:
                raise AssertionError(f"no {type_} for port {port} within {timeout}s; saw {self.seen}") from None
            if msg["port"] == port:
                assert msg["type"] == type_, f"expected {type_} for {port}, got {msg}"
                return msg

    def quiet(self, port: int, seconds: float) -> None:
        """Assert no message about ``port`` arrives within ``seconds``."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                msg = self.next(remaining)
            except queue.Empty:
                return
            assert msg["port"] != port, f"unexpected {msg}"

    def drain(self, settle: float = 0.3) -> list[dict]:
        out = []
        while True:
            try:
                out.append(self.next(settle))
            except queue.Empty:
                return out

    def stop(self) -> int:
        """Stop it; its exit status. Its log and lines are whole once this returns."""
        status = terminate(self.proc)
        for reader in self._readers:
            reader.join(5)
        return status
