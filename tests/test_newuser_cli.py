"""The command line tried as a new user would: ``aether ports list --json`` says ``tcp`` for
a database-like port that hangs up on every HTTP request and ClientHello (PostgreSQL),
rather than null as for a port that has not answered yet."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from support import AETHER, ROOT

#: Reads what it is sent, then closes without a byte, as PostgreSQL does with an HTTP request.
HANGS_UP = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
while True:
    c, _ = s.accept()
    c.settimeout(5)
    try:
        c.recv(8)
    except OSError:
        pass
    c.close()
"""


def listed(tmp_path) -> dict[int, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AETHER_")}
    env["AETHER_STATE_DIR"] = str(tmp_path / "state")
    env["AETHER_WORKSPACE_ROOT"] = str(tmp_path)
    result = subprocess.run([*AETHER, "ports", "list", "--json"], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    return {row["port"]: row for row in json.loads(result.stdout)}


def test_ports_list_says_tcp_for_ports_that_hang_up(listeners, tmp_path):
    hangs_up = listeners.spawn_on(lambda p: [sys.executable, "-c", HANGS_UP, str(p)]).port
    http = listeners.http_server().port
    rows = listed(tmp_path)
    assert rows[hangs_up]["protocol"] == "tcp"
    assert rows[http]["protocol"] == "http"
