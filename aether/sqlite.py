"""SQLite as aether's stores use it (the port registry, the agent's history): a file in the
state directory in WAL mode, so readers run beside a writer; writers that queue on SQLite's
lock (``busy_timeout``) instead of failing; every write one ``BEGIN IMMEDIATE`` transaction; and
the schema versioned with ``PRAGMA user_version`` and migrated forward on open. A file is
made 0600 (SQLite gives its ``-wal`` and ``-shm`` the same mode); one found empty starts as a
new database, with a warning naming it: what it held is gone, and nothing else will say so."""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

#: Writers wait this long for another writer's transaction before giving up.
BUSY_TIMEOUT_MS = 30_000

T = TypeVar("T")

log = logging.getLogger("aether.sqlite")


class SchemaTooNew(Exception):
    """The file was written by a newer aether: its ``version`` is past what this one knows."""

    def __init__(self, version: int, known: int):
        super().__init__(f"schema version {version} is newer than this aether knows ({known})")
        self.version = version


def connect(path: Path, check_same_thread: bool = True, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> sqlite3.Connection:
    """``path`` opened (created, with its directory, if missing); sqlite3 and OS errors pass.
    A statement waits up to ``busy_timeout_ms`` for another process's lock, then fails with
    an OperationalError that :func:`is_locked` recognises."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    existed = os.path.lexists(path)
    # Made here, not by SQLite, which would use the umask's mode (0644 by default).
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        empty = existed and os.fstat(fd).st_size == 0 and _size(f"{path}-wal") == 0
    finally:
        os.close(fd)
    db = sqlite3.connect(str(path), timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=check_same_thread)
    db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    db.execute("PRAGMA journal_mode = WAL")
    # With WAL, NORMAL still never corrupts or loses a committed write to a crash of the
    # process; only a power loss can drop the last commits.
    db.execute("PRAGMA synchronous = NORMAL")
    if empty:
        log.warning("empty database file: starting with no data", extra={"path": str(path)})
    return db


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def is_locked(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite giving up on another connection's lock (SQLITE_BUSY/LOCKED)."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED and their extended codes
    return "locked" in str(exc) or "busy" in str(exc)


def transaction(db: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """``fn(db)`` in one immediate transaction, rolled back if it raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        result = fn(db)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return result


def migrate(db: sqlite3.Connection, migrations: list[str]) -> None:
    """Run the scripts of ``migrations`` the file has not had yet; SchemaTooNew if it is ahead."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > len(migrations):
        raise SchemaTooNew(version, len(migrations))
    if version == len(migrations):
        return

    def run(db: sqlite3.Connection) -> None:
        current = db.execute("PRAGMA user_version").fetchone()[0]  # another process may have migrated
        for number, script in enumerate(migrations[current:], start=current + 1):
            for statement in filter(str.strip, script.split(";")):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {number}")

    transaction(db, run)
