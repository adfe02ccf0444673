"""Files channel benchmark (issue 6): how soon a change made by another process is told, and how
fast a large file reads through the channel.

1. Another process writes a new file in a watched tree; the time until the `created` event
   reaches the client. Baseline from the same run: a poller that stats the tree every second
   (what a client without watching would do).
2. `read` of a file in 256 KiB chunks to a websockets client, against reading it from disk.

    .venv/bin/python bench/files.py [--changes 50] [--megabytes 50]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

from common import PY, fmt, stop, summary
from server import start_server

WRITER = "import sys, time; print(time.time(), flush=True); open(sys.argv[1], 'w').write('x')"


def write_elsewhere(path: str) -> float:
    """Create ``path`` from another process; the wall time just before it did."""
    out = subprocess.run([PY, "-c", WRITER, path], capture_output=True, text=True, check=True).stdout
    return float(out)


def poller_latency(root: str, changes: int, interval: float = 1.0) -> list[float]:
    """A 1 s poller listing ``root``: new name -> seen, in ms."""
    seen: dict[str, float] = {}
    done = threading.Event()

    def poll():
        while not done.is_set():
            now = time.time()
            for name in os.listdir(root):
                seen.setdefault(name, now)
            time.sleep(interval)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    times = {}
    for i in range(changes):
        name = f"poll-{i}"
        times[name] = write_elsewhere(os.path.join(root, name))
        time.sleep(0.137)  # not a divisor of the interval: changes land all over its cycle
    time.sleep(interval * 1.5)
    done.set()
    return [(seen[n] - t) * 1000 for n, t in times.items() if n in seen]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--changes", type=int, default=50)
    parser.add_argument("--megabytes", type=int, default=50)
    args = parser.parse_args()
    from websockets.sync.client import connect

    root = tempfile.mkdtemp(prefix="aether-files-")
    os.mkdir(os.path.join(root, "src"))
    blob = os.urandom(args.megabytes << 20)
    with open(os.path.join(root, "big.bin"), "wb") as f:
        f.write(blob)
    proc, port, token = start_server("sockdiag", "--workspace-root", root)
    url = f"ws://127.0.0.1:{port}/workspaces/bench/ws"
    try:
        with connect(url, subprotocols=["Bearer", token], max_size=None) as ws:

            def reply(kind: str, id_, path: str = "") -> dict:
                while True:
                    m = json.loads(ws.recv(timeout=30))
                    if m["channel"] != "files":
                        continue
                    if m.get("id") == id_ if id_ is not None else (m["type"] == kind and m["path"] == path):
                        return m

            ws.send(json.dumps({"channel": "files", "type": "watch", "path": ".", "recursive": True, "id": 1}))
            assert reply("watch", 1)["type"] == "watch"
            watched = []
            for i in range(args.changes):
                writer = subprocess.Popen([PY, "-c", WRITER, os.path.join(root, "src", f"new-{i}")],
                                          stdout=subprocess.PIPE, text=True)
                reply("created", None, f"src/new-{i}")
                told = time.time()
                watched.append((told - float(writer.stdout.readline())) * 1000)
                writer.wait()
                time.sleep(0.2)  # apart: each change is a lone one, as a save is
            polled = poller_latency(os.path.join(root, "src"), args.changes)

            started = time.perf_counter()
            with open(os.path.join(root, "big.bin"), "rb") as f:
                assert f.read() == blob
            disk = time.perf_counter() - started
            started = time.perf_counter()
            ws.send(json.dumps({"channel": "files", "type": "read", "path": "big.bin", "id": 2}))
            got, chunks = bytearray(), 0
            while True:
                m = reply("read", 2)
                got += base64.b64decode(m["content"]) if m["encoding"] == "base64" else m["content"].encode()
                chunks += 1
                if m["eof"]:
                    break
            through = time.perf_counter() - started
            assert bytes(got) == blob
    finally:
        stop(proc)
    mb = len(blob) / 1e6
    print("a file created by another process -> told (ms)")
    print(f"  inotify watch, created event:  {fmt(summary(watched))}")
    print(f"  1 s poller (baseline):         {fmt(summary(polled))}")
    print(f"read of a {len(blob) >> 20} MiB binary file")
    print(f"  through the channel: {through:.2f} s = {mb / through:.0f} MB/s in {chunks} messages;"
          f" from disk (page cache, baseline): {disk:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
