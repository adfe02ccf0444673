"""Processes behind sockets: who holds a socket inode, what a process is called, is it alive.

Everything here reads /proc directly; a process that exits mid-read is simply not found.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional


def process_name(pid: Optional[int]) -> Optional[str]:
    """The process's name (``/proc/<pid>/comm`` of its main thread), or None if unknowable.

    The main thread's comm, not the event's: a listener created in a thread named
    ``lsnr-worker`` still belongs to the process ``python3``.
    """
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().rstrip(b"\n").decode("utf-8", "replace")
    except OSError:
        return None


def is_alive(pid: Optional[int]) -> bool:
    """True if the process exists and is not a zombie (a zombie holds no sockets)."""
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    # The state follows the comm, which is parenthesised and may itself contain ')'.
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state not in (b"Z", b"X")


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def socket_holders(inodes: Iterable[int]) -> dict[int, list[int]]:
    """Every process holding each socket inode (forked workers share one socket)."""
    wanted = {f"socket:[{inode}]": inode for inode in inodes if inode}
    holders: dict[int, list[int]] = {}
    if not wanted:
        return holders
    for pid in _pids():
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            inode = wanted.get(target)
            if inode is not None:
                pids = holders.setdefault(inode, [])
                if pid not in pids:
                    pids.append(pid)
    return holders


def socket_owners(inodes: Iterable[int]) -> dict[int, int]:
    """One owning pid per socket inode: the lowest pid among its holders (the parent, usually)."""
    return {inode: min(pids) for inode, pids in socket_holders(inodes).items()}


def net_namespace(pid: int | str = "self", tid: Optional[int] = None) -> Optional[int]:
    """The inode of a task's network namespace, or None if the task is gone."""
    path = f"/proc/{pid}/task/{tid}/ns/net" if tid else f"/proc/{pid}/ns/net"
    try:
        return os.stat(path).st_ino
    except OSError:
        return None
