"""Processes behind sockets: who holds a socket inode, what a process is called, is it alive.

Everything here reads /proc directly; a process that exits mid-read is simply not found.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

from aether.ports.events import PortState


def process_name(pid: int | None) -> str | None:
    """The process's name (``/proc/<pid>/comm`` of its main thread), or None if unknowable.

    The main thread's comm, not the event's: a listener created in a thread named
    ``lsnr-worker`` still belongs to the process ``python3``.
    """
    if pid is None:
        return None
    comm = _read(f"/proc/{pid}/comm")
    return None if comm is None else comm.rstrip(b"\n").decode("utf-8", "replace")


def is_alive(pid: int | None) -> bool:
    """True if the process exists and is not a zombie (a zombie holds no sockets)."""
    if pid is None:
        return False
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return False
    # The state follows the comm, which is parenthesised and may itself contain ')'.
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state not in (b"Z", b"X")


def started_ms(pid: int | None) -> int | None:
    """When the process started, Unix ms, or None if unknowable: /proc/<pid>/stat field 22
    (clock ticks since boot) against /proc/uptime, both to 10 ms (/proc/stat's ``btime`` is
    whole seconds, up to a second off). A port's owner started before the port opened: a lower
    bound of its opening that a restart of the daemon does not lose."""
    stat = None if pid is None else _read(f"/proc/{pid}/stat")
    uptime = _read("/proc/uptime")
    if stat is None or uptime is None:
        return None
    try:
        ticks = int(stat[stat.rfind(b")") + 2 :].split()[19])
        up = float(uptime.split()[0])
    except (IndexError, ValueError):
        return None
    return round((time.time() - up + ticks / os.sysconf("SC_CLK_TCK")) * 1000)


def is_aether_server(pid: int | None) -> bool:
    """Whether the process runs ``aether serve`` (``aether serve``, ``python -m aether serve``,
    a venv's ``bin/aether serve``), by its command line."""
    args = [] if pid is None else (_read(f"/proc/{pid}/cmdline") or b"").split(b"\0")
    named = any(os.path.basename(arg) == b"aether" for arg in args[:3]) or b"aether" in args[1:4]
    return named and b"serve" in args


def command_line(pid: int | None, limit: int = 4096) -> str | None:
    """The process's command line, arguments joined by spaces, at most ``limit`` bytes read."""
    raw = None if pid is None else _read(f"/proc/{pid}/cmdline")
    if not raw:
        return None
    return raw[:limit].rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")


def _read(path: str) -> bytes | None:
    """A small /proc file in one read; unbuffered, as this sits on the event path (~3 us
    where open() costs ~20 us)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def socket_holders(inodes: Iterable[int], pids: Iterable[int] | None = None) -> dict[int, list[int]]:
    """Every process holding each socket inode (forked workers share one socket).

    ``pids`` limits the search to those processes; by default every process is read, which
    costs ~8 us per open file descriptor on the machine (0.3 s with 40,000 sockets open).
    """
    wanted = {f"socket:[{inode}]": inode for inode in inodes if inode}
    holders: dict[int, list[int]] = {}
    if not wanted:
        return holders
    for pid in _pids() if pids is None else pids:
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


def find_holders(inodes: Iterable[int], first: Iterable[int] = ()) -> dict[int, list[int]]:
    """:func:`socket_holders` of ``inodes``, looked for among the ``first`` processes, then
    among every process for those they do not hold. Reads every descriptor on the machine
    unless ``first`` holds them all: call it off the event loop."""
    inodes = set(inodes)
    first = list(first)
    found = socket_holders(inodes, first) if first and inodes else {}
    if inodes - found.keys():
        found.update(socket_holders(inodes - found.keys()))
    return found


def parent(pid: int) -> int | None:
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    return int(stat[stat.rfind(b")") + 2 :].split()[1])


def start_time(pid: int) -> int | None:
    """When the process started, in clock ticks since boot (``starttime`` of /proc/<pid>/stat)."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    return int(stat[stat.rfind(b")") + 2 :].split()[19])


def younger(since: int) -> list[int]:
    """The processes started at ``since`` (clock ticks) or later: where a process's children,
    and so the sockets they inherited, can be. One small read per process (~3 us), where
    :func:`socket_holders` of every process reads every descriptor on the machine."""
    pids = []
    for pid in _pids():
        started = start_time(pid)
        if started is not None and started >= since:
            pids.append(pid)
    return pids


def owner(pids: Iterable[int]) -> int | None:
    """Of the processes sharing a socket, the one whose parent does not share it: nginx's
    master rather than a worker. The lowest pid where that does not decide."""
    pids = sorted(set(pids))
    roots = [pid for pid in pids if parent(pid) not in pids]
    return roots[0] if roots else pids[0] if pids else None


def socket_owners(inodes: Iterable[int], hints: Iterable[int] = ()) -> dict[int, int | None]:
    """One owning pid per socket inode (see :func:`owner`).

    The ``hints`` processes (say, the task a probe record names) are searched first; the
    whole of /proc only for inodes they do not hold.
    """
    return {inode: owner(pids) for inode, pids in find_holders(inodes, hints).items()}


def port_holders(raw: Iterable[tuple], ports: Iterable[int] | None = None) -> dict[int, list[int]]:
    """Living processes holding each port's sockets, from a sock_diag dump's
    ``(family, port, address, inode)`` rows; only ``ports`` when given. One /proc walk."""
    wanted = None if ports is None else set(ports)
    inode_port = {inode: port for _family, port, _address, inode in raw if wanted is None or port in wanted}
    result: dict[int, set[int]] = {port: set() for port in inode_port.values()}
    for inode, pids in socket_holders(inode_port).items():
        result[inode_port[inode]].update(pid for pid in pids if is_alive(pid))
    return {port: sorted(pids) for port, pids in result.items()}


def port_states(
    raw: Iterable[tuple],
    ports: Iterable[int] | None = None,
    recorded: dict[int, list] | None = None,
) -> list[PortState]:
    """The listening ports of a sock_diag dump, each with its owner, process name, bound
    addresses and every living holder. The owner is a ``recorded`` pid (the process a probe saw
    call ``listen()``) while it still holds the port, else :func:`owner` of the holders."""
    raw = list(raw)
    wanted = None if ports is None else set(ports)
    addresses: dict[int, set[str]] = {}
    for _family, port, address, _inode in raw:
        if wanted is None or port in wanted:
            addresses.setdefault(port, set()).add(address)
    holders = port_holders(raw, addresses)
    states = []
    for port in sorted(addresses):
        pids = holders.get(port, [])
        pid = next((p for p in (recorded or {}).get(port, ()) if p in pids), None) or owner(pids)
        states.append(PortState(port, pid, process_name(pid), tuple(sorted(addresses[port])), tuple(pids)))
    return states


def ancestors(pid: int) -> list[int]:
    """The chain of parents of ``pid``, nearest first, up to (not including) pid 0."""
    chain = []
    current = parent(pid)
    while current and current not in chain:
        chain.append(current)
        current = parent(current)
    return chain


def net_namespace(pid: int | str = "self", tid: int | None = None) -> int | None:
    """The inode of a task's network namespace, or None if the task is gone."""
    path = f"/proc/{pid}/task/{tid}/ns/net" if tid else f"/proc/{pid}/ns/net"
    try:
        return os.stat(path).st_ino
    except OSError:
        return None
