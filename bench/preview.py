"""Preview proxy benchmarks, each beside its baselines in the same run (see bench/NOTES.md):
throughput (wrk -c50) and latency (wrk -c1) of a 1 KB GET directly, through nginx (1 worker) and
through aether's preview URL; WebSocket echo round trips directly and through aether; and the time
from listen() in a fresh process to the first 200 directly and through the preview URL, beside the
moment a 1 s /proc/net/tcp poller (proc_poller.py) sees the port.

The proxy under test (nginx's worker, aether) runs on CPU 1; wrk, the upstream nginx, the node
server and the Python clients on CPU 0. wrk runs are interleaved, the median run is reported.

    .venv/bin/python bench/preview.py [--seconds 5] [--rounds 3] [--trips 2000] [--opens 20] [--quick] [--baseline TREE]

With --baseline TREE, that checkout's aether joins the throughput and latency runs (interleaved).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import PY, ROOT, cpu_seconds, percentile, stop

PROJECT_ID, PREFIX, TOKEN = "abc123def", "abc123", "secret"
AUTH = f"Bearer {TOKEN}"
CLIENT_CPU, PROXY_CPU = 0, 1
NGINX = "/usr/sbin/nginx"
NODE_PATH = str(ROOT / ".tools" / "node_modules")
DEVNULL = subprocess.DEVNULL

ECHO_JS = """
const {WebSocketServer} = require('ws');
const wss = new WebSocketServer({host: '127.0.0.1', port: Number(process.argv[2])});
wss.on('listening', () => console.log('ready'));
wss.on('connection', (ws) => ws.on('message', (data, isBinary) => ws.send(data, {binary: isBinary})));
"""

# The app of test 4: its clock reading right before listen() (CLOCK_MONOTONIC is system-wide, so
# it compares with this process's), then keep-alive 200s. It listens when told to: on 2 CPUs, the
# interpreter's ~20 ms start-up would otherwise share a CPU with the client or aether at the very
# moment measured (a real app is done starting when it listens, too). Orphaned, it ends after 10 s.
LISTENER_PY = r"""
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.settimeout(10)
sys.stdin.readline()
t = time.monotonic()
s.listen(64)
print(repr(t), flush=True)
while True:
    conn, _ = s.accept()
    conn.settimeout(10)
    with conn:
        buf = b""
        while data := conn.recv(65536):
            buf += data
            while b"\r\n\r\n" in buf:
                _, buf = buf.split(b"\r\n\r\n", 1)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
"""


def on_cpu(cpu, cmd):
    return ["taskset", "-c", str(cpu), *cmd]


def free_port(avoid=()):
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port


def wait_listening(port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {port}")
        time.sleep(0.02)


def read_line(fd, timeout, want=b""):
    """The first line on ``fd`` containing ``want``, within ``timeout`` s (no buffering in the way)."""
    deadline, buf = time.monotonic() + timeout, b""
    while True:
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if want in line:
                return line
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise TimeoutError(f"no line with {want!r}")
        chunk = os.read(fd, 65536)
        if not chunk:
            raise EOFError(f"process ended before a line with {want!r}")
        buf += chunk


def nginx_conf(tmp, name, port, server, http_extra=""):
    # Every path nginx writes goes into the temp dir; keepalive_requests is raised everywhere
    # so wrk's connections (and the proxies' upstream ones) stay open for the whole run.
    t = f"{tmp}/{name}"
    return f"""daemon off; worker_processes 1; pid {t}.pid; error_log {t}.error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off; keepalive_requests 1000000;
    client_body_temp_path {t}.body; proxy_temp_path {t}.proxy; fastcgi_temp_path {t}.fastcgi;
    uwsgi_temp_path {t}.uwsgi; scgi_temp_path {t}.scgi;
    {http_extra}
    server {{ listen 127.0.0.1:{port}; {server} }}
}}
"""


class Bench:
    """Owns the temp dir and every process started, so ``close`` can end them all."""

    def __init__(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="aether-preview-bench-"))
        os.chmod(self.tmp, 0o755)  # nginx workers run as nobody and read the static file here
        self.procs: list[subprocess.Popen] = []

    def spawn(self, cmd, **kwargs):
        kwargs.setdefault("stdout", DEVNULL)
        kwargs.setdefault("stderr", DEVNULL)
        kwargs.setdefault("cwd", ROOT)
        proc = subprocess.Popen(cmd, **kwargs)
        self.procs.append(proc)
        return proc

    def end(self, proc):
        stop(proc)  # TERM, then KILL after 5 s
        self.procs.remove(proc)

    def close(self):
        for proc in reversed(list(self.procs)):
            self.end(proc)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def nginx(self, name, cpu, port, server, http_extra=""):
        conf = self.tmp / f"{name}.conf"
        conf.write_text(nginx_conf(self.tmp, name, port, server, http_extra))
        master = self.spawn(on_cpu(cpu, [NGINX, "-p", str(self.tmp), "-e", str(self.tmp / f"{name}.error.log"), "-c", str(conf)]))
        wait_listening(port)
        # The worker inherits the master's CPU; pinning it again by pid fails loudly if it is not there.
        (worker,) = Path(f"/proc/{master.pid}/task/{master.pid}/children").read_text().split()
        subprocess.run(["taskset", "-pc", str(cpu), worker], check=True, stdout=DEVNULL)
        return int(worker)

    def aether(self, tree=None):
        """``aether serve`` on CPU 1, from this checkout or from ``tree`` (another one's)."""
        port = free_port()
        state = self.tmp / f"aether-state-{port}"
        state.mkdir()
        env = {**os.environ, "PYTHONPATH": str(tree)} if tree else None
        proc = self.spawn(
            on_cpu(
                PROXY_CPU,
                [
                    PY,
                    "-m",
                    "aether",
                    "serve",
                    "--port",
                    str(port),
                    "--state-dir",
                    str(state),
                    "--project-id",
                    PROJECT_ID,
                    "--token",
                    TOKEN,
                    "--backend",
                    "ebpf",
                ],
            ),
            stderr=subprocess.PIPE,
            cwd=tree or ROOT,
            env=env,
        )
        read_line(proc.stderr.fileno(), 60, b'"msg":"serving"')
        # Keep draining the log so the server never blocks on a full pipe.
        threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
        return port, proc.pid  # taskset exec()s the server: same pid


def preview_host(port, aether_port):
    return f"{port}-{PREFIX}.preview.localhost:{aether_port}"


def get_status(conn, host=None):
    """One GET on ``conn`` (with the preview Host and token if ``host``): the status and when the
    status line came. http.client reopens a closed connection on the next request."""
    try:
        conn.request("GET", "/", headers={"Host": host, "Authorization": AUTH} if host else {})
        response = conn.getresponse()
        arrived = time.monotonic()
        response.read()
    except (OSError, http.client.HTTPException):
        conn.close()
        raise
    if response.will_close or response.status == 502:
        conn.close()  # aether closes after its 502 without saying so: reopen now, not after a failed request
    return response.status, arrived


def wait_proxied(aether_port, port, timeout=10.0):
    """Until aether answers something else than 502 (its monitor has seen ``port``)."""
    deadline = time.monotonic() + timeout
    with contextlib.closing(http.client.HTTPConnection("127.0.0.1", aether_port, timeout=5)) as conn:
        while get_status(conn, preview_host(port, aether_port))[0] == 502:
            if time.monotonic() > deadline:
                raise TimeoutError(f"aether does not proxy {port}")
            time.sleep(0.02)


def cpu_ticks(cpu):
    """(busy, total) ticks of one CPU since boot, from /proc/stat."""
    fields = [int(v) for v in re.search(rf"^cpu{cpu} (.*)$", Path("/proc/stat").read_text(), re.M).group(1).split()]
    return sum(fields) - fields[3] - fields[4], sum(fields)  # idle and iowait are not busy


def wrk(target, seconds, connections, latency=False):
    """requests/s, {50: p50 ms, 99: p99 ms}, and shares of a core over the run: the proxy
    process's, and CPU 0's (wrk + upstream; when it is full, the proxy is not the limit)."""
    url, headers, proxy_pid = target
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", *(["--latency"] if latency else [])]
    cmd += [arg for header in headers for arg in ("-H", header)]
    cpu0, t0, ticks0 = cpu_seconds(proxy_pid) if proxy_pid else 0, time.monotonic(), cpu_ticks(CLIENT_CPU)
    out = subprocess.run(on_cpu(CLIENT_CPU, cmd + [url]), capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    cpu = (cpu_seconds(proxy_pid) - cpu0) / (time.monotonic() - t0) if proxy_pid else float("nan")
    busy, total = (after - before for after, before in zip(cpu_ticks(CLIENT_CPU), ticks0))
    # A run full of 502s or resets would be a fast benchmark of an error page: refuse it.
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: .*", out)
    if bad:
        raise RuntimeError(f"wrk {url}: {bad.group(0)}\n{out}")
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    percentiles = {int(q): float(v) * scale[u] for q, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)}
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), percentiles, (cpu, busy / total)


def interleaved(targets, rounds, run):
    results = {name: [] for name in targets}
    for _ in range(rounds):
        for name, target in targets.items():
            results[name].append(run(target))
    return results


def throughput(targets, seconds, rounds):
    for target in targets.values():  # warm-up: pools filled, caches hot, before any figure counts
        wrk(target, 1, 50)
    runs = interleaved(targets, rounds, lambda t: wrk(t, seconds, 50))
    medians = {name: statistics.median(rps for rps, _, _ in values) for name, values in runs.items()}
    print(
        f"throughput: 1 KB GET, 50 keep-alive connections, wrk -t1 -c50 -d{seconds}s, "
        f"median of {rounds} interleaved runs; busy share of a core over the run (medians)"
    )
    per_cpu = {}
    for name, values in runs.items():
        proxy, cpu0 = (statistics.median(shares[i] for _, _, shares in values) for i in (0, 1))
        per_cpu[name] = medians[name] / proxy
        proxy = "  - " if proxy != proxy else f"{proxy:4.0%}"
        print(
            f"  {name:<36} {medians[name]:>7,.0f} req/s  proxy {proxy}  CPU 0 (wrk, upstream) {cpu0:4.0%}  "
            f"runs: {', '.join(f'{rps:,.0f}' for rps, _, _ in values)}"
        )
    aether, nginx = "aether preview proxy", "nginx proxy, 1 worker (baseline)"
    ratio = medians[aether] / medians[nginx]
    print(f"  aether / nginx = {ratio:.2f} (goal >= 0.7: {'met' if ratio >= 0.7 else 'missed'})")
    # With CPU 0 full, nginx's figure is wrk's and the upstream's limit, not nginx's: per CPU-second
    # of the proxy compares the proxies themselves.
    print(
        f"  per proxy CPU-second: aether {per_cpu[aether]:,.0f}, nginx {per_cpu[nginx]:,.0f} req "
        f"= {per_cpu[aether] / per_cpu[nginx]:.2f} (goal >= 0.6: {'met' if per_cpu[aether] >= 0.6 * per_cpu[nginx] else 'missed'})",
        flush=True,
    )
    for name in runs:
        if name.startswith("aether of "):
            print(
                f"  {name}: / nginx = {medians[name] / medians[nginx]:.2f}, per CPU-second {per_cpu[name]:,.0f} req "
                f"= {per_cpu[name] / per_cpu[nginx]:.2f} of nginx's; this checkout's per CPU-second "
                f"= {per_cpu[aether] / per_cpu[name]:.2f} x its",
                flush=True,
            )


def latency(targets, seconds, rounds):
    runs = interleaved(targets, rounds, lambda t: wrk(t, seconds, 1, latency=True)[1])
    print(f"latency: 1 connection, wrk -t1 -c1 -d{seconds}s --latency, median of {rounds} interleaved runs")
    p50 = {}
    for name, values in runs.items():
        p50[name] = statistics.median(v[50] for v in values)
        p99 = statistics.median(v[99] for v in values)
        print(f"  {name:<40} p50={p50[name]:.3f} ms  p99={p99:.3f} ms")
    added = p50["aether preview proxy"] - p50["upstream nginx, direct (baseline)"]
    print(f"  aether adds to p50: {added:.3f} ms (goal <= 0.3 ms: {'met' if added <= 0.3 else 'missed'})", flush=True)
    for name in runs:
        if name.startswith("aether of "):
            print(f"  {name} adds to p50: {p50[name] - p50['upstream nginx, direct (baseline)']:.3f} ms", flush=True)


def websocket_echo(bench, aether_port, trips, warmup):
    from websockets.sync.client import connect

    script = bench.tmp / "echo.js"
    script.write_text(ECHO_JS)
    port = free_port()
    node = bench.spawn(
        on_cpu(CLIENT_CPU, ["node", str(script), str(port)]), stdout=subprocess.PIPE, env={**os.environ, "NODE_PATH": NODE_PATH}
    )
    read_line(node.stdout.fileno(), 10, b"ready")
    wait_proxied(aether_port, port)

    def nodelay_socket(p):  # both paths alike, and no Nagle wait in anyone's figure
        sock = socket.create_connection(("127.0.0.1", p))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    message, times = "x" * 32, {"direct (baseline)": [], "through aether": []}
    try:
        with contextlib.ExitStack() as stack:
            clients = {
                "direct (baseline)": stack.enter_context(
                    connect(f"ws://127.0.0.1:{port}/", sock=nodelay_socket(port), compression=None)
                )
            }
            clients["through aether"] = stack.enter_context(
                connect(
                    f"ws://{preview_host(port, aether_port)}/",
                    sock=nodelay_socket(aether_port),
                    additional_headers={"Authorization": AUTH},
                    compression=None,
                )
            )
            # Alternating one round trip each way keeps the VM's noise the same for both.
            for i in range(warmup + trips):
                for name, ws in clients.items():
                    t0 = time.perf_counter_ns()
                    ws.send(message)
                    assert ws.recv(timeout=5) == message
                    if i >= warmup:
                        times[name].append((time.perf_counter_ns() - t0) / 1e3)
    finally:
        bench.end(node)
    print(f"websocket echo: 32-byte text message, {trips} sequential round trips after {warmup} warm-up, alternating")
    for name, values in times.items():
        print(f"  {name:<40} p50={percentile(values, 50):.0f} us  p99={percentile(values, 99):.0f} us")
    added = (percentile(times["through aether"], 50) - percentile(times["direct (baseline)"], 50)) / 1e3
    print(f"  aether adds to p50: {added:.3f} ms (goal <= 0.3 ms: {'met' if added <= 0.3 else 'missed'})", flush=True)


def poller_clock(proc):
    """When the 1 s /proc/net/tcp poller first reports each port open, stamped in a thread as each
    line arrives (not whenever the main loop gets round to the pipe)."""
    seen: dict[int, float] = {}

    def read():
        for line in proc.stdout:
            msg = json.loads(line)
            if msg["type"] == "open":
                seen.setdefault(msg["port"], time.monotonic())

    threading.Thread(target=read, daemon=True).start()
    return seen


def listen_to_200(bench, port, conn, host=None, then=lambda listen_at: None, timeout=10.0):
    """A fresh process listens on ``port``; GET through ``conn`` back to back until a 200 (before:
    502 from aether, refused directly). ms from its listen() to the 200, and what ``then`` returns
    (it runs while the port is still open)."""
    listener = bench.spawn([PY, "-c", LISTENER_PY, str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        time.sleep(0.1)  # its start-up, done before the clock starts
        listener.stdin.write(b"go\n")
        listener.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no 200 from {port}")
            try:
                status, ok_at = get_status(conn, host)
            except (OSError, http.client.HTTPException):
                continue  # refused (direct, before listen()), or cut as the port opened
            if status == 200:
                break
            if status != 502:
                raise RuntimeError(f"answered {status}")
        listen_at = float(read_line(listener.stdout.fileno(), 5))
        return (ok_at - listen_at) * 1e3, then(listen_at)
    finally:
        conn.close()
        bench.end(listener)


def port_opens(bench, aether_port, tries):
    poller = bench.spawn([PY, str(ROOT / "bench" / "proc_poller.py"), "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    read_line(poller.stderr.fileno(), 10, b"poller ready")
    seen = poller_clock(poller)
    direct_ms, aether_ms, poller_ms, used = [], [], [], set()
    for _ in range(tries):
        # Start at a random moment of the poller's 1 s cycle: back-to-back tries would lock to its phase.
        time.sleep(random.uniform(0, 1))
        port = free_port(avoid=used)  # a port reused too soon could still look open to the poller
        used.add(port)

        def poller_delay(listen_at):
            for _ in range(300):  # up to 3 s; the stamp is the thread's: polling here costs no precision
                if port in seen:
                    return (seen[port] - listen_at) * 1e3
                time.sleep(0.01)
            raise TimeoutError(f"the poller never reported {port}")

        conn = http.client.HTTPConnection("127.0.0.1", aether_port, timeout=5)
        ms, seen_ms = listen_to_200(bench, port, conn, preview_host(port, aether_port), then=poller_delay)
        aether_ms.append(ms)
        poller_ms.append(seen_ms)
        port = free_port(avoid=used)
        used.add(port)
        direct_ms.append(listen_to_200(bench, port, http.client.HTTPConnection("127.0.0.1", port, timeout=5))[0])
    bench.end(poller)
    print(f"port opens: {tries} fresh listener processes each way, GETs back to back from before listen()")
    for name, values in (
        ("listen() -> first 200 directly (floor: the app itself)", direct_ms),
        ("listen() -> first 200 through aether", aether_ms),
        ("listen() -> 1 s /proc/net/tcp poller sees it (baseline)", poller_ms),
    ):
        print(
            f"  {name:<56} median={statistics.median(values):.3f} ms  p95={percentile(values, 95):.3f} ms  "
            f"max={max(values):.3f} ms"
        )
    # A poller-gated proxy answers its first 200 one GET after the poller sees the port.
    print("  (the poller line is a floor for a proxy gated by such a poller)", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=5, help="length of each wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs per contender")
    parser.add_argument("--trips", type=int, default=2000, help="WebSocket round trips")
    parser.add_argument("--opens", type=int, default=20, help="listener processes started in test 4")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--only", default="throughput,latency,websocket,opens", help="the tests to run, comma-separated")
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout's tree: its aether joins the wrk runs")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.rounds, args.trips, args.opens = 2, 1, 300, 5
    # This process runs the Python clients (WebSocket, port opens): keep it off the proxy's CPU,
    # like wrk. Every child inherits it unless started with taskset -c 1.
    os.sched_setaffinity(0, {CLIENT_CPU})
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` ends the processes
    bench = Bench()
    try:
        www = bench.tmp / "www"
        www.mkdir()
        (www / "1k.html").write_bytes(b"x" * 1024)
        upstream_port, nginx_port = free_port(), free_port()
        bench.nginx("upstream", CLIENT_CPU, upstream_port, f"root {www};")
        nginx_pid = bench.nginx(
            "proxy",
            PROXY_CPU,
            nginx_port,
            'location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }',
            f"upstream app {{ server 127.0.0.1:{upstream_port}; keepalive 64; keepalive_requests 1000000; }}",
        )
        aether_port, aether_pid = bench.aether()
        wait_proxied(aether_port, upstream_port)
        targets = {
            "upstream nginx, direct (baseline)": (f"http://127.0.0.1:{upstream_port}/1k.html", (), None),
            "nginx proxy, 1 worker (baseline)": (f"http://127.0.0.1:{nginx_port}/1k.html", (), nginx_pid),
            "aether preview proxy": (
                f"http://127.0.0.1:{aether_port}/1k.html",
                (f"Host: {preview_host(upstream_port, aether_port)}", f"Authorization: {AUTH}"),
                aether_pid,
            ),
        }
        if args.baseline:
            base_port, base_pid = bench.aether(args.baseline)
            wait_proxied(base_port, upstream_port)
            targets[f"aether of {args.baseline} (baseline)"] = (
                f"http://127.0.0.1:{base_port}/1k.html",
                (f"Host: {preview_host(upstream_port, base_port)}", f"Authorization: {AUTH}"),
                base_pid,
            )
        only = set(args.only.split(","))
        if "throughput" in only:
            throughput(targets, args.seconds, args.rounds)
        if "latency" in only:
            latency(targets, args.seconds, args.rounds)
        if "websocket" in only:
            websocket_echo(bench, aether_port, args.trips, warmup=200 if not args.quick else 50)
        if "opens" in only:
            port_opens(bench, aether_port, args.opens)
    finally:
        bench.close()


if __name__ == "__main__":
    sys.exit(main())
