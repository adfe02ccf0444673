"""Where the preview proxy's CPU goes: 1 KB GETs over 50 keep-alive connections (the throughput
run of preview.py) while a profiler samples ``aether serve``.

- CPU split: user and kernel (``/proc/PID/stat``), per request.
- ``perf record`` (cpu-clock, whole process): the share of each shared object (the kernel,
  libpython, uvloop, httptools, ...) and the top symbols, self time.
- ``py-spy`` (non-blocking): the Python functions, self time (the innermost
  Python frame of each sample, C it calls included) and inclusive, in microseconds per request.

The proxy runs on CPU 1, wrk, the upstream nginx and the profilers on CPU 0.

    .venv/bin/python bench/proxy_profile.py [--seconds 10] [--top 25] [--profiler both|perf|py-spy]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, cpu_seconds
from preview import AUTH, CLIENT_CPU, Bench, free_port, on_cpu, preview_host, wait_proxied

PY_SPY = ROOT / ".venv" / "bin" / "py-spy"


def user_system(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def run_wrk(url, headers, seconds):
    """Requests made in ``seconds`` of wrk -c50 with ``headers`` ("Name: value" each)."""
    cmd = ["wrk", "-t1", "-c50", f"-d{seconds}s", *(arg for header in headers for arg in ("-H", header)), url]
    out = subprocess.run(on_cpu(CLIENT_CPU, cmd), capture_output=True, text=True, check=True, timeout=seconds + 30).stdout
    if re.search(r"Non-2xx or 3xx responses|Socket errors", out):
        raise RuntimeError(out)
    return int(re.search(r"(\d+) requests in", out).group(1))


def profiled(profiler_cmd, url, headers, pid, seconds):
    """Run wrk while ``profiler_cmd`` records; (requests, user s, system s)."""
    prof = subprocess.Popen(on_cpu(CLIENT_CPU, profiler_cmd), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)  # the profiler attached
    u0, s0 = user_system(pid)
    requests = run_wrk(url, headers, seconds)
    u1, s1 = user_system(pid)
    prof.send_signal(signal.SIGINT)
    _, err = prof.communicate(timeout=120)
    if prof.returncode not in (0, -signal.SIGINT, 130):
        raise RuntimeError(f"{profiler_cmd[0]} failed: {err.decode()[-2000:]}")
    return requests, u1 - u0, s1 - s0


def perf_profile(tmp, url, headers, pid, seconds, top):
    data = tmp / "perf.data"
    cmd = ["perf", "record", "-F", "1999", "-p", str(pid), "-o", str(data)]
    requests, user, system = profiled(cmd, url, headers, pid, seconds)
    per_request = (user + system) / requests * 1e6

    def report(sort):
        out = subprocess.run(
            ["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", sort, "--percent-limit", "0.3"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return [line for line in out.splitlines() if line.strip() and not line.startswith("#")]

    print(f"perf record -F 1999 (cpu-clock), {requests:,} requests, {per_request:.1f} us of CPU per request")
    print("  by shared object (self):")
    for line in report("dso")[:12]:
        share, dso = line.split(None, 1)
        print(f"    {share:>7}  {float(share.rstrip('%')) / 100 * per_request:5.1f} us  {dso.strip()}")
    print(f"  top {top} symbols (self):")
    for line in report("dso,sym")[:top]:
        share, rest = line.split(None, 1)
        print(f"    {share:>7}  {float(share.rstrip('%')) / 100 * per_request:5.1f} us  {rest.strip()}")


def pyspy_profile(tmp, url, headers, pid, seconds, top):
    raw = tmp / "py-spy.txt"
    cmd = [str(PY_SPY), "record", "--pid", str(pid), "--rate", "997", "--nonblocking", "--format", "raw"]
    cmd += ["--output", str(raw)]
    requests, user, system = profiled(cmd, url, headers, pid, seconds)
    per_request = (user + system) / requests * 1e6
    inner, inclusive, total = collections.Counter(), collections.Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        count = int(count)
        total += count
        frames = stack.split(";")
        python = [f for f in frames if ".py:" in f]  # "name (file.py:line)"
        names = {re.sub(r":\d+\)$", ")", f) for f in python}
        for name in names:
            inclusive[name] += count
        if python:
            inner[re.sub(r":\d+\)$", ")", python[-1])] += count
        elif frames:
            inner[f"[native] {frames[-1]}"] += count
    print(f"py-spy --nonblocking, {total:,} samples, {requests:,} requests, {per_request:.1f} us of CPU per request")
    print("  (a sample is taken whether the loop runs or waits in epoll: the shares are of wall time)")
    print(f"  top {top}, innermost Python frame (self, the C it calls included):")
    for name, count in inner.most_common(top):
        print(f"    {count / total:6.1%}  {name}")
    print(f"  top {top}, inclusive:")
    for name, count in inclusive.most_common(top):
        print(f"    {count / total:6.1%}  {name}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10, help="length of each profiled wrk run")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--profiler", choices=("both", "perf", "py-spy"), default="both")
    args = parser.parse_args()
    os.sched_setaffinity(0, {CLIENT_CPU})
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    bench = Bench()
    try:
        www = bench.tmp / "www"
        www.mkdir()
        (www / "1k.html").write_bytes(b"x" * 1024)
        upstream_port = free_port()
        bench.nginx("upstream", CLIENT_CPU, upstream_port, f"root {www};")
        aether_port, pid = bench.aether()
        wait_proxied(aether_port, upstream_port)
        url = f"http://127.0.0.1:{aether_port}/1k.html"
        headers = [f"Host: {preview_host(upstream_port, aether_port)}", f"Authorization: {AUTH}"]
        run_wrk(url, headers, 2)  # warm-up: the pool filled
        c0, t0 = cpu_seconds(pid), time.monotonic()
        requests = run_wrk(url, headers, args.seconds)
        cpu, wall = cpu_seconds(pid) - c0, time.monotonic() - t0
        print(
            f"unprofiled: {requests / wall:,.0f} req/s, proxy {cpu / wall:.0%} of a core, "
            f"{cpu / requests * 1e6:.1f} us of CPU per request"
        )
        if args.profiler in ("both", "perf") and shutil.which("perf"):
            perf_profile(bench.tmp, url, headers, pid, args.seconds, args.top)
        if args.profiler in ("both", "py-spy"):
            pyspy_profile(bench.tmp, url, headers, pid, args.seconds, args.top)
    finally:
        bench.close()


if __name__ == "__main__":
    sys.exit(main())
