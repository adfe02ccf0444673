"""A VM's half of fleet mode: keep this workspace's record in Redis true while the server runs.

The publisher holds nothing but the workspace's identity; what it publishes is read from a
:class:`State` (the server's ports, visibility and registry) whenever it writes, always whole:
every write carries the complete blob, so each is idempotent and Redis's order is the truth.

- :meth:`Publisher.start` claims the prefix (:data:`~aether.fleet.keys.CLAIM`): refused with
  :class:`PrefixTaken` when another project holds it and is alive. A Redis that cannot be
  reached then is not fatal: the server works locally and the claim is made once it can be.
- :meth:`Publisher.changed`: something the blob shows changed. Changes are coalesced: the
  writer wakes once per event-loop turn at most, and a burst of events is one update.
- Heartbeats every ``heartbeat`` s refresh the deadline (``dead_after`` ahead). An update or a
  heartbeat that finds the record ``missing`` (Redis restarted empty) claims again with the
  whole state; one that finds it ``superseded`` (another start of this project took over) stops
  publishing, with an error in the log.
- While Redis is unreachable it retries with a backoff of 0.25 s doubling to 1 s, and claims
  on reconnecting (Redis may have lost everything meanwhile, or a failover may have lost the
  last writes).
- :meth:`Publisher.stop` at a clean exit marks the workspace stopped (gateways answer 503 at
  once) within ``stop_timeout``.

It needs nothing of the server: ``aether.server`` gives it a :class:`State`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Collection, Mapping
from typing import Protocol

from aether.fleet import blob, connection, keys

log = logging.getLogger("aether.fleet")

BACKOFF_FIRST = 0.25
BACKOFF_MAX = 1.0


class State(Protocol):
    """What the workspace shows, read at each write."""

    def ports(self) -> Mapping[int, str]:
        """The open (previewable) ports -> ``"public"`` or ``"private"``."""

    def public(self) -> Collection[int]:
        """Every public port, open or not."""

    def names(self) -> Mapping[str, int]:
        """Registry key -> port."""


class Identity:
    """Who this workspace is. ``verifier``: :func:`aether.fleet.auth.verifier` of its token;
    set a new one (and call :meth:`Publisher.changed`) if the token changes."""

    __slots__ = ("prefix", "project", "workspace", "address", "verifier")

    def __init__(self, prefix: str, project: str, workspace: str, address: str, verifier: str):
        if not blob.PREFIX.match(prefix):
            raise ValueError(f"prefix {prefix!r}: fleet prefixes are 1-64 lower-case letters and digits")
        blob.split_address(address)
        self.prefix, self.project, self.workspace = prefix, project, workspace
        self.address, self.verifier = address, verifier


class PrefixTaken(Exception):
    """The prefix belongs to another project's live workspace."""

    def __init__(self, prefix: str, workspace: str):
        self.prefix, self.workspace = prefix, workspace
        super().__init__(
            f"prefix {prefix} belongs to workspace {workspace}, which is alive: give this workspace "
            f"a longer --prefix-length or another --project-id"
        )


class _Refused(Exception):
    """A script answered that this epoch may not write (``missing`` or ``superseded``)."""


#: What :attr:`Publisher.status` says.
STARTING, PUBLISHED, DOWN, SUPERSEDED, TAKEN, STOPPED = "starting", "published", "down", "superseded", "taken", "stopped"


class Publisher:
    def __init__(
        self,
        url: str,
        identity: Identity,
        state: State,
        *,
        heartbeat: float = 1.0,
        dead_after: float = 3.0,
        stream_maxlen: int = keys.STREAM_MAXLEN,
        stop_timeout: float = 1.0,
    ):
        if not 0 < heartbeat < dead_after:
            raise ValueError("the heartbeat interval must be positive and shorter than dead_after")
        self.url = connection.check(url)
        self.identity = identity
        self.state = state
        self.heartbeat = heartbeat
        self.dead_after = dead_after
        self.stream_maxlen = stream_maxlen
        self.stop_timeout = stop_timeout
        self.epoch = secrets.token_hex(8)
        self.started = int(time.time() * 1000)
        self.status = STARTING
        self.claims = self.updates = self.heartbeats = self.failures = 0
        #: The last change's sequence number this publisher wrote (0: none yet).
        self.seq = 0
        self._client = None
        self._scripts: dict = {}
        self._dirty = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._claimed = False
        self.blob()  # BlobError (a ValueError) now, for an identity no gateway would route

    # -- the blob -------------------------------------------------------------------------

    def blob(self, alive: bool = True) -> bytes:
        """The record as it is now; :class:`~aether.fleet.blob.BlobError` if a gateway would
        refuse it (a fault here shows here, not as a 404 at every gateway)."""
        ident = self.identity
        raw = blob.encode(
            prefix=ident.prefix,
            project=ident.project,
            workspace=ident.workspace,
            address=ident.address,
            epoch=self.epoch,
            started=self.started,
            dead_after=int(self.dead_after * 1000),
            verifier=ident.verifier,
            alive=alive,
            ports=dict(self.state.ports()),
            public=frozenset(self.state.public()),
            names=dict(self.state.names()),
        )
        blob.decode(raw, ident.prefix)
        return raw

    # -- Redis ----------------------------------------------------------------------------

    def _connect(self):
        if self._client is None:
            # A command never takes long: one that hangs for 2 s means Redis is in trouble.
            self._client = connection.client(self.url, socket_timeout=2.0, connect_timeout=1.0)
            self._scripts = {
                name: self._client.register_script(source)
                for name, source in (
                    ("claim", keys.CLAIM),
                    ("update", keys.UPDATE),
                    ("heartbeat", keys.HEARTBEAT),
                    ("stop", keys.STOP),
                )
            }
        return self._client

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.aclose()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is gone either way
                pass

    async def _run_script(self, name: str, *args) -> list:
        self._connect()
        reply = await connection.call(self._scripts[name](keys=keys.CHANGE_KEYS, args=args))
        return [item.decode() if isinstance(item, bytes) else item for item in reply]

    async def _claim(self) -> None:
        reply = await self._run_script(
            "claim",
            self.identity.prefix,
            self.identity.project,
            self.epoch,
            self.blob(),
            int(self.dead_after * 1000),
            secrets.token_hex(8),
            self.stream_maxlen,
        )
        if reply[0] == "taken":
            raise PrefixTaken(self.identity.prefix, reply[1])
        self.claims += 1
        self.seq = reply[1]
        self._claimed = True
        if self.status != PUBLISHED:
            log.info(
                "fleet workspace published",
                extra={
                    "prefix": self.identity.prefix,
                    "epoch": self.epoch,
                    "address": self.identity.address,
                    "redis": connection.describe(self.url),
                },
            )
        self.status = PUBLISHED

    async def _update(self) -> None:
        reply = await self._run_script("update", self.identity.prefix, self.epoch, self.blob(), self.stream_maxlen)
        if reply[0] != "ok":
            raise _Refused(reply[0])
        self.updates += 1
        self.seq = reply[1]

    async def _heartbeat(self) -> None:
        reply = await self._run_script(
            "heartbeat", self.identity.prefix, self.epoch, int(self.dead_after * 1000), self.stream_maxlen
        )
        if reply[0] != "ok":
            raise _Refused(reply[0])
        self.heartbeats += 1
        if len(reply) > 2:
            self.seq = reply[2]
            log.info("fleet workspace alive again: its deadline had passed", extra={"prefix": self.identity.prefix})

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, timeout: float = 2.0) -> None:
        """Claim the prefix, then keep it. Raises :class:`PrefixTaken`; an unreachable Redis is
        logged and retried in the background."""
        try:
            await asyncio.wait_for(self._claim(), timeout)
        except PrefixTaken:
            self.status = TAKEN
            await self._drop()
            raise
        except Exception as exc:  # noqa: BLE001 - any failure (a timeout too): retried by the loop
            self._down(exc)
            await self._drop()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def changed(self) -> None:
        """Something :meth:`blob` shows changed: publish it (coalesced)."""
        self._dirty.set()

    def _down(self, exc: BaseException) -> None:
        self.failures += 1
        self._claimed = False
        if self.status != DOWN:
            log.warning(
                "fleet redis unreachable: serving locally, retrying",
                extra={"redis": connection.describe(self.url), "error": f"{type(exc).__name__}: {exc}"[:300]},
            )
        self.status = DOWN

    async def _loop(self) -> None:
        backoff = BACKOFF_FIRST
        next_beat = time.monotonic() + self.heartbeat
        while True:
            try:
                if not self._claimed:
                    self._dirty.clear()  # the claim carries the whole state
                    await self._claim()
                    backoff = BACKOFF_FIRST
                    next_beat = time.monotonic() + self.heartbeat
                wait = next_beat - time.monotonic()
                if wait > 0 and not self._dirty.is_set():
                    try:
                        await asyncio.wait_for(self._dirty.wait(), wait)
                    except TimeoutError:
                        pass
                if self._dirty.is_set():
                    self._dirty.clear()
                    await self._update()
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.heartbeat
                    await self._heartbeat()
            except _Refused as refused:
                if str(refused) == "missing":
                    log.warning("fleet workspace missing in redis: claiming it again", extra={"prefix": self.identity.prefix})
                    self._claimed = False
                    continue
                self.status = SUPERSEDED
                log.error(
                    "fleet workspace superseded: another start of this project publishes it now; this one stops publishing",
                    extra={"prefix": self.identity.prefix, "epoch": self.epoch},
                )
                await self._drop()
                return
            except PrefixTaken as exc:
                self.status = TAKEN
                log.error("fleet prefix taken: not publishing", extra={"prefix": exc.prefix, "error": str(exc)})
                await self._drop()
                return
            except blob.BlobError as exc:
                log.error(
                    "fleet record not published: a gateway would refuse it",
                    extra={"prefix": self.identity.prefix, "reason": str(exc)},
                )
                await asyncio.sleep(BACKOFF_MAX)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - down, or refusing (OOM, a wrong key type): retry
                if not connection.is_down(exc):
                    log.error("fleet redis refused a write", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})
                self._down(exc)
                await self._drop()
                await asyncio.sleep(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)

    async def stop(self) -> None:
        """Mark the workspace stopped (best effort, ``stop_timeout`` at most) and disconnect."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # ends at once: see connection.call
        if self.status in (PUBLISHED, DOWN):
            try:
                await asyncio.wait_for(
                    self._run_script("stop", self.identity.prefix, self.epoch, self.blob(alive=False), self.stream_maxlen),
                    self.stop_timeout,
                )
            except Exception as exc:  # noqa: BLE001 - the deadline will say it instead
                log.warning(
                    "fleet workspace not marked stopped: it goes unavailable at its deadline",
                    extra={"prefix": self.identity.prefix, "error": f"{type(exc).__name__}: {exc}"[:300]},
                )
        self.status = STOPPED
        await self._drop()
