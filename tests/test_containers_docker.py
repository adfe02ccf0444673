"""Ports that Docker publishes, named by their container, against a real dockerd of the
tests' own (support.docker): `aether serve` tells a WebSocket client the container behind a
port ``docker-proxy`` holds, and behind one dockerd holds itself (its userland proxy off);
`aether ports watch`, `aether ports list` and the dashboard (in Chromium) show it; a container
published later is named too, and a stopped container's port closes. dockerd lists a
container only once it runs, after its ports opened: the first ask as the port opens does not
name it, and aether asks again."""

from __future__ import annotations

import json
import os
import queue
import time

import pytest
from support.browser import chromium
from support.clients import opens, port_messages, recv_until
from support.docker import IMAGE, Dockerd
from support.ebpf import need_ebpf
from support.processes import aether
from support.servers import Server, Watcher
from test_dashboard_browser import connection, row, wait

#: Each test here runs containers on a dockerd of the module's own (its start, 0.3-0.7 s; its
#: stop, 1.1 s) and waits for them: seconds each.
pytestmark = pytest.mark.slow


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
        took = time.monotonic() - began
        print(f"\ndockerd (userland proxy {mode}): its containers, processes, mounts and bridge gone in {took:.2f} s")


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
    srv = Server(backend, tmp_path / "state", "--docker-socket", dockerd.socket)
    yield srv
    srv.stop()


def named(ws, port: int, timeout: float = 30.0) -> tuple[dict, list[dict]]:
    """The port's messages up to the one carrying a container: (that one, all of them)."""
    seen: list[dict] = []
    received: list[float] = []

    def done(message: dict) -> bool:
        if message.get("port") == port:
            seen.append(message)
            received.append(time.monotonic())
            return message.get("container") is not None or message["type"] == "close"
        return False

    try:
        recv_until(ws, done, timeout=timeout)
    except TimeoutError:
        raise AssertionError(f"port {port} was not named by its container within {timeout}s: {seen}") from None
    assert seen[-1]["type"] != "close", seen
    print(f"\nport {port} ({seen[0]['process']}): its container told {received[-1] - received[0]:.2f} s after its open")
    return seen[-1], seen


def watched(watcher: Watcher, port: int, timeout: float = 30.0) -> dict:
    """`aether ports watch`'s first line for ``port`` that carries a container."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = watcher.next(max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"ports watch named no container for {port}: {watcher.seen}") from None
        if line.get("port") == port and line.get("container") is not None:
            return line


def test_published_port_named_by_its_container(backend, server, dockerd):
    watcher = Watcher(backend, "--docker-socket", dockerd.socket, plain=False)
    try:
        with server.connect() as ws:
            published(ws, watcher, dockerd)
    finally:
        watcher.stop()


def published(ws, watcher: Watcher, dockerd: Dockerd) -> None:
    """A container published, named (by serve and by ports watch), a second one, both stopped."""
    opens(ws)
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
    # `aether ports watch` names it too, asking on its own --docker-socket.
    assert watched(watcher, port)["container"] == message["container"]

    # A second container, published moments after the first was named (within the 2 s
    # one answer serves): the answer asked for before its port opened does not hide it.
    api = f"aether-api-{os.urandom(3).hex()}"
    second_port, second = dockerd.run(api)
    message, _ = named(ws, second_port)
    assert message["container"] == {"id": second, "name": api, "image": IMAGE}

    # The container stops: docker-proxy goes, and the port closes.
    dockerd.remove(web)
    closing = port_messages(ws, port, lambda m: m["type"] == "close", timeout=30)
    assert closing[-1]["type"] == "close"
    # The other is still named (each update until its close still carries it).
    dockerd.remove(api)
    for message in port_messages(ws, second_port, lambda m: m["type"] == "close", timeout=30):
        assert message["type"] in ("ready", "close") or message["container"]["name"] == api, message


@pytest.mark.ebpf
def test_port_dockerd_holds_itself_named_by_its_container(tmp_path, dockerd_direct):
    """With the userland proxy off, dockerd itself listens on a published port (no
    docker-proxy, no container address on its command line): the listing names it by port."""
    need_ebpf()
    srv = Server("ebpf", tmp_path / "state", "--docker-socket", dockerd_direct.socket)
    try:
        with srv.connect() as ws:
            opens(ws)
            port, ident = dockerd_direct.run("aether-direct")
            message, seen = named(ws, port)
            assert seen[0]["type"] == "open" and seen[0]["process"] == "dockerd", seen
            assert message["container"] == {"id": ident, "name": "aether-direct", "image": IMAGE}
            dockerd_direct.remove("aether-direct")
            assert port_messages(ws, port, lambda m: m["type"] == "close", timeout=30)[-1]["type"] == "close"
    finally:
        srv.stop()


def test_ports_list_names_the_container(dockerd):
    """`aether ports list` (one sock_diag snapshot, whatever the backend) asks the same
    dockerd: by its flag, and by DOCKER_HOST. `docker run -d` returns once the container runs,
    so dockerd lists it by then."""
    name = f"aether-listed-{os.urandom(3).hex()}"
    port, ident = dockerd.run(name)
    try:
        listed = aether("ports", "list", "--json", "--docker-socket", dockerd.socket)
        assert listed.returncode == 0, listed.stderr
        rows = {entry["port"]: entry for entry in json.loads(listed.stdout)}
        assert rows[port]["process"] == "docker-proxy"
        assert rows[port]["container"] == {"id": ident, "name": name, "image": IMAGE}
        table = aether("ports", "list", env={**os.environ, "DOCKER_HOST": f"unix://{dockerd.socket}", "COLUMNS": "400"})
        assert table.returncode == 0, table.stderr
        line = next(line for line in table.stdout.splitlines() if line.split()[0] == str(port))
        assert f"container: {name} ({IMAGE})" in line and "docker-proxy" in line
    finally:
        dockerd.remove(name)


def test_dashboard_shows_the_container(dockerd, tmp_path):
    """The dashboard's row names the container under the process, and its filter finds the
    port by the container's name."""
    from selenium.webdriver.common.by import By

    name = f"aether-shown-{os.urandom(3).hex()}"
    srv = Server("sockdiag", tmp_path / "state", "--docker-socket", dockerd.socket)
    browser = chromium(tmp_path / "profile")
    try:
        browser.get(f"http://127.0.0.1:{srv.port}/?token={srv.token}")
        wait(browser, lambda d: connection(d) == "connected", what="the WebSocket to connect")
        port, _ = dockerd.run(name)

        def container_line(d) -> str:
            found = row(d, port)
            return found.find_element(By.CSS_SELECTOR, ".container").text if found is not None else ""

        assert wait(browser, container_line, timeout=30, what="the row's container") == f"container: {name} ({IMAGE})"
        browser.find_element(By.ID, "filter").send_keys(name)
        shown = "return [...document.querySelectorAll('#ports tbody tr')].map((tr) => +tr.dataset.port)"
        wait(browser, lambda d: d.execute_script(shown) == [port], what="the filter to leave the container's row")
    finally:
        browser.quit()
        srv.stop()
