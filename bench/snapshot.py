"""Snapshot cost: 10,000 listeners, then 20,000 idle established connections beside few listeners.
Compares aether's sock_diag dump with pyroute2's DiagSocket.get_sock_stats and a /proc/net/tcp
parse in the same run, and measures the sock_diag backend's CPU share with 10,000 listeners.

    .venv/bin/python bench/snapshot.py [--listeners 10000] [--connections 20000]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time

from common import PY, ROOT, aether_watch, cpu_seconds, stop

sys.path.insert(0, str(ROOT))
from aether.ports import procs, sockdiag  # noqa: E402

LISTENERS = """
import resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
keep = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(); keep.append(s)
print("ready", flush=True); sys.stdin.readline()
"""
# One server accepting N connections from a client process: 2N established sockets.
SERVER = """
import resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
n = int(sys.argv[1]); srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(4096)
print(srv.getsockname()[1], flush=True)
conns = [srv.accept()[0] for _ in range(n)]
print("ready", flush=True); sys.stdin.readline()
"""
CLIENT = """
import resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
port, n = int(sys.argv[1]), int(sys.argv[2]); keep = []
for _ in range(n):
    c = socket.socket(); c.connect(("127.0.0.1", port)); keep.append(c)
print("ready", flush=True); sys.stdin.readline()
"""


def timed(fn, repeat=5):
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        samples.append((time.perf_counter() - t) * 1000)
    return statistics.median(samples), result


def proc_net_tcp_listeners():
    count = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as f:
            next(f)
            count += sum(1 for line in f if line.split()[3] == "0A")
    return count


def pyroute2_dump():
    from pyroute2.netlink.diag import DiagSocket

    with DiagSocket() as ds:
        ds.bind()
        return len(ds.get_sock_stats(family=socket.AF_INET, states=1 << 10)) + len(
            ds.get_sock_stats(family=socket.AF_INET6, states=1 << 10)
        )


def report(label):
    with sockdiag.DiagSocket() as diag:
        ms, raw = timed(diag.raw)
        print(f"[{label}] aether sock_diag dump: {ms:.1f} ms for {len(raw)} listeners")
        inodes = {entry[3] for entry in raw}
        ms_pids, owners = timed(lambda: procs.socket_owners(inodes), repeat=1)
        print(f"[{label}] pid resolution through /proc (all inodes new): {ms_pids:.1f} ms ({len(owners)} resolved)")
    ms, n = timed(pyroute2_dump, repeat=1)
    print(f"[{label}] pyroute2 DiagSocket.get_sock_stats (baseline): {ms:.1f} ms for {n} listeners")
    ms, n = timed(proc_net_tcp_listeners, repeat=3)
    print(f"[{label}] /proc/net/tcp{{,6}} parse (baseline): {ms:.1f} ms for {n} listeners")


def spawn(code, *args):
    proc = subprocess.Popen([PY, "-c", code, *map(str, args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    return proc


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--listeners", type=int, default=10000)
    parser.add_argument("--connections", type=int, default=20000)
    args = parser.parse_args()

    holder = spawn(LISTENERS, args.listeners)
    assert holder.stdout.readline().strip() == b"ready"
    report(f"{args.listeners} listeners")
    watcher = aether_watch("sockdiag", stdout=subprocess.DEVNULL)
    time.sleep(2)  # the start-up snapshot resolves every pid once
    before = cpu_seconds(watcher.pid)
    time.sleep(10)
    share = (cpu_seconds(watcher.pid) - before) / 10
    print(f"[{args.listeners} listeners] sock_diag backend CPU over 10 s: {share * 100:.1f}% of a core (budget 2%)")
    stop(watcher)
    holder.kill()

    procs_ = []
    per = 9000  # connections per server/client pair: each side stays under the fd limit
    remaining = args.connections
    while remaining > 0:
        n = min(per, remaining)
        server = spawn(SERVER, n)
        port = int(server.stdout.readline())
        client = spawn(CLIENT, port, n)
        assert client.stdout.readline().strip() == b"ready"
        assert server.stdout.readline().strip() == b"ready"
        procs_ += [server, client]
        remaining -= n
    report(f"{args.connections} established connections")
    for p in procs_:
        p.kill()


if __name__ == "__main__":
    main()
