"""Fleet mode end to end: a real ``redis-server``, two VMs as network namespaces (each a veth
pair away) running ``aether serve --fleet-redis`` with the eBPF probe inside, two ``aether
gateway`` processes on loopback, real clients (http.client, raw sockets, ``websockets``, one
Chromium page).

The VMs and gateways are shared by the module (each start compiles the probe); a test that
breaks one (a SIGKILL, a link down, Redis restarted empty) puts it back before it ends.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from support import ROOT
from support.ebpf import need_ebpf
from support.fleet import DOMAIN, Gateway
from support.netns import Host
from support.processes import terminate
from support.redis import RedisServer
from support.servers import Server
from support.waiting import wait_for

pytestmark = pytest.mark.ebpf  # every VM runs the probe

VM_PORT = 3001  # each VM is a host of its own: the same port in each

#: The workspaces' app: a page, its headers as seen, a WebSocket echo; "ready" once listening.
APP = r"""
import asyncio, sys
import tornado.web, tornado.websocket
name, port = sys.argv[1], int(sys.argv[2])
PAGE = '''<!doctype html><title>loading</title><script>
const ws = new WebSocket("ws://" + location.host + "/ws");
ws.onopen = () => ws.send("hi");
ws.onmessage = (e) => { document.title = "echo:" + e.data; };
ws.onerror = () => { document.title = "error"; };
</script>'''
class Root(tornado.web.RequestHandler):
    def get(self):
        self.write(f"app {name} {port}")
    def post(self):
        self.write(b"got " + self.request.body)
class Events(tornado.web.RequestHandler):
    async def get(self):
        self.set_header("Content-Type", "text/event-stream")
        self.write("data: one\n\n")
        await self.flush()
        await asyncio.Event().wait()  # the stream stays open: only a streaming proxy shows "one"
class Headers(tornado.web.RequestHandler):
    def get(self):
        self.write({"uri": self.request.uri, "headers": [[k.lower(), v] for k, v in self.request.headers.get_all()]})
class Page(tornado.web.RequestHandler):
    def get(self):
        self.write(PAGE)
class Echo(tornado.websocket.WebSocketHandler):
    def check_origin(self, origin):
        return True
    def on_message(self, message):
        self.write_message(message)
async def main():
    app = tornado.web.Application([(r"/", Root), (r"/headers", Headers), (r"/page", Page), (r"/ws", Echo), (r"/events", Events)])
    app.listen(port, "0.0.0.0")
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


class VM:
    """A workspace VM: a host of its own running ``aether serve`` in fleet mode, and its apps."""

    def __init__(self, name: str, project: str, redis_url: str, key_file: str, state_dir, host: Host):
        self.name, self.project, self.prefix = name, project, project[:6]
        self.redis_url, self.key_file, self.state_dir, self.host = redis_url, key_file, state_dir, host
        self.apps: dict[int, subprocess.Popen] = {}
        self.server: Server | None = None

    def start(self) -> VM:
        self.server = Server(
            "ebpf",
            self.state_dir,
            "--host",
            "0.0.0.0",
            "--preview-domain",
            DOMAIN,
            "--project-id",
            self.project,
            "--fleet-redis",
            self.redis_url,
            "--fleet-advertise",
            f"{self.host.address}:{VM_PORT}",
            "--fleet-key-file",
            self.key_file,
            port=VM_PORT,
            wrap=self.host.wrap,
        )
        return self

    @property
    def token(self) -> str:
        return self.server.token

    def preview(self, port: int) -> str:
        return f"{port}-{self.prefix}.{DOMAIN}"

    def app(self, port: int) -> subprocess.Popen:
        proc = subprocess.Popen(
            [*self.host.wrap, sys.executable, "-c", APP, self.name, str(port)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
        )
        assert proc.stdout.readline() == "ready\n"
        self.apps[port] = proc
        return proc

    def stop_app(self, port: int) -> None:
        terminate(self.apps.pop(port))

    def connect(self):
        """The workspace's WebSocket API, straight to the VM."""
        from websockets.sync.client import connect

        url = f"ws://{self.host.address}:{VM_PORT}/workspaces/ws-test/ws"
        return connect(url, subprotocols=["Bearer", self.token], max_queue=None, open_timeout=5)

    def visibility(self, port: int, value: str) -> None:
        with self.connect() as ws:
            ws.send(json.dumps({"channel": "ports", "type": "visibility", "port": port, "visibility": value, "id": "v"}))
            while True:
                reply = json.loads(ws.recv(timeout=5))
                if reply.get("id") == "v":
                    assert reply["type"] == "visibility", reply
                    return

    def close(self) -> None:
        for port in list(self.apps):
            self.stop_app(port)
        if self.server is not None:
            self.server.stop()


def websocket(gateway: Gateway, host: str, headers: dict | None = None):
    """A ``websockets`` client to ``ws://host/ws`` through ``gateway`` (its socket connected to
    the gateway, its Host the preview's)."""
    from websockets.sync.client import connect

    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
    return connect(f"ws://{host}/ws", sock=sock, additional_headers=headers or {}, open_timeout=5)


def raw(port: int, request: bytes, address: str = "127.0.0.1") -> bytes:
    """``request`` as given on one connection; the response's status line."""
    with socket.create_connection((address, port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n", 1)[0]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    need_ebpf()
    tmp = tmp_path_factory.mktemp("fleet")
    key_file = tmp / "fleet.key"
    key_file.write_text(os.urandom(32).hex())
    key_file.chmod(0o600)
    hosts, vms, gateways, redis = [], [], [], None
    try:
        hosts = [Host(), Host()]
        redis = RedisServer(extra=("--bind", " ".join(["127.0.0.1", *(h.gateway for h in hosts)]))).start()
        for host, name, project in zip(hosts, ("a", "b"), ("aaaa11project", "bbbb22project")):
            url = f"redis://{host.gateway}:{redis.port}/0"
            vms.append(VM(name, project, url, str(key_file), tmp / name, host).start())
        gateways = [Gateway(redis.url, str(key_file)), Gateway(redis.url, str(key_file))]
        import types

        yield types.SimpleNamespace(redis=redis, a=vms[0], b=vms[1], gateways=gateways, key_file=str(key_file), tmp=tmp)
    finally:
        for gateway in gateways:
            gateway.stop()
        for vm in vms:
            vm.close()
        if redis is not None:
            redis.close()
        for host in hosts:
            host.remove()


def bearer(vm: VM) -> dict:
    return {"Authorization": f"Bearer {vm.token}"}


def on_every_gateway(fleet, host: str, status: int, headers: dict | None = None, timeout: float = 5.0) -> None:
    for gateway in fleet.gateways:
        wait_for(lambda g=gateway: g.status(host, headers=headers) == status, timeout)


def test_a_port_opened_is_served_by_every_gateway_and_closed_is_502(fleet):
    a = fleet.a
    host = a.preview(4000)
    on_every_gateway(fleet, host, 502, bearer(a))  # a workspace alive, nothing listening
    a.app(4000)
    on_every_gateway(fleet, host, 200, bearer(a))
    for gateway in fleet.gateways:
        status, response, body = gateway.get(host, headers=bearer(a))
        assert body == b"app a 4000"
    a.stop_app(4000)
    on_every_gateway(fleet, host, 502, bearer(a))
    status, response, body = fleet.gateways[0].get(host, headers=bearer(a))
    assert b"Nothing is listening yet" in body and b'http-equiv="refresh"' in body.replace(b"'", b'"')


def test_bodies_keep_alive_events_and_registry_names_through_a_gateway(fleet):
    a, g1 = fleet.a, fleet.gateways[0]
    a.app(4060)
    host = a.preview(4060)
    wait_for(lambda: g1.status(host, headers=bearer(a)) == 200)
    conn = http.client.HTTPConnection("127.0.0.1", g1.port, timeout=10)
    body = os.urandom(300_000).hex().encode()
    for _ in range(3):  # one connection, kept alive
        conn.request("POST", "/", body=body, headers={"Host": host, **bearer(a)})
        response = conn.getresponse()
        assert response.status == 200 and response.read() == b"got " + body
    conn.request("GET", "/events", headers={"Host": host, **bearer(a)})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
    assert response.readline() == b"data: one\n"  # while the stream stays open
    conn.close()
    # A registry name routes like its port, on every gateway, with the change.
    api = http.client.HTTPConnection(a.host.address, VM_PORT, timeout=10)
    api.request("PUT", "/api/ports/web", body=json.dumps({"port": 4060}), headers=bearer(a))
    assert api.getresponse().status == 200
    api.close()
    on_every_gateway(fleet, f"web-{a.prefix}.{DOMAIN}", 200, bearer(a))
    assert g1.get(f"web-{a.prefix}.{DOMAIN}", headers=bearer(a))[2] == b"app a 4060"
    assert g1.status(f"api-{a.prefix}.{DOMAIN}", headers=bearer(a)) == 404
    a.stop_app(4060)


def test_what_the_app_receives(fleet):
    """The fleet's credentials and a client's X-Aether-* and X-Forwarded-For never reach the
    app; the gateway's signature is taken out by the VM."""
    a, gateway = fleet.a, fleet.gateways[0]
    a.app(4001)
    host = a.preview(4001)
    wait_for(lambda: gateway.status(host, headers=bearer(a)) == 200)
    sent = {**bearer(a), "X-Aether-Fleet": "v1 t=1 a=token s=x", "X-Aether-Evil": "1", "X-Forwarded-For": "6.6.6.6"}
    status, _, body = gateway.get(host, "/headers?x=1", sent)
    assert status == 200
    seen = dict(json.loads(body)["headers"])
    assert "authorization" not in seen
    assert not [name for name in seen if name.startswith("x-aether-")]
    assert seen["x-forwarded-for"].split(",")[0].strip() == "127.0.0.1"
    assert "6.6.6.6" not in seen["x-forwarded-for"]
    assert seen["x-forwarded-host"] == host  # the VM gives the app its own Host, as without a fleet
    # ?token= becomes a cookie for this host; neither the token nor the cookie goes on.
    status, response, _ = gateway.get(host, f"/headers?token={a.token}&x=1")
    assert status == 302 and response.getheader("Location") == "/headers?x=1"
    cookie = response.getheader("Set-Cookie").split(";")[0]
    assert cookie.startswith("aether_fleet=") and "HttpOnly" in response.getheader("Set-Cookie")
    status, _, body = gateway.get(host, "/headers?x=1", {"Cookie": cookie + "; app=1"})
    assert status == 200
    got = json.loads(body)
    assert got["uri"] == "/headers?x=1"
    assert dict(got["headers"]).get("cookie") == "app=1"
    a.stop_app(4001)


def test_private_and_public_through_the_gateways(fleet):
    a = fleet.a
    a.app(4002)
    host = a.preview(4002)
    on_every_gateway(fleet, host, 200, bearer(a))
    g1, g2 = fleet.gateways
    status, response, _ = g1.get(host)
    assert status == 401 and response.getheader("WWW-Authenticate") == 'Bearer realm="aether preview"'
    status, response, _ = g1.get(host, f"/?token={a.token}")
    assert status == 302
    cookie = response.getheader("Set-Cookie").split(";")[0]
    assert g1.status(host, headers={"Cookie": cookie}) == 200
    assert g2.status(host, headers={"Cookie": cookie}) == 200  # any gateway verifies it, no lookup
    assert g1.status(a.preview(4003), headers={"Cookie": cookie}) == 401  # bound to its host
    assert g1.status(host, f"/?token={a.token}x") == 401
    # Public: to anyone, on every gateway, with the change.
    a.visibility(4002, "public")
    on_every_gateway(fleet, host, 200)
    # A WebSocket admitted as public closes when the port turns private.
    from websockets.exceptions import ConnectionClosed

    with websocket(g1, host) as ws:
        ws.send("one")
        assert ws.recv(timeout=5) == "one"
        a.visibility(4002, "private")
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=5)
    on_every_gateway(fleet, host, 401)
    assert g1.status(host, headers=bearer(a)) == 200
    a.stop_app(4002)


def test_hostile_credentials_hosts_and_requests(fleet):
    a, b = fleet.a, fleet.b
    g1 = fleet.gateways[0]
    a.app(4004)
    b.app(4004)
    host_a, host_b = a.preview(4004), b.preview(4004)
    on_every_gateway(fleet, host_b, 200, bearer(b))
    wait_for(lambda: g1.status(host_a, headers=bearer(a)) == 200)
    # A's token and cookie open nothing of B.
    assert g1.status(host_b, headers=bearer(a)) == 401
    assert g1.status(host_b, f"/?token={a.token}") == 401
    cookie = g1.get(host_a, f"/?token={a.token}")[1].getheader("Set-Cookie").split(";")[0]
    assert g1.status(host_b, headers={"Cookie": cookie}) == 401
    # Straight to the VM, from another host: refused unless a gateway signed it.
    vm = (a.host.address, VM_PORT)
    conn = http.client.HTTPConnection(*vm, timeout=10)
    conn.request("GET", "/", headers={"Host": host_a, **bearer(a)})
    response = conn.getresponse()
    assert response.status == 403 and b"gateways" in response.read()
    conn.close()
    from aether.fleet import auth

    keys = auth.FleetKeys.load(fleet.key_file)
    here = a.host.gateway

    def signed(access: bytes, when: float | None = None, target: bytes = b"/") -> int:
        signature = auth.sign(keys, access, b"GET", host_a.encode(), target, here.encode(), b"http", b"80", when)
        conn = http.client.HTTPConnection(*vm, timeout=10)
        headers = {"Host": host_a, "X-Forwarded-For": here, "X-Forwarded-Proto": "http", "X-Forwarded-Port": "80"}
        conn.request("GET", target.decode(), headers={**headers, "X-Aether-Fleet": signature.decode()})
        status = conn.getresponse().status
        conn.close()
        return status

    assert signed(b"token") == 200
    assert signed(b"public") == 401  # the VM holds the port private
    assert signed(b"token", time.time() - 120) == 403  # too old
    forged = auth.sign(auth.FleetKeys([b"x" * 32]), b"token", b"GET", host_a.encode(), b"/", here.encode(), b"http", b"80")
    conn = http.client.HTTPConnection(*vm, timeout=10)
    conn.request("GET", "/", headers={"Host": host_a, "X-Forwarded-For": here, "X-Forwarded-Proto": "http",
                                      "X-Forwarded-Port": "80", "X-Aether-Fleet": forged.decode()})  # fmt: skip
    assert conn.getresponse().status == 403
    conn.close()
    # Host tricks through the gateway.
    port = g1.port
    token = a.token.encode()
    auth_line = b"Authorization: Bearer " + token + b"\r\n"
    two_hosts = b"GET / HTTP/1.1\r\nHost: " + host_b.encode() + b"\r\nHost: " + host_a.encode() + b"\r\n" + auth_line + b"\r\n"
    assert raw(port, two_hosts).split()[1] == b"400"
    absolute = b"GET http://" + host_a.encode() + b"/ HTTP/1.1\r\nHost: " + host_a.encode() + b"\r\n" + auth_line + b"\r\n"
    assert raw(port, absolute).split()[1] == b"400"
    assert g1.status("04004-" + a.prefix + "." + DOMAIN, headers=bearer(a)) == 404  # a port has one spelling
    assert g1.status("4004-" + a.prefix + "." + DOMAIN + ".", headers=bearer(a)) == 404
    assert g1.status("4004-" + a.prefix + ".evil." + DOMAIN, headers=bearer(a)) == 404
    assert g1.status("4004-zzzzzz." + DOMAIN, headers=bearer(a)) == 404
    assert g1.status(host_a.upper() + ":80", headers=bearer(a)) == 200
    assert g1.status(host_a + ":8o", headers=bearer(a)) == 404
    a.stop_app(4004)
    b.stop_app(4004)


@pytest.mark.slow
def test_a_vm_killed_or_cut_off_is_503_on_every_gateway_then_back(fleet):
    a = fleet.a
    a.app(4010)
    host = a.preview(4010)
    on_every_gateway(fleet, host, 200, bearer(a))
    a.server.proc.send_signal(signal.SIGKILL)
    a.server.proc.wait()
    # Its deadline is 3 s after its last heartbeat; each gateway checks deadlines every 0.1 s.
    on_every_gateway(fleet, host, 503, bearer(a), timeout=4.5)
    status, response, body = fleet.gateways[0].get(host, headers=bearer(a))
    assert response.getheader("Retry-After") == "2" and b"Workspace unavailable" in body
    a.server.stop()
    a.start()
    on_every_gateway(fleet, host, 200, bearer(a), timeout=10)
    # The link down: no heartbeat reaches Redis.
    a.host.link(False)
    try:
        on_every_gateway(fleet, host, 503, bearer(a), timeout=4.5)
    finally:
        a.host.link(True)
    on_every_gateway(fleet, host, 200, bearer(a), timeout=10)
    a.stop_app(4010)


@pytest.mark.slow
def test_redis_killed_and_restarted_empty_fails_no_request(fleet):
    a, b = fleet.a, fleet.b
    a.app(4020)
    b.app(4020)
    hosts = [(a.preview(4020), bearer(a)), (b.preview(4020), bearer(b))]
    for host, headers in hosts:
        on_every_gateway(fleet, host, 200, headers)
    failures, done, count = [], threading.Event(), [0]

    def hammer():
        while not done.is_set():
            for gateway in fleet.gateways:
                for host, headers in hosts:
                    status = gateway.status(host, headers=headers)
                    count[0] += 1
                    if status != 200:
                        failures.append((gateway.port, host, status))

    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    try:
        fleet.redis.kill()
        for gateway in fleet.gateways:
            wait_for(lambda g=gateway: g.health()["status"] == "degraded")
            assert gateway.metric("aether_gateway_redis_up") == 0
        fleet.redis.start()
        redis = fleet.redis.client()
        wait_for(lambda: len(redis.hkeys("aether:{aether}:state")) == 2, 10)
        for gateway in fleet.gateways:
            wait_for(lambda g=gateway: g.health()["status"] == "ok", 10)
        # Requests go on past the grace of the workspaces the gateways kept unconfirmed (2 x
        # dead_after, 6 s): had the VMs' claims not confirmed them, they would turn 503 then.
        grace_ends = time.monotonic() + 2 * 3.0 + 0.5
        wait_for(lambda: time.monotonic() > grace_ends, 10, interval=0.1)
    finally:
        done.set()
        thread.join(30)
    assert failures == []
    for gateway in fleet.gateways:
        assert (
            gateway.metric('aether_gateway_reloads_total{reason="boot"}')
            + gateway.metric('aether_gateway_reloads_total{reason="reconnect"}')
            >= 1
        )
    a.stop_app(4020)
    b.stop_app(4020)


@pytest.mark.slow
def test_a_stream_trimmed_while_a_gateway_was_away_reloads(fleet):
    a = fleet.a
    g2 = fleet.gateways[1]
    redis = fleet.redis.client()
    gaps = g2.metric('aether_gateway_reloads_total{reason="gap"}')
    g1 = fleet.gateways[0]
    os.kill(g2.proc.pid, signal.SIGSTOP)
    try:
        # The first change reaches the XREAD the stopped gateway had pending; the second is
        # trimmed away before it asks again; the third is what it finds then.
        for port in (4030, 4031):
            a.app(port)
            wait_for(lambda p=port: g1.status(a.preview(p), headers=bearer(a)) == 200)
        redis.xtrim("aether:{aether}:changes", maxlen=0, approximate=False)
        a.app(4032)
        wait_for(lambda: g1.status(a.preview(4032), headers=bearer(a)) == 200)
    finally:
        os.kill(g2.proc.pid, signal.SIGCONT)
    wait_for(lambda: g2.status(a.preview(4031), headers=bearer(a)) == 200)
    for port in (4030, 4032):
        assert g2.status(a.preview(port), headers=bearer(a)) == 200
    assert g2.metric('aether_gateway_reloads_total{reason="gap"}') == gaps + 1
    for port in (4030, 4031, 4032):
        a.stop_app(port)


def test_a_gateway_killed_mid_websocket_the_client_reconnects_through_another(fleet):
    from websockets.exceptions import ConnectionClosed

    a = fleet.a
    a.app(4040)
    host = a.preview(4040)
    on_every_gateway(fleet, host, 200, bearer(a))
    spare = Gateway(fleet.redis.url, fleet.key_file)
    try:
        wait_for(lambda: spare.status(host, headers=bearer(a)) == 200)
        with websocket(spare, host, bearer(a)) as ws:
            ws.send("one")
            assert ws.recv(timeout=5) == "one"
            spare.kill()
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=5)
    finally:
        spare.stop()
    other = fleet.gateways[1]
    with websocket(other, host, bearer(a)) as ws:
        ws.send("two")
        assert ws.recv(timeout=5) == "two"
    a.stop_app(4040)


@pytest.mark.slow
def test_a_chromium_page_and_its_websocket_through_a_gateway(fleet):
    from support.browser import chromium

    a = fleet.a
    a.app(4050)
    g1 = fleet.gateways[0]
    host = a.preview(4050)
    wait_for(lambda: g1.status(host, headers=bearer(a)) == 200)
    driver = chromium(fleet.tmp / "profile", (f"--host-resolver-rules=MAP *.{DOMAIN} 127.0.0.1",))
    try:
        # The token once: the gateway's cookie opens the page and its same-origin WebSocket.
        driver.get(f"http://{host}:{g1.port}/page?token={a.token}")
        wait_for(lambda: driver.title == "echo:hi", 15)
        assert driver.current_url == f"http://{host}:{g1.port}/page"
    finally:
        driver.quit()
    a.stop_app(4050)


def test_healthz_and_metrics(fleet):
    g1 = fleet.gateways[0]
    health = g1.health()
    assert health["status"] == "ok" and health["redis"] == "up" and health["workspaces"] >= 2
    assert g1.metric("aether_gateway_workspaces_alive") >= 2
    assert g1.metric("aether_gateway_requests_total") > 0
    status, _, body = g1.get(f"127.0.0.1:{g1.port}", "/nothing")
    assert status == 404
