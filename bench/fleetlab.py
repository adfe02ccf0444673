"""The fleet of bench/fleet.py: a real redis-server, VMs as network namespaces (a veth pair each,
``aether serve --fleet-...`` with the eBPF probe inside, entered with ``nsenter --net``), gateways,
nginx, apps, and a small asyncio HTTP/1.1 client. :class:`Lab` owns every process, namespace and
file it makes, and ``close`` removes them all."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from common import PY, ROOT, stop
from preview import NGINX, nginx_conf, read_line

sys.path.insert(0, str(ROOT / "tests"))

from support.redis import RedisServer  # noqa: E402

DOMAIN = "fleet.localhost"
TOKEN = "bench-token"
AUTH = f"Bearer {TOKEN}"
VM_PORT = 3001
DEVNULL = subprocess.DEVNULL

# The app in a VM: binds every port given, listens on all of them when told ("go", so the
# interpreter's start-up is not in the figure), prints its clock reading right before listen()
# (CLOCK_MONOTONIC is system-wide: it compares with the bench's), then answers keep-alive 200s.
# "exit" prints the clock and ends the process: every socket of it closes at once.
APP_PY = r"""
import asyncio, os, socket, sys, threading, time
socks = []
for port in sys.argv[1:]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(port)))
    socks.append(s)
async def handle(reader, writer):
    try:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        writer.close()
async def main():
    loop = asyncio.get_running_loop()
    go = asyncio.Event()
    def commands():
        for line in sys.stdin:
            if line.strip() == "go":
                loop.call_soon_threadsafe(go.set)
            elif line.strip() == "exit":
                print(repr(time.monotonic()), flush=True)
                os._exit(0)
        os._exit(0)
    threading.Thread(target=commands, daemon=True).start()
    await go.wait()
    t = time.monotonic()
    for s in socks:
        s.listen(128)
    print(repr(t), flush=True)
    for s in socks:
        await asyncio.start_server(handle, sock=s, backlog=128)
    await asyncio.Event().wait()
asyncio.run(main())
"""

ECHO_JS = """
const {WebSocketServer} = require('ws');
const wss = new WebSocketServer({host: '0.0.0.0', port: Number(process.argv[2])});
wss.on('listening', () => console.log('ready'));
wss.on('connection', (ws) => ws.on('message', (data, isBinary) => ws.send(data, {binary: isBinary})));
"""


def ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_connect(host: str, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {host}:{port}")
        time.sleep(0.02)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def drain(stream) -> list[str]:
    """Keep reading ``stream`` in a thread (a full pipe would block the process); the lines so far."""
    lines: list[str] = []
    threading.Thread(target=lambda: [lines.append(line) for line in stream], daemon=True).start()
    return lines


class VM:
    """A namespace with a veth pair: ``here`` (root side, ``host``) and ``there`` (``address``)."""

    def __init__(self, lab: Lab, n: int):
        self.lab, self.n = lab, n
        self.ns = f"aefb{lab.tag}{n}"
        self.here, self.there = f"aefb{lab.tag}{n}h", f"aefb{lab.tag}{n}t"
        net = f"10.79.{n}"
        self.host, self.address = f"{net}.1", f"{net}.2"
        self.project = f"vm{n}{lab.tag}"[:6] + "0123456789abcdef"
        self.prefix = self.project[:6]
        self.workspace = f"ws-bench-{n}"
        self.proc: subprocess.Popen | None = None
        ip("netns", "add", self.ns)
        lab.namespaces.append(self)
        ip("link", "add", self.here, "type", "veth", "peer", "name", self.there, "netns", self.ns)
        ip("addr", "add", f"{self.host}/30", "dev", self.here)
        ip("link", "set", self.here, "up")
        ip("-n", self.ns, "link", "set", "lo", "up")
        ip("-n", self.ns, "addr", "add", f"{self.address}/30", "dev", self.there)
        ip("-n", self.ns, "link", "set", self.there, "up")

    @property
    def enter(self) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.ns}"]

    def serve(self, redis_port: int) -> None:
        """`aether serve` in the namespace, in fleet mode: until it says it serves."""
        state = self.lab.tmp / f"state-{self.n}-{secrets.token_hex(3)}"
        state.mkdir()
        # On both CPUs: the bench's own processes keep to CPU 0, and its children inherit that.
        cmd = [
            *self.enter,
            "taskset",
            "-c",
            "0,1",
            PY,
            "-m",
            "aether",
            "serve",
            "--host",
            "0.0.0.0",
            "--port",
            str(VM_PORT),
            "--backend",
            "ebpf",
        ]
        cmd += ["--state-dir", str(state), "--project-id", self.project, "--workspace-id", self.workspace, "--token", TOKEN]
        cmd += ["--preview-domain", DOMAIN, "--fleet-redis", f"redis://{self.host}:{redis_port}/0"]
        cmd += ["--fleet-advertise", f"{self.address}:{VM_PORT}", "--fleet-key-file", str(self.lab.key_file)]
        self.proc = self.lab.spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        read_line(self.proc.stderr.fileno(), 90, b'"msg":"serving"')
        drain(self.proc.stdout)
        self.log = drain(self.proc.stderr)

    def kill(self) -> None:
        """SIGKILL its aether (nsenter exec()s it: the same pid)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.lab.procs.remove(self.proc)

    def link(self, up: bool) -> None:
        ip("link", "set", self.here, "up" if up else "down")

    def host_name(self, port: int | str) -> str:
        return f"{port}-{self.prefix}.{DOMAIN}"


class App:
    """APP_PY in a VM on ``ports``: ``go()`` returns the monotonic time of its listen(),
    ``exit()`` the time right before it ended."""

    def __init__(self, lab: Lab, vm: VM, ports: list[int]):
        self.lab = lab
        self.proc = lab.spawn([*vm.enter, PY, "-c", APP_PY, *map(str, ports)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.ports = ports

    def _say(self, word: str) -> float:
        self.proc.stdin.write(word.encode() + b"\n")
        self.proc.stdin.flush()
        return float(read_line(self.proc.stdout.fileno(), 10))

    def go(self) -> float:
        return self._say("go")

    def exit(self) -> float:
        at = self._say("exit")
        self.proc.wait(5)
        self.lab.procs.remove(self.proc)
        return at


class Lab:
    def __init__(self):
        self.tag = secrets.token_hex(2)
        self.tmp = Path(tempfile.mkdtemp(prefix="aether-fleet-bench-"))
        os.chmod(self.tmp, 0o755)  # nginx workers run as nobody and read the static file here
        self.procs: list[subprocess.Popen] = []
        self.namespaces: list[VM] = []
        self.redis: RedisServer | None = None
        self.key_file = self.tmp / "fleet.key"
        self.key_file.write_text(secrets.token_hex(32) + "\n")
        self.key_file.chmod(0o600)

    def spawn(self, cmd, **kwargs) -> subprocess.Popen:
        kwargs.setdefault("stdout", DEVNULL)
        kwargs.setdefault("stderr", DEVNULL)
        kwargs.setdefault("cwd", ROOT)
        proc = subprocess.Popen(cmd, **kwargs)
        self.procs.append(proc)
        return proc

    def end(self, proc: subprocess.Popen) -> None:
        stop(proc)
        if proc in self.procs:
            self.procs.remove(proc)

    def start_redis(self, binds: list[str]) -> RedisServer:
        # Bound to loopback and each VM's side of its link: the VMs reach it there.
        self.redis = RedisServer(extra=("--bind", " ".join(["127.0.0.1", *binds]), "--maxclients", "10000"))
        self.redis.start()
        return self.redis

    def gateway(self, cpu: int | None = None, liveness: float = 0.1, root: Path = ROOT) -> Gateway:
        return Gateway(self, cpu, liveness, root)

    def nginx(self, name: str, listen: str, port: int, server: str, http_extra: str = "", enter=(), cpu=None) -> int:
        """nginx (1 worker) on ``listen``:``port``; the worker's pid."""
        conf = self.tmp / f"{name}.conf"
        conf.write_text(nginx_conf(self.tmp, name, port, server, http_extra).replace("listen 127.0.0.1:", f"listen {listen}:"))
        pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
        master = self.spawn(
            [*enter, *pin, NGINX, "-p", str(self.tmp), "-e", str(self.tmp / f"{name}.error.log"), "-c", str(conf)]
        )
        wait_connect(listen if listen != "0.0.0.0" else "127.0.0.1", port) if not enter else None
        deadline = time.monotonic() + 10
        while not (children := Path(f"/proc/{master.pid}/task/{master.pid}/children").read_text().split()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"nginx {name} has no worker")
            time.sleep(0.02)
        return int(children[0])

    def node_echo(self, vm: VM, port: int) -> subprocess.Popen:
        script = self.tmp / "echo.js"
        script.write_text(ECHO_JS)
        env = {**os.environ, "NODE_PATH": str(ROOT / ".tools" / "node_modules")}
        proc = self.spawn([*vm.enter, "node", str(script), str(port)], stdout=subprocess.PIPE, env=env)
        read_line(proc.stdout.fileno(), 20, b"ready")
        return proc

    def close(self) -> None:
        for proc in reversed(list(self.procs)):
            self.end(proc)
        if self.redis is not None:
            self.redis.close()
        for vm in self.namespaces:
            ip("link", "del", vm.here, check=False)
            ip("netns", "del", vm.ns, check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)


class Gateway:
    """`aether gateway` on a free loopback port, with public metrics."""

    def __init__(self, lab: Lab, cpu: int | None, liveness: float, root: Path = ROOT):
        """``root``: the checkout whose aether runs (another's, for a baseline)."""
        self.lab = lab
        self.port = free_port()
        pin = ["taskset", "-c", "0,1" if cpu is None else str(cpu)]  # else it would inherit the bench's CPU 0
        cmd = [*pin, PY, "-m", "aether", "gateway", "--redis", lab.redis.url, "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--preview-domain", DOMAIN, "--fleet-key-file", str(lab.key_file), "--metrics-public"]
        cmd += ["--liveness-interval", str(liveness)]
        self.started = time.monotonic()
        self.proc = lab.spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=root)
        read_line(self.proc.stdout.fileno(), 60, b"aether gateway on")
        self.ready = time.monotonic()
        drain(self.proc.stdout)
        self.log = drain(self.proc.stderr)
        self.pid = self.proc.pid  # taskset exec()s it

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, by its name with labels."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as response:
            text = response.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def health(self) -> dict:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=5) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())


# -- a small HTTP/1.1 client -----------------------------------------------------------------


class Client:
    """One keep-alive connection to ``addr`` asking for ``host`` (with the token), reopened
    whenever the server closes it or a request fails."""

    def __init__(self, addr: tuple[str, int], host: str, auth: bool = True, path: str = "/"):
        self.addr = addr
        extra = f"Authorization: {AUTH}\r\n" if auth else ""
        self.request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, timeout: float = 5.0) -> tuple[int, float]:
        """The status and when its status line came; OSError (reopened next time) on failure."""
        try:
            return await asyncio.wait_for(self._get(), timeout)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            self.close()
            raise OSError(f"{type(exc).__name__}: {exc}") from None

    async def _get(self) -> tuple[int, float]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(*self.addr)
            self.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        at = time.monotonic()
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if "content-length" in headers:
            await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower().endswith("chunked"):
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        if (
            headers.get("connection", "").lower() == "close"
            or "content-length" not in headers
            and "transfer-encoding" not in headers
        ):
            self.close()
        return status, at

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None
