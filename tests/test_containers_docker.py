"""Ports that Docker publishes, named by their container, against a real dockerd of the
tests' own (support.docker): `aether serve` tells a WebSocket client the container behind a
port ``docker-proxy`` holds, and behind one dockerd holds itself (its userland proxy off),
`aether ports list` shows it, a container published later is named too, and a stopped
container's port closes. dockerd lists a container only once it runs, after its ports opened:
the first ask as the port opens does not name it, and aether asks again."""

from __future__ import annotations

import json
import os
import time

import pytest
from support.clients import opens_done, port_messages, recv_until
from support.docker import IMAGE, Dockerd
from support.ebpf import need_ebpf
from support.processes import aether
from support.servers import Server


def started(userland_proxy: bool):
    """A module's dockerd, how long it took to start and to go printed (``pytest -s``)."""
    mode = "on" if userland_proxy else "off"
    dockerd = Dockerd(userland_proxy=userland_proxy)
    print(f"\ndockerd (userland proxy {mode}): answering, its image imported, in {dockerd.started:.2f} s")
    try:
        yield dockerd
    finally:
        began = time.monotonic()
        dockerd.close()
        print(
            f"\ndockerd (userland proxy {mode}): its containers, processes, mounts and bridge gone in {time.monotonic() - began:.2f} s"
        )


@pytest.fixture(scope="module")
def dockerd():
    yield from started(userland_proxy=True)


@pytest.fixture(scope="module")
def dockerd_direct():
    """dockerd with its userland proxy off: it holds published ports itself (with iptables
    off, as here, it listens on them and never accepts; the NAT rules it would add carry the
    traffic)."""
    yield from started(userland_proxy=False)


@pytest.fixture
def server(backend, tmp_path, dockerd):
    """`aether serve` on ``backend``, told the socket of the tests' dockerd."""
    started = Server(backend, tmp_path / "state", "--docker-socket", dockerd.socket)
    yield started
    started.stop()


def named(ws, port: int, timeout: float = 30.0) -> tuple[dict, list[dict]]:
    """The port's messages up to the one carrying a container: (that one, all of them)."""
    seen: list[dict] = []

    def done(message: dict) -> bool:
        if message.get("port") == port:
            seen.append(message)
            return message.get("container") is not None or message["type"] == "close"
        return False

    try:
        recv_until(ws, done, timeout=timeout)
    except TimeoutError:
        raise AssertionError(f"port {port} was not named by its container within {timeout}s: {seen}") from None
    assert seen[-1]["type"] != "close", seen
    return seen[-1], seen


def test_published_port_named_by_its_container(server, dockerd):
    with server.connect() as ws:
        opens_done(ws)
        web = f"aether-web-{os.urandom(3).hex()}"  # a fresh name on each backend's run
        port, ident = dockerd.run(web)
        message, seen = named(ws, port)
        opened = seen[0]
        assert opened["type"] == "open" and opened["process"] == "docker-proxy", seen
        # The open goes out at once, before dockerd is asked; the container follows in an update.
        assert opened["container"] is None and message["type"] == "update"
        assert message["container"] == {"id": ident, "name": web, "image": IMAGE}
        assert len(ident) == 64
        assert "-host-port" in message["command"] and "-container-port 8000" in message["command"]

        # A second container, published moments after the first was named (within the 2 s
        # one answer serves): the answer asked for before its port opened does not hide it.
        api = f"aether-api-{os.urandom(3).hex()}"
        second_port, second = dockerd.run(api)
        message, _ = named(ws, second_port)
        assert message["container"] == {"id": second, "name": api, "image": IMAGE}

        # `aether ports list` asks the same dockerd: by its flag, and by DOCKER_HOST.
        listed = aether("ports", "list", "--json", "--docker-socket", dockerd.socket)
        assert listed.returncode == 0, listed.stderr
        rows = {row["port"]: row for row in json.loads(listed.stdout)}
        assert rows[port]["container"] == {"id": ident, "name": web, "image": IMAGE}
        assert rows[second_port]["container"]["name"] == api
        table = aether("ports", "list", env={**os.environ, "DOCKER_HOST": f"unix://{dockerd.socket}", "COLUMNS": "400"})
        assert table.returncode == 0, table.stderr
        line = next(line for line in table.stdout.splitlines() if line.split()[0] == str(port))
        assert f"container: {web} ({IMAGE})" in line and "docker-proxy" in line

        # The container stops: docker-proxy goes, and the port closes.
        dockerd.remove(web)
        closing = port_messages(ws, port, lambda m: m["type"] == "close", timeout=30)
        assert closing[-1]["type"] == "close"
        # The other is still named (its update, if any, still carries it).
        dockerd.remove(api)
        for message in port_messages(ws, second_port, lambda m: m["type"] == "close", timeout=30)[:-1]:
            assert message["container"]["name"] == api


@pytest.mark.ebpf
def test_port_dockerd_holds_itself_named_by_its_container(tmp_path, dockerd_direct):
    """With the userland proxy off, dockerd itself listens on a published port (no
    docker-proxy, no container address on its command line): the listing names it by port."""
    need_ebpf()
    srv = Server("ebpf", tmp_path / "state", "--docker-socket", dockerd_direct.socket)
    try:
        with srv.connect() as ws:
            opens_done(ws)
            port, ident = dockerd_direct.run("aether-direct")
            message, seen = named(ws, port)
            assert seen[0]["type"] == "open" and seen[0]["process"] == "dockerd", seen
            assert message["container"] == {"id": ident, "name": "aether-direct", "image": IMAGE}
            dockerd_direct.remove("aether-direct")
            assert port_messages(ws, port, lambda m: m["type"] == "close", timeout=30)[-1]["type"] == "close"
    finally:
        srv.stop()
