"""The port table: listening sockets in, port ``open``/``close`` out.

A port is open from the moment its first listening socket appears until its last one goes,
so IPv4 and IPv6 listeners, SO_REUSEPORT groups and sockets shared by forked workers are one
port. The table is pure bookkeeping: no I/O, no clock, so it can be tested exhaustively.
"""

from __future__ import annotations

from typing import Hashable, Iterable, Optional

from aether.ports.events import CLOSE, INODE, OPEN, SKADDR, Listener, PortEvent


class PortTable:
    """Listening sockets grouped by port, with the ignored ports left out entirely."""

    def __init__(self, ignored: Iterable[int] = ()):
        self._ignored = frozenset(ignored)
        self._sockets: dict[Hashable, Listener] = {}
        self._ports: dict[int, dict[Hashable, Listener]] = {}

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

    def is_uncertain(self, port: int) -> bool:
        """True when some of the port's sockets came from a snapshot, not from the probe.

        Probe events for such a port cannot be matched to those sockets, so the caller
        resynchronises instead of trusting its own count.
        """
        return any(key[0] == INODE for key in self._ports.get(port, ()))

    def add(self, listener: Listener) -> Optional[PortEvent]:
        """Record a listening socket; an ``open`` event when it is its port's first."""
        if listener.port in self._ignored or listener.key in self._sockets:
            return None
        self._sockets[listener.key] = listener
        group = self._ports.setdefault(listener.port, {})
        group[listener.key] = listener
        if len(group) == 1:
            return _open_event(listener.port, group)
        return None

    def remove(self, key: Hashable) -> tuple[bool, Optional[PortEvent]]:
        """Forget a socket: (whether it was known, a ``close`` event if its port emptied)."""
        listener = self._sockets.pop(key, None)
        if listener is None:
            return False, None
        group = self._ports[listener.port]
        del group[key]
        if group:
            return True, None
        del self._ports[listener.port]
        return True, PortEvent(CLOSE, listener.port)

    def sync(self, snapshot: Iterable[Listener], trust_probe: bool = True) -> list[PortEvent]:
        """Make the table agree with a complete snapshot; the events that brings.

        Ports are compared as a whole. Where the snapshot and the table name the same sockets,
        nothing changes. Where the table holds probe-keyed sockets, the counts agree and
        ``trust_probe`` holds (no probe record was lost), the table is kept: its keys will
        match the probe's later events. Otherwise the port's sockets are replaced by the
        snapshot's, without an event while the port stays open, and the port is uncertain.
        """
        wanted: dict[int, dict[Hashable, Listener]] = {}
        for listener in snapshot:
            if listener.port not in self._ignored:
                wanted.setdefault(listener.port, {})[listener.key] = listener
        events = []
        for port in sorted(self._ports.keys() - wanted.keys()):
            for key in list(self._ports[port]):
                known, event = self.remove(key)
                if event:
                    events.append(event)
        for port in sorted(wanted):
            have = self._ports.get(port)
            want = wanted[port]
            if have is None:
                for listener in want.values():
                    event = self.add(listener)
                    if event:
                        events.append(event)
                continue
            if have.keys() == want.keys():
                continue
            if trust_probe and len(have) == len(want) and any(key[0] == SKADDR for key in have):
                continue
            for key in list(have):
                del self._sockets[key]
            self._ports[port] = dict(want)
            self._sockets.update(want)
        return events

    def set_ignored(self, ignored: Iterable[int]) -> list[PortEvent]:
        """Change the ignored ports: ``close`` for ports newly ignored.

        Ports no longer ignored are not known to the table; the caller resynchronises to
        learn whether they listen.
        """
        self._ignored = frozenset(ignored)
        events = []
        for port in sorted(self._ports.keys() & self._ignored):
            for key in list(self._ports[port]):
                known, event = self.remove(key)
                if event:
                    events.append(event)
        return events

    def open_event(self, port: int) -> Optional[PortEvent]:
        """The ``open`` event that describes a port as it is now (for new subscribers)."""
        group = self._ports.get(port)
        return _open_event(port, group) if group else None


def _open_event(port: int, group: dict[Hashable, Listener]) -> PortEvent:
    first = next(iter(group.values()))
    addresses = tuple(sorted({listener.address for listener in group.values()}))
    return PortEvent(OPEN, port, first.pid, None, addresses)
