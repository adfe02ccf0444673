"""``aether gateway`` in a subprocess on a free loopback port, and requests to it with any
``Host`` (a preview host of ``DOMAIN`` or its own endpoints)."""

from __future__ import annotations

import http.client
import json
import subprocess
import threading

from support import AETHER, ROOT
from support.ports import PortTaken, on_a_free_port
from support.processes import terminate

#: The fleet's preview domain in the tests.
DOMAIN = "fleet.test"


class Gateway:
    """``aether gateway`` on a free loopback port (``/metrics`` public unless ``public`` is
    false); its stderr collected."""

    def __init__(self, redis_url: str, key_file: str, *extra: str, public: bool = True):
        self.args = (redis_url, key_file, *extra, *(["--metrics-public"] if public else []))
        self.start()

    def start(self) -> Gateway:
        redis_url, key_file, *extra = self.args

        def start(port: int) -> None:
            self.port = port
            cmd = [*AETHER, "gateway", "--redis", redis_url, "--host", "127.0.0.1", "--port", str(port)]
            cmd += ["--preview-domain", DOMAIN, "--fleet-key-file", key_file, *extra]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
            first = self.proc.stdout.readline()
            if not first.startswith("aether gateway on"):
                err = self.proc.stderr.read()
                self.proc.wait()
                if "address already in use" in err:
                    raise PortTaken(port)
                raise AssertionError(f"the gateway did not start: {first} {err}")
            self.log: list[str] = []
            threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()

        on_a_free_port(start)
        return self

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        terminate(self.proc)

    def get(self, host: str, path: str = "/", headers: dict | None = None, method: str = "GET"):
        """(status, response headers, body) of one request on a connection of its own."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, headers={"Host": host, **(headers or {})})
            response = conn.getresponse()
            return response.status, response, response.read()
        finally:
            conn.close()

    def status(self, host: str, path: str = "/", headers: dict | None = None) -> int | None:
        """The status, or None when the connection failed (a request in flight when its VM was
        found dead is reset)."""
        try:
            return self.get(host, path, headers)[0]
        except (OSError, http.client.HTTPException):
            return None

    def health(self) -> dict:
        return json.loads(self.get(f"127.0.0.1:{self.port}", "/healthz")[2])

    def metric(self, name: str) -> float:
        body = self.get(f"127.0.0.1:{self.port}", "/metrics")[2].decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(name))
