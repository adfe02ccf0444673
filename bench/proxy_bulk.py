"""Large bodies and tunnels through the preview proxy, beside nginx (1 worker, streaming:
``proxy_buffering off``, ``proxy_request_buffering off``) and the upstream directly, in the
same run: a 1 GiB download (nginx serving a sparse file), a 1 GiB upload (curl ``-T``, a node
upstream that reads it all before it answers) and a WebSocket stream (a node ``ws`` server sending
64 KiB binary messages to a node client). The proxy under test runs on CPU 1; curl, node and
the upstream on CPU 0. Rounds are interleaved; the median is reported, with the proxy's CPU
seconds per GiB.

    .venv/bin/python bench/proxy_bulk.py [--gib 1] [--rounds 3] [--ws-mib 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys

from common import cpu_seconds
from preview import AUTH, CLIENT_CPU, NODE_PATH, PROXY_CPU, Bench, free_port, on_cpu, preview_host, read_line, wait_proxied

WS_SERVER_JS = """
const {WebSocketServer} = require('ws');
const wss = new WebSocketServer({host: '127.0.0.1', port: Number(process.argv[2])});
const chunk = Buffer.alloc(65536, 120);
wss.on('listening', () => console.log('ready'));
wss.on('connection', (ws, req) => {
  let left = Number(new URL(req.url, 'http://x').searchParams.get('bytes'));
  const pump = () => {
    while (left > 0 && ws.bufferedAmount < (1 << 20)) { ws.send(chunk, {binary: true}); left -= chunk.length; }
    if (left > 0) setTimeout(pump, 0); else ws.close();
  };
  pump();
});
// The upload's app: reads the whole body, then answers with its length.
require('http').createServer((req, res) => {
  let n = 0;
  req.on('data', (c) => { n += c.length; });
  req.on('end', () => res.end(String(n)));
}).listen(Number(process.argv[3]), '127.0.0.1');
"""
WS_CLIENT_JS = """
const WebSocket = require('ws');
const [url, host] = process.argv.slice(2);
const headers = host ? {Host: host, Authorization: process.env.AUTH} : {};
const ws = new WebSocket(url, {headers, perMessageDeflate: false});
let bytes = 0, started;
ws.on('open', () => { started = process.hrtime.bigint(); });
ws.on('message', (data) => { bytes += data.length; });
ws.on('close', () => { console.log(JSON.stringify({bytes, seconds: Number(process.hrtime.bigint() - started) / 1e9})); });
ws.on('error', (e) => { console.error(String(e)); process.exit(1); });
"""


def curl(args, expect_bytes):
    """(seconds, bytes moved) of one curl transfer, as curl itself times it."""
    cmd = ["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{time_total} %{size_download} %{size_upload}", *args]
    out = subprocess.run(on_cpu(CLIENT_CPU, cmd), capture_output=True, text=True, check=True, timeout=600).stdout
    seconds, down, up = out.split()
    moved = max(int(float(down)), int(float(up)))
    if moved != expect_bytes:
        raise RuntimeError(f"curl moved {moved} bytes, not {expect_bytes}: {' '.join(cmd)}")
    return float(seconds), moved


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=1.0, help="size of the download and the upload")
    parser.add_argument("--ws-mib", type=int, default=1024, help="bytes the WebSocket server sends")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.sched_setaffinity(0, {CLIENT_CPU})
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    size = int(args.gib * (1 << 30))
    ws_bytes = args.ws_mib << 20
    bench = Bench()
    try:
        www = bench.tmp / "www"
        www.mkdir()
        big = www / "big.bin"
        with open(big, "wb") as f:
            f.truncate(size)  # sparse: nginx's sendfile reads zeros from the page cache
        upstream_port, nginx_port, ws_port, upload_port = free_port(), free_port(), free_port(), free_port()
        bench.nginx(
            "upstream",
            CLIENT_CPU,
            upstream_port,
            f"root {www};",
        )
        streaming = (
            "proxy_http_version 1.1; proxy_buffering off; proxy_request_buffering off; client_max_body_size 0; "
            "proxy_read_timeout 600s; proxy_send_timeout 600s;"
        )
        nginx_pid = bench.nginx(
            "proxy",
            PROXY_CPU,
            nginx_port,
            f'location / {{ proxy_pass http://app; {streaming} proxy_set_header Connection ""; }} '
            f"location /upload {{ proxy_pass http://127.0.0.1:{upload_port}; {streaming} }} "
            f"location /ws {{ proxy_pass http://127.0.0.1:{ws_port}; {streaming} "
            'proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection "upgrade"; }',
            f"upstream app {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}",
        )
        script = bench.tmp / "ws_server.js"
        script.write_text(WS_SERVER_JS)
        client_js = bench.tmp / "ws_client.js"
        client_js.write_text(WS_CLIENT_JS)
        env = {**os.environ, "NODE_PATH": NODE_PATH, "AUTH": AUTH}
        node = bench.spawn(
            on_cpu(CLIENT_CPU, ["node", str(script), str(ws_port), str(upload_port)]), stdout=subprocess.PIPE, env=env
        )
        read_line(node.stdout.fileno(), 10, b"ready")
        aether_port, aether_pid = bench.aether()
        wait_proxied(aether_port, upstream_port)
        wait_proxied(aether_port, ws_port)
        wait_proxied(aether_port, upload_port)
        aether_host = preview_host(upstream_port, aether_port)
        aether_ws_host = preview_host(ws_port, aether_port)
        aether_upload_host = preview_host(upload_port, aether_port)

        def download(base, host):
            extra = ["-H", f"Host: {host}", "-H", f"Authorization: {AUTH}"] if host else []
            return curl([*extra, f"{base}/big.bin"], size)

        def upload(base, host, direct=None):
            base = direct or base
            extra = ["-H", f"Host: {host}", "-H", f"Authorization: {AUTH}"] if host else []
            return curl([*extra, "-X", "POST", "-T", str(big), "-H", "Expect:", f"{base}/upload"], size)

        def websocket(base, host):
            cmd = ["node", str(client_js), f"{base.replace('http', 'ws')}/ws?bytes={ws_bytes}"] + ([host] if host else [])
            out = subprocess.run(on_cpu(CLIENT_CPU, cmd), capture_output=True, text=True, check=True, timeout=600, env=env)
            result = json.loads(out.stdout)
            if result["bytes"] < ws_bytes:
                raise RuntimeError(f"websocket got {result['bytes']} of {ws_bytes} bytes")
            return result["seconds"], result["bytes"]

        contenders = {
            "direct (baseline)": (
                f"http://127.0.0.1:{upstream_port}",
                None,
                None,
                f"http://127.0.0.1:{ws_port}",
                None,
                None,
                f"http://127.0.0.1:{upload_port}",
            ),
            "nginx proxy, 1 worker (baseline)": (
                f"http://127.0.0.1:{nginx_port}",
                None,
                nginx_pid,
                f"http://127.0.0.1:{nginx_port}",
                None,
                None,
                None,
            ),
            "aether preview proxy": (
                f"http://127.0.0.1:{aether_port}",
                aether_host,
                aether_pid,
                f"http://127.0.0.1:{aether_port}",
                aether_ws_host,
                aether_upload_host,
                None,
            ),
        }
        tests = {
            f"download {args.gib:g} GiB": lambda c: download(c[0], c[1]),
            f"upload {args.gib:g} GiB": lambda c: upload(c[0], c[5], c[6]),
            f"websocket stream {args.ws_mib} MiB": lambda c: websocket(c[3], c[4]),
        }
        print(
            f"bulk: {args.rounds} interleaved rounds, median; proxy on CPU {PROXY_CPU}, "
            f"clients and upstreams on CPU {CLIENT_CPU}",
            flush=True,
        )
        for test, run in tests.items():
            results = {name: [] for name in contenders}
            for _ in range(args.rounds):
                for name, contender in contenders.items():
                    pid = contender[2]
                    cpu0 = cpu_seconds(pid) if pid else 0.0
                    seconds, moved = run(contender)
                    cpu = cpu_seconds(pid) - cpu0 if pid else float("nan")
                    results[name].append((moved / seconds / 1e6, cpu / (moved / (1 << 30))))
            print(f"{test}:")
            medians = {}
            for name, values in results.items():
                medians[name] = statistics.median(v[0] for v in values)
                cpu = statistics.median(v[1] for v in values)
                cpu_text = "  -  " if cpu != cpu else f"{cpu:5.2f}"
                runs = ", ".join(f"{v[0]:,.0f}" for v in values)
                print(f"  {name:<34} {medians[name]:>7,.0f} MB/s  proxy CPU s/GiB {cpu_text}  runs: {runs}")
            ratio = medians["aether preview proxy"] / medians["nginx proxy, 1 worker (baseline)"]
            print(f"  aether / nginx = {ratio:.2f} (goal >= 0.7: {'met' if ratio >= 0.7 else 'missed'})", flush=True)
    finally:
        bench.close()


if __name__ == "__main__":
    sys.exit(main())
