"""Fixtures: real listeners, a real `aether ports watch`, both backends.

eBPF tests skip only where the probe truly cannot load, and fail instead when
AETHER_REQUIRE_EBPF=1 (as .ci/run sets).
"""

from __future__ import annotations

import base64
import functools
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
AETHER = [sys.executable, "-m", "aether"]
REQUIRE_EBPF = os.environ.get("AETHER_REQUIRE_EBPF") == "1"


@functools.lru_cache(maxsize=1)
def ebpf_unavailable() -> str | None:
    """Why the probe cannot load here, or None. Loads it once for real to be sure."""
    from aether.ports.ebpf import Probe, ProbeUnavailable

    try:
        Probe().stop()
    except ProbeUnavailable as exc:
        return str(exc)
    return None


def need_ebpf() -> None:
    reason = ebpf_unavailable()
    if reason:
        if REQUIRE_EBPF:
            pytest.fail(f"AETHER_REQUIRE_EBPF=1 but the probe cannot load: {reason}")
        pytest.skip(f"eBPF unavailable: {reason}")


@pytest.fixture(params=["ebpf", "sockdiag"])
def backend(request) -> str:
    if request.param == "ebpf":
        need_ebpf()
    return request.param


def free_port(family: int = socket.AF_INET) -> int:
    with socket.socket(family) as s:
        s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        return s.getsockname()[1]


def kernel_listening_ports() -> set[int]:
    from aether.ports import sockdiag

    with sockdiag.DiagSocket() as diag:
        return {port for _family, port, _addr, _inode in diag.raw()}


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")


def terminate(proc: subprocess.Popen) -> int:
    """SIGTERM, then SIGKILL after 5 s; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


#: ``python -c`` code for ``.format(port=N)``: listens on 127.0.0.1:N, forks a child that holds
#: the socket (for a minute), prints the child's pid, and exits once its stdin closes: a
#: daemonizing server's parent, exiting on cue.
FORKING_OWNER = """
import os, socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", {port})); s.listen()
pid = os.fork()
if pid == 0:
    time.sleep(60); os._exit(0)
print(pid, flush=True)
sys.stdin.readline()
"""


def stop_daemon(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM a process that is not our child (nginx's fast shutdown: after a SIGKILL its
    workers would wait out open connections), and wait for its exit through a pidfd."""
    import select

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        signal.pidfd_send_signal(fd, signal.SIGTERM)
        if not select.select([fd], [], [], timeout)[0]:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
            select.select([fd], [], [], timeout)
    except ProcessLookupError:
        pass
    finally:
        os.close(fd)


class Watcher:
    """`aether ports watch` in a subprocess; its JSON lines collected by a thread."""

    def __init__(self, backend: str, *args: str, env: dict | None = None):
        cmd = [*AETHER, "--log-level", "debug", "ports", "watch", "--backend", backend]
        if backend == "sockdiag":
            cmd += ["--interval", "0.05"]
        self.proc = subprocess.Popen(
            [*cmd, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
            cwd=ROOT,
        )
        self.lines: "queue.Queue[dict]" = queue.Queue()
        self.seen: list[dict] = []
        self.log: list[dict] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        if not self._ready.wait(20):
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
                self._ready.set()

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
                raise AssertionError(f"no {type_} for port {port} within {timeout}s; saw {self.seen}")
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
        return terminate(self.proc)


@pytest.fixture
def watch(backend):
    watchers = []

    def start(*args, env=None) -> Watcher:
        w = Watcher(backend, *args, env=env)
        watchers.append(w)
        return w

    yield start
    for w in watchers:
        w.stop()


class Listeners:
    """Real listening processes, stopped at teardown."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.procs: list[subprocess.Popen] = []
        self.daemons: list[int] = []  # pids of processes that are not our children

    def spawn(self, cmd: list[str], ready_port: int | None = None, **kw) -> subprocess.Popen:
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(cmd, **kw)
        self.procs.append(proc)
        if ready_port is not None:
            wait_for(lambda: ready_port in kernel_listening_ports() or proc.poll() is not None, 10)
            assert proc.poll() is None, f"{cmd} exited with {proc.returncode}"
        return proc

    def python(self, code: str, ready_port: int | None = None, **kw) -> subprocess.Popen:
        """A python3 process running ``code``; waits for ``ready_port`` to listen."""
        return self.spawn([sys.executable, "-c", code], ready_port, **kw)

    def http_server(self, port: int, bind: str = "127.0.0.1") -> subprocess.Popen:
        return self.spawn(
            [sys.executable, "-m", "http.server", str(port), "--bind", bind],
            port,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def node(self, port: int) -> subprocess.Popen:
        node = shutil.which("node") or pytest.fail("node is not installed (deploy/setup.sh installs it)")
        code = f"require('http').createServer((q, s) => s.end('ok')).listen({port}, '127.0.0.1')"
        return self.spawn([node, "-e", code], port)

    def nginx(self, port: int, daemon: bool = False):
        """nginx (a master, two workers) on 127.0.0.1 and [::1]; its Popen. With ``daemon``,
        in nginx's default mode instead: the process started listens, forks the master and
        exits; the master's pid (from nginx's pid file) once it has settled."""
        nginx = shutil.which("nginx") or (Path("/usr/sbin/nginx").exists() and "/usr/sbin/nginx")
        if not nginx:
            pytest.fail("nginx is not installed (deploy/setup.sh installs it)")
        conf, pid_file = self.tmp / f"nginx-{port}.conf", self.tmp / f"nginx-{port}.pid"
        conf.write_text(
            f"""
{"" if daemon else "daemon off;"} master_process on; worker_processes 2; user root;
pid {pid_file}; error_log stderr error;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {self.tmp}/body; proxy_temp_path {self.tmp}/proxy;
  fastcgi_temp_path {self.tmp}/fcgi; uwsgi_temp_path {self.tmp}/uwsgi; scgi_temp_path {self.tmp}/scgi;
  server {{ listen 127.0.0.1:{port}; listen [::1]:{port}; return 200 "ok"; }}
}}
"""
        )
        if not daemon:
            return self.spawn([nginx, "-c", str(conf), "-p", str(self.tmp)], port)
        subprocess.run([nginx, "-c", str(conf), "-p", str(self.tmp)], check=True, timeout=20)
        # The master writes its pid file after the parent has exited.
        master = int(wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 10))
        self.daemons.append(master)
        return master

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for pid in self.daemons:
            stop_daemon(pid)


@pytest.fixture
def listeners(tmp_path):
    pool = Listeners(tmp_path)
    yield pool
    pool.stop_all()


def proc_comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def aether(*args: str, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*AETHER, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kw
    )


class Server:
    """`aether serve` in a subprocess, on a free port (or ``port``) with its own state dir;
    ``wrap`` is a command that runs it (a sandbox), ending with its argv."""

    def __init__(self, backend: str, state_dir: Path, *args: str, env: dict | None = None, port: int | None = None,
                 wrap: tuple = ()):
        self.port = port or free_port()
        self.state_dir = state_dir
        cmd = [*wrap, *AETHER, "--log-level", "debug", "serve", "--port", str(self.port), "--backend", backend,
               "--state-dir", str(state_dir), "--workspace-id", "ws-test", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})}, cwd=ROOT)
        self.banner: list[str] = []
        self.log: list[dict] = []
        self.raw_stderr: list[str] = []
        ready = threading.Event()

        def read_stderr():
            for raw in self.proc.stderr:
                self.raw_stderr.append(raw)
                try:
                    line = json.loads(raw)
                except ValueError:
                    continue
                self.log.append(line)
                if line.get("msg") == "serving":
                    ready.set()

        threading.Thread(target=read_stderr, daemon=True).start()
        for _ in range(7):  # the banner's lines (app.banner)
            self.banner.append(self.proc.stdout.readline().rstrip("\n"))
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()
        if not ready.wait(20):
            self.stop()
            raise AssertionError(f"server did not start: {self.banner} {self.raw_stderr}")
        self.token = self.banner[2].split()[1]
        self.url = f"ws://127.0.0.1:{self.port}/workspaces/ws-test/ws"

    def connect(self, how: str = "header", **kw):
        from websockets.sync.client import connect

        if how == "header":
            return connect(self.url, subprotocols=["Bearer", self.token], **kw)
        return connect(f"{self.url}?token={self.token}", **kw)

    def stop(self) -> int:
        return terminate(self.proc)


@pytest.fixture
def serve(backend, tmp_path):
    servers = []

    def start(*args, env=None) -> Server:
        server = Server(backend, tmp_path / f"state{len(servers)}", *args, env=env)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def workspace_server(tmp_path):
    """``start(*flags, env=None, state=None, wrap=())``: `aether serve` (sockdiag: the ports
    backend does not matter to the channels that use this) rooted in one fresh workspace,
    ``server.root``."""
    servers = []
    root = tmp_path / "workspace"
    root.mkdir()

    def start(*args: str, env: dict | None = None, state: str | None = None, wrap: tuple = ()) -> Server:
        server = Server("sockdiag", tmp_path / (state or f"state{len(servers)}"), "--workspace-root", str(root),
                        *args, env=env, wrap=wrap)
        server.root = root
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


#: Runs a command as ``nohup`` leaves it, and more: SIGHUP and SIGQUIT ignored, SIGUSR2 blocked.
NOHUP = (sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
         "signal.signal(signal.SIGQUIT, signal.SIG_IGN); signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2}); "
         "os.execv(sys.argv[1], sys.argv[1:])")


def signal_state(pid: int | str = "self") -> tuple[int, int]:
    """(ignored, blocked) signal masks of a process, from /proc/PID/status."""
    fields = dict(line.split(":\t", 1) for line in open(f"/proc/{pid}/status").read().splitlines() if ":\t" in line)
    return int(fields["SigIgn"], 16), int(fields["SigBlk"], 16)


def gone(pid: int) -> bool:
    """The process has exited (a zombie counts: it runs nothing and holds nothing)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def recv_json(ws, timeout: float = 5.0) -> dict:
    return json.loads(ws.recv(timeout=timeout))


def recv_until(ws, predicate, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError("timed out waiting for a matching message")
        msg = recv_json(ws, remaining)
        if predicate(msg):
            return msg


def raw_upgrade(server, rcvbuf: int | None = None) -> socket.socket:
    """A bare TCP client that completes the upgrade and then does nothing at all."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", server.port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /workspaces/{getattr(server, 'workspace', 'ws-test')}/ws?token={server.token} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    response = sock.recv(4096)
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


def masked_text_frame(text: str) -> bytes:
    """One client-to-server text frame (clients must mask, RFC 6455 5.3)."""
    payload = text.encode()
    mask = os.urandom(4)
    n = len(payload)
    header = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big"))
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
