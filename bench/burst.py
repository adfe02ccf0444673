"""10,000 listen/close pairs as fast as one process can make them (every 97th socket kept open),
watched by `aether ports watch --backend ebpf`. Afterwards the ports the watcher says are open
must equal the kernel's truth; records lost and resyncs are reported, not hidden.

    .venv/bin/python bench/burst.py [--pairs 10000] [--pages 512]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

from common import PY, ROOT, LineReader, stop

BURST = """
import socket, sys, time
n = int(sys.argv[1]); kept = []
t = time.perf_counter()
for i in range(n):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
    if i % 97 == 0:
        kept.append(s)
    else:
        s.close()
print(time.perf_counter() - t, flush=True)
sys.stdin.readline()
"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=10000)
    parser.add_argument("--pages", type=int, default=512)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from aether.ports import sockdiag

    watcher = subprocess.Popen(
        [PY, "-m", "aether", "--log-level", "debug", "ports", "watch", "--backend", "ebpf"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env={**__import__("os").environ, "AETHER_EBPF_PAGES": str(args.pages)},
    )
    log, ready = [], threading.Event()

    def read_log():
        for raw in watcher.stderr:
            line = json.loads(raw)
            log.append(line)
            if line["msg"] == "port monitor started":
                ready.set()

    threading.Thread(target=read_log, daemon=True).start()
    ready.wait(30)
    reader = LineReader(watcher)
    open_ports = set()
    burst = subprocess.Popen([PY, "-c", BURST, str(args.pairs)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    elapsed = float(burst.stdout.readline())
    events = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            msg = reader.read(timeout=1.0)
        except TimeoutError:
            break
        events += 1
        (open_ports.add if msg["type"] == "open" else open_ports.discard)(msg["port"])
    with sockdiag.DiagSocket() as diag:
        truth = {port for _f, port, _a, _i in diag.raw()} - {22, 2222, 3001}
    lost = max((line.get("total", 0) for line in log if line["msg"] == "probe records lost"), default=0)
    resyncs = sum(1 for line in log if line["msg"] == "resync")
    print(f"burst: {args.pairs} listen/close pairs in {elapsed:.2f} s ({args.pairs / elapsed:,.0f}/s), ring {args.pages} pages")
    print(f"events read: {events}; records lost: {lost}; resyncs: {resyncs}")
    print(f"table equals kernel truth: {open_ports == truth} ({len(truth)} ports open)")
    burst.kill()
    stop(watcher)
    return 0 if open_ports == truth else 1


if __name__ == "__main__":
    sys.exit(main())
