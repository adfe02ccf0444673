"""aether.ports.detect against real servers: Python's http.server plain and over ssl, node's
http and https, nginx plain and with ssl, a PostgreSQL-like server (answers a byte that is not
HTTP; or, as PostgreSQL does with bytes it cannot parse, closes), one that speaks first, one
that answers only after a delay, one that accepts and never answers, and a burst of listeners
that never accept. Certificates are self-signed (conftest's ``cert``)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.listeners import Listeners
from support.ports import free_port
from support.processes import tool
from support.waiting import wait_for

from aether.ports import detect
from aether.ports.detect import HTTP, HTTPS, TCP, Detector, classify_answer

PY = sys.executable


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    listeners = Listeners(tmp_path_factory.mktemp("servers"))
    yield listeners
    listeners.stop_all()


def run(coro, loop: str = "asyncio", timeout: float = 120):
    """On asyncio's loop or on uvloop, which ``aether serve`` runs on."""
    factory = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(asyncio.wait_for(coro, timeout))


def look_once(port: int, loop: str = "asyncio", **kw) -> detect.Detection:
    return run(Detector(**kw).detect("127.0.0.1", port), loop)


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request) -> str:
    return request.param


#: Speaks first, as sshd does; appends the length of whatever it then receives to a log.
BANNER = """
import socket, sys
port, log = int(sys.argv[1]), sys.argv[2]
s = socket.socket(); s.bind(("127.0.0.1", port)); s.listen()
while True:
    c, _ = s.accept()
    c.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\\r\\n")
    c.settimeout(5)
    received = b""
    try:
        while chunk := c.recv(4096):
            received += chunk
    except OSError:
        pass
    with open(log, "ab") as f:
        f.write(b"%d\\n" % len(received))
    c.close()
"""

#: Listens at once, answers HTTP only after a delay (a dev server's first compile); writes
#: CLOCK_MONOTONIC when it starts answering to a file.
SLOW = """
import http.server, socket, sys, time
port, delay, mark = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
s = socket.socket(); s.bind(("127.0.0.1", port)); s.listen()
time.sleep(delay)
open(mark, "w").write(repr(time.monotonic()))
server = http.server.HTTPServer(("127.0.0.1", port), http.server.BaseHTTPRequestHandler, bind_and_activate=False)
server.socket = s
server.serve_forever()
"""

#: A forwarder whose far end is not up yet (docker-proxy, ``ssh -L``): accepts, and after a
#: round trip to nowhere (120 ms, past the banner wait) closes without reading; after a delay
#: the far end is up and it answers HTTP. Writes CLOCK_MONOTONIC then to a file.
FORWARDER = """
import http.server, socket, sys, time
port, delay, mark = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
s = socket.socket(); s.bind(("127.0.0.1", port)); s.listen()
up = time.monotonic() + delay
s.settimeout(0.05)
while time.monotonic() < up:
    try:
        c, _ = s.accept()
    except TimeoutError:
        continue
    time.sleep(0.12)
    c.close()
s.settimeout(None)
open(mark, "w").write(repr(time.monotonic()))
server = http.server.HTTPServer(("127.0.0.1", port), http.server.BaseHTTPRequestHandler, bind_and_activate=False)
server.socket = s
server.serve_forever()
"""

#: Accepts every connection and never answers.
MUTE = """
import socket, sys
s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
held = []
while True:
    held.append(s.accept()[0])
"""


def nginx_conf(tmp: Path, port: int, cert: tuple[str, str] | None) -> Path:
    conf = tmp / f"nginx-{port}.conf"
    ssl = f"ssl; ssl_certificate {cert[0]}; ssl_certificate_key {cert[1]};" if cert else ";"
    temps = " ".join(f"{kind}_temp_path {tmp}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf.write_text(
        f"daemon off; master_process off; user root; pid {tmp}/nginx-{port}.pid; error_log stderr error;\n"
        f"events {{ worker_connections 64; }}\n"
        f"http {{ access_log off; {temps}\n"
        f'  server {{ listen 127.0.0.1:{port} {ssl} return 200 "ok"; }} }}\n'
    )
    return conf


# -- real servers --------------------------------------------------------------------------


def test_python_http_server_is_http(pool, loop):
    port = free_port()
    pool.http_server(port)
    found = look_once(port, loop)
    assert (found.protocol, found.reason, found.status) == (HTTP, "http", 501)  # http.server has no OPTIONS
    assert found.ready is not None and found.attempts == 1


def test_ipv6_loopback(pool):
    port = free_port(socket.AF_INET6)
    pool.http_server(port, bind="::1")
    found = run(Detector().detect("::1", port))
    assert (found.protocol, found.status) == (HTTP, 501)


def test_python_ssl_server_is_https(pool, cert, loop):
    port = pool.python_https(cert).port
    found = look_once(port, loop)
    assert (found.protocol, found.reason) == (HTTPS, "tls")
    assert found.ready is not None


def test_node_http_and_https(pool, cert):
    plain, tls = free_port(), free_port()
    pool.node(plain)
    pool.node_https(cert, tls)
    assert (look_once(plain).protocol, look_once(tls).protocol) == (HTTP, HTTPS)


def test_nginx_ssl_is_https_though_it_answers_plain_http_with_400(pool, cert, tmp_path, loop):
    port = free_port()
    conf = nginx_conf(tmp_path, port, cert)
    pool.spawn([tool("nginx"), "-c", str(conf), "-p", str(tmp_path)], port)
    # What a client sending plain HTTP gets: the answer that must not decide.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(detect.REQUEST)
        assert s.recv(64).startswith(b"HTTP/1.1 400")
    found = look_once(port, loop)
    assert (found.protocol, found.reason) == (HTTPS, "tls")


def test_nginx_plain_is_http(pool, tmp_path):
    port = free_port()
    conf = nginx_conf(tmp_path, port, None)
    pool.spawn([tool("nginx"), "-c", str(conf), "-p", str(tmp_path)], port)
    found = look_once(port)
    assert found.protocol == HTTP and found.status is not None


def test_postgres_like_answer_is_tcp(pool, tmp_path):
    log = tmp_path / "pg.log"
    port = pool.postgres_like(log=log).port
    found = look_once(port)
    assert (found.protocol, found.reason, found.sample) == (TCP, "answer", b"N")
    assert found.ready is None and found.attempts == 1


def test_server_that_closes_on_every_probe_is_tcp_after_a_few_looks(pool, tmp_path):
    log = tmp_path / "pg.log"
    port = pool.postgres_like(mode="close", log=log).port
    found = look_once(port, deadline=30)
    assert (found.protocol, found.reason, found.ready) == (TCP, "closed", None)
    # It reads each request and closes cleanly: HANGUPS such looks in a row, of two
    # connections each (the plain request, then a ClientHello), and it is tcp long before the
    # deadline (PostgreSQL's log gets six lines, not a minute of them).
    assert found.attempts == detect.HANGUPS
    # Each of them reached the server, the request and then the ClientHello. (Any other aether
    # on the host looks at the port too, so the log may hold more.)
    assert wait_for(lambda: log.exists() and len(log.read_text().split()) >= 2 * found.attempts, 10)


def test_a_reset_as_the_banner_wait_ends_is_a_closed_look_not_a_crash():
    """A port that resets the connection while the loop is held (a busy server's loop) has its
    reset and the end of the banner wait come due together: the look finds the connection
    closed, and sends nothing into it (on uvloop that write raised RuntimeError, and the
    port's detection died with a traceback). Twenty rounds: the coincidence is the kernel's
    and the loop's to order, most rounds hit it."""
    import struct
    import threading

    import uvloop

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    go, reset = threading.Event(), threading.Event()

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed at the end of the test
            go.wait(10)
            go.clear()
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # a reset, not a FIN
            reset.set()

    class Held(Detector):
        """Holds the loop, once the connection is open, until the port has reset it."""

        async def _open(self, host, port):
            opened = await super()._open(host, port)

            def hold() -> None:
                go.set()
                reset.wait(10)
                reset.clear()

            asyncio.get_running_loop().call_soon(hold)
            return opened

    threading.Thread(target=serve, daemon=True).start()
    try:
        for _ in range(20):
            found = uvloop.run(Held(banner_wait=1e-6).look("127.0.0.1", port, 0.2))
            assert (found.protocol, found.reason) in ((None, "closed"), (None, "silent")), found
    finally:
        listener.close()


def test_server_that_speaks_first_is_tcp_and_is_sent_nothing(pool, tmp_path):
    port, log = free_port(), tmp_path / "banner.log"
    pool.spawn([PY, "-c", BANNER, str(port), str(log)], port)
    found = look_once(port)
    assert (found.protocol, found.reason) == (TCP, "banner")
    assert found.sample.startswith(b"SSH-2.0-")
    assert wait_for(lambda: log.exists() and log.read_text().split()) == ["0"]


def test_slow_server_is_ready_when_it_first_answers(pool, tmp_path, loop):
    port, mark = free_port(), tmp_path / "answering"
    pool.spawn([PY, "-c", SLOW, str(port), "1.5", str(mark)], port, stderr=subprocess.DEVNULL)

    async def main():
        opened = time.monotonic()
        return opened, await Detector().detect("127.0.0.1", port, opened)

    opened, found = run(main(), loop)
    answering = float(mark.read_text())
    assert found.protocol == HTTP
    # One connection, held until the server answered it: ready is when the server started
    # answering, on the same clock, not an attempt's timeout later.
    assert found.attempts == 1
    assert opened + found.ready >= answering


def test_a_forwarder_closing_before_its_app_is_up_is_not_ready_yet_not_tcp(pool, tmp_path, loop):
    """It closes after the banner wait, as PostgreSQL does, but without reading the request:
    a reset, not a hang-up, so it is looked at until it answers."""
    port, mark = free_port(), tmp_path / "answering"
    pool.spawn([PY, "-c", FORWARDER, str(port), "1.5", str(mark)], port, stderr=subprocess.DEVNULL)

    async def main():
        opened = time.monotonic()
        return opened, await Detector().detect("127.0.0.1", port, opened)

    opened, found = run(main(), loop)
    assert (found.protocol, found.reason) == (HTTP, "http"), found
    assert found.attempts > detect.HANGUPS and opened + found.ready >= float(mark.read_text())


def test_server_that_never_answers_is_retried_and_given_up_on(pool):
    port = free_port()
    pool.spawn([PY, "-c", MUTE, str(port)], port)
    found = look_once(port, deadline=1.5, refresh=0.4)
    assert (found.protocol, found.reason, found.ready) == (TCP, "silent", None)
    # A fresh connection every 0.4 s up to the deadline, then one last: bounded.
    assert 3 <= found.attempts <= 6


# -- the detector --------------------------------------------------------------------------


def test_burst_of_opens_is_looked_at_a_bounded_number_at_a_time():
    """1,000 listeners that never accept (their backlog completes the connection and nothing
    answers): never more than ``max_connections`` probe connections at once, every port
    given a verdict, none left open."""
    sockets = []
    try:
        for _ in range(1000):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen()
            sockets.append(s)
        ports = [s.getsockname()[1] for s in sockets]

        async def main():
            detector = Detector(max_connections=16, deadline=0.5, refresh=0.2, banner_wait=0.01)
            found = await asyncio.gather(*(detector.detect("127.0.0.1", port) for port in ports))
            return detector, found

        detector, found = run(main(), timeout=300)
        assert 1 <= detector.peak_connections <= 16
        assert detector.connections == 0
        assert {(f.protocol, f.reason) for f in found} == {(TCP, "silent")}
    finally:
        for s in sockets:
            s.close()


def test_start_reports_stop_cancels(pool):
    answering, mute = free_port(), free_port()
    pool.http_server(answering)
    pool.spawn([PY, "-c", MUTE, str(mute)], mute)

    async def main():
        results = []
        detector = Detector(results.append)
        detector.start(answering, "127.0.0.1")
        detector.start(answering, "127.0.0.1")  # once per port
        detector.start(mute, "127.0.0.1")
        assert detector.pending() == {answering, mute}
        while not results:
            await asyncio.sleep(0.01)
        assert detector.pending() == {mute}
        detector.stop(mute)
        await asyncio.sleep(0)  # let the cancellation run
        while detector.connections:
            await asyncio.sleep(0.01)
        return results, detector

    results, detector = run(main(), timeout=30)
    assert [(r.port, r.protocol) for r in results] == [(answering, HTTP)]
    assert detector.pending() == set()


def test_refused_port_is_retried_until_the_deadline():
    port = free_port()  # nothing listens
    found = look_once(port, deadline=0.5)
    assert (found.protocol, found.reason) == (TCP, "refused") and found.attempts >= 2


# -- the pure part -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"HTTP/1.1 200 OK\r\n", ("http", 200)),
        (b"HTTP/1.0 400 Bad Request", ("http", 400)),
        (b"HTTP/1.", ("http", None)),  # the server closed after a prefix
        (b"\x15\x03\x03\x00\x02\x02\x46", ("tls", None)),  # an alert record
        (b"\x16\x03\x03\x00\x7a\x02", ("tls", None)),  # a ServerHello
        (b"N", ("answer", None)),
        (b"-ERR unknown command", ("answer", None)),
        (b"SSH-2.0-OpenSSH", ("answer", None)),
        (b"HTTP/2 200", ("answer", None)),
    ],
)
def test_classify_answer(data, expected):
    assert classify_answer(data) == expected


def test_detection_json():
    found = detect.Detection(8443, HTTPS, 1.2346, "tls", 1)
    assert found.to_json() == {"port": 8443, "protocol": "https", "ready": 1235, "reason": "tls"}
    assert detect.Detection(5432, TCP, 0.1, "answer", 1).to_json()["ready"] is None


_LOOKS = {
    "http 200": detect.Look(HTTP, "http", 200),
    "http 400": detect.Look(HTTP, "http", 400),
    "tls record": detect.Look(None, "tls", sample=b"\x15\x03"),
    "closed": detect.Look(None, "closed"),
    "hangup": detect.Look(None, "hangup"),
    "silent": detect.Look(None, "silent"),
    "refused": detect.Look(None, "refused"),
    "answer": detect.Look(TCP, "answer", sample=b"N"),
    "banner": detect.Look(TCP, "banner", sample=b"SSH-2.0"),
}


@pytest.mark.parametrize(
    "plain, needed",
    [
        ("http 200", False),
        ("http 400", True),
        ("tls record", True),
        ("closed", True),
        ("silent", False),
        ("refused", False),
        ("answer", False),
        ("banner", False),
    ],
)
def test_needs_tls(plain, needed):
    assert detect.needs_tls(_LOOKS[plain]) is needed


@pytest.mark.parametrize(
    "plain, tls, verdict",
    [
        ("http 400", detect.Look(HTTPS, "tls"), (HTTPS, "tls")),  # nginx on a TLS port
        ("http 400", detect.Look(HTTP, "http", 400), (HTTP, "http")),  # a plain nginx: 400s both ways
        ("http 400", detect.Look(None, "closed"), (HTTP, "http")),
        ("closed", detect.Look(HTTPS, "tls"), (HTTPS, "tls")),  # node's https closes on plain HTTP
        ("closed", detect.Look(HTTPS, "tls-alert"), (HTTPS, "tls-alert")),
        ("closed", detect.Look(None, "closed"), (None, "closed")),  # PostgreSQL, or not ready: try again
        ("closed", detect.Look(None, "silent"), (None, "closed")),
        # Reset on the request, then bytes that are not TLS: a forwarder whose app came up
        # between the two looks (http.server answers a ClientHello with a page): look again.
        ("closed", detect.Look(TCP, "answer", sample=b"<!DOCTYPE"), (None, "closed")),
        ("hangup", detect.Look(TCP, "answer", sample=b"-ERR"), (TCP, "answer")),
        ("closed", detect.Look(HTTP, "http", 400), (HTTP, "http")),
        ("tls record", detect.Look(None, "closed"), (TCP, "answer")),
        ("tls record", detect.Look(HTTPS, "tls"), (HTTPS, "tls")),
    ],
)
def test_combine(plain, tls, verdict):
    found = detect.combine(_LOOKS[plain], tls)
    assert (found.protocol, found.reason) == verdict
