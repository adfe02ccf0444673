"""The fallback process tree, where there are no cgroups (see :mod:`aether.cgroup`): the
leader, every process in its session or process group, and their descendants by parent links,
found by a scan of /proc when signalled and signalled through pidfds.

That misses a process that left the session (``setsid``, a daemonizing server) and whose parent
exited before the scan: init adopts it and nothing links it to the tree any more. A terminal
takes a scan at its hang-up (:meth:`ScanTree.hold`), so children orphaned by the hang-up itself
are still ended; one that left and was orphaned before that is not. Nothing ends what a
SIGKILLed daemon's sessions left, nor, at daemon exit, what a session that ended by itself left
(its leader reaped, its ids name nothing any more).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable


def signal_pidfds(pidfds: Iterable[int], sig: int) -> None:
    for pidfd in pidfds:
        try:
            signal.pidfd_send_signal(pidfd, sig)
        except (ProcessLookupError, PermissionError):
            pass


def pidfd_of(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


class ScanTree:
    """The fallback: the leader's session and process group and their descendants, found in
    /proc when signalled; :meth:`hold` keeps pidfds of the members found then, so that those
    orphaned later (their parent exited at the hang-up) are still signalled."""

    procs = None

    def __init__(self) -> None:
        self.leader: int | None = None
        self._held: list[int] = []

    def started(self, pid: int) -> None:
        self.leader = pid

    def pids(self) -> list[int]:
        return sorted(members(process_table(), self.leader)) if self.leader else []

    def _open_members(self) -> list[int]:
        """Pidfds of the members; each opened, then checked to be a member still (scanning again
        after opening: a pid reused between the scans is kept only if it is a member now)."""
        if self.leader is None:
            return []
        opened = {}
        for pid in members(process_table(), self.leader):
            pidfd = pidfd_of(pid)
            if pidfd is not None:
                opened[pid] = pidfd
        still = members(process_table(), self.leader)
        for pid in [pid for pid in opened if pid not in still]:
            os.close(opened.pop(pid))
        return list(opened.values())

    def hold(self) -> None:
        self._held += self._open_members()

    def signal(self, sig: int) -> None:
        pidfds = self._open_members()
        try:
            signal_pidfds(pidfds + self._held, sig)
        finally:
            for pidfd in pidfds:
                os.close(pidfd)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def remove(self, wait: float = 0.0) -> bool:
        return True

    def release(self) -> None:
        """Done with it: once the leader is reaped, its ids may name another's session."""
        for pidfd in self._held:
            os.close(pidfd)
        self._held = []
        self.leader = None


def process_table() -> dict[int, tuple[int, int, int]]:
    """``{pid: (parent, process group, session)}`` of every process, from /proc/PID/stat;
    zombies left out (they hold nothing and cannot be signalled away)."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if fields[0] in (b"Z", b"X"):
            continue
        table[int(name)] = (int(fields[1]), int(fields[2]), int(fields[3]))
    return table


def members(table: dict[int, tuple[int, int, int]], leader: int) -> set[int]:
    """The leader, every process in its session or process group (their ids are the leader's
    pid), and all their descendants."""
    found = {pid for pid, (_parent, group, session) in table.items() if pid == leader or leader in (group, session)}
    children: dict[int, list[int]] = {}
    for pid, (parent, _group, _session) in table.items():
        children.setdefault(parent, []).append(pid)
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found
