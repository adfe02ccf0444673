"""A gateway's half of fleet mode: keep a :class:`~aether.fleet.routes.Routes` equal to Redis.

- **Full load**, in one MULTI/EXEC: ``GET seq``, ``HGETALL state``, the stream's last id,
  ``SET boot NX GET`` (a boot id is made if there is none), ``TIME``, every deadline. The
  table is built aside and swapped in whole.
- **Follow**: ``XREAD BLOCK`` from the load's position, on a connection of its own, each entry
  applied as it comes; an entry out of sequence (a gap) asks for a full load. The block is 1 s,
  so a reload asked for by another part (the timer, a changed boot id) waits 1 s at most; an
  idle gateway costs Redis one XREAD a second.
- **Reload** also after any reconnect, when the boot id changed (Redis lost its data: the load
  merges, see :mod:`.routes`), and every ``reload_interval`` s (±10 %), so nothing drifts.
- **Liveness**, every ``liveness_interval`` s: one script reads Redis's clock, the deadlines
  passed since the last check (dead), the boot id, and the deadlines of a batch of dead
  workspaces (revived when ahead again: a backstop, as a heartbeat that finds its deadline
  passed also writes an entry). After Redis was away nobody could heartbeat, so for ``quiet`` s
  after a reconnect, or after a check that Redis ran over ``stall`` s after it was sent (it
  stalled for everyone), no deadline marks anyone dead; then all of them are judged.
- **While Redis is down** the table stands as it was and keeps serving; :attr:`redis_up` and
  :meth:`health` say so; both connections retry with a backoff of 0.25 s doubling to 1 s.

Every ``reap_interval`` s the follower also forgets workspaces dead for more than ``retain`` s
(:data:`~aether.fleet.keys.REAP`), so the table does not grow with every VM ever deleted.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import random
import secrets
import time
from typing import TYPE_CHECKING

from aether.fleet import connection, keys
from aether.fleet import routes as r

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

log = logging.getLogger("aether.fleet")

BACKOFF_FIRST = 0.25
BACKOFF_MAX = 1.0
#: Seconds. Entries are applied within a millisecond of their write on a LAN; a gateway that
#: falls behind shows in the upper buckets.
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: A check answered within this many ms measures the clocks' offset well enough.
_CLEAN_RTT_MS = 20.0
REASONS = ("start", "reconnect", "gap", "boot", "interval")


class Histogram:
    """Bucket counts (``counts[-1]`` is +Inf), as :class:`aether.server.metrics.Histogram` keeps them."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = LAG_BUCKETS):
        self.bounds, self.counts, self.total = bounds, [0] * (len(bounds) + 1), 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value


class Follower:
    def __init__(
        self,
        url: str,
        routes: r.Routes,
        *,
        liveness_interval: float = 0.1,
        reload_interval: float = 300.0,
        block_ms: int = 1000,
        count: int = 1000,
        revive_batch: int = 256,
        quiet: float = 6.0,
        stall: float = 0.5,
        reap_interval: float = 3600.0,
        retain: float = 7 * 86400.0,
        reap_batch: int = 1000,
    ):
        self.url = connection.check(url)
        self.routes = routes
        self.liveness_interval = liveness_interval
        self.reload_interval = reload_interval
        self.block_ms, self.count, self.revive_batch = block_ms, count, revive_batch
        self.quiet = quiet
        # A check answers in well under a millisecond on a LAN, tens under load: one that takes
        # half a second means Redis stopped answering everyone, heartbeats too. (VMs heartbeat
        # every 1 s with a 3 s deadline: only a stall of over 2 s can make a deadline pass.)
        self.stall = stall
        self.stalls = 0
        self.checks = 0  # liveness checks answered
        self.reap_interval, self.retain, self.reap_batch = reap_interval, retain, reap_batch
        # -- what the gateway shows on /healthz and /metrics --------------------------------
        self.redis_up = False
        self.down_since: float | None = time.time()  # wall clock: for people
        self.loaded = False
        self.reloads = dict.fromkeys(REASONS, 0)
        self.merges = 0
        self.applied = 0
        self.reaped = 0
        self.lag = Histogram()
        self.last_load_seconds = 0.0
        #: Redis's clock minus this host's, in ms, from the last check answered quickly.
        self.offset_ms = 0.0
        self._offset_known = False
        # -- the machinery ------------------------------------------------------------------
        self._main: Redis | None = None  # loads, liveness, reaping
        self._stream: Redis | None = None  # XREAD BLOCK only
        self._liveness: AsyncScript | None = None
        self._reap: AsyncScript | None = None
        self._reason: str | None = "start"
        self._prev: int | None = None
        self._quiet_until = 0.0
        self._tasks: list[asyncio.Task] = []
        self._loading = False
        self._loads = 0

    # -- clients --------------------------------------------------------------------------

    def _clients(self):
        if self._main is None:
            self._main = connection.client(self.url, socket_timeout=5.0)
            self._liveness = self._main.register_script(keys.LIVENESS)
            self._reap = self._main.register_script(keys.REAP)
        if self._stream is None:
            self._stream = connection.client(self.url, socket_timeout=self.block_ms / 1000 + 2.0)
        return self._main, self._stream

    async def _close(self, which: str) -> None:
        client = getattr(self, which)
        setattr(self, which, None)
        if client is not None:
            try:
                await client.aclose()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is gone
                pass

    def _down(self, exc: BaseException, where: str) -> None:
        if self.redis_up or self.down_since is None:
            self.down_since = time.time()
        if self.redis_up:
            log.warning(
                "fleet redis unreachable: serving the routes held",
                extra={"redis": connection.describe(self.url), "where": where, "error": f"{type(exc).__name__}: {exc}"[:300]},
            )
        self.redis_up = False
        self._prev = None
        if self._reason is None:
            self._reason = "reconnect"

    def _reload_soon(self, reason: str) -> None:
        """Reload when the follow loop's XREAD returns (``block_ms`` at most)."""
        if self._reason is None:
            self._reason = reason

    # -- full loads -----------------------------------------------------------------------

    async def _snapshot(self) -> r.Snapshot:
        main, _ = self._clients()
        pipe = main.pipeline(transaction=True)
        pipe.get(keys.SEQ)
        pipe.hgetall(keys.STATE)
        pipe.xrevrange(keys.CHANGES, "+", "-", count=1)
        candidate = secrets.token_hex(8).encode()
        pipe.set(keys.BOOT, candidate, nx=True, get=True)
        pipe.time()
        pipe.zrange(keys.ALIVE, 0, -1, withscores=True)
        seq, state, last, boot, (seconds, micros), alive = await connection.call(pipe.execute())
        return r.Snapshot(
            seq=int(seq or 0),
            position=last[0][0] if last else b"0-0",
            boot=boot if boot is not None else candidate,
            now_ms=seconds * 1000 + micros // 1000,
            state=state,
            deadlines=dict(alive),
        )

    async def _reload(self, reason: str) -> None:
        started = time.perf_counter()
        snapshot = await self._snapshot()
        if not self.redis_up and self.loaded:
            # Back after Redis was away: no VM could heartbeat meanwhile.
            self._quiet_until = max(self._quiet_until, time.monotonic() + self.quiet)
        quiet = time.monotonic() < self._quiet_until
        merged = self.routes.load(snapshot, judge=not quiet)
        self.last_load_seconds = time.perf_counter() - started
        self.reloads[reason] = self.reloads.get(reason, 0) + 1
        self.merges += merged
        self._prev = None if quiet else snapshot.now_ms
        self.loaded = True
        self._loads += 1
        if not self.redis_up:
            self.redis_up, self.down_since = True, None
        count, ports, alive = self.routes.counts()
        log.info(
            "fleet routes loaded",
            extra={
                "reason": "boot" if merged else reason,
                "merged": merged,
                "workspaces": count,
                "ports": ports,
                "alive": alive,
                "seq": snapshot.seq,
                "seconds": round(self.last_load_seconds, 4),
            },
        )

    # -- the loops ------------------------------------------------------------------------

    async def _follow(self) -> None:
        backoff = BACKOFF_FIRST
        while True:
            if self._reason is not None:
                reason = self._reason
                try:
                    self._loading = True
                    await self._reload(reason)
                except Exception as exc:  # noqa: BLE001 - down or refusing: the table stands
                    self._down(exc, "load")
                    await self._close("_main")
                    await asyncio.sleep(backoff)
                    backoff = min(BACKOFF_MAX, backoff * 2)
                    continue
                finally:
                    self._loading = False
                if self._reason == reason:
                    self._reason = None
                backoff = BACKOFF_FIRST
            _, stream = self._clients()
            try:
                reply = await connection.call(
                    stream.xread({keys.CHANGES: self.routes.position}, count=self.count, block=self.block_ms)
                )
            except Exception as exc:  # noqa: BLE001
                self._down(exc, "stream")
                await self._close("_stream")
                await asyncio.sleep(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)
                continue
            self._apply(reply)

    def _apply(self, reply) -> None:
        now_ms = time.time() * 1000 + self.offset_ms
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                try:
                    seq = int(fields[b"seq"])
                    prefix = fields[b"prefix"].decode()
                    state = fields[b"state"]
                except (KeyError, ValueError, UnicodeDecodeError):
                    log.warning("fleet stream entry malformed: reloading", extra={"id": entry_id.decode("latin-1")})
                    self._reason = self._reason or "gap"
                    return
                if self.routes.apply(entry_id, seq, prefix, state) == r.GAP:
                    log.info("fleet stream gap: reloading", extra={"expected": self.routes.seq + 1, "got": seq})
                    self._reason = self._reason or "gap"
                    return
                self.applied += 1
                self.lag.observe(max(0.0, now_ms - int(entry_id.partition(b"-")[0])) / 1000)

    async def _watch(self) -> None:
        """The liveness checks, and noticing Redis is back or lost its data."""
        while True:
            await asyncio.sleep(self.liveness_interval)
            if self._main is None:
                if self._loading or self._reason is not None:
                    continue  # the follow loop is reconnecting
                self._clients()
            batch = self.routes.to_revive(self.revive_batch)
            judging = time.monotonic() >= self._quiet_until
            # Not judging: ask for no deadlines ("(+inf" is an empty range).
            since = ("" if self._prev is None else self._prev) if judging else "+inf"
            loads = self._loads
            sent = time.time() * 1000
            assert self._liveness is not None  # registered by _clients with the first client
            try:
                now_ms, boot, expired, deadlines = await connection.call(
                    self._liveness(keys=keys.LIVENESS_KEYS, args=[since, *batch])
                )
            except Exception as exc:  # noqa: BLE001
                self._down(exc, "liveness")
                await self._close("_main")
                continue
            received = time.time() * 1000
            self.checks += 1
            if self._offset_known and now_ms - (sent + self.offset_ms) > self.stall * 1000:
                # Redis ran the check long after it was sent (this gateway's own loop being slow
                # to read the answer does not count).
                self.stalls += 1
                self._quiet_until = time.monotonic() + self.quiet
                judging = False
                log.warning(
                    "fleet redis stalled: no deadline judged for a while",
                    extra={"seconds": round((now_ms - sent - self.offset_ms) / 1000, 3), "quiet": self.quiet},
                )
            elif received - sent <= _CLEAN_RTT_MS or not self._offset_known:
                self.offset_ms = now_ms - (sent + received) / 2
                self._offset_known = received - sent <= _CLEAN_RTT_MS
            if not self.redis_up:
                if self.loaded:
                    # Back: reload, and judge no deadline until the VMs had time to heartbeat.
                    self._quiet_until = time.monotonic() + self.quiet
                    self._reload_soon("reconnect")
                continue  # (not loaded yet: the follow loop is at its first load)
            if self._loading or self._reason is not None:
                continue
            if boot != self.routes.boot:
                self._reload_soon("boot")
                continue
            # A load that ended meanwhile judged for itself (or began a quiet time).
            if judging and loads == self._loads and time.monotonic() >= self._quiet_until:
                # Without a previous check, every deadline up to now (the script's range).
                self.routes.expire((prefix.decode(), float(deadline)) for prefix, deadline in zip(expired[::2], expired[1::2]))
                self._prev = now_ms
            self.routes.revive(((prefix, None if d is None else float(d)) for prefix, d in zip(batch, deadlines)), now_ms)

    async def _timers(self) -> None:
        next_reload = time.monotonic() + self._jitter(self.reload_interval)
        next_reap = time.monotonic() + self._jitter(self.reap_interval)
        while True:
            await asyncio.sleep(max(0.0, min(next_reload, next_reap) - time.monotonic()))
            now = time.monotonic()
            if now >= next_reload:
                next_reload = now + self._jitter(self.reload_interval)
                if self._reason is None and self.redis_up:
                    self._reason = "interval"  # after the current XREAD returns (block_ms at most)
            if now >= next_reap:
                next_reap = now + self._jitter(self.reap_interval)
                await self.reap()

    @staticmethod
    def _jitter(seconds: float) -> float:
        return seconds * random.uniform(0.9, 1.1)

    async def reap(self) -> int:
        """Forget workspaces dead longer than ``retain`` s; how many (0 when Redis is down)."""
        if self._main is None or not self.redis_up:
            return 0
        assert self._reap is not None  # registered by _clients with the first client
        try:
            count = await connection.call(
                self._reap(keys=keys.CHANGE_KEYS, args=[int(self.retain * 1000), self.reap_batch, keys.STREAM_MAXLEN])
            )
        except Exception as exc:  # noqa: BLE001 - the next round tries again
            log.warning("fleet reap failed", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})
            return 0
        if count:
            self.reaped += count
            log.info("fleet workspaces forgotten: dead longer than the retention", extra={"count": count, "retain": self.retain})
        return count

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, timeout: float = 5.0) -> None:
        """Load the table (up to ``timeout`` s: a Redis that is down leaves it empty, loaded
        when Redis is back), then follow."""
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._follow()), loop.create_task(self._watch()), loop.create_task(self._timers())]
        deadline = time.monotonic() + timeout
        while not self.loaded and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # each ends at once: see connection.call
        await self._close("_main")
        await self._close("_stream")

    def health(self) -> dict:
        """What ``/healthz`` shows: ``ok``, or ``degraded`` while Redis is down (the routes held
        are served), or ``starting`` before the first load."""
        count, ports, alive = self.routes.counts()
        body = {
            "status": "ok" if self.redis_up else ("degraded" if self.loaded else "starting"),
            "redis": "up" if self.redis_up else "down",
            "workspaces": count,
            "alive": alive,
            "ports": ports,
            "seq": self.routes.seq,
        }
        if self.down_since is not None:
            body["since"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.down_since))
        return body
