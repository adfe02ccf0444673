"""`update`: a real `aether serve` tells its WebSocket clients when an open port's owner or
addresses change, with the port's whole state, as `open` gives it."""

from __future__ import annotations

import subprocess
import time

from support.clients import FACTS, opens, recv_json, recv_until
from support.ports import free_port
from support.processes import FORKING_OWNER, proc_comm

BOTH = ["127.0.0.1", "::1"]


class Port:
    """One port as a client applying ``open``/``update``/``close`` has it."""

    def __init__(self, ws, port: int):
        self.ws, self.port, self.state = ws, port, None

    def follow(self, until, timeout: float = 5.0) -> list[dict]:
        """The messages about the port until ``until(state)`` holds; all of them, in order."""
        seen = []
        deadline = time.monotonic() + timeout
        while self.state is None or not until(self.state):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"port {self.port} never reached the state wanted; saw {seen}")
            try:
                msg = recv_json(self.ws, remaining)
            except TimeoutError:
                continue
            if msg.get("port") != self.port:
                continue
            seen.append(msg)
            if msg["type"] == "open":
                self.state = dict(msg)
            elif msg["type"] == "update":
                assert self.state is not None, f"an update before the open: {seen}"
                self.state = {**self.state, **msg}
            elif msg["type"] == "close":
                self.state = None
        return seen


def test_daemonized_nginx_reaches_clients_with_its_master_and_both_families(serve, listeners):
    """nginx's default mode: the process started binds both sockets, forks the master and
    exits. The probe saw the parent call listen(); the client ends with the master."""
    server = serve()
    with server.connect() as ws:
        opens(ws)
        master, port = listeners.nginx(daemon=True)
        seen = Port(ws, port).follow(lambda s: s["pid"] == master and s["addresses"] == BOTH)
        assert seen[0]["type"] == "open" and [m["type"] for m in seen[1:]] == ["update"] * (len(seen) - 1)
        last = seen[-1]
        assert last["process"] == "nginx"
        # An update is a whole state: every field of the open, the same opening time.
        assert last.keys() == seen[0].keys()
        assert (last["url"], last["visibility"], last["opened"], last["seenAtStart"]) == (
            seen[0]["url"],
            "private",
            seen[0]["opened"],
            False,
        )
    # A client connecting now is told the same.
    with server.connect() as ws:
        now = opens(ws)[port]
        assert (now["pid"], now["process"], now["addresses"]) == (master, "nginx", BOTH)


def test_owner_exiting_hands_the_port_to_the_child_holding_it(serve, listeners):
    """A daemonizing server made plain: listen(), fork(), and the parent exits on request."""
    server = serve()
    port = free_port()
    with server.connect() as ws:
        opens(ws)
        parent = listeners.python(FORKING_OWNER.format(port=port), port, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        child = int(parent.stdout.readline())
        listeners.daemons.append(child)
        view = Port(ws, port)
        (opened,) = view.follow(lambda s: True)
        assert (opened["type"], opened["pid"]) == ("open", parent.pid)
        parent.stdin.close()
        parent.wait(10)
        update = view.follow(lambda s: s["pid"] == child)[-1]
        # Its whole state again (what was found of the port, test_facts.py, may have come between).
        assert {key: update[key] for key in opened if key not in FACTS} == {
            **{key: opened[key] for key in opened if key not in FACTS},
            "type": "update",
            "pid": child,
            "process": proc_comm(child),
        }


def test_second_address_and_its_closing_are_updates(serve, listeners):
    server = serve()
    port = free_port()
    code = f"""
import socket, sys
v4 = socket.socket(); v4.bind(("127.0.0.1", {port})); v4.listen()
sys.stdin.readline()
v6 = socket.socket(socket.AF_INET6); v6.bind(("::1", {port})); v6.listen()
sys.stdin.readline()
v4.close()
sys.stdin.readline()
"""
    with server.connect() as ws:
        opens(ws)
        proc = listeners.python(code, port, stdin=subprocess.PIPE)
        view = Port(ws, port)
        assert view.follow(lambda s: True)[-1]["addresses"] == ["127.0.0.1"]
        proc.stdin.write(b"\n")
        proc.stdin.flush()
        grown = view.follow(lambda s: s["addresses"] == BOTH)[-1]
        assert (grown["type"], grown["pid"]) == ("update", proc.pid)
        proc.stdin.write(b"\n")
        proc.stdin.flush()
        shrunk = view.follow(lambda s: s["addresses"] == ["::1"])[-1]
        assert (shrunk["type"], shrunk["pid"]) == ("update", proc.pid)
        proc.stdin.close()
        assert recv_until(ws, lambda m: m.get("port") == port and m["type"] not in ("update", "ready"))["type"] == "close"
