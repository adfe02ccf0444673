"""Ports for the tests' own listeners, and who listens where.

A port from :func:`free_port` is free when it is returned, not when the listener meant for it
binds: another process on the host (other tests, their servers) can take it in between. So a
helper that starts a listener on a port of its choosing retries with another one when the
port turns out taken (:func:`on_a_free_port`); one given a port by its caller cannot, and says
plainly that the port was taken.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: Starts tried on fresh ports before giving up: a collision is rare (two processes drawing
#: the same port of ~28,000 within a few milliseconds), two in a row rarer still.
ATTEMPTS = 5


class PortTaken(Exception):
    """Another process took the port meant for a listener of ours."""


def free_port(family: int = socket.AF_INET) -> int:
    with socket.socket(family) as s:
        s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        return s.getsockname()[1]


def on_a_free_port(start: Callable[[int], T], attempts: int = ATTEMPTS, family: int = socket.AF_INET) -> T:
    """``start(port)`` on a free port, again on another while it raises PortTaken."""
    for attempt in range(attempts):
        try:
            return start(free_port(family))
        except PortTaken:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def kernel_listening_ports() -> set[int]:
    from aether.ports import sockdiag

    with sockdiag.DiagSocket() as diag:
        return {port for _family, port, _addr, _inode in diag.raw()}


def listening_inodes(port: int) -> set[int]:
    """The inodes of the sockets listening on ``port``, in this network namespace."""
    from aether.ports import sockdiag

    with sockdiag.DiagSocket() as diag:
        return {inode for _family, p, _addr, inode in diag.raw() if p == port}


def held_sockets(pid: int) -> set[int]:
    """The inodes of the sockets ``pid`` and its descendants hold (what can be read of them)."""
    inodes: set[int] = set()
    for each in _tree(pid):
        try:
            fds = os.listdir(f"/proc/{each}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{each}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def _tree(pid: int) -> list[int]:
    pids, i = [pid], 0
    while i < len(pids):
        try:
            tasks = os.listdir(f"/proc/{pids[i]}/task")
        except OSError:
            tasks = []
        for task in tasks:
            try:
                with open(f"/proc/{pids[i]}/task/{task}/children") as f:
                    pids += [int(child) for child in f.read().split()]
            except OSError:
                pass
        i += 1
    return pids
