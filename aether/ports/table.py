"""The port table: listening sockets in, port ``open``/``update``/``close`` out.

A port is open from the moment its first listening socket appears until its last one goes,
so IPv4 and IPv6 listeners, SO_REUSEPORT groups and sockets shared by forked workers are one
port. While it is open, a change of its state (its owner: the first socket's pid; its set of
bound addresses) is an ``update``. The table is pure bookkeeping: no I/O, no clock, so it can
be tested exhaustively.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from aether.ports.events import CLOSE, INODE, OPEN, SKADDR, UPDATE, Key, Listener, PortEvent

State = tuple[int | None, tuple[str, ...]]  # (pid, addresses)


class PortTable:
    """Listening sockets grouped by port, with the ignored ports left out entirely."""

    def __init__(self, ignored: Iterable[int] = ()):
        self._ignored = frozenset(ignored)
        self._sockets: dict[Key, Listener] = {}
        self._ports: dict[int, dict[Key, Listener]] = {}
        self._by_pid: dict[int, set[Key]] = {}  # recorded pid -> its sockets' keys
        # port -> bound address -> sockets on it: a port's state costs its few distinct
        # addresses, not its sockets (an SO_REUSEPORT group can be hundreds).
        self._addresses: dict[int, dict[str, int]] = {}

    @property
    def ignored(self) -> frozenset[int]:
        return self._ignored

    def __contains__(self, port: int) -> bool:
        return port in self._ports

    def __len__(self) -> int:
        return len(self._ports)

    def ports(self) -> list[int]:
        return sorted(self._ports)

    def listeners(self, port: int) -> list[Listener]:
        return list(self._ports.get(port, {}).values())

    def pids(self) -> set[int]:
        """Every pid recorded as a socket's owner."""
        return set(self._by_pid)

    def ports_of(self, pids: Iterable[int]) -> set[int]:
        """The ports with a socket recorded as owned by one of ``pids``."""
        return {self._sockets[key].port for pid in pids for key in self._by_pid.get(pid, ())}

    def is_uncertain(self, port: int) -> bool:
        """True when some of the port's sockets came from a snapshot, not from the probe.

        Probe events for such a port cannot be matched to those sockets, so the caller
        resynchronises instead of trusting its own count.
        """
        return any(key[0] == INODE for key in self._ports.get(port, ()))

    def add(self, listener: Listener) -> PortEvent | None:
        """Record a listening socket: ``open`` when it is its port's first, ``update`` when it
        changes the open port's state (a new address)."""
        if listener.port in self._ignored or listener.key in self._sockets:
            return None
        if listener.port not in self._ports:
            self._put(listener)
            return self._event(OPEN, listener.port)
        before = self._state(listener.port)
        self._put(listener)
        return self._changed(listener.port, before)

    def remove(self, key: Key) -> tuple[bool, PortEvent | None]:
        """Forget a socket: (whether it was known, ``close`` if its port emptied, ``update`` if
        the port stays open in another state)."""
        listener = self._sockets.get(key)
        if listener is None:
            return False, None
        before = self._state(listener.port)
        self._drop(key)
        if listener.port not in self._ports:
            return True, PortEvent(CLOSE, listener.port)
        return True, self._changed(listener.port, before)

    def set_pids(self, port: int, pids: dict[Key, int | None]) -> PortEvent | None:
        """Give the port's sockets named by key new owners (a recorded owner exited and
        another process holds the socket): ``update`` if the port's state changed."""
        group = self._ports.get(port)
        if not group:
            return None
        before = self._state(port)
        for key, pid in pids.items():
            listener = group.get(key)
            if listener is not None and listener.pid != pid:
                self._put(dataclasses.replace(listener, pid=pid))
        return self._changed(port, before)

    def sync(self, snapshot: Iterable[Listener], trust_probe: bool = True) -> list[PortEvent]:
        """Make the table agree with a complete snapshot; the events that brings.

        Ports are compared as a whole. Where the snapshot and the table hold the same sockets,
        nothing changes. Where the table holds probe-keyed sockets, the counts agree and
        ``trust_probe`` holds (no probe record was lost), the table is kept: its keys will
        match the probe's later events. Otherwise the port's sockets are replaced by the
        snapshot's (an ``update`` if that changes the port's state), and the port is uncertain.
        A port new to the table opens with all of the snapshot's sockets.
        """
        wanted: dict[int, dict[Key, Listener]] = {}
        for listener in snapshot:
            if listener.port not in self._ignored:
                wanted.setdefault(listener.port, {})[listener.key] = listener
        events = []
        for port in sorted(self._ports.keys() - wanted.keys()):
            for key in list(self._ports[port]):
                self._drop(key)
            events.append(PortEvent(CLOSE, port))
        for port in sorted(wanted):
            have = self._ports.get(port)
            want = wanted[port]
            if have is None:
                for listener in want.values():
                    self._put(listener)
                events.append(self._event(OPEN, port))
                continue
            if have == want or self._trusted(have, len(want), trust_probe):
                continue
            before = self._state(port)
            # Sockets kept keep their places (the first is the owner), new ones go last.
            order = [key for key in have if key in want] + [key for key in want if key not in have]
            for key in list(have):
                self._drop(key)
            for key in order:
                self._put(want[key])
            event = self._changed(port, before)
            if event is not None:
                events.append(event)
        return events

    def keeps(self, port: int, sockets: int, trust_probe: bool = True) -> bool:
        """Whether :meth:`sync` keeps the open ``port`` as the table has it, whatever its
        ``sockets`` snapshot sockets are: their owners cannot change it."""
        have = self._ports.get(port)
        return have is not None and self._trusted(have, sockets, trust_probe)

    def set_ignored(self, ignored: Iterable[int]) -> list[PortEvent]:
        """Change the ignored ports: ``close`` for ports newly ignored.

        Ports no longer ignored are not known to the table; the caller resynchronises to
        learn whether they listen.
        """
        self._ignored = frozenset(ignored)
        events = []
        for port in sorted(self._ports.keys() & self._ignored):
            for key in list(self._ports[port]):
                self._drop(key)
            events.append(PortEvent(CLOSE, port))
        return events

    def open_event(self, port: int) -> PortEvent | None:
        """The ``open`` event that describes a port as it is now (for new subscribers)."""
        return self._event(OPEN, port) if port in self._ports else None

    # -- internals ----------------------------------------------------------------------

    def _put(self, listener: Listener) -> None:
        """Record ``listener``, replacing (in place: the port's order is kept) any socket of its key."""
        old = self._sockets.get(listener.key)
        if old is not None:
            self._unindex(old)
        self._sockets[listener.key] = listener
        self._ports.setdefault(listener.port, {})[listener.key] = listener
        counts = self._addresses.setdefault(listener.port, {})
        counts[listener.address] = counts.get(listener.address, 0) + 1
        if listener.pid is not None:
            self._by_pid.setdefault(listener.pid, set()).add(listener.key)

    def _drop(self, key: Key) -> None:
        """Forget a known socket, and its port when it was the last."""
        listener = self._sockets.pop(key)
        self._unindex(listener)
        group = self._ports[listener.port]
        del group[key]
        if not group:
            del self._ports[listener.port]

    def _unindex(self, listener: Listener) -> None:
        counts = self._addresses[listener.port]
        counts[listener.address] -= 1
        if not counts[listener.address]:
            del counts[listener.address]
            if not counts:
                del self._addresses[listener.port]
        if listener.pid is not None:
            keys = self._by_pid.get(listener.pid)
            if keys is not None:
                keys.discard(listener.key)
                if not keys:
                    del self._by_pid[listener.pid]

    @staticmethod
    def _trusted(have: dict[Key, Listener], sockets: int, trust_probe: bool) -> bool:
        """The probe's sockets of a port stand against a snapshot of as many (see :meth:`sync`)."""
        return trust_probe and len(have) == sockets and any(key[0] == SKADDR for key in have)

    def _state(self, port: int) -> State:
        """What a client is told of a port: the owner (its first socket's) and the bound addresses."""
        return next(iter(self._ports[port].values())).pid, tuple(sorted(self._addresses[port]))

    def _event(self, kind: str, port: int) -> PortEvent:
        pid, addresses = self._state(port)
        return PortEvent(kind, port, pid, None, addresses)

    def _changed(self, port: int, before: State) -> PortEvent | None:
        return self._event(UPDATE, port) if self._state(port) != before else None
