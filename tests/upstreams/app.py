"""A test app behind the preview proxy: reports what reached it, and misbehaves on demand.

Usage: app.py PORT [BIND]. Paths:
  /echo...    JSON of the request as received (method, target, headers, body size, peer port)
  /big?n=N    N bytes of body, streamed from one buffer
  /upload     reads the request body (any framing) and answers its size
  /sse        an event, then (once FLAG exists, given as ?flag=) a second one, chunked
  /headers    several Set-Cookie, and a header named in Connection
  /slow       never answers; writes ?reached= once the request is in, ?flag= when the proxy
              closes the connection
  /close      a body without a length: it ends when the connection closes
  /204        no content
  /crash      closes the connection without answering
  /partial    promises 100 bytes, sends 10, closes
  /loop?to=H:P&host=X  forwards the request, headers and all, to H:P as Host X (a proxy
              misconfigured onto itself)
"""

import http.client
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

CHUNK = b"x" * (1 << 20)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _query(self):
        return {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}

    def _send(self, status, body, ctype="application/json", extra=()):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            total = 0
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return total
                remaining = size
                while remaining:
                    remaining -= len(self.rfile.read(min(remaining, 1 << 20)))
                total += size
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        remaining = length
        while remaining:
            got = self.rfile.read(min(remaining, 1 << 20))
            if not got:
                break
            remaining -= len(got)
        return length - remaining

    def do_GET(self):
        path = urlsplit(self.path).path
        query = self._query()
        if path.startswith("/echo"):
            size = self._read_body()
            report = {
                "method": self.command,
                "target": self.path,
                "headers": [[k, v] for k, v in self.headers.items()],
                "body": size,
                "peer_port": self.client_address[1],
            }
            self._send(200, json.dumps(report).encode())
        elif path == "/big":
            n = int(query["n"])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            while n:
                piece = CHUNK if n >= len(CHUNK) else CHUNK[:n]
                self.wfile.write(piece)
                n -= len(piece)
        elif path == "/upload":
            self._send(200, json.dumps({"received": self._read_body()}).encode())
        elif path == "/sse":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self._chunk(b"data: first\n\n")
            deadline = time.monotonic() + 10
            while not os.path.exists(query["flag"]) and time.monotonic() < deadline:
                time.sleep(0.01)
            self._chunk(b"data: second\n\n")
            self._chunk(b"")
        elif path == "/headers":
            self._send(
                200,
                b"{}",
                extra=[
                    ("Set-Cookie", "a=1; Path=/"),
                    ("Set-Cookie", "b=2; Path=/"),
                    ("Connection", "X-Secret"),
                    ("X-Secret", "hop"),
                    ("Keep-Alive", "timeout=5"),
                    ("X-Kept", "yes"),
                ],
            )
        elif path == "/slow":
            if "reached" in query:
                with open(query["reached"], "w") as f:
                    f.write("reached")
            try:
                while self.rfile.read(1):
                    pass
            except OSError:
                pass
            with open(query["flag"], "w") as f:
                f.write("closed")
            self.close_connection = True
        elif path == "/close":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"hello-close")
            self.close_connection = True
        elif path == "/204":
            self.send_response(204)
            self.end_headers()
        elif path == "/crash":
            self.close_connection = True
        elif path == "/partial":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.wfile.flush()
            self.close_connection = True
        elif path == "/loop":
            host, port = query["to"].rsplit(":", 1)
            conn = http.client.HTTPConnection(host, int(port), timeout=5)
            headers = dict(self.headers.items())
            headers["Host"] = query["host"]
            conn.request(self.command, self.path, headers=headers)
            reply = conn.getresponse()
            self._send(reply.status, reply.read(), reply.getheader("Content-Type", "text/html"))
        else:
            self._send(404, b'{"error": "no such path"}')

    def _chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET


if __name__ == "__main__":
    port = int(sys.argv[1])
    bind = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    server_class = ThreadingHTTPServer
    if ":" in bind:
        import socket

        class V6(ThreadingHTTPServer):
            address_family = socket.AF_INET6

        server_class = V6
    server_class.daemon_threads = True
    server_class((bind, port), Handler).serve_forever()
