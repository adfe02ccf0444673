"""Which preview ports are ``public``; every other port is ``private`` (the default).

Kept in the state directory's ``config.json`` as ``preview_public_ports`` so a restart keeps it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

PRIVATE = "private"
PUBLIC = "public"
VALUES = (PRIVATE, PUBLIC)


class Visibility:
    """``public``: the ports public now. That is the ports chosen public (``chosen``, what
    ``config.json`` keeps), except where an attribute rule gave an open port its initial
    visibility (:meth:`rule`) and nobody chose otherwise since it opened (:meth:`choose`)."""

    def __init__(self, public: Iterable[int] = ()):
        self.chosen: frozenset[int] = frozenset(public)
        self._public: frozenset[int] = self.chosen
        self._rules: dict[int, str] = {}  # open port -> its rule's visibility
        self._chosen_since_open: set[int] = set()
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
        """The ports chosen public after setting ``port`` to ``value``; this object is unchanged."""
        if value not in VALUES:
            raise ValueError(f"visibility must be {' or '.join(VALUES)}, not {value!r}")
        return self.chosen | {port} if value == PUBLIC else self.chosen - {port}

    def choose(self, port: int, value: str) -> None:
        """A person set ``port``'s visibility: it holds over the port's rule until the port closes."""
        self.chosen = self.changed(port, value)
        self._rules.pop(port, None)
        self._chosen_since_open.add(port)
        self._update()

    def rule(self, port: int, value: str | None) -> None:
        """An open port's rule says ``value`` (None: no rule sets its visibility)."""
        if port in self._chosen_since_open or self._rules.get(port) == value:
            return
        if value is None:
            self._rules.pop(port, None)
        else:
            self._rules[port] = value
        self._update()

    def closed(self, port: int) -> None:
        self._chosen_since_open.discard(port)
        if self._rules.pop(port, None) is not None:
            self._update()

    def _update(self) -> None:
        ruled = {port for port, value in self._rules.items() if value == PUBLIC}
        private = {port for port, value in self._rules.items() if value == PRIVATE}
        public = frozenset((self.chosen | ruled) - private)
        if public != self._public:
            self.public = public


def load(raw: object) -> frozenset[int]:
    """The public ports from ``config.json``'s value, or ValueError saying what is wrong."""
    if not isinstance(raw, list) or not all(isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 65535 for p in raw):
        raise ValueError("preview_public_ports must be an array of port numbers")
    return frozenset(raw)
