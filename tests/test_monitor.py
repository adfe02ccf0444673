"""PortMonitor in-process: subscribers, wait_closed, ignored-port changes, living holders."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys

import pytest

from aether.ports.monitor import PortMonitor
from conftest import free_port


async def until(predicate, timeout=5.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.01)


def listening(port: int) -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", port))
    s.listen()
    return s


def run(backend, scenario):
    async def main():
        monitor = PortMonitor(backend=backend, interval=0.05)
        await monitor.start()
        try:
            await scenario(monitor)
        finally:
            monitor.stop()

    asyncio.run(main())


def test_subscriber_sees_open_and_close_in_order(backend):
    async def scenario(monitor):
        seen = []
        monitor.subscribe(seen.append)
        port = free_port()
        s = listening(port)
        await until(lambda: any(e.port == port for e in seen))
        assert port in [state.port for state in monitor.ports()]
        s.close()
        assert await monitor.wait_closed(port, 5)
        mine = [(e.type, e.pid, e.process) for e in seen if e.port == port]
        assert mine == [("open", os.getpid(), open("/proc/self/comm").read().strip()), ("close", None, None)]

    run(backend, scenario)


def test_wait_closed_times_out_while_open(backend):
    async def scenario(monitor):
        port = free_port()
        s = listening(port)
        await until(lambda: port in monitor.table)
        assert await monitor.wait_closed(port, 0.1) is False
        s.close()

    run(backend, scenario)


def test_changing_ignored_ports_closes_and_reopens(backend):
    async def scenario(monitor):
        seen = []
        monitor.subscribe(seen.append)
        port = free_port()
        s = listening(port)
        await until(lambda: port in monitor.table)
        monitor.set_ignored([port])
        assert [(e.type, e.port) for e in seen if e.port == port][-1] == ("close", port)
        monitor.set_ignored([])
        await until(lambda: port in monitor.table)
        assert [e.type for e in seen if e.port == port] == ["open", "close", "open"]
        s.close()

    run(backend, scenario)


def test_ports_names_a_living_holder_after_the_owner_exits(backend):
    async def scenario(monitor):
        port = free_port()
        code = f"""
import os, socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", {port})); s.listen()
pid = os.fork()
if pid == 0:
    time.sleep(30); os._exit(0)
print(pid, flush=True)
"""
        owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        child = int(owner.stdout.readline())
        try:
            await until(lambda: port in monitor.table)
            owner.wait()
            state = next(s for s in monitor.ports() if s.port == port)
            assert state.pid == child
            assert [e.pid for e in monitor.open_events() if e.port == port] == [child]
        finally:
            os.kill(child, 9)
        assert await monitor.wait_closed(port, 5)

    run(backend, scenario)
