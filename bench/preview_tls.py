"""What a TLS upstream costs the preview proxy, beside a plain one in the same run: wrk -c1
(latency) and -c50 (throughput) of a 2-byte GET through aether's preview host to nginx (one
worker) on a plain port and to the same nginx config with ``ssl`` on another, interleaved, the
median run reported. The certificate is self-signed, made here by openssl.

    .venv/bin/python bench/preview_tls.py [--seconds 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import PY, ROOT

PROJECT_ID, PREFIX, TOKEN = "abc123def", "abc123", "secret"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nginx(tmp: Path, port: int, cert: tuple[Path, Path] | None) -> subprocess.Popen:
    ssl = f" ssl; ssl_certificate {cert[0]}; ssl_certificate_key {cert[1]};" if cert else ";"
    temps = " ".join(f"{kind}_temp_path {tmp}/{kind}-{port};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = tmp / f"nginx-{port}.conf"
    conf.write_text(
        f"daemon off; master_process off; user root; pid {tmp}/nginx-{port}.pid; error_log stderr error;\n"
        f"events {{ worker_connections 1024; }}\n"
        f"http {{ access_log off; keepalive_requests 1000000; {temps}\n"
        f'  server {{ listen 127.0.0.1:{port}{ssl} return 200 "ok"; }} }}\n'
    )
    return subprocess.Popen(["/usr/sbin/nginx", "-c", str(conf), "-p", str(tmp)], stdin=subprocess.DEVNULL)


def until(check, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("not ready")
        time.sleep(0.05)


def answers(server_port: int, port: int) -> bool:
    out = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", f"Authorization: Bearer {TOKEN}"]
        + ["-H", f"Host: {port}-{PREFIX}.preview.localhost", f"http://127.0.0.1:{server_port}/"],
        capture_output=True,
        text=True,
    )
    return out.stdout == "200"


def wrk(server_port: int, port: int, seconds: int, connections: int) -> tuple[float, float]:
    """requests/s and the median latency in ms."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-H", f"Authorization: Bearer {TOKEN}"]
    cmd += ["-H", f"Host: {port}-{PREFIX}.preview.localhost", f"http://127.0.0.1:{server_port}/"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    if re.search(r"Non-2xx or 3xx responses|Socket errors", out):
        raise RuntimeError(out)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    value, unit = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), float(value) * scale[unit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for tool in ("wrk", "curl", "openssl"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is needed")
    tmp = Path(tempfile.mkdtemp(prefix="aether-preview-tls-bench-"))
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        + ["-keyout", "key.pem", "-out", "cert.pem", "-days", "2", "-subj", "/CN=localhost"],
        cwd=tmp,
        check=True,
        capture_output=True,
    )
    plain_port, tls_port, server_port = free_port(), free_port(), free_port()
    procs = [nginx(tmp, plain_port, None), nginx(tmp, tls_port, (tmp / "cert.pem", tmp / "key.pem"))]
    serve = [PY, "-m", "aether", "serve", "--port", str(server_port), "--state-dir", str(tmp / "state")]
    serve += ["--project-id", PROJECT_ID, "--token", TOKEN]
    procs.append(subprocess.Popen(serve, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        for port in (plain_port, tls_port):
            until(lambda port=port: answers(server_port, port))
        for connections, what in ((1, "latency"), (50, "throughput")):
            runs: dict[str, list] = {"plain": [], "tls": []}
            for _ in range(args.rounds):
                runs["plain"].append(wrk(server_port, plain_port, args.seconds, connections))
                runs["tls"].append(wrk(server_port, tls_port, args.seconds, connections))
            plain = statistics.median(r[0] for r in runs["plain"]), statistics.median(r[1] for r in runs["plain"])
            tls = statistics.median(r[0] for r in runs["tls"]), statistics.median(r[1] for r in runs["tls"])
            print(
                f"wrk -c{connections} ({what}): plain upstream {plain[0]:,.0f} req/s p50 {plain[1]:.3f} ms; "
                f"TLS upstream {tls[0]:,.0f} req/s p50 {tls[1]:.3f} ms; TLS/plain req/s {tls[0] / plain[0]:.2f}, "
                f"p50 +{tls[1] - plain[1]:.3f} ms"
            )
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
