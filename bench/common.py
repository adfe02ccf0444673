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
