"""listen() returning in this process -> the `open` JSON line read from a watcher's stdout
(and close() -> `close`), for aether's two backends and two baselines measured in the same run:
a minimal bcc ring-buffer consumer, and a 2 s /proc/net/tcp poller like cloud IDEs use.

    .venv/bin/python bench/latency.py [--cycles 1000] [--slow-cycles 20]
"""

from __future__ import annotations

import argparse
import random
import socket
import time

from common import PY, LineReader, aether_watch, fmt, start, stop, summary


def measure(proc, cycles, port, jitter=0.0):
    reader = LineReader(proc)
    rng = random.Random(1)
    opens, closes = [], []
    for _ in range(cycles):
        # A poller's phase must not line up with the cycles: start each at a random moment.
        time.sleep(rng.uniform(0, jitter))
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
        t0 = time.perf_counter_ns()
        while not ((m := reader.read())["port"] == port and m["type"] == "open"):
            pass
        opens.append((time.perf_counter_ns() - t0) / 1e6)
        time.sleep(rng.uniform(0, jitter))
        s.close()
        t0 = time.perf_counter_ns()
        while not ((m := reader.read())["port"] == port and m["type"] == "close"):
            pass
        closes.append((time.perf_counter_ns() - t0) / 1e6)
    return summary(opens), summary(closes)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--slow-cycles", type=int, default=20, help="cycles for the polling contenders")
    args = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    contenders = [
        ("minimal bcc consumer (baseline)", lambda: start([PY, "bench/minimal_bcc.py"], lambda r: b"ready" in r), args.cycles, 0),
        ("aether ebpf", lambda: aether_watch("ebpf"), args.cycles, 0),
        ("aether sockdiag (250 ms)", lambda: aether_watch("sockdiag"), args.slow_cycles, 0.25),
        (
            "/proc/net/tcp poller, 2 s (baseline)",
            lambda: start([PY, "bench/proc_poller.py", "2"], lambda r: b"ready" in r),
            args.slow_cycles,
            2.0,
        ),
    ]
    results = {}
    for name, launch, cycles, jitter in contenders:
        proc = launch()
        try:
            time.sleep(0.3)
            results[name] = measure(proc, cycles, port, jitter)
        finally:
            stop(proc)
        print(f"{name:<40} open:  {fmt(results[name][0])}", flush=True)
        print(f"{'':<40} close: {fmt(results[name][1])}", flush=True)
    ebpf = results["aether ebpf"][0]["p50"]
    poll = results["/proc/net/tcp poller, 2 s (baseline)"][0]["p50"]
    print(f"open p50: 2 s poller / aether ebpf = {poll / ebpf:,.0f}x")


if __name__ == "__main__":
    main()
