"""CPU time and wake-ups of each watcher over an idle period (default 60 s), run side by side.

.venv/bin/python bench/idle.py [--seconds 60]
"""

from __future__ import annotations

import argparse
import time

from common import PY, aether_watch, cpu_seconds, start, stop, wakeups


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    procs = {
        "aether ebpf": aether_watch("ebpf"),
        "aether sockdiag (250 ms)": aether_watch("sockdiag"),
        "/proc/net/tcp poller, 1 s (baseline)": start([PY, "bench/proc_poller.py", "1"], lambda r: b"ready" in r),
    }
    time.sleep(1)
    before = {name: (cpu_seconds(p.pid), wakeups(p.pid)) for name, p in procs.items()}
    time.sleep(args.seconds)
    for name, p in procs.items():
        cpu, wake = cpu_seconds(p.pid) - before[name][0], wakeups(p.pid) - before[name][1]
        print(
            f"{name:<40} idle {args.seconds:.0f} s: cpu {cpu * 1000:.0f} ms ({cpu / args.seconds * 100:.3f}% of a core), {wake} wake-ups"
        )
        stop(p)


if __name__ == "__main__":
    main()
