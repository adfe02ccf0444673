"""What finding a port's protocol costs: the time from a look's start to its verdict, for
each kind of server, and the event loop's responsiveness while 1,000 ports are looked at.

Per protocol, against real servers (Python's http.server plain and over ssl, node http and
https, nginx plain and ssl, a PostgreSQL-like server answering one byte, an SSH-like one that
speaks first), each ``--rounds`` times; the baseline, in the same run, is a bare TCP connect
and close to the same port.

The burst: one process serving ``--burst`` ports (one in ten over TLS) that answer at once,
all handed to one Detector together. A 1 ms ticker on the same loop measures how late the
loop runs its callbacks, beside the same ticker with nothing else to do; then the burst again
with the CPU time of each loop callback measured, counting those over ``--slow-ms``.

    .venv/bin/python bench/detect.py [--rounds 20] [--burst 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import PY, percentile  # noqa: E402

from aether.ports.detect import Detector  # noqa: E402

PYTHON_SSL = """
import http.server, ssl, sys
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), http.server.SimpleHTTPRequestHandler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); context.load_cert_chain(sys.argv[2], sys.argv[3])
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"""
NODE = "require('http').createServer((q, s) => s.end('ok')).listen(Number(process.argv[1]), '127.0.0.1')"
NODE_HTTPS = """
const fs = require('fs'); const [port, cert, key] = process.argv.slice(1);
require('https').createServer({cert: fs.readFileSync(cert), key: fs.readFileSync(key)}, (q, s) => s.end('ok'))
  .listen(Number(port), '127.0.0.1');
"""
RAW = """
import socket, sys, threading
port, banner = int(sys.argv[1]), sys.argv[2] == "banner"
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", port)); s.listen()
def serve(c):
    try:
        if banner:
            c.sendall(b"SSH-2.0-OpenSSH_9.2p1\\r\\n")
        if c.recv(8):
            c.sendall(b"N")
    except OSError:
        pass
    c.close()
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""
#: Serves N ports on one loop, every tenth over TLS; prints the ports as JSON.
BURST = """
import asyncio, json, ssl, sys
count, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); context.load_cert_chain(cert, key)
async def answer(reader, writer):
    try:
        await reader.readuntil(b"\\r\\n\\r\\n")
        writer.write(b"HTTP/1.1 204 No Content\\r\\nConnection: close\\r\\n\\r\\n")
        await writer.drain()
    except Exception:
        pass
    writer.close()
async def main():
    servers = [await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context if i % 10 == 0 else None, backlog=64)
               for i in range(count)]
    print(json.dumps([s.sockets[0].getsockname()[1] for s in servers]), flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not listen")


def nginx_conf(tmp: Path, port: int, cert) -> Path:
    conf = tmp / f"nginx-{port}.conf"
    tls = f"ssl; ssl_certificate {cert[0]}; ssl_certificate_key {cert[1]};" if cert else ";"
    temps = " ".join(f"{kind}_temp_path {tmp}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf.write_text(
        f"daemon off; master_process off; user root; pid {tmp}/nginx-{port}.pid; error_log stderr error;\n"
        f"events {{ worker_connections 64; }} http {{ access_log off; {temps}\n"
        f'server {{ listen 127.0.0.1:{port} {tls} return 200 "ok"; }} }}\n'
    )
    return conf


def servers(tmp: Path, cert) -> list[tuple[str, int, subprocess.Popen]]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    plans = [
        ("http.server", lambda p: [PY, "-m", "http.server", str(p), "--bind", "127.0.0.1"]),
        ("python ssl", lambda p: [PY, "-c", PYTHON_SSL, str(p), *cert]),
        ("node http", lambda p: ["node", "-e", NODE, str(p)]),
        ("node https", lambda p: ["node", "-e", NODE_HTTPS, str(p), *cert]),
        ("nginx", lambda p: [nginx, "-c", str(nginx_conf(tmp, p, None)), "-p", str(tmp)]),
        ("nginx ssl", lambda p: [nginx, "-c", str(nginx_conf(tmp, p, cert)), "-p", str(tmp)]),
        ("postgres-like", lambda p: [PY, "-c", RAW, str(p), "answer"]),
        ("ssh-like banner", lambda p: [PY, "-c", RAW, str(p), "banner"]),
    ]
    started = []
    for name, argv in plans:
        port = free_port()
        proc = subprocess.Popen(argv(port), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(port, proc)
        started.append((name, port, proc))
    return started


async def connect_ms(port: int) -> float:
    started = time.perf_counter()
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.close()
    return (time.perf_counter() - started) * 1000


async def per_protocol(started, rounds: int) -> None:
    print(f"detection, look start to verdict, {rounds} rounds each (a fresh Detector per look):")
    print(f"  {'server':<16} {'verdict':<18} {'p50':>9} {'max':>9}   baseline: TCP connect+close p50")
    for name, port, _proc in started:
        took, base, verdict = [], [], None
        for _ in range(rounds):
            base.append(await connect_ms(port))
            begin = time.perf_counter()
            found = await Detector().detect("127.0.0.1", port)
            took.append((time.perf_counter() - begin) * 1000)
            verdict = f"{found.protocol} ({found.reason})"
        print(f"  {name:<16} {verdict:<18} {percentile(took, 50):7.1f} ms {max(took):7.1f} ms   {percentile(base, 50):.2f} ms")


async def ticker(stop: asyncio.Event, lags: list[float]) -> None:
    """How late a 1 ms timer fires: the loop's responsiveness to everything else."""
    while not stop.is_set():
        due = time.perf_counter() + 0.001
        await asyncio.sleep(0.001)
        lags.append(max(0.0, (time.perf_counter() - due) * 1000))


async def burst(ports: list[int]) -> tuple[list[float], list[float], Detector, float]:
    stop = asyncio.Event()
    idle: list[float] = []
    task = asyncio.ensure_future(ticker(stop, idle))
    await asyncio.sleep(2)
    stop.set()
    await task
    stop = asyncio.Event()
    busy: list[float] = []
    task = asyncio.ensure_future(ticker(stop, busy))
    detector = Detector()
    begin = time.perf_counter()
    found = await asyncio.gather(*(detector.detect("127.0.0.1", port) for port in ports))
    took = time.perf_counter() - begin
    stop.set()
    await task
    kinds = {}
    for f in found:
        kinds[f.protocol] = kinds.get(f.protocol, 0) + 1
    detector.kinds = kinds
    return idle, busy, detector, took


def lag(values: list[float]) -> str:
    return f"p50={percentile(values, 50):.2f} ms  p99={percentile(values, 99):.2f} ms  max={max(values):.2f} ms"


async def callback_cpu(ports: list[int]) -> list[float]:
    """The CPU time of every callback the loop runs during a burst, in ms. A loop is blocked
    by a callback that computes, not by one that the scheduler preempted (two cores shared
    with the servers and whatever else runs): thread CPU time tells the two apart, where
    asyncio's debug mode, timing callbacks by the wall clock, does not."""
    cpu: list[float] = []
    original = asyncio.events.Handle._run

    def timed(handle):
        started = time.thread_time()
        try:
            return original(handle)
        finally:
            cpu.append((time.thread_time() - started) * 1000)

    asyncio.events.Handle._run = timed
    try:
        detector = Detector()
        await asyncio.gather(*(detector.detect("127.0.0.1", port) for port in ports))
    finally:
        asyncio.events.Handle._run = original
    return cpu


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--slow-ms", type=float, default=10.0)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8 * args.burst + 1024)), hard))
    tmp = Path(tempfile.mkdtemp(prefix="aether-bench-detect-"))
    cert = (str(tmp / "cert.pem"), str(tmp / "key.pem"))
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            cert[1],
            "-out",
            cert[0],
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
        ],
        check=True,
        capture_output=True,
    )
    started = servers(tmp, cert)
    many = subprocess.Popen(
        [PY, "-c", BURST, str(args.burst), *cert],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8 * args.burst + 1024), hard)),
    )
    try:
        ports = json.loads(many.stdout.readline())
        asyncio.run(per_protocol(started, args.rounds))
        idle, busy, detector, took = asyncio.run(burst(ports))
        print(f"\nburst: {len(ports)} ports answering at once (one in ten over TLS), one Detector:")
        print(f"  all found in {took:.2f} s: {detector.kinds}; at most {detector.peak_connections} probe connections")
        print(f"  1 ms ticker lateness during the burst  {lag(busy)}")
        print(f"  baseline: the same ticker, loop idle   {lag(idle)}")
        cpu = asyncio.run(callback_cpu(ports))
        slow = sum(1 for ms in cpu if ms > args.slow_ms)
        print(
            f"  CPU per loop callback during the burst: {len(cpu)} callbacks, {sum(cpu) / 1000:.2f} s in all, "
            f"p99={percentile(cpu, 99):.3f} ms  max={max(cpu):.2f} ms; {slow} over {args.slow_ms:g} ms"
        )
    finally:
        many.kill()
        for _name, _port, proc in started:
            proc.kill()
        for proc in [many] + [p for _n, _p, p in started]:
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
