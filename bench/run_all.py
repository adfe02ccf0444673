"""Run every benchmark and write their output, with the exact commands, to bench/RESULTS.md.

make bench        # or: .venv/bin/python bench/run_all.py
"""

from __future__ import annotations

import datetime
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHES = [
    ["bench/latency.py", "--cycles", "1000", "--slow-cycles", "20"],
    ["bench/burst.py", "--pairs", "10000", "--pages", "512"],
    ["bench/burst.py", "--pairs", "10000", "--pages", "64"],
    ["bench/idle.py", "--seconds", "60"],
    ["bench/snapshot.py", "--listeners", "10000", "--connections", "20000"],
    ["bench/server.py", "--cycles", "500", "--clients", "1000", "--rounds", "20"],
    ["bench/daemonize.py", "--cycles", "50"],
    ["bench/preview.py", "--seconds", "5", "--rounds", "3", "--trips", "2000", "--opens", "20"],
    ["bench/proxy_bulk.py", "--gib", "1", "--ws-mib", "1024", "--rounds", "3"],
    ["bench/registry.py", "--runs", "30", "--entries", "1000"],
    ["bench/terminal.py", "--megabytes", "200", "--idle-cycles", "200"],
    ["bench/spawn.py", "--runs", "300"],
    ["bench/files.py", "--changes", "50", "--megabytes", "50"],
    ["bench/who.py", "--calls", "20000"],
    ["bench/detect.py", "--rounds", "20", "--burst", "1000"],
    ["bench/dashboard.py", "--samples", "20"],
    ["bench/fleet.py", "--opens", "20", "--seconds", "5", "--rounds", "3", "--trips", "2000", "--workspaces", "10000"],
    ["bench/footprint.py", "--clients", "1000", "--pairs", "10000", "--starts", "5"],
]


def main() -> int:
    sections, status = [], 0
    for args in BENCHES:
        command = f".venv/bin/python {' '.join(args)}"
        print(f"$ {command}", flush=True)
        result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
        output = result.stdout + (f"\n(exit {result.returncode})\n{result.stderr[-2000:]}" if result.returncode else "")
        print(output, flush=True)
        status |= result.returncode
        sections.append(f"```\n$ {command}\n{output.rstrip()}\n```\n")
    header = (
        "# Benchmark results\n\n"
        f"Latest run: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
        f"kernel {platform.release()}, {platform.python_implementation()} {platform.python_version()}, "
        "2 vCPU VM. Regenerate with `make bench` (runs `.venv/bin/python bench/run_all.py`); "
        "each block below is one command and its output. Baselines run in the same invocation.\n\n"
    )
    notes_path = ROOT / "bench" / "NOTES.md"
    notes = notes_path.read_text() if notes_path.exists() else ""
    (ROOT / "bench" / "RESULTS.md").write_text(header + "\n".join(sections) + ("\n" + notes if notes else ""))
    return status


if __name__ == "__main__":
    sys.exit(main())
