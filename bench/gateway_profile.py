"""Where a fleet gateway's CPU goes: 1 KB GETs over 50 keep-alive connections (the throughput run
of fleet.py) through one ``aether gateway`` to a stand-in workspace (an nginx on loopback, which
ignores Host and the signature), while a profiler samples the gateway; as proxy_profile.py does
for a VM's preview proxy, with its reports.

- ``--credential none``: a public port, no credential (fleet.py's "gateway -> stand-in VM");
- ``--credential bearer``: the port private, ``Authorization: Bearer`` with the token;
- ``--credential cookie``: the port private, the gateway's cookie (minted as ``?token=`` would).

The gateway runs on CPU 1; wrk, the upstream nginx, Redis and the profilers on CPU 0.

    .venv/bin/python bench/gateway_profile.py [--seconds 10] [--rounds 3] [--top 25]
        [--profiler both|perf|py-spy|none] [--credential none|bearer|cookie] [--baseline TREE]

Before the profile, interleaved unprofiled runs of nginx as the proxy (one worker, as in
fleet.py), the gateway, and with ``--baseline TREE`` that checkout's gateway: requests/s and
requests per proxy CPU-second, each beside nginx's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

from common import cpu_seconds
from fleet import stand_in
from fleetlab import DOMAIN, Lab, free_port
from preview import CLIENT_CPU
from proxy_profile import perf_profile, pyspy_profile, run_wrk

PROXY_CPU = 1
TOKEN = "profile-token"


def throughput(targets: dict, seconds: int, rounds: int) -> None:
    """Interleaved unprofiled wrk runs of each target (url, headers, proxy pid): the medians."""
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in targets}
    for _ in range(rounds):
        for name, (url, headers, pid) in targets.items():
            c0, t0 = cpu_seconds(pid), time.monotonic()
            requests = run_wrk(url, headers, seconds)
            cpu, wall = cpu_seconds(pid) - c0, time.monotonic() - t0
            runs[name].append((requests / wall, requests / cpu))
    print(f"throughput: 1 KB GET, wrk -t1 -c50 -d{seconds}s, median of {rounds} interleaved runs; proxies on CPU {PROXY_CPU}")
    nginx = statistics.median(per_cpu for _, per_cpu in runs[NGINX_PROXY])
    rps_nginx = statistics.median(rps for rps, _ in runs[NGINX_PROXY])
    for name, results in runs.items():
        rps = statistics.median(r for r, _ in results)
        per_cpu = statistics.median(c for _, c in results)
        print(
            f"  {name:<34} {rps:>8,.0f} req/s = {rps / rps_nginx:.3f} x nginx   {per_cpu:>8,.0f} per CPU-second = "
            f"{per_cpu / nginx:.3f} x nginx   {1e6 / per_cpu:5.1f} us per request"
        )


NGINX_PROXY = "nginx proxy, 1 worker (baseline)"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10, help="length of each wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved unprofiled runs of each proxy")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--profiler", choices=("both", "perf", "py-spy", "none"), default="both")
    parser.add_argument("--credential", choices=("none", "bearer", "cookie"), default="none")
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout's tree: its gateway joins the runs")
    args = parser.parse_args()
    os.sched_setaffinity(0, {CLIENT_CPU})
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from aether.fleet import auth

    load = os.getloadavg()
    lab = Lab()
    try:
        lab.start_redis([])
        www = lab.tmp / "www"
        www.mkdir()
        (www / "1k.html").write_bytes(b"x" * 1024)
        up = free_port()
        lab.nginx("upstream", "127.0.0.1", up, f"root {www};", cpu=CLIENT_CPU)
        nginx_port = free_port()
        nginx_pid = lab.nginx(
            "proxy",
            "127.0.0.1",
            nginx_port,
            'location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }',
            f"upstream app {{ server 127.0.0.1:{up}; keepalive 64; keepalive_requests 1000000; }}",
            cpu=PROXY_CPU,
        )
        prefix = stand_in(lab, f"127.0.0.1:{up}", "prof", public=args.credential == "none", token=TOKEN)
        gateways = {"gateway": lab.gateway(cpu=PROXY_CPU)}
        if args.baseline:
            gateways[f"gateway of {args.baseline}"] = lab.gateway(cpu=PROXY_CPU, root=args.baseline)
        host = f"8000-{prefix}.{DOMAIN}"
        headers = [f"Host: {host}"]
        if args.credential == "bearer":
            headers.append(f"Authorization: Bearer {TOKEN}")
        elif args.credential == "cookie":
            keys = auth.FleetKeys.load(str(lab.key_file))
            verifier = auth.verifier(keys, TOKEN, prefix).encode()
            headers.append(f"Cookie: {auth.COOKIE.decode()}={auth.mint_cookie(keys, host.encode(), verifier).decode()}")
        targets = {NGINX_PROXY: (f"http://127.0.0.1:{nginx_port}/1k.html", [], nginx_pid)}
        for name, gateway in gateways.items():
            url = f"http://127.0.0.1:{gateway.port}/1k.html"
            deadline = time.monotonic() + 10
            while True:  # the gateway's table holds the stand-in once its stream entry arrived
                try:
                    run_wrk(url, headers, 1)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            targets[name] = (url, headers, gateway.pid)
        for url, target_headers, _ in targets.values():
            run_wrk(url, target_headers, 1)  # warm-up: the pools filled
        print(f"credential: {args.credential}; load average (1 min) {load[0]:.2f} at the start")
        throughput(targets, args.seconds, args.rounds)
        url, _, pid = targets["gateway"]
        if args.profiler in ("both", "perf") and shutil.which("perf"):
            perf_profile(lab.tmp, url, headers, pid, args.seconds, args.top)
        if args.profiler in ("both", "py-spy"):
            pyspy_profile(lab.tmp, url, headers, pid, args.seconds, args.top)
    finally:
        lab.close()
    print(f"load average (1 min) {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
