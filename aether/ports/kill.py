"""Stop whatever listens on a port: SIGTERM (or another signal), SIGKILL after a grace period.

Refusals are :class:`KillRefused` with a stable ``code``: ``not_open``, ``ignored``,
``forbidden`` (pid 1, or a protected process such as the caller's own), ``no_owner`` (the
listener's process is not visible here), ``invalid``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from typing import Awaitable, Callable, Iterable, Optional

from aether.ports import procs, sockdiag


class KillRefused(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


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


def holders(port: int) -> tuple[bool, list[int]]:
    """(whether the port is listening, the pids of every living process holding its sockets)."""
    raw = _raw()
    if not any(row[1] == port for row in raw):
        return False, []
    return True, procs.port_holders(raw, [port]).get(port, [])


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


def check(port: int, ignored: Iterable[int], protected: Iterable[int]) -> list[int]:
    """The pids to signal for ``port``, or KillRefused saying why not."""
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise KillRefused("invalid", f"not a port number (1-65535): {port!r}")
    if port in set(ignored):
        raise KillRefused("ignored", f"port {port} is ignored")
    listening, pids = holders(port)
    if not listening:
        raise KillRefused("not_open", f"port {port} is not open")
    if not pids:
        raise KillRefused("no_owner", f"no visible process holds port {port}")
    if 1 in pids:
        raise KillRefused("forbidden", f"port {port} is held by pid 1, which is never signalled")
    mine = set(protected) & set(pids)
    if mine:
        raise KillRefused("forbidden", f"port {port} is held by pid {min(mine)}, the caller's own process")
    for pid in pids:
        # Before any signal: a refusal must not leave some holders already signalled.
        try:
            os.kill(pid, 0)
        except PermissionError:
            raise KillRefused("forbidden", f"port {port} is held by pid {pid}, which we may not signal") from None
        except ProcessLookupError:
            pass
    return pids


async def kill_port(
    port: int,
    sig: signal.Signals = signal.SIGTERM,
    grace: float = 5.0,
    ignored: Iterable[int] = (),
    protected: Iterable[int] = (),
    wait_closed: Optional[Callable[[int, float], Awaitable[bool]]] = None,
) -> KillResult:
    """Signal the port's holders, SIGKILL those left after ``grace`` seconds; wait for close."""
    # Never the caller itself, nor anything it runs under (its shell, a supervisor).
    protected = {os.getpid(), *procs.ancestors(os.getpid()), *protected}
    wait_closed = wait_closed or poll_closed
    loop = asyncio.get_running_loop()
    # Finding holders walks every process's file descriptors: off the event loop.
    pids = await loop.run_in_executor(None, check, port, tuple(ignored), protected)
    _signal_all(pids, sig)
    if await wait_closed(port, grace):
        return KillResult(port, pids, sig.name, False, True)
    listening, remaining = await loop.run_in_executor(None, holders, port)
    remaining = [pid for pid in remaining if pid != 1 and pid not in protected]
    _signal_all(remaining, signal.SIGKILL)
    closed = not listening or await wait_closed(port, 2.0)
    return KillResult(port, sorted(set(pids) | set(remaining)), sig.name, bool(remaining), closed)


def _signal_all(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            raise KillRefused("forbidden", f"not permitted to signal pid {pid}") from None
