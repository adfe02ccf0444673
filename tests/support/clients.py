"""Talking to `aether serve`: JSON messages on a ``websockets`` connection (the opens sent on
connect among them), and raw sockets
that complete the upgrade and then do only what a test tells them (never answer a ping,
never read)."""

from __future__ import annotations

import base64
import json
import os
import socket
import time


def recv_json(ws, timeout: float = 5.0) -> dict:
    return json.loads(ws.recv(timeout=timeout))


def recv_until(ws, predicate, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError("timed out waiting for a matching message")
        msg = recv_json(ws, remaining)
        if predicate(msg):
            return msg


def opens(ws, expect=(), timeout: float = 10.0) -> dict[int, dict]:
    """The initial open messages, by port. The server sends them on connect, before it reads
    anything: the answer to a request sent now ends them (no waiting for a quiet moment).
    Then, for the ports in ``expect`` (listening, but perhaps not seen yet: the sock_diag
    backend finds a port with its next snapshot), the live opens until each has come."""
    ws.send(json.dumps({"channel": "config", "type": "get", "id": "opens-end"}))
    seen, ended = {}, False
    deadline = time.monotonic() + timeout
    while not ended or not set(expect) <= seen.keys():
        msg = recv_json(ws, max(0.0, deadline - time.monotonic()))
        if msg["channel"] == "ports" and msg["type"] == "open":
            seen[msg["port"]] = msg
        ended = ended or msg.get("id") == "opens-end"
    return seen


#: The fields of an open beside its owner's (see test_facts.py).
FACTS = ("protocol", "ready", "command", "cwd", "started", "container", "label", "onOpen", "sources")


def port_messages(ws, port: int, until, timeout: float = 30.0) -> list[dict]:
    """Every message about ``port`` until one satisfies ``until`` (included)."""
    seen: list[dict] = []

    def matched(message: dict) -> bool:
        if message.get("port") == port:
            seen.append(message)
            return until(message)
        return False

    recv_until(ws, matched, timeout=timeout)
    return seen


def raw_upgrade(server, rcvbuf: int | None = None) -> socket.socket:
    """A bare TCP client that completes the upgrade and then does nothing at all."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", server.port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /workspaces/{getattr(server, 'workspace', 'ws-test')}/ws?token={server.token} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    response = sock.recv(4096)
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """One client-to-server frame (clients must mask, RFC 6455 5.3)."""
    mask = os.urandom(4)
    n = len(payload)
    header = bytes([0x80 | opcode]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big"))
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def masked_text_frame(text: str) -> bytes:
    return masked_frame(0x1, text.encode())


def read_frames(sock: socket.socket, buffer: bytearray) -> list[tuple[int, bytes]]:
    """The whole server frames (opcode, payload) in ``buffer`` after one read from ``sock``,
    taken out of it; [] at a read timeout. EOFError when the server closed the connection."""
    try:
        data = sock.recv(65536)
    except TimeoutError:
        return []
    if not data:
        raise EOFError("closed by the server")
    buffer += data
    frames = []
    while len(buffer) >= 2:
        length = buffer[1] & 0x7F
        header = 2 + (2 if length == 126 else 8 if length == 127 else 0)
        if len(buffer) < header:
            break
        if length >= 126:
            length = int.from_bytes(buffer[2:header], "big")
        if len(buffer) < header + length:
            break
        frames.append((buffer[0] & 0x0F, bytes(buffer[header : header + length])))
        del buffer[: header + length]
    return frames
