"""Logs on stderr, JSON or logfmt: one line per record whatever it holds, the token never
printed, a bad --log-format refused. Real processes, their real stderr."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading

import pytest
from support import AETHER, ROOT
from support.ports import PortTaken, on_a_free_port
from support.processes import aether, terminate
from support.waiting import wait_for

# A logfmt value: bare, or quoted with backslash escapes inside.
_PAIR = re.compile(r'([^\s="]+)=(?:"((?:[^"\\]|\\.)*)"|([^\s"]*))(?:\s|$)')
_UNESCAPE = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}


def parse_logfmt(line: str) -> dict[str, str]:
    """The pairs of one logfmt line; the whole line must be pairs."""
    fields, end = {}, 0
    for match in _PAIR.finditer(line):
        assert match.start() == end, f"not logfmt at {end}: {line!r}"
        end = match.end()
        key, quoted, bare = match.groups()
        if quoted is None:
            fields[key] = bare
        else:
            fields[key] = re.sub(
                r"\\(u[0-9a-f]{4}|.)",
                lambda m: chr(int(m[1][1:], 16)) if m[1][0] == "u" and len(m[1]) == 5 else _UNESCAPE[m[1]],
                quoted,
            )
    assert end == len(line), f"not logfmt at {end}: {line!r}"
    return fields


PARSE = {"json": json.loads, "logfmt": parse_logfmt}

LOGGING = r"""
import logging, sys
from aether import log
log.setup("debug", sys.argv[1])
log.redact("s3cret-token")
logger = logging.getLogger("aether.test")
logger.info('two\nlines "quoted" a=b \x1b[31mred\x1b[0m s3cret-token \x85\u2028\u2029', extra={"port": 8080, "empty": "", "none": None,
            "flag": True, "path": "/a b", "pids": [1, 2]})
try:
    raise ValueError("bad\nvalue")
except ValueError:
    logger.exception("failed")
"""


@pytest.mark.parametrize("fmt", ["json", "logfmt"])
def test_every_record_is_one_line_with_everything_escaped(fmt):
    result = subprocess.run([sys.executable, "-c", LOGGING, fmt], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()  # str.splitlines breaks at NEL, U+2028 and U+2029 too
    assert len(lines) == 2, lines
    assert "\x1b" not in result.stderr, "control characters are escaped, never written"
    first, second = map(PARSE[fmt], lines)
    assert first["msg"] == 'two\nlines "quoted" a=b \x1b[31mred\x1b[0m [redacted] \x85\u2028\u2029'
    assert (first["ts"][-1], first["level"], first["logger"]) == ("Z", "info", "aether.test")
    if fmt == "json":
        assert (first["port"], first["empty"], first["none"], first["flag"], first["pids"]) == (8080, "", None, True, [1, 2])
    else:
        assert lines[0].startswith("ts=") and " level=info logger=aether.test msg=" in lines[0]
        assert (first["port"], first["empty"], first["none"], first["flag"], first["pids"]) == (
            "8080",
            "",
            "null",
            "true",
            "[1,2]",
        )
        assert first["path"] == "/a b"
    assert second["msg"] == "failed" and second["level"] == "error"
    assert second["exc"].startswith("Traceback (most recent call last):\n")
    assert second["exc"].endswith("ValueError: bad\nvalue")
    assert "s3cret-token" not in result.stderr


@pytest.mark.parametrize("args, env", [(["--log-format", "xml"], {}), ([], {"AETHER_LOG_FORMAT": "XML"})])
def test_bad_log_format_is_a_usage_error(args, env):
    result = aether(*args, "ports", "list", env={**os.environ, **env})
    assert result.returncode == 2
    source = "--log-format" if args else "AETHER_LOG_FORMAT"
    assert result.stderr.startswith(f"aether: {source} must be json or logfmt, not ")
    assert len(result.stderr.splitlines()) == 1 and result.stdout == ""


def test_serve_logs_logfmt_without_the_token(tmp_path):
    token = "tok-" + os.urandom(8).hex()
    env = {**os.environ, "AETHER_LOG_FORMAT": "logfmt"}
    lines: list[str] = []

    def start(port: int):
        lines.clear()
        proc = subprocess.Popen(
            [
                *AETHER,
                "--log-level",
                "debug",
                "serve",
                "--port",
                str(port),
                "--backend",
                "sockdiag",
                "--state-dir",
                str(tmp_path),
                "--token",
                token,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if " msg=serving " in line:
                return proc, port
        proc.wait()
        if any("address already in use" in line for line in lines):
            raise PortTaken(port)
        raise AssertionError(f"aether serve did not start: {lines}")

    proc, port = on_a_free_port(start)

    def read_rest():
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=read_rest, daemon=True)
    reader.start()
    try:
        # A malformed header: Tornado's own logger prints such a request whole.
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(f"GET /metrics HTTP/1.1\r\nAuthorization: Bearer {token}\x01\r\n\r\n".encode())
            raw.settimeout(5)
            raw.recv(1024)
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(f"GET /healthz?token={token} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            raw.settimeout(5)
            while raw.recv(4096):
                pass
        # Stopped only once the request is logged: its line comes after the answer.
        wait_for(lambda: any(" msg=request " in line and " path=/healthz " in f"{line} " for line in lines))
    finally:
        assert terminate(proc) == 0
        reader.join(5)
    records = [parse_logfmt(line) for line in lines if line]
    assert {"serving", "request", "stopped"} <= {r["msg"] for r in records}
    assert any(r["msg"] == "request" and r["path"] == "/healthz" and r["status"] == "200" for r in records)
    assert any(r["logger"] == "tornado.general" and "Bearer [redacted]" in r["msg"] for r in records)
    assert token not in "\n".join(lines)


def test_under_systemd_the_banner_names_the_token_file_only(tmp_path):
    """stdout is the journal under systemd ($JOURNAL_STREAM): the banner must not carry the token."""
    env = {**os.environ, "JOURNAL_STREAM": "8:12345"}

    def start(port: int):
        proc = subprocess.Popen(
            [*AETHER, "serve", "--port", str(port), "--backend", "sockdiag", "--state-dir", str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        first = proc.stdout.readline()
        if not first and "address already in use" in proc.stderr.read():
            proc.wait()
            raise PortTaken(port)
        return proc, first

    proc, first = on_a_free_port(start)
    try:
        banner = [first] + [proc.stdout.readline() for _ in range(6)]
    finally:
        assert terminate(proc) == 0
    token = (tmp_path / "token").read_text().strip()
    assert token and not any(token in line for line in banner), banner
    assert banner[2].split() == ["token:", "in", str(tmp_path / "token")]
    assert banner[6].rstrip().endswith("/?token=TOKEN")
