"""A gateway's route table: every workspace of the fleet, in memory, kept by full loads and the
change stream's entries. Pure: the follower does the Redis half and feeds it.

- A **full load** builds the new table aside and swaps it in whole; a blob whose bytes did not
  change keeps its decoded object (a periodic reload decodes nothing new).
- An **entry** must carry the sequence number after the last one applied; any other is a gap
  (trimmed while the gateway was away, or Redis lost its data) and asks for a full load.
- **Liveness**: a workspace is unavailable (503) when its blob says it stopped, when its
  deadline passed (the follower's checks mark it dead; a later deadline or entry revives it),
  or when it is unconfirmed past its grace.
- **Redis lost its data** (its boot id changed, or it came back empty while the table was not):
  the load merges. Workspaces Redis no longer knows are kept, *unconfirmed*, for a grace of twice
  their heartbeat deadline; their VMs claim them again within a heartbeat, which confirms them.
  Requests to their open ports go on being served meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

from aether.fleet.blob import BlobError, Workspace, decode

log = logging.getLogger("aether.fleet")

#: What :meth:`Routes.route` found.
UNKNOWN = "unknown"  # no such prefix: 404
NO_KEY = "no-key"  # the workspace registers no such key: 404
UNAVAILABLE = "unavailable"  # stopped, dead, or unconfirmed past its grace: 503
CLOSED = "closed"  # nothing listens on the port: 502
OPEN = "open"  # forward

GAP = "gap"
APPLIED = "applied"

Change = Callable[[str, Workspace | None, Workspace | None], None]


class Snapshot:
    """What a full load read from Redis in one transaction."""

    __slots__ = ("seq", "position", "boot", "now_ms", "state", "deadlines")

    def __init__(
        self,
        seq: int,
        position: bytes,
        boot: bytes | None,
        now_ms: int,
        state: Mapping[bytes, bytes],
        deadlines: Mapping[bytes, float],
    ):
        self.seq = seq  # the last change's number
        self.position = position  # the stream id to follow from
        self.boot = boot
        self.now_ms = now_ms  # Redis's clock at the load
        self.state = state  # prefix -> blob
        self.deadlines = deadlines  # prefix -> deadline (ms)


def became_private(old: Workspace | None, new: Workspace | None) -> frozenset[int]:
    """Ports public in ``old`` that are not in ``new`` (gone, or another workspace now): the
    connections admitted to them without a credential must close."""
    if old is None:
        return frozenset()
    public = frozenset(port for port, is_public in old.open.items() if is_public) | old.closed_public
    if new is None or new.epoch != old.epoch:
        return public
    return frozenset(port for port in public if not new.is_public(port))


def _decoded(prefix: str, raw: bytes) -> Workspace | None:
    try:
        return decode(raw, prefix)
    except BlobError as exc:
        log.warning("fleet workspace skipped: its blob is malformed", extra={"prefix": prefix[:64], "reason": str(exc)})
        return None


class Routes:
    """The table. ``on_change(prefix, old, new)`` is called for every workspace whose blob a
    load or an entry replaced (``new`` None: removed), after the table changed."""

    def __init__(self, on_change: Change | None = None, clock: Callable[[], float] = time.monotonic):
        self.workspaces: dict[str, Workspace] = {}
        self.seq = 0
        self.position = b"0-0"
        self.boot: bytes | None = None
        self.on_change = on_change
        self.clock = clock
        self.dead: set[str] = set()
        self.unconfirmed: dict[str, float] = {}  # prefix -> end of its grace (clock)
        self._seen: dict[str, int] = {}  # prefix -> Redis ms of the entry or load that wrote it
        self._revive_from = 0
        #: Called with each prefix a deadline or a load newly marks dead (its VM is not answering).
        self.on_dead: Callable[[str], None] | None = None

    # -- lookups --------------------------------------------------------------------------

    def route(self, prefix: str, target: int | str) -> tuple[Workspace | None, int | None, str]:
        """(workspace, port, what) for a request to port or registry key ``target``."""
        ws = self.workspaces.get(prefix)
        if ws is None:
            return None, None, UNKNOWN
        if isinstance(target, str):
            port = ws.names.get(target)
            if port is None:
                return ws, None, NO_KEY
        else:
            port = target
        if not self.available(prefix, ws):
            return ws, port, UNAVAILABLE
        return ws, port, OPEN if port in ws.open else CLOSED

    def available(self, prefix: str, ws: Workspace) -> bool:
        if not ws.alive or prefix in self.dead:
            return False
        until = self.unconfirmed.get(prefix)
        return until is None or self.clock() <= until

    def counts(self) -> tuple[int, int, int]:
        """(workspaces, open ports, workspaces available) for the metrics."""
        ports = alive = 0
        for prefix, ws in self.workspaces.items():
            ports += len(ws.open)
            alive += self.available(prefix, ws)
        return len(self.workspaces), ports, alive

    # -- full loads -----------------------------------------------------------------------

    def data_lost(self, snapshot: Snapshot) -> bool:
        """Whether Redis lost what this table was loaded from."""
        if self.boot is None:
            return False
        return snapshot.boot != self.boot or (not snapshot.state and bool(self.workspaces))

    def load(self, snapshot: Snapshot, judge: bool = True) -> bool:
        """Replace the table by ``snapshot``; whether it merged (Redis lost its data). ``judge``
        False keeps the dead marks a workspace had (after Redis was away, its deadlines say
        nothing: the VMs could not heartbeat)."""
        merge = self.data_lost(snapshot)
        now = self.clock()
        old = self.workspaces
        table: dict[str, Workspace] = {}
        dead: set[str] = set()
        seen: dict[str, int] = {}
        for raw_prefix, raw in snapshot.state.items():
            prefix = raw_prefix.decode("utf-8", "replace")
            previous = old.get(prefix)
            ws = previous if previous is not None and previous.raw == raw else _decoded(prefix, raw)
            if ws is None:
                continue
            table[prefix] = ws
            seen[prefix] = self._seen.get(prefix, 0) if ws is previous else snapshot.now_ms
            if not judge and previous is not None:
                if prefix in self.dead:
                    dead.add(prefix)
            else:
                deadline = snapshot.deadlines.get(raw_prefix)
                if ws.alive and (deadline is None or deadline <= snapshot.now_ms):
                    dead.add(prefix)
        unconfirmed: dict[str, float] = {}
        for prefix, ws in old.items():
            if prefix in table:
                continue
            until = self.unconfirmed.get(prefix)
            if merge and until is None:
                until = now + 2 * ws.dead_after / 1000
            if until is not None and now <= until:
                # Kept as it was, alive or not: its VM will claim it again.
                table[prefix] = ws
                unconfirmed[prefix] = until
                seen[prefix] = self._seen.get(prefix, 0)
                if prefix in self.dead:
                    dead.add(prefix)
        newly_dead = dead - self.dead
        self.workspaces, self.dead, self._seen, self.unconfirmed = table, dead, seen, unconfirmed
        if self.on_dead is not None:
            for prefix in newly_dead:
                self.on_dead(prefix)
        self.seq, self.position, self.boot = snapshot.seq, snapshot.position, snapshot.boot
        if self.on_change is not None:
            for prefix, ws in old.items():
                new = table.get(prefix)
                if new is not ws:
                    self.on_change(prefix, ws, new)
            for prefix, ws in table.items():
                if prefix not in old:
                    self.on_change(prefix, None, ws)
        return merge

    # -- the stream -----------------------------------------------------------------------

    def apply(self, entry_id: bytes, seq: int, prefix: str, state: bytes) -> str:
        """One stream entry: ``APPLIED``, or ``GAP`` (nothing changed: load in full)."""
        if seq != self.seq + 1:
            return GAP
        self.seq, self.position = seq, entry_id
        old = self.workspaces.get(prefix)
        new = _decoded(prefix, state) if state else None
        if new is None:
            self.workspaces.pop(prefix, None)
            self._seen.pop(prefix, None)
        else:
            self.workspaces[prefix] = new
            self._seen[prefix] = int(entry_id.partition(b"-")[0] or 0)
        # Written by its VM just now (or removed): alive and confirmed, whatever was thought.
        self.dead.discard(prefix)
        self.unconfirmed.pop(prefix, None)
        if self.on_change is not None and (old is not None or new is not None):
            self.on_change(prefix, old, new)
        return APPLIED

    # -- liveness -------------------------------------------------------------------------

    def expire(self, expired: Iterable[tuple[str, float]]) -> list[str]:
        """Deadlines that passed: (prefix, deadline) pairs. A workspace written after its
        deadline (an entry crossed the check) is not dead. Returns the ones newly marked."""
        marked = []
        for prefix, deadline in expired:
            if prefix in self.workspaces and prefix not in self.dead and prefix not in self.unconfirmed:
                if self._seen.get(prefix, 0) < deadline:
                    self.dead.add(prefix)
                    marked.append(prefix)
        if self.on_dead is not None:
            for prefix in marked:
                self.on_dead(prefix)
        return marked

    def to_revive(self, limit: int) -> list[str]:
        """Up to ``limit`` dead workspaces whose deadline to check, a different slice each call."""
        if not self.dead:
            return []
        dead = list(self.dead)
        start = self._revive_from % len(dead)
        self._revive_from = start + limit
        return (dead[start:] + dead[:start])[:limit]

    def revive(self, deadlines: Iterable[tuple[str, float | None]], now_ms: int) -> list[str]:
        """Dead workspaces whose deadline (now known) is ahead of ``now_ms`` again."""
        revived = []
        for prefix, deadline in deadlines:
            if deadline is not None and deadline > now_ms and prefix in self.dead:
                self.dead.discard(prefix)
                revived.append(prefix)
        return revived
