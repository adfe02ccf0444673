"""What naming a port's holder costs: ``who(pid)`` (command line, working directory, start
time) on real listening processes.

Baselines in the same run: ``procs.process_name`` (the one read a port event already costs,
``/proc/<pid>/comm``), and psutil's ``cmdline()``, ``cwd()`` and ``create_time()`` for the
same three facts. Calls are interleaved so that load hits each alike.

    .venv/bin/python bench/who.py [--calls 20000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
from common import PY, percentile  # noqa: E402

from aether.ports import procs  # noqa: E402
from aether.ports.who import who  # noqa: E402

LISTEN = "import socket, sys, time; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); time.sleep(3600)"


def by_psutil(pid: int):
    p = psutil.Process(pid)
    return p.cmdline(), p.cwd(), p.create_time()


def us(values: list[float]) -> str:
    return f"p50={percentile(values, 50):6.2f} us  p90={percentile(values, 90):6.2f} us  p99={percentile(values, 99):6.2f} us"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    # Four python listeners, with the arguments a dev server has, and nginx-like long ones.
    holders = [
        subprocess.Popen(
            [PY, "-c", LISTEN, "--port", str(8000 + i), "--host", "127.0.0.1", "x" * 200 * i], stdin=subprocess.DEVNULL
        )
        for i in range(4)
    ]
    try:
        time.sleep(0.5)
        pids = [p.pid for p in holders]
        for pid in pids:
            assert who(pid).argv, pid
        timings: dict[str, list[float]] = {"who": [], "comm": [], "psutil": []}
        calls = {"who": who, "comm": procs.process_name, "psutil": by_psutil}
        for i in range(args.calls):
            pid = pids[i % len(pids)]
            for name, call in calls.items():
                started = time.perf_counter()
                call(pid)
                timings[name].append((time.perf_counter() - started) * 1e6)
        sample = who(pids[0])
        print(f"who(pid) on {len(pids)} listening processes, {args.calls} calls each way, interleaved")
        print(f"  who (cmdline, cwd, start)     {us(timings['who'])}")
        print(f"  baseline: comm only           {us(timings['comm'])}")
        print(f"  baseline: psutil, same facts  {us(timings['psutil'])}")
        print(f"  e.g. {sample.to_json()}")
    finally:
        for p in holders:
            p.kill()
            p.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
