"""Files channel benchmark: how soon a change made by another process is told, and how
fast a large file reads through the channel.

1. Another process writes a new file in a watched tree; the time until the `created` event
   reaches the client. Baseline from the same run: a poller that stats the tree every second
   (what a client without watching would do).
2. `read` of a file in 256 KiB chunks to a websockets client, against reading it from disk.
3. The cost of one operation as the channel's pool runs it (the blocking call: confinement
   and the system calls), on a path three directories deep. Baseline from the same run: the
   same system calls on the absolute path, with no confinement at all. And a recursive `watch`
   of 2,041 directories through the channel (each one opened and watched), against `os.walk`
   of the same tree. Whichever `aether` is
   importable is measured: `PYTHONPATH=<other checkout>` measures another; with
   `AETHER_FILES_NO_OPENAT2=1` the component walk stands in for openat2.

    .venv/bin/python bench/files.py [--changes 50] [--megabytes 50] [--ops 3000]
    .venv/bin/python bench/files.py --ops-only [--ops 3000]
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


def _medians_us(fn, floor, reps: int) -> tuple[float, float]:
    """The medians of ``reps`` timings of ``fn()`` and of ``floor()``, in microseconds, taken
    in alternating batches of 10 so both see the same disk and the same neighbours."""
    times: tuple[list, list] = ([], [])
    for _ in range(max(1, reps // 10)):
        for which, call in enumerate((fn, floor)):
            started = time.perf_counter()
            for _ in range(10):
                call()
            times[which].append((time.perf_counter() - started) / 10 * 1e6)
    return tuple(sorted(t)[len(t) // 2] for t in times)


def op_costs(reps: int) -> list[tuple[str, float, float]]:
    """(operation, its cost, the baseline's) in microseconds, for each operation."""
    from aether.files import ops, reading, writing

    root = os.path.realpath(tempfile.mkdtemp(prefix="aether-files-ops-"))
    mod = os.path.join(root, "src", "pkg", "mod")
    os.makedirs(mod)
    for i in range(20):
        with open(os.path.join(mod, f"n{i:02d}.py"), "wb") as f:
            f.write(b"x" * 100)
    with open(os.path.join(mod, "f.txt"), "wb") as f:
        f.write(b"y" * 1024)
    os.symlink("src/pkg", os.path.join(root, "link"))
    f_rel, f_abs = "src/pkg/mod/f.txt", os.path.join(mod, "f.txt")
    payload = b"z" * 1024

    def read_once():
        reader = reading.Reader(root, f_rel)
        reader.next()
        reader.close()

    def read_floor():
        fd = os.open(f_abs, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        os.fstat(fd)
        os.pread(fd, 1 << 18, 0)
        os.close(fd)

    def list_floor():
        with os.scandir(mod) as it:
            for item in it:
                item.stat(follow_symlinks=False)

    def pwrite_floor():
        fd = os.open(f_abs, os.O_WRONLY | os.O_CLOEXEC)
        os.fstat(fd)
        os.pwrite(fd, payload, 0)
        os.close(fd)

    def replace_floor():
        fd, temp = tempfile.mkstemp(dir=mod)
        os.write(fd, payload)
        os.fsync(fd)
        os.close(fd)
        os.replace(temp, f_abs)

    def mkdir_delete():
        ops.mkdir(root, "src/pkg/mod/new")
        ops.delete(root, "src/pkg/mod/new")

    def rename_pair():
        ops.rename(root, f_rel, "src/pkg/mod/g.txt")
        ops.rename(root, "src/pkg/mod/g.txt", f_rel)

    new, g_abs = os.path.join(mod, "new"), os.path.join(mod, "g.txt")
    cases = [
        ("stat src/pkg/mod/f.txt", lambda: ops.stat(root, f_rel), lambda: os.lstat(f_abs)),
        ("stat link/mod/f.txt (a link on the way)", lambda: ops.stat(root, "link/mod/f.txt"), lambda: os.lstat(f_abs)),
        ("stat src/pkg/../pkg/mod/f.txt (..)", lambda: ops.stat(root, "src/pkg/../pkg/mod/f.txt"), lambda: os.lstat(f_abs)),
        ("list src/pkg/mod (21 entries)", lambda: ops.list_dir(root, "src/pkg/mod"), list_floor),
        ("read 1 KiB", read_once, read_floor),
        ("write 1 KiB at offset 0 (in place)", lambda: writing.write(root, f_rel, payload, 0), pwrite_floor),
        ("write 1 KiB (atomic: temp, fsync, rename)", lambda: writing.write(root, f_rel, payload), replace_floor),
        ("mkdir + delete", mkdir_delete, lambda: (os.mkdir(new), os.rmdir(new))),
        ("rename there and back", rename_pair, lambda: (os.rename(f_abs, g_abs), os.rename(g_abs, f_abs))),
    ]
    results = []
    for name, fn, floor in cases:
        fast = name.startswith("write 1 KiB (atomic")  # fsync: fewer rounds
        n = reps // 20 if fast else reps
        fn(), floor()  # warm
        results.append((name, *_medians_us(fn, floor, n)))
    return results


def print_op_costs(reps: int) -> None:
    import aether.files

    where = os.path.dirname(os.path.dirname(os.path.abspath(aether.files.__file__)))
    walk = os.environ.get("AETHER_FILES_NO_OPENAT2") == "1"
    print(f"one operation, the blocking call (us, median; aether from {where}{', component walk' if walk else ''})")
    print(f"  {'operation':44} {'aether':>9} {'baseline: same calls, no confinement':>38}")
    for name, cost, floor in op_costs(reps):
        print(f"  {name:44} {cost:9.1f} {floor:38.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--changes", type=int, default=50)
    parser.add_argument("--megabytes", type=int, default=50)
    parser.add_argument("--ops", type=int, default=3000, help="timings per operation")
    parser.add_argument("--ops-only", action="store_true", help="only the cost of each operation")
    args = parser.parse_args()
    if args.ops_only:
        print_op_costs(args.ops)
        return 0
    from websockets.sync.client import connect

    root = tempfile.mkdtemp(prefix="aether-files-")
    os.mkdir(os.path.join(root, "src"))
    for i in range(40):
        for j in range(50):
            os.makedirs(os.path.join(root, "tree", f"d{i}", f"e{j}"))
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

            ws.send(json.dumps({"channel": "files", "type": "watch", "path": "src", "recursive": True, "id": 1}))
            assert reply("watch", 1)["type"] == "watch"
            watched = []
            for i in range(args.changes):
                writer = subprocess.Popen(
                    [PY, "-c", WRITER, os.path.join(root, "src", f"new-{i}")], stdout=subprocess.PIPE, text=True
                )
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

            scans, walks = [], []
            for n in range(10):
                started = time.perf_counter()
                ws.send(json.dumps({"channel": "files", "type": "watch", "path": "tree", "recursive": True, "id": 100 + n}))
                watch_id = reply("watch", 100 + n)["watchId"]
                scans.append((time.perf_counter() - started) * 1000)
                ws.send(json.dumps({"channel": "files", "type": "unwatch", "watchId": watch_id, "id": 200 + n}))
                reply("unwatch", 200 + n)
                started = time.perf_counter()
                sum(1 for _ in os.walk(os.path.join(root, "tree")))
                walks.append((time.perf_counter() - started) * 1000)
    finally:
        stop(proc)
    mb = len(blob) / 1e6
    print("a file created by another process -> told (ms)")
    print(f"  inotify watch, created event:  {fmt(summary(watched))}")
    print(f"  1 s poller (baseline):         {fmt(summary(polled))}")
    print(f"read of a {len(blob) >> 20} MiB binary file")
    print(
        f"  through the channel: {through:.2f} s = {mb / through:.0f} MB/s in {chunks} messages;"
        f" from disk (page cache, baseline): {disk:.3f} s"
    )
    print("recursive watch of 2,041 directories (ms)")
    print(f"  watch request -> reply:  {fmt(summary(scans))}")
    print(f"  os.walk (baseline):      {fmt(summary(walks))}")
    print_op_costs(args.ops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
