"""Real listening processes: http.server (plain and over ssl), node (http and https), nginx, a
PostgreSQL-like server that speaks no HTTP, and any python code."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from support.ports import PortTaken, held_sockets, listening_inodes, on_a_free_port
from support.processes import stop_daemon, tool
from support.waiting import wait_for

#: Seconds a listener has to start listening.
READY_TIMEOUT = 10

#: ``python - PORT CERT KEY``: http.server over ssl on 127.0.0.1:PORT.
PYTHON_HTTPS = """
import http.server, ssl, sys
port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
server = http.server.HTTPServer(("127.0.0.1", port), http.server.SimpleHTTPRequestHandler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"""

#: ``node - PORT CERT KEY``: node's https on 127.0.0.1:PORT, answering "ok".
NODE_HTTPS = """
const fs = require('fs');
const [port, cert, key] = process.argv.slice(1);
require('https').createServer({cert: fs.readFileSync(cert), key: fs.readFileSync(key)}, (q, s) => s.end('ok'))
  .listen(Number(port), '127.0.0.1');
"""

#: ``python - PORT MODE [LOG]``: answers whatever startup message it gets with one byte, as
#: PostgreSQL answers an SSLRequest ('N': no TLS here); with MODE "close", closes instead, as
#: PostgreSQL does with bytes it cannot parse as a startup packet. It reads what has come, as
#: PostgreSQL reads into its 8 KiB buffer, so that its close is a clean one (a close that left
#: bytes unread would be a reset). Appends the length of what it received to LOG, when given one.
POSTGRES_LIKE = """
import socket, sys
port, mode, log = int(sys.argv[1]), sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port)); s.listen()
while True:
    c, _ = s.accept()
    c.settimeout(5)
    try:
        data = c.recv(65536)
        if log:
            with open(log, "ab") as f:
                f.write(b"%d\\n" % len(data))
        if mode == "answer" and data:
            c.sendall(b"N")
    except OSError:
        pass
    c.close()
"""


class Listeners:
    """Real listening processes, stopped at teardown (``stop_all``).

    ``http_server``, ``node`` and ``nginx`` listen on a free port of their choosing unless
    given one, and another if that one turns out taken; the port is the returned process's
    ``port``."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.procs: list[subprocess.Popen] = []
        self.daemons: list[int] = []  # pids of processes that are not our children

    def spawn(self, cmd: list[str], ready_port: int | None = None, sockets: int = 1, **kw) -> subprocess.Popen:
        """``cmd``, once it (or a process it started) listens on ``ready_port`` (with
        ``sockets`` sockets); PortTaken when it exits and another process listens there."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(cmd, **kw)
        self.procs.append(proc)
        if ready_port is not None:

            def ready() -> bool:
                if proc.poll() is not None:
                    return True
                # Its own sockets: the port listening is not enough, another process may hold it.
                return len(listening_inodes(ready_port) & held_sockets(proc.pid)) >= sockets

            wait_for(ready, READY_TIMEOUT)
            if proc.poll() is not None:
                if listening_inodes(ready_port):
                    raise PortTaken(f"port {ready_port} is taken by another process")
                raise AssertionError(f"{cmd} exited with {proc.returncode}")
            proc.port = ready_port
        return proc

    def python(self, code: str, ready_port: int | None = None, **kw) -> subprocess.Popen:
        """A python3 process running ``code``; waits for ``ready_port`` to listen."""
        return self.spawn([sys.executable, "-c", code], ready_port, **kw)

    def spawn_on(self, command, port: int | None = None, family: int = socket.AF_INET, **kw) -> subprocess.Popen:
        """``command(port)`` (an argv) spawned as by ``spawn``, on ``port`` or a free port of
        ``family`` of its own choosing (another one if that is taken); the port is the
        process's ``port``."""
        return self._on(port, lambda p: self.spawn(command(p), p, **kw), family)

    def _on(self, port: int | None, start, family: int = socket.AF_INET):
        if port is not None:
            try:
                return start(port)
            except PortTaken:
                raise AssertionError(f"port {port} was taken by another process") from None
        return on_a_free_port(start, family=family)

    def http_server(self, port: int | None = None, bind: str = "127.0.0.1") -> subprocess.Popen:
        return self._on(
            port,
            lambda p: self.spawn(
                [sys.executable, "-m", "http.server", str(p), "--bind", bind],
                p,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
        )

    def python_https(self, cert: tuple[str, str], port: int | None = None) -> subprocess.Popen:
        """http.server over ssl with ``cert`` (certificate, key)."""
        return self.spawn_on(lambda p: [sys.executable, "-c", PYTHON_HTTPS, str(p), *cert], port, stderr=subprocess.DEVNULL)

    def node_https(self, cert: tuple[str, str], port: int | None = None) -> subprocess.Popen:
        """node's https with ``cert`` (certificate, key)."""
        return self.spawn_on(lambda p: [tool("node"), "-e", NODE_HTTPS, str(p), *cert], port)

    def postgres_like(self, port: int | None = None, mode: str = "answer", log: Path | None = None) -> subprocess.Popen:
        """A server that speaks no HTTP (``POSTGRES_LIKE``): it answers one byte, or with
        ``mode="close"`` closes; each connection's received length appended to ``log``."""
        extra = [str(log)] if log else []
        return self.spawn_on(lambda p: [sys.executable, "-c", POSTGRES_LIKE, str(p), mode, *extra], port)

    def node(self, port: int | None = None) -> subprocess.Popen:
        node = tool("node")

        def start(p: int) -> subprocess.Popen:
            code = f"require('http').createServer((q, s) => s.end('ok')).listen({p}, '127.0.0.1')"
            return self.spawn([node, "-e", code], p)

        return self._on(port, start)

    def nginx(self, port: int | None = None, daemon: bool = False):
        """nginx (a master, two workers) on 127.0.0.1 and [::1]; its Popen. With ``daemon``,
        in nginx's default mode instead: the process started listens, forks the master and
        exits; ``(master's pid, port)`` once the master has settled (its pid file written)."""
        nginx = tool("nginx")

        def start(p: int):
            conf, pid_file = self.tmp / f"nginx-{p}.conf", self.tmp / f"nginx-{p}.pid"
            conf.write_text(
                f"""
{"" if daemon else "daemon off;"} master_process on; worker_processes 2; user root;
pid {pid_file}; error_log stderr error;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {self.tmp}/body; proxy_temp_path {self.tmp}/proxy;
  fastcgi_temp_path {self.tmp}/fcgi; uwsgi_temp_path {self.tmp}/uwsgi; scgi_temp_path {self.tmp}/scgi;
  server {{ listen 127.0.0.1:{p}; listen [::1]:{p}; return 200 "ok"; }}
}}
"""
            )
            if not daemon:
                # Both families: with one address taken, nginx listens on the other, then exits.
                return self.spawn([nginx, "-c", str(conf), "-p", str(self.tmp)], p, sockets=2)
            # Not a pipe: the master inherits it and would hold it open.
            errors = self.tmp / f"nginx-{p}.stderr"
            with errors.open("w") as stderr:
                started = subprocess.run(
                    [nginx, "-c", str(conf), "-p", str(self.tmp)], stdout=subprocess.DEVNULL, stderr=stderr, timeout=20
                )
            if started.returncode != 0:
                if "Address already in use" in errors.read_text():
                    raise PortTaken(f"port {p} is taken by another process")
                raise AssertionError(f"nginx did not start: {errors.read_text()}")
            # The master writes its pid file after the parent has exited.
            master = int(wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 10))
            self.daemons.append(master)
            return master, p

        return self._on(port, start)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for pid in self.daemons:
            stop_daemon(pid)
