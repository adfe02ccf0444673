"""Terminal flood benchmark: `cat` of a large file in a terminal session.

While one client reads a session's output as fast as it can, another client measures
listen() -> `open` on the ports channel; the same measurement with no flood is the baseline
from the same run. The daemon's memory is sampled throughout. Throughput is compared with a
bare PTY read by this process (no aether, no WebSocket) in the same run.

    .venv/bin/python bench/terminal.py [--megabytes 200] [--idle-cycles 200]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

from common import PY, fmt, stop, summary
from server import rss_kib, start_server

READER = r"""
import base64, json, sys, time
from websockets.sync.client import connect
url, token, path = sys.argv[1:4]
with connect(url, subprotocols=["Bearer", token], max_size=None) as ws:
    ws.send(json.dumps({"channel": "terminal", "type": "create", "sessionId": "flood", "cols": 80, "rows": 24,
                        "command": f"stty -onlcr; cat {path}"}))
    received, started = 0, None
    for frame in ws:
        m = json.loads(frame)
        if m["channel"] != "terminal":
            continue
        if m["type"] == "created":
            started = time.monotonic()
            print("started", flush=True)
        elif m["type"] == "output":
            data = m["data"]
            received += len(base64.b64decode(data)) if m.get("encoding") == "base64" else len(data.encode())
        elif m["type"] == "exit":
            print(json.dumps({"bytes": received, "seconds": time.monotonic() - started, "code": m["code"]}), flush=True)
            break
"""


def bare_pty_seconds(path: str) -> float:
    """`cat` into a PTY read by this process: the floor for terminal output."""
    master, slave = os.openpty()
    started = time.monotonic()
    proc = subprocess.Popen(["sh", "-c", f"stty -onlcr; cat {path}"], stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    while True:
        try:
            if not os.read(master, 65536):
                break
        except OSError:
            break
    proc.wait()
    os.close(master)
    return time.monotonic() - started


def open_latencies(ws, cycles: int, keep_going=lambda: True) -> list[float]:
    """listen() -> `open` read by ``ws``, in ms, for up to ``cycles`` ports."""
    out = []
    for _ in range(cycles):
        if not keep_going():
            break
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        started = time.perf_counter()
        sock.listen()
        while True:
            m = json.loads(ws.recv(timeout=10))
            if m["channel"] == "ports" and m["type"] == "open" and m["port"] == port:
                break
        out.append((time.perf_counter() - started) * 1000)
        sock.close()
        while True:
            m = json.loads(ws.recv(timeout=10))
            if m["channel"] == "ports" and m["type"] == "close" and m["port"] == port:
                break
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--megabytes", type=int, default=200)
    parser.add_argument("--idle-cycles", type=int, default=200)
    parser.add_argument("--max-flood-cycles", type=int, default=50000)
    args = parser.parse_args()
    from websockets.sync.client import connect

    with tempfile.NamedTemporaryFile(prefix="aether-flood-", delete=False) as f:
        line = b"0123456789 abcdefghijklmnopqrstuvwxyz \xc3\xa9\xe2\x82\xac ABCDEFGHIJKLMNOPQRSTUVWXYZ\n"
        block = line * ((1 << 20) // len(line) + 1)
        for _ in range(args.megabytes):
            f.write(block[: 1 << 20])
        path = f.name
    size = os.path.getsize(path)
    bare = bare_pty_seconds(path)
    proc, port, token = start_server("ebpf")
    url = f"ws://127.0.0.1:{port}/workspaces/bench/ws"
    try:
        with connect(url, subprotocols=["Bearer", token]) as ws:
            time.sleep(0.3)
            idle = open_latencies(ws, args.idle_cycles)
            rss_before = rss_kib(proc.pid)
            peak = [rss_before]
            reader = subprocess.Popen([PY, "-c", READER, url, token, path], stdout=subprocess.PIPE, text=True)
            assert reader.stdout.readline().strip() == "started"
            done = threading.Event()

            def sample():
                while not done.is_set():
                    peak[0] = max(peak[0], rss_kib(proc.pid))
                    time.sleep(0.05)

            threading.Thread(target=sample, daemon=True).start()
            flood = open_latencies(ws, args.max_flood_cycles, lambda: reader.poll() is None)
            result = json.loads(reader.stdout.readline())
            reader.wait(30)
            done.set()
    finally:
        stop(proc)
        os.unlink(path)
    mb = size / 1e6
    print(f"flood: cat of {size >> 20} MiB in a terminal session, one client reading it all, eBPF backend")
    print(f"  delivered {result['bytes']:,} of {size:,} bytes, exit code {result['code']}")
    print(
        f"  through aether: {result['seconds']:.2f} s = {mb / result['seconds']:.0f} MB/s;"
        f" bare PTY read by one process (baseline): {bare:.2f} s = {mb / bare:.0f} MB/s"
    )
    print(
        f"  daemon RSS: {rss_before / 1024:.1f} MiB before, peak {peak[0] / 1024:.1f} MiB during"
        f" (+{(peak[0] - rss_before) / 1024:.1f} MiB)"
    )
    print("listen() -> open at another client (ms)")
    print(f"  idle (baseline):  {fmt(summary(idle))}")
    print(f"  during the flood: {fmt(summary(flood))}")
    return 0 if result["bytes"] == size else 1


if __name__ == "__main__":
    sys.exit(main())
