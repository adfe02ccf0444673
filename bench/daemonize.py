"""A server that daemonizes -> a WebSocket client of `aether serve` holding its true state.

nginx in its default mode binds 127.0.0.1 and [::1], forks the master and exits; the master
writes its pid file and forks two workers. For each cycle: from the parent's exit (its pidfd
polled here, in a thread) to the moment the client, applying `open` and `update`, holds the
master's pid and both addresses. Negative when the client was right first (the monitor read
the probe's records, or took its snapshot, after the parent had gone). Also listen() -> `open`
is not measurable here (nginx's listen() is its own), so the start of nginx -> `open` is shown.

With --baseline TREE, the same against that checkout's aether in the same run (main's, say,
exported with `git archive main | tar -x -C TREE`): a cycle whose client is not right within
--timeout seconds counts as never.

    .venv/bin/python bench/daemonize.py [--cycles 50] [--baseline TREE] [--baseline-cycles 10]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, fmt, summary
from server import free_port, start_server

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
BOTH = ["127.0.0.1", "::1"]


def nginx_conf(work: Path, port: int) -> Path:
    conf = work / "nginx.conf"
    conf.write_text(
        f"""
master_process on; worker_processes 2; user root;
pid {work}/nginx.pid; error_log {work}/error.log error;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {work}/body; proxy_temp_path {work}/proxy;
  fastcgi_temp_path {work}/fcgi; uwsgi_temp_path {work}/uwsgi; scgi_temp_path {work}/scgi;
  server {{ listen 127.0.0.1:{port}; listen [::1]:{port}; return 200 "ok"; }}
}}
"""
    )
    return conf


def cycle(ws, work: Path, timeout: float):
    """(parent exit -> client right, nginx start -> open) in ms; the first None if never."""
    port = free_port()
    conf = nginx_conf(work, port)
    pid_file = work / "nginx.pid"
    pid_file.unlink(missing_ok=True)
    exited = {}
    started = time.perf_counter()
    parent = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(work)])
    pidfd = os.pidfd_open(parent.pid)

    def wait_exit():
        select.select([pidfd], [], [])
        exited["at"] = time.perf_counter()

    waiter = threading.Thread(target=wait_exit)
    waiter.start()
    state, opened_at, right_at, master = None, None, None, None
    deadline = started + timeout
    while time.perf_counter() < deadline:
        if master is None and pid_file.exists() and pid_file.read_text().strip():
            master = int(pid_file.read_text())
        if master is not None and state and (state["pid"], state["addresses"]) == (master, BOTH):
            break
        try:
            msg = json.loads(ws.recv(timeout=0.01))
        except TimeoutError:
            continue
        if msg.get("port") != port:
            continue
        now = time.perf_counter()
        if msg["type"] == "open":
            state, opened_at = dict(msg), now
        elif msg["type"] == "update" and state is not None:
            state = {**state, **msg}
        right_at = now  # of the last message: the one that made the state what it is
    else:
        right_at = None
    waiter.join()
    parent.wait()
    os.close(pidfd)
    if master is None:
        master = int(pid_file.read_text())
    # Stop: the master's fast shutdown; wait for the port's close so cycles do not overlap.
    os.kill(master, signal.SIGTERM)
    end = time.perf_counter() + 10
    while time.perf_counter() < end:
        try:
            msg = json.loads(ws.recv(timeout=0.5))
        except TimeoutError:
            continue
        if msg.get("port") == port and msg["type"] == "close":
            break
    right = None if right_at is None else (right_at - exited["at"]) * 1000
    return right, None if opened_at is None else (opened_at - started) * 1000


def run(tree: Path, backend: str, cycles: int, timeout: float):
    from websockets.sync.client import connect

    server, port, token = start_server(backend, tree=tree)
    work = Path(tempfile.mkdtemp(prefix="aether-bench-nginx-"))
    rights, opens, never = [], [], 0
    try:
        with connect(f"ws://127.0.0.1:{port}/workspaces/bench/ws", subprotocols=["Bearer", token]) as ws:
            time.sleep(0.3)
            for _ in range(cycles):
                right, opened = cycle(ws, work, timeout)
                if right is None:
                    never += 1
                else:
                    rights.append(right)
                if opened is not None:
                    opens.append(opened)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    return rights, opens, never


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout's tree, run in the same way")
    parser.add_argument("--baseline-cycles", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds a cycle waits for the right state")
    args = parser.parse_args()
    contenders = [(f"aether {b}", ROOT, b, args.cycles) for b in ("ebpf", "sockdiag")]
    if args.baseline:
        contenders += [(f"baseline {b} ({args.baseline})", args.baseline, b, args.baseline_cycles) for b in ("ebpf", "sockdiag")]
    for name, tree, backend, cycles in contenders:
        rights, opens, never = run(tree, backend, cycles, args.timeout)
        print(f"{name}", flush=True)
        print(
            f"  parent exit -> master + both families: {fmt(summary(rights)) if rights else 'n=0'}"
            f"; never within {args.timeout:g} s: {never} of {cycles}",
            flush=True,
        )
        print(f"  nginx start -> open:                   {fmt(summary(opens)) if opens else 'n=0'}", flush=True)


if __name__ == "__main__":
    main()
