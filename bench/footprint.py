"""What `aether serve` costs a VM: resident memory idle (eBPF and sock_diag backends), with
1,000 idle WebSocket clients, after a 10,000-pair listen/close burst, and the time from process
start to the first successful /healthz. Baselines from the same run: libbpf-tools' `tcpstates`
(C, CO-RE), bcc's `tcpstates-bpfcc` (Python with bcc in-process), a bare
`python -c 'import aether.server.app'`, and Python itself. Last, what each dependency costs
to import (`python -X importtime`, and resident memory over `import asyncio`).

RSS is VmRSS; PSS (/proc/PID/smaps_rollup) shares each library page among its users.

    .venv/bin/python bench/footprint.py [--clients 1000] [--pairs 10000] [--starts 5]
                                        [--only memory|start|baselines|imports]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from burst import BURST
from common import PY, ROOT, stop
from server import free_port

#: n WebSocket clients that upgrade and then only read, in one process: raw sockets, 100 at a
#: time (a full client each would measure Python, and 1,000 at once overflow the backlog).
IDLE_CLIENTS = r"""
import base64, os, select, socket, sys, time
path, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks, deadline = [], time.monotonic() + 120
while len(socks) < n:
    batch = []
    for _ in range(min(100, n - len(socks))):
        s = socket.create_connection(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        batch.append(s)
    waiting = {s.fileno(): s for s in batch}
    while waiting:
        if time.monotonic() > deadline:
            sys.exit(f"{len(waiting)} upgrades unanswered")
        for fd in select.select(list(waiting), [], [], 1)[0]:
            if b" 101 " not in waiting.pop(fd).recv(65536):
                sys.exit("upgrade refused")
    socks += batch
print("ready", flush=True)
sys.stdin.readline()
"""


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB."""
    rss = next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS"))
    try:
        pss = next(int(line.split()[1]) for line in open(f"/proc/{pid}/smaps_rollup") if line.startswith("Pss:"))
    except (OSError, StopIteration):
        pss = -1
    return rss, pss


def fmt_memory(kib: tuple[int, int]) -> str:
    return f"RSS {kib[0] / 1024:6.1f} MiB  PSS {kib[1] / 1024:6.1f} MiB"


def rss_parts(pid: int) -> str:
    """Anonymous (the heap), file-backed and shared (the ring buffer's pages) resident KiB."""
    fields = {
        line.split(":")[0]: int(line.split()[1])
        for line in open(f"/proc/{pid}/status")
        if line.startswith(("RssAnon", "RssFile", "RssShmem"))
    }
    return ", ".join(f"{name[3:].lower()} {kib / 1024:.1f}" for name, kib in fields.items())


def maps_of(pid: int, *names: str) -> list[str]:
    """Libraries mapped into ``pid`` whose path contains one of ``names``."""
    found = set()
    for line in open(f"/proc/{pid}/maps"):
        path = line.split()[-1] if len(line.split()) >= 6 else ""
        if any(name in path for name in names):
            found.add(os.path.basename(path))
    return sorted(found)


def healthy(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("GET", "/healthz")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


class Serve:
    """`aether serve` in a fresh state dir; ``started`` is process start -> first 200 on /healthz."""

    def __init__(self, backend: str, env: dict | None = None):
        self.state = tempfile.mkdtemp(prefix="aether-footprint-")
        self.port = free_port()
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            [
                PY,
                "-m",
                "aether",
                "serve",
                "--port",
                str(self.port),
                "--state-dir",
                self.state,
                "--workspace-id",
                "bench",
                "--backend",
                backend,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
        self.log: list[bytes] = []
        threading.Thread(target=lambda: [self.log.append(line) for line in self.proc.stderr], daemon=True).start()
        deadline = started + 30
        while not healthy(self.port):
            if self.proc.poll() is not None or time.perf_counter() > deadline:
                raise RuntimeError(f"aether serve --backend {backend} did not serve: {b''.join(self.log[-5:])!r}")
            time.sleep(0.002)
        self.started = time.perf_counter() - started
        # CPU seconds spent until then, its helper's included (a waited-for child's count):
        # unlike the wall-clock time, barely moved by whatever else the machine runs.
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        self.cpu = sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")
        self.token = Path(self.state, "token").read_text().strip()

    def backend(self) -> str:
        for raw in self.log:
            if b'"serving"' in raw:
                return json.loads(raw).get("backend", "?")
        return "?"

    def close(self) -> None:
        stop(self.proc)
        shutil.rmtree(self.state, ignore_errors=True)


def settle(seconds: float = 2.0) -> None:
    time.sleep(seconds)  # start-up's garbage collected, the loop idle


def idle(backend: str, cache_env: dict) -> None:
    server = Serve(backend, cache_env)
    try:
        settle()
        mem = memory_kib(server.proc.pid)
        heavy = maps_of(server.proc.pid, "LLVM", "libbcc", "libclang")
        print(
            f"aether serve --backend {backend:<9} idle:            {fmt_memory(mem)}  "
            f"(backend {server.backend()}; LLVM/bcc mapped: {', '.join(heavy) or 'none'})",
            flush=True,
        )
    finally:
        server.close()


def with_clients(clients: int, cache_env: dict) -> None:
    server = Serve("ebpf", cache_env)
    try:
        settle()
        before = memory_kib(server.proc.pid)
        client = subprocess.Popen(
            [PY, "-c", IDLE_CLIENTS, f"/workspaces/bench/ws?token={server.token}", str(server.port), str(clients)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if client.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the clients did not connect (exit status {client.wait()})")
        settle(1.0)
        during = memory_kib(server.proc.pid)
        client.kill()
        client.wait()
        settle(1.0)
        after = memory_kib(server.proc.pid)
        print(
            f"aether serve --backend ebpf, {clients} idle WebSocket clients: {fmt_memory(during)}  "
            f"(+{(during[0] - before[0]) / clients:.1f} KiB RSS each; idle before {before[0] / 1024:.1f} MiB, "
            f"after they left {after[0] / 1024:.1f} MiB)",
            flush=True,
        )
    finally:
        server.close()


def after_burst(pairs: int, cache_env: dict) -> None:
    from websockets.sync.client import connect

    server = Serve("ebpf", cache_env)
    burst = None
    try:
        settle()
        before = memory_kib(server.proc.pid)
        with connect(
            f"ws://127.0.0.1:{server.port}/workspaces/bench/ws", subprotocols=["Bearer", server.token], max_size=None
        ) as ws:
            time.sleep(0.3)
            while True:  # the initial messages
                try:
                    ws.recv(timeout=0.3)
                except TimeoutError:
                    break
            burst = subprocess.Popen([PY, "-c", BURST, str(pairs)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            elapsed = float(burst.stdout.readline())
            messages = 0
            while True:  # until a second passes without one: the server has caught up
                try:
                    ws.recv(timeout=1.0)
                    messages += 1
                except TimeoutError:
                    break
            mem, parts = memory_kib(server.proc.pid), rss_parts(server.proc.pid)
        print(
            f"aether serve --backend ebpf, after {pairs} listen/close pairs ({elapsed:.2f} s, "
            f"{messages} messages to one client): {fmt_memory(mem)}  (idle before {before[0] / 1024:.1f} MiB; "
            f"now {parts} MiB)",
            flush=True,
        )
    finally:
        if burst is not None:
            burst.kill()
            burst.wait()
        server.close()


def start_times(starts: int, cache_dir: str) -> None:
    runs = {
        "ebpf, compiled probe cached": ("ebpf", {"AETHER_CACHE_DIR": cache_dir}),
        "ebpf, nothing cached (compiles)": ("ebpf", None),
        "sockdiag": ("sockdiag", {"AETHER_CACHE_DIR": cache_dir}),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(starts):  # interleaved, so a busy moment of the machine hits each alike
        for name, (backend, env) in runs.items():
            empty = None
            if env is None:
                empty = tempfile.mkdtemp(prefix="aether-cache-")
                env = {"AETHER_CACHE_DIR": empty}
            server = Serve(backend, env)
            times[name].append(server.started)
            cpu[name].append(server.cpu)
            server.close()
            if empty:
                shutil.rmtree(empty, ignore_errors=True)
    for name, values in times.items():
        print(
            f"start -> first /healthz 200, {name:<32} median {statistics.median(values) * 1000:6.0f} ms  "
            f"max {max(values) * 1000:6.0f} ms  CPU median {statistics.median(cpu[name]) * 1000:4.0f} ms  "
            f"(n={len(values)})",
            flush=True,
        )


def attached(proc: subprocess.Popen) -> bool:
    """The process holds a perf event or BPF link: its probe is attached."""
    for fd in Path(f"/proc/{proc.pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target in ("anon_inode:[perf_event]", "anon_inode:bpf_link"):
            return True
    return False


def baseline(name: str, argv: list[str], ready=attached, env: dict | None = None) -> None:
    if not shutil.which(argv[0]) and not os.path.exists(argv[0]):
        print(f"{name:<44} not installed (deploy/setup.sh installs it)", flush=True)
        return
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT, env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + 60
        while not ready(proc):
            if proc.poll() is not None or time.monotonic() > deadline:
                print(f"{name:<44} did not start (exit status {proc.poll()})", flush=True)
                return
            time.sleep(0.05)
        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
        settle()
        print(f"{name:<44} {fmt_memory(memory_kib(proc.pid))}", flush=True)
    finally:
        stop(proc)


def imports() -> None:
    """Each dependency imported after asyncio in a fresh process: its cumulative import time
    (the median of 3) and what it adds to resident memory."""
    probe = "import re; print(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read())[1])"

    def run(modules: list[str]) -> tuple[float, int]:
        code = f"import asyncio; import {', '.join(modules)}\n{probe}" if modules else f"import asyncio\n{probe}"
        done = subprocess.run([PY, "-X", "importtime", "-c", code], capture_output=True, text=True, cwd=ROOT)
        ms = 0.0
        for line in done.stderr.splitlines():
            parts = line.split("|")
            if len(parts) == 3 and parts[2].strip() in modules and parts[2].startswith(" "):
                if len(parts[2]) - len(parts[2].lstrip()) == 1:  # a top-level import of the -c
                    ms += int(parts[1]) / 1000
        return ms, int(done.stdout.split()[-1])

    base = statistics.median(run([])[1] for _ in range(3))
    print(f"import cost over `import asyncio` ({base / 1024:.1f} MiB RSS), each in a fresh process, median of 3:")
    for modules in (
        ["tornado.web", "tornado.httpserver", "tornado.websocket"],
        ["prometheus_client"],
        ["uvloop"],
        ["ujson"],
        ["httptools"],
        ["psutil"],
        ["sqlite3"],
        ["pyroute2"],
        ["bcc"],
        ["aether.ports.monitor"],
        ["aether.server.metrics"],
        ["aether.agent.store"],
        ["aether.server.channels.files"],
        ["aether.server.channels.agent"],
        ["aether.server.channels.terminal"],
        ["aether.preview.service"],
        ["aether.doctor"],
        ["aether.server.app"],
    ):
        results = [run(modules) for _ in range(3)]
        ms = statistics.median(r[0] for r in results)
        rss = statistics.median(r[1] for r in results)
        print(f"  {', '.join(modules):<52} {ms:6.1f} ms  +{(rss - base) / 1024:5.1f} MiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--pairs", type=int, default=10000)
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--only", choices=("memory", "start", "baselines", "imports"), default=None)
    args = parser.parse_args()
    parts = {args.only} if args.only else {"memory", "start", "baselines", "imports"}
    cache_dir = tempfile.mkdtemp(prefix="aether-cache-")
    cache_env = {"AETHER_CACHE_DIR": cache_dir}
    try:
        Serve("ebpf", cache_env).close()  # compiles the probe once, into this run's cache
        if "memory" in parts:
            for backend in ("ebpf", "sockdiag"):
                idle(backend, cache_env)
            with_clients(args.clients, cache_env)
            after_burst(args.pairs, cache_env)
        if "start" in parts:
            start_times(args.starts, cache_dir)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    if "baselines" in parts:
        print("baselines, each idle 2 s after attaching (or importing):")
        baseline("  libbpf-tools tcpstates (C, CO-RE)", ["tcpstates"])
        baseline("  bcc tcpstates-bpfcc", ["tcpstates-bpfcc"])
        baseline("  python -c 'import aether.server.app'", [PY, "-c", IMPORTED.format("aether.server.app")], ready=said_ready)
        baseline("  python -c 'import time' (the interpreter)", [PY, "-c", IMPORTED.format("time")], ready=said_ready)
    if "imports" in parts:
        imports()


IMPORTED = "import {}, os, time; os.write(1, b'ready\\n'); time.sleep(60)"


def said_ready(proc: subprocess.Popen) -> bool:
    return proc.stdout.readline() == b"ready\n"


if __name__ == "__main__":
    sys.exit(main())
