"""Which preview ports are ``public``; every other port is ``private`` (the default).

Kept in the state directory's ``config.json`` as ``preview_public_ports`` so a restart keeps it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

PRIVATE = "private"
PUBLIC = "public"
VALUES = (PRIVATE, PUBLIC)


class Visibility:
    def __init__(self, public: Iterable[int] = ()):
        self._public: frozenset[int] = frozenset(public)
        self._subscribers: list[Callable[[], None]] = []

    @property
    def public(self) -> frozenset[int]:
        return self._public

    @public.setter
    def public(self, ports: frozenset[int]) -> None:
        self._public = ports
        for subscriber in self._subscribers:
            subscriber()

    def subscribe(self, subscriber: Callable[[], None]) -> None:
        """Call ``subscriber`` after every change (fleet mode publishes it)."""
        self._subscribers.append(subscriber)

    def of(self, port: int) -> str:
        return PUBLIC if port in self.public else PRIVATE

    def changed(self, port: int, value: str) -> frozenset[int]:
        """The public ports after setting ``port`` to ``value``; this object is unchanged."""
        if value not in VALUES:
            raise ValueError(f"visibility must be {' or '.join(VALUES)}, not {value!r}")
        return self.public | {port} if value == PUBLIC else self.public - {port}


def load(raw: object) -> frozenset[int]:
    """The public ports from ``config.json``'s value, or ValueError saying what is wrong."""
    if not isinstance(raw, list) or not all(isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 65535 for p in raw):
        raise ValueError("preview_public_ports must be an array of port numbers")
    return frozenset(raw)
