"""How the parts are wired, checked without sockets: every message type of the protocol has its
handler (and every handler a schema), and the lower layers never import the server."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from aether import protocol
from aether.ports.monitor import PortMonitor
from aether.server.app import WorkspaceServer
from aether.settings.serve import add_arguments, resolve


@pytest.fixture
def server(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = resolve(parser.parse_args(["--state-dir", str(tmp_path), "--workspace-id", "w"]))
    server = WorkspaceServer(settings, PortMonitor(backend="sockdiag", ignored=settings.monitor_ignored))
    yield server
    server.close_channels()
    server.registry_api.close()


def test_every_message_type_has_its_handler_and_every_handler_a_schema(server):
    assert set(server.channels) == set(protocol.CHANNELS)
    handled = {(name, kind) for name, channel in server.channels.items() for kind in channel.handlers}
    assert sorted(set(protocol.SCHEMAS) - handled) == [], "schema entries without a handler"
    assert sorted(handled - set(protocol.SCHEMAS)) == [], "handlers without a schema entry"
    assert all(channel.name == name for name, channel in server.channels.items())


def test_every_error_echo_names_a_field_of_its_schema():
    for key, fields in protocol.ECHOED.items():
        schema = {name.rstrip("?") for name in protocol.SCHEMAS[key]}
        assert set(fields) <= schema, key


class Recorder:
    allowed = None

    def __init__(self):
        self.sent: list = []

    def send(self, message) -> None:
        self.sent.append(message)


def test_a_refusal_is_answered_by_the_dispatcher_with_the_fields_the_protocol_echoes(server):
    """A handler raises; the reply carries the request's id, the echoed request field and the
    refusal's own fields, whatever the channel."""
    client = Recorder()
    server.channels["files"].on_open(client)
    server.dispatcher.receive(
        client, json.dumps({"channel": "terminal", "type": "input", "sessionId": "nope", "data": "x", "id": 4})
    )
    assert client.sent == [
        {"channel": "terminal", "type": "error", "code": "not_found", "message": "no terminal session nope", "id": 4}
    ]
    server.dispatcher.receive(client, json.dumps({"channel": "config", "type": "set", "config": {}, "id": "c"}))
    assert client.sent[-1] == {
        "channel": "config",
        "type": "error",
        "code": "invalid",
        "message": "config holds no key to change",
        "id": "c",
    }


#: Packages below the server: they may be used by the CLI, the doctor and each other, never
#: import the server (or Tornado, which only the server needs).
LOWER = (
    "aether.ports",
    "aether.files",
    "aether.terminal",
    "aether.agent",
    "aether.registry",
    "aether.attributes",
    "aether.fleet",
)
IMPORT_ALL = """
import importlib, pkgutil, sys
for name in sys.argv[1:]:
    package = importlib.import_module(name)
    for module in pkgutil.walk_packages(getattr(package, "__path__", []), name + "."):
        importlib.import_module(module.name)
print(sorted(n for n in sys.modules if n == "aether.server" or n.startswith(("aether.server.", "tornado"))))
"""


@pytest.mark.parametrize("package", [*LOWER, "aether.wire aether.protocol aether.errors"])
def test_lower_layers_never_import_the_server(package):
    found = subprocess.run([sys.executable, "-c", IMPORT_ALL, *package.split()], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]", f"{package} pulls in {found.stdout.strip()}"


def test_frames_go_to_the_socket_at_once_but_never_past_tls():
    """The fast path hands a frame to the kernel when nothing is queued; on a TLS stream it
    leaves everything to the stream (a send() there would put plaintext on the wire)."""
    import asyncio
    import socket
    import ssl

    import tornado.iostream

    from aether.server.websocket import send_now

    async def main() -> None:
        plain, peer = socket.socketpair()
        stream = tornado.iostream.IOStream(plain)
        assert send_now(stream, b"frame") == b""
        assert peer.recv(16) == b"frame"
        stream.close()
        peer.close()

        raw, peer = socket.socketpair()
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        wrapped = context.wrap_socket(raw, do_handshake_on_connect=False)
        stream = tornado.iostream.SSLIOStream(wrapped, ssl_options=context)
        assert send_now(stream, b"frame") == b"frame"
        peer.setblocking(False)
        try:
            got = peer.recv(16)
        except BlockingIOError:
            got = b""
        assert b"frame" not in got
        stream.close()
        peer.close()

    asyncio.run(main())
