"""A watch's events in one window, coalesced (:class:`Coalescer`): at most one per path, in an
order a client can apply. Pure: no I/O, no event loop.
"""

from __future__ import annotations

#: Distinct paths in one window beyond which the window is sent as one ``overflow``.
MAX_PENDING_PATHS = 1000
#: Pending paths looked through for directory moves in one window (each move looks through
#: all), beyond which the window is sent as one ``overflow``: a directory moved back and forth
#: next to many changes stays cheap.
MAX_CARRY_WORK = 100 * MAX_PENDING_PATHS

CREATED, MODIFIED, DELETED, MOVED = "created", "modified", "deleted", "moved"
FILE, DIRECTORY = "file", "directory"


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top + "/")


class Coalescer:
    """One watch's events in one window, at most one per path, in an order a client can apply
    one after another: what it never saw is not told (created then deleted is nothing; a file
    created then moved is created where it ends up), and what a moved directory held moves
    with it. Paths are relative to the watched directory."""

    def __init__(self, limit: int = MAX_PENDING_PATHS, work: int = MAX_CARRY_WORK):
        self.limit = limit
        self.work = work
        self.pending: dict[str, tuple[str, str, str | None]] = {}  # path -> (type, kind, from)
        self.overflowed = False
        self._carried = 0

    def __bool__(self) -> bool:
        return self.overflowed or bool(self.pending)

    def overflow(self) -> None:
        self.overflowed = True
        self.pending.clear()

    def add(self, type_: str, path: str, kind: str, source: str | None = None) -> None:
        if self.overflowed:
            return
        if type_ == MOVED:
            self._move(source or "", path, kind)
        else:
            self._merge(type_, path, kind)
        if len(self.pending) > self.limit:
            self.overflow()

    def take(self) -> list[tuple[str, str, str, str | None]] | None:
        """The window's events as ``(type, path, kind, from)``, or None for an overflow."""
        events = None if self.overflowed else [(t, p, k, s) for p, (t, k, s) in self.pending.items()]
        self.pending = {}
        self.overflowed = False
        self._carried = 0
        return events

    def _merge(self, type_: str, path: str, kind: str) -> None:
        prev = self.pending.get(path)
        if prev is None:
            self.pending[path] = (type_, kind, None)
            return
        was, was_kind, source = prev
        if type_ == CREATED:
            # Deleted and made again: changed, unless it is now another kind of thing.
            same = was == DELETED and was_kind == kind
            self.pending[path] = (MODIFIED if same else CREATED, kind, None)
        elif type_ == DELETED:
            if was == CREATED:
                del self.pending[path]
            else:
                self.pending[path] = (DELETED, kind, None)
                if was == MOVED and source is not None and source not in self.pending:
                    self.pending[source] = (DELETED, kind, None)
        elif was == DELETED:
            self.pending[path] = (MODIFIED, kind, None)
        # Modified after created, moved or modified adds nothing.

    def _move(self, source: str, path: str, kind: str) -> None:
        prev = self.pending.pop(source, None)
        new: tuple[str, str, str | None]
        if prev is not None and prev[0] == CREATED:
            new = (CREATED, kind, None)
        elif prev is not None and prev[0] == MOVED:
            new = (MODIFIED, kind, None) if prev[2] == path else (MOVED, kind, prev[2])
        else:
            new = (MOVED, kind, source)
        old = self.pending.pop(path, None)
        if new[0] == CREATED and old is not None and old[0] == DELETED and old[1] == kind:
            new = (MODIFIED, kind, None)
        self.pending[path] = new  # last: after whatever it depends on
        if kind == DIRECTORY and len(self.pending) > 1:
            self._carried += len(self.pending)
            if self._carried > self.work:
                self.overflow()
            else:
                self._carry(source, path)

    def _carry(self, source: str, path: str) -> None:
        """Events under a moved directory, renamed to where it went and put after the move."""
        prefix = source + "/"
        below = [(p, e) for p, e in self.pending.items() if p.startswith(prefix)]
        for p, _ in below:
            del self.pending[p]
        for p, (t, k, s) in below:
            if s is not None and _under(s, source):
                s = path + s[len(source) :]
            self.pending[path + p[len(source) :]] = (t, k, s)
