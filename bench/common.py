"""Shared helpers for the benchmarks: percentiles, a watcher subprocess, CPU accounting."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def percentile(values, q):
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(values_ms):
    return {
        "n": len(values_ms),
        "p50": percentile(values_ms, 50),
        "p90": percentile(values_ms, 90),
        "p99": percentile(values_ms, 99),
        "max": max(values_ms) if values_ms else float("nan"),
    }


def fmt(s):
    return f"n={s['n']:<5} p50={s['p50']:.3f} ms  p90={s['p90']:.3f} ms  p99={s['p99']:.3f} ms  max={s['max']:.3f} ms"


class LineReader:
    """Reads JSON lines from a subprocess's stdout without Python's buffering in the way."""

    def __init__(self, proc):
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.buf = b""

    def read(self, timeout=10.0):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.fd], [], [], remaining)[0]:
                raise TimeoutError("no line")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise EOFError("watcher exited")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)


def start(cmd, ready=lambda line: True, env=None, stdout=subprocess.PIPE):
    """Start a watcher; wait until its stderr says it is ready."""
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, cwd=ROOT, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 30
    for raw in proc.stderr:
        if ready(raw):
            break
        if time.monotonic() > deadline:
            raise RuntimeError("watcher did not start")
    # Keep draining stderr so the watcher never blocks on a full pipe.
    import threading

    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    return proc


def aether_watch(backend, extra_env=None, interval=None, stdout=subprocess.PIPE):
    cmd = [PY, "-m", "aether", "ports", "watch", "--backend", backend]
    if interval:
        cmd += ["--interval", str(interval)]
    return start(cmd, ready=lambda raw: b"port monitor started" in raw, env=extra_env, stdout=stdout)


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def wakeups(pid):
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        for line in status.read_text().splitlines():
            if "ctxt_switches" in line:
                total += int(line.split()[1])
    return total


def stop(proc):
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- the proxies' own Python, without sockets (proxy_python.py, gateway_python.py) ------------

#: What Chromium sends for a page between its request line's Host and its cookies.
CHROMIUM_LINES = (
    b"Connection: keep-alive\r\n"
    b'sec-ch-ua: "Chromium";v="120", "Not?A_Brand";v="24"\r\nsec-ch-ua-mobile: ?0\r\n'
    b'sec-ch-ua-platform: "Linux"\r\nUpgrade-Insecure-Requests: 1\r\n'
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8\r\n"
    b"Sec-Fetch-Site: none\r\nSec-Fetch-Mode: navigate\r\nSec-Fetch-User: ?1\r\nSec-Fetch-Dest: document\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\nAccept-Language: en-US,en;q=0.9\r\n"
)
#: nginx's answer for a 1 KB static file.
NGINX_1K = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 07 Dec 2026 16:50:29 GMT\r\n"
    b"Content-Type: text/html\r\nContent-Length: 1024\r\nLast-Modified: Mon, 07 Dec 2026 16:50:00 GMT\r\n"
    b'Connection: keep-alive\r\nETag: "6753a1b8-400"\r\nAccept-Ranges: bytes\r\n\r\n' + b"x" * 1024
)


class MemoryTransport:
    """What a protocol needs of an ``asyncio`` transport; writes are kept for the checks."""

    def __init__(self):
        self.written: list[bytes] = []
        self.closed = False
        self.write = self.written.append

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def is_closing(self):
        return False

    def close(self):
        self.closed = True

    abort = close


def cpu_per_request(one, browser: MemoryTransport, upstream: MemoryTransport, requests: int, profile: bool) -> list[float]:
    """CPU seconds per call of ``one`` (a request through a proxy on in-memory transports), in 5
    rounds of ``requests // 5``; the transports' writes dropped now and then. CPU time, not wall
    time: other processes taking the CPU meanwhile do not count. ``profile``: under cProfile,
    its top functions printed."""
    import cProfile
    import pstats

    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    rounds = []
    for _ in range(5):
        started = time.process_time()
        for _ in range(requests // 5):
            one()
            if len(browser.written) > 1000:
                browser.written.clear()
                upstream.written.clear()
        rounds.append((time.process_time() - started) / (requests // 5))
        assert not browser.closed
    if profiler:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    return rounds
