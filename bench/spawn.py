"""What starting a terminal's process costs: spawn -> exit of ``setsid --ctty true`` on a PTY.

The baseline, measured in the same run, is how the terminal started its child before:
``subprocess.Popen`` (vfork, inherited signal dispositions, no cgroup). Against it:
``aether.spawn`` (posix_spawn, signals reset, through the ``/bin/sh`` step that enters the
cgroup and the directory) with no cgroup, and with a cgroup of its own made before and killed
and removed after, as a session's is. The three are interleaved so that load hits each alike.

    .venv/bin/python bench/spawn.py [--runs 300]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import fmt, summary  # noqa: E402

from aether import cgroup, spawn  # noqa: E402
from aether.terminal.process import SETSID  # noqa: E402

ARGV = [SETSID, "--ctty", "true"]


def popen_ms() -> float:
    master, slave = os.openpty()
    started = time.perf_counter()
    proc = subprocess.Popen(ARGV, stdin=slave, stdout=slave, stderr=slave, cwd="/tmp", close_fds=True)
    os.close(slave)
    proc.wait()
    took = time.perf_counter() - started
    os.close(master)
    return took * 1000


def spawn_ms(trees: cgroup.Trees | None) -> float:
    master, slave = os.openpty()
    started = time.perf_counter()
    tree = trees.new() if trees else None
    pid = spawn.spawn(ARGV, cwd="/tmp", env=os.environ, stdio=(slave, slave, slave), cgroup_procs=tree.procs if tree else None)
    os.close(slave)
    os.waitpid(pid, 0)
    if trees:
        tree.kill()
        trees.done(tree)
    took = time.perf_counter() - started
    os.close(master)
    return took * 1000


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as state:
        trees = cgroup.Trees(state, "bench")
        if not trees.cgroups:
            print(f"no cgroups here ({trees.why}): the cgroup row is missing")
        results: dict[str, list[float]] = {"popen": [], "spawn": [], "spawn+cgroup": []}
        for _ in range(args.runs):
            results["popen"].append(popen_ms())
            results["spawn"].append(spawn_ms(None))
            if trees.cgroups:
                results["spawn+cgroup"].append(spawn_ms(trees))
        trees.close()
    print(f"start and exit of `setsid --ctty true` on a PTY, {args.runs} runs each, interleaved")
    for name, values in results.items():
        if values:
            print(f"  {name:<13} {fmt(summary(values))}")
    base = summary(results["popen"])["p50"]
    for name in ("spawn", "spawn+cgroup"):
        if results[name]:
            print(f"  {name} p50 - popen p50: {summary(results[name])['p50'] - base:+.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
