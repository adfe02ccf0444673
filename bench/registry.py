"""`aether port get KEY` as a whole process, the way `curl localhost:$(aether port get web)` runs
it: wall time from fork to exit, beside the interpreter alone (`python -c pass`) and
`aether --version` (the rest of the command line) in the same run. Target: under 100 ms.

    .venv/bin/python bench/registry.py [--runs 30] [--entries 1000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

from common import PY, ROOT, percentile

AETHER = str(ROOT / ".venv" / "bin" / "aether")


def timed(cmd: list[str], env: dict, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=True)
        out.append((time.perf_counter() - started) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--entries", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as state:
        env = dict(os.environ, AETHER_STATE_DIR=state)
        import sys

        sys.path.insert(0, str(ROOT))
        from aether.registry.store import Registry

        with Registry(Path(state) / "registry.db") as reg:
            for i in range(args.entries):
                reg.set(f"app{i}", 20000 + i, app=f"group{i // 4}", label=f"l{i % 4}")
        contenders = [
            ("python -c pass (floor)", [PY, "-c", "pass"]),
            ("aether --version", [AETHER, "--version"]),
            (f"aether port get (registry of {args.entries})", [AETHER, "port", "get", f"app{args.entries // 2}"]),
        ]
        print(f"wall time of one whole process, {args.runs} runs each, interleaved warm-up of 3")
        for _name, cmd in contenders:
            timed(cmd, env, 3)
        for name, cmd in contenders:
            ms = timed(cmd, env, args.runs)
            print(f"  {name:<40} p50={percentile(ms, 50):6.1f} ms  p90={percentile(ms, 90):6.1f} ms  max={max(ms):6.1f} ms")


if __name__ == "__main__":
    main()
