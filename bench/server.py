"""`aether serve` benchmarks, each against a baseline from the same run.

1. One client: listen() returning in this process -> the `open` message read by a WebSocket client
   (the websockets library). Baseline: the same through `aether ports watch` on a pipe.
2. 1,000 clients at once: listen() -> the `open` frame arriving at each of them. The clients are
   raw sockets in one epoll loop in a separate process (a full WebSocket client per connection
   would measure Python, not the server); RSS of the server per idle connection.
3. A client that never reads, beside one that does: the reader's p99 with and without it.

    .venv/bin/python bench/server.py [--cycles 500] [--clients 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import types

from common import PY, ROOT, LineReader, aether_watch, fmt, stop, summary

FANOUT_CLIENT = r"""
import base64, os, select, socket, sys, time
url_path, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks = []
for _ in range(n):
    s = socket.socket(); s.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(f"GET {url_path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    socks.append(s)
for s in socks:  # the 101 response and the initial open frames
    s.settimeout(5); s.recv(65536); s.setblocking(False)
time.sleep(0.5)
for s in socks:
    try: s.recv(1 << 20)
    except BlockingIOError: pass
ep = select.epoll(); fds = {}
for s in socks:
    ep.register(s.fileno(), select.EPOLLIN); fds[s.fileno()] = s
print("ready", flush=True)
for line in sys.stdin:  # one round per line: report when every client got its frame
    got = {}
    deadline = time.monotonic() + 5
    while len(got) < n and time.monotonic() < deadline:
        for fd, _ in ep.poll(1):
            now = time.monotonic()
            try: fds[fd].recv(1 << 16)
            except BlockingIOError: continue
            got.setdefault(fd, now)
    print(" ".join(f"{t:.6f}" for t in got.values()), flush=True)
"""


def start_server(backend="ebpf", *args, tree=ROOT):
    """`aether serve` of the checkout at ``tree``: (process, port, token)."""
    state = tempfile.mkdtemp(prefix="aether-bench-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            PY,
            "-m",
            "aether",
            "serve",
            "--port",
            str(port),
            "--state-dir",
            state,
            "--workspace-id",
            "bench",
            "--backend",
            backend,
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tree,
    )
    for raw in proc.stderr:
        if '"serving"' in raw:
            break
    import threading

    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    token = open(os.path.join(state, "token")).read().strip()
    return proc, port, token


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])


def listen_cycles(receive, cycles, port):
    """listen()/close() ``cycles`` times; ``receive(port, type)`` blocks until the message."""
    opens, closes = [], []
    for _ in range(cycles):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
        t0 = time.perf_counter_ns()
        receive(port, "open")
        opens.append((time.perf_counter_ns() - t0) / 1e6)
        s.close()
        t0 = time.perf_counter_ns()
        receive(port, "close")
        closes.append((time.perf_counter_ns() - t0) / 1e6)
    return summary(opens), summary(closes)


def ws_receiver(ws):
    def receive(port, kind):
        while True:
            msg = json.loads(ws.recv(timeout=5))
            if msg.get("port") == port and msg.get("type") == kind:
                return

    return receive


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_client(cycles):
    from websockets.sync.client import connect

    port = free_port()
    watcher = aether_watch("ebpf")
    reader = LineReader(watcher)

    def pipe_receive(p, kind):
        while not ((m := reader.read())["port"] == p and m["type"] == kind):
            pass

    base = listen_cycles(pipe_receive, cycles, port)
    stop(watcher)
    proc, sport, token = start_server()
    try:
        with connect(f"ws://127.0.0.1:{sport}/workspaces/bench/ws", subprotocols=["Bearer", token]) as ws:
            time.sleep(0.3)
            ws_result = listen_cycles(ws_receiver(ws), cycles, port)
    finally:
        stop(proc)
    print(f"{'aether ports watch, pipe (baseline)':<44} open:  {fmt(base[0])}")
    print(f"{'':<44} close: {fmt(base[1])}")
    print(f"{'aether serve, one WebSocket client':<44} open:  {fmt(ws_result[0])}")
    print(f"{'':<44} close: {fmt(ws_result[1])}", flush=True)


def fanout(clients, rounds):
    proc, sport, token = start_server()
    try:
        _fanout(proc, sport, token, clients, rounds)
    finally:
        stop(proc)


def _fanout(proc, sport, token, clients, rounds):
    time.sleep(0.5)
    rss_before = rss_kib(proc.pid)
    client = subprocess.Popen(
        [PY, "-c", FANOUT_CLIENT, f"/workspaces/bench/ws?token={token}", str(sport), str(clients)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    rss_after = rss_kib(proc.pid)
    latencies, missing = [], 0
    port = free_port()
    for _ in range(rounds):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        client.stdin.write("go\n")
        client.stdin.flush()
        time.sleep(0.05)  # the client is waiting in epoll before the port opens
        s.listen()
        t0 = time.monotonic()
        arrivals = [float(t) for t in client.stdout.readline().split()]
        missing += clients - len(arrivals)
        latencies += [(t - t0) * 1000 for t in arrivals]
        s.close()
        time.sleep(0.2)
        client.stdin.write("drain\n")  # swallow the close frames
        client.stdin.flush()
        client.stdout.readline()
    client.kill()
    print(
        f"{clients} clients, {rounds} port opens: listen() -> open frame at each client: {fmt(summary(latencies))}; missing {missing}"
    )
    print(
        f"server RSS: {rss_before / 1024:.1f} MiB idle, {rss_after / 1024:.1f} MiB with {clients} idle connections "
        f"= {(rss_after - rss_before) / clients:.1f} KiB per connection",
        flush=True,
    )


def slow_reader(cycles):
    from websockets.sync.client import connect

    sys.path.insert(0, str(ROOT / "tests"))
    from support.clients import raw_upgrade

    results = {}
    for label in ("alone", "beside a client that never reads"):
        proc, sport, token = start_server()

        try:
            handle = types.SimpleNamespace(port=sport, token=token, workspace="bench")
            stalled = raw_upgrade(handle, rcvbuf=4096) if label != "alone" else None
            port = free_port()
            with connect(f"ws://127.0.0.1:{sport}/workspaces/bench/ws", subprotocols=["Bearer", token]) as ws:
                time.sleep(0.3)
                results[label] = listen_cycles(ws_receiver(ws), cycles, port)
            if stalled:
                stalled.close()
        finally:
            stop(proc)
        print(f"reader {label:<36} open: {fmt(results[label][0])}", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=500)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--only", choices=("one", "fanout", "slow"), default=None)
    args = parser.parse_args()
    if args.only in (None, "one"):
        one_client(args.cycles)
    if args.only in (None, "fanout"):
        fanout(args.clients, args.rounds)
    if args.only in (None, "slow"):
        slow_reader(args.cycles)


if __name__ == "__main__":
    main()
