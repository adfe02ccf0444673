"""Stop whatever listens on a port: SIGTERM (or another signal), SIGKILL after a grace period.

Each holder is signalled through a pidfd, opened before checking that the process still holds
one of the port's sockets (its /proc/PID/fd links the socket's inode) and is alive after that
check: a process that released the port and exited, its pid reused by another, is never
signalled, and neither is the process that got the pid.

Refusals are :class:`KillRefused` with a stable ``code``: ``not_open``, ``ignored``,
``forbidden`` (pid 1, or a protected process such as the caller's own), ``no_owner`` (the
listener's process is not visible here), ``invalid``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from collections.abc import Awaitable, Callable, Iterable

from aether.errors import Refusal
from aether.ports import procs, sockdiag


class KillRefused(Refusal):
    """A kill refused (``code``, ``message``): the CLI prints it, the ports channel answers it."""


@dataclasses.dataclass
class KillResult:
    port: int
    pids: list[int]
    signal: str
    escalated: bool  # SIGKILL was needed
    closed: bool


def parse_signal(name: str | int) -> signal.Signals:
    """``TERM``, ``SIGTERM``, ``15`` -> ``signal.SIGTERM``; KillRefused('invalid') otherwise."""
    text = str(name).strip().upper()
    try:
        if text.isdigit():
            return signal.Signals(int(text))
        return signal.Signals[text if text.startswith("SIG") else "SIG" + text]
    except (KeyError, ValueError):
        raise KillRefused("invalid", f"unknown signal {name!r}") from None


def _raw() -> list[tuple[int, int, str, int]]:
    with sockdiag.DiagSocket() as diag:
        return diag.raw()


def holders(port: int) -> tuple[bool, list[int], set[int]]:
    """(whether the port is listening, the pids of every living process holding its sockets,
    the sockets' inodes)."""
    raw = _raw()
    inodes = {row[3] for row in raw if row[1] == port}
    if not inodes:
        return False, [], set()
    return True, procs.port_holders(raw, [port]).get(port, []), inodes


def is_listening(port: int) -> bool:
    return any(row[1] == port for row in _raw())


async def poll_closed(port: int, timeout: float) -> bool:
    """Wait for the port to close, re-reading sock_diag every 10 ms (for callers with no monitor)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while is_listening(port):
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(min(0.01, max(0.0, deadline - loop.time())))
    return True


def open_holders(pids: Iterable[int], inodes: set[int]) -> dict[int, int]:
    """``{pid: pidfd}`` of those of ``pids`` that hold one of the ``inodes``: the pidfd first,
    then the check, then proof the process outlived the check (so what was read was its own).
    PermissionError, every pidfd closed, for one we may not signal."""
    held: dict[int, int] = {}
    try:
        for pid in pids:
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue  # exited since it was found
            try:
                holds = bool(procs.socket_holders(inodes, [pid]))
                if holds:
                    signal.pidfd_send_signal(pidfd, 0)
            except ProcessLookupError:
                holds = False
            except BaseException:
                os.close(pidfd)
                raise
            if holds:
                held[pid] = pidfd
            else:
                os.close(pidfd)
    except BaseException:
        close_all(held)
        raise
    return held


def close_all(held: dict[int, int]) -> None:
    for pidfd in held.values():
        os.close(pidfd)


def check(port: int, ignored: Iterable[int], protected: Iterable[int]) -> dict[int, int]:
    """``{pid: pidfd}`` of the processes to signal for ``port``, or KillRefused saying why not."""
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise KillRefused("invalid", f"not a port number (1-65535): {port!r}")
    if port in set(ignored):
        raise KillRefused("ignored", f"port {port} is ignored")
    listening, pids, inodes = holders(port)
    if not listening:
        raise KillRefused("not_open", f"port {port} is not open")
    if not pids:
        raise KillRefused("no_owner", f"no visible process holds port {port}")
    if 1 in pids:
        raise KillRefused("forbidden", f"port {port} is held by pid 1, which is never signalled")
    mine = set(protected) & set(pids)
    if mine:
        raise KillRefused("forbidden", f"port {port} is held by pid {min(mine)}, the caller's own process")
    # Before any signal: a refusal must not leave some holders already signalled.
    try:
        held = open_holders(pids, inodes)
    except PermissionError:
        who = next((pid for pid in pids if not _may_signal(pid)), None)
        raise KillRefused("forbidden", f"port {port} is held by pid {who}, which we may not signal") from None
    if not held:
        raise KillRefused("no_owner", f"no visible process holds port {port}")
    # An aether server's listener, whichever instance: its clients would lose it. Read while
    # its pidfd is held, then proved alive, so the command line read was that process's.
    for pid, pidfd in held.items():
        if procs.is_aether_server(pid):
            try:
                signal.pidfd_send_signal(pidfd, 0)
            except ProcessLookupError:
                continue
            close_all(held)
            raise KillRefused("forbidden", f"port {port} is held by pid {pid}, an aether server: stop it as you started it")
    return held


def _may_signal(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except PermissionError:
        return False
    except ProcessLookupError:
        pass
    return True


def _remaining(port: int, protected: set[int]) -> tuple[bool, dict[int, int]]:
    listening, pids, inodes = holders(port)
    pids = [pid for pid in pids if pid != 1 and pid not in protected]
    return listening, open_holders(pids, inodes) if pids else {}


async def kill_port(
    port: int,
    sig: signal.Signals = signal.SIGTERM,
    grace: float = 5.0,
    ignored: Iterable[int] = (),
    protected: Iterable[int] = (),
    wait_closed: Callable[[int, float], Awaitable[bool]] | None = None,
) -> KillResult:
    """Signal the port's holders, SIGKILL those left after ``grace`` seconds; wait for close."""
    # Never the caller itself, nor anything it runs under (its shell, a supervisor).
    protected = {os.getpid(), *procs.ancestors(os.getpid()), *protected}
    wait_closed = wait_closed or poll_closed
    loop = asyncio.get_running_loop()
    # Finding holders walks every process's file descriptors: off the event loop.
    held = await loop.run_in_executor(None, check, port, tuple(ignored), protected)
    pids = sorted(held)
    try:
        _signal_all(held, sig)
    finally:
        close_all(held)
    if await wait_closed(port, grace):
        return KillResult(port, pids, sig.name, False, True)
    try:
        listening, remaining = await loop.run_in_executor(None, _remaining, port, protected)
    except PermissionError:
        raise KillRefused("forbidden", f"not permitted to signal a holder of port {port}") from None
    try:
        _signal_all(remaining, signal.SIGKILL)
    finally:
        close_all(remaining)
    closed = not listening or await wait_closed(port, 2.0)
    return KillResult(port, sorted(set(pids) | set(remaining)), sig.name, bool(remaining), closed)


def _signal_all(held: dict[int, int], sig: signal.Signals) -> None:
    for pid, pidfd in held.items():
        try:
            signal.pidfd_send_signal(pidfd, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            raise KillRefused("forbidden", f"not permitted to signal pid {pid}") from None
