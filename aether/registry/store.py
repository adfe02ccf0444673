"""The port registry: named, labelled ports kept in SQLite in the state directory.

One row per key; a port belongs to one key at most (a UNIQUE constraint, so two writers can
never both win it). Every write is one ``BEGIN IMMEDIATE`` transaction: writers queue on
SQLite's lock (``busy_timeout``) instead of failing, and WAL lets readers run beside them.
The schema is versioned with ``PRAGMA user_version`` and migrated forward on open (a file an
older aether made gains the newer columns, empty, as it is opened). A file that
is not a readable registry is an error naming it, never replaced by a fresh database; an
empty file (0 bytes) is an empty database to SQLite, and starts anew with a warning naming it.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

from aether import sqlite
from aether.errors import Refusal
from aether.excerpt import excerpt

KEY_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,62}\Z")
WORD_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")

MIGRATIONS = [
    # 1: the entries.
    """
    CREATE TABLE ports (
        key TEXT PRIMARY KEY,
        port INTEGER NOT NULL UNIQUE CHECK (port BETWEEN 1 AND 65535),
        app TEXT,
        label TEXT,
        description TEXT NOT NULL DEFAULT '',
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE INDEX ports_app ON ports (app);
    """,
    # 2: what the port speaks, over what the server detects (NULL: as detected).
    """
    ALTER TABLE ports ADD COLUMN protocol TEXT CHECK (protocol IN ('https', 'http', 'tcp'))
    """,
]

#: What an entry's ``protocol`` may be; ``auto`` (:data:`AUTO`) clears it: the port speaks what
#: the server detects (the word the ports channel's ``protocol`` message uses for the same).
PROTOCOLS = ("https", "http", "tcp")
AUTO = "auto"
#: The columns in the order of :meth:`Entry.astuple`, for every SELECT and INSERT (a file's
#: own column order is the order its migrations added them).
COLUMNS = "key, port, app, label, description, created, updated, protocol"
_INSERT = f"INSERT INTO ports ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"


class RegistryError(Refusal):
    """A refused request or an unusable database; the message is for the user as is.

    ``code``: ``invalid`` (bad input), ``conflict`` (the port or block is taken), ``not_found``,
    or ``unavailable`` (the database cannot be used)."""

    def __init__(self, message: str, code: str = "invalid"):
        super().__init__(code, message)


class Entry:
    """One registered port. (Not a dataclass: importing dataclasses costs ``aether port get``
    several milliseconds.)"""

    __slots__ = ("key", "port", "app", "label", "description", "created", "updated", "protocol")

    def __init__(
        self,
        key: str,
        port: int,
        app: str | None = None,
        label: str | None = None,
        description: str = "",
        created: float = 0.0,
        updated: float = 0.0,
        protocol: str | None = None,
    ):
        self.key, self.port, self.app, self.label = key, port, app, label
        self.description, self.created, self.updated = description, created, updated
        self.protocol = protocol

    def astuple(self) -> tuple:
        return (self.key, self.port, self.app, self.label, self.description, self.created, self.updated, self.protocol)

    def __eq__(self, other) -> bool:
        return isinstance(other, Entry) and self.astuple() == other.astuple()

    def __repr__(self) -> str:
        return f"Entry{self.astuple()!r}"

    def with_live(self, owner: tuple[int | None, str | None] | None) -> dict:
        """The JSON form joined with what listens on the port now: ``owner`` is its (pid,
        process), or None when nothing listens."""
        pid, process = owner if owner is not None else (None, None)
        return {**self.to_json(), "listening": owner is not None, "pid": pid, "process": process}

    def to_json(self) -> dict:
        return {
            "key": self.key,
            "port": self.port,
            "app": self.app,
            "label": self.label,
            "description": self.description,
            "created": _iso(self.created),
            "updated": _iso(self.updated),
            "protocol": self.protocol,
        }


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def check_key(key: str) -> str:
    if not isinstance(key, str) or not KEY_PATTERN.match(key):
        raise RegistryError(
            f"invalid key {excerpt(key)}: lower-case letters, digits and '-', 1-63 characters, not starting with '-'"
        )
    if key.isdigit():
        raise RegistryError(f"invalid key {excerpt(key)}: all digits would clash with {{port}}- preview URLs")
    return key


def check_port(port) -> int:
    try:
        value = int(port)
    except (TypeError, ValueError, OverflowError):  # OverflowError: JSON's 1e400 is infinite
        raise RegistryError(f"invalid port {excerpt(port)}: a number 1-65535") from None
    if isinstance(port, bool) or (isinstance(port, float) and value != port) or not 1 <= value <= 65535:
        raise RegistryError(f"invalid port {excerpt(port)}: a number 1-65535")
    return value


def check_word(what: str, value: str | None) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not WORD_PATTERN.match(value):
        raise RegistryError(f"invalid {what} {excerpt(value)}: one word of letters, digits, '_', '.', '-'")
    return value


def check_protocol(value: str | None) -> str | None:
    """``value`` as given (None: not given, the entry's own is kept), checked: one of
    :data:`PROTOCOLS`, or :data:`AUTO` to clear it."""
    if value is None or value in PROTOCOLS or value == AUTO:
        return value
    raise RegistryError(f"invalid protocol {excerpt(value)}: https, http, tcp, or auto for what the server detects")


class Registry:
    """The registry in ``path``; see the module docstring."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._db = sqlite.connect(self.path)
            sqlite.migrate(self._db, MIGRATIONS)
        except sqlite.SchemaTooNew as exc:
            raise RegistryError(f"{self.path}: {exc}", "unavailable") from None
        except sqlite3.DatabaseError as exc:
            raise RegistryError(
                f"{self.path}: not a readable aether registry ({exc}); move it away to start a new one", "unavailable"
            ) from None
        except OSError as exc:
            raise RegistryError(f"{self.path}: {exc.strerror}", "unavailable") from None

    def version(self) -> int:
        """Changes when another connection (the CLI, another process) commits a write."""
        return self._db.execute("PRAGMA data_version").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write(self, fn):
        """Run ``fn(db)`` in one immediate transaction; SQLite errors become RegistryError."""
        try:
            return sqlite.transaction(self._db, fn)
        except sqlite3.OperationalError as exc:
            raise RegistryError(f"{self.path}: {exc}", "unavailable") from None

    # -- reads ------------------------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        row = self._db.execute(f"SELECT {COLUMNS} FROM ports WHERE key = ?", (check_key(key),)).fetchone()
        return Entry(*row) if row else None

    def by_port(self, port: int) -> Entry | None:
        row = self._db.execute(f"SELECT {COLUMNS} FROM ports WHERE port = ?", (port,)).fetchone()
        return Entry(*row) if row else None

    def entries(self, app: str | None = None) -> list[Entry]:
        if app is None:
            rows = self._db.execute(f"SELECT {COLUMNS} FROM ports ORDER BY app IS NULL, app, port").fetchall()
        else:
            rows = self._db.execute(f"SELECT {COLUMNS} FROM ports WHERE app = ? ORDER BY port", (app,)).fetchall()
        return [Entry(*row) for row in rows]

    # -- writes -----------------------------------------------------------------------------

    def set(
        self,
        key: str,
        port,
        app: str | None = None,
        label: str | None = None,
        description: str | None = None,
        protocol: str | None = None,
    ) -> Entry:
        """Create or update ``key``; fields not given (None) keep their value on an update.
        ``protocol``: ``https``, ``http``, ``tcp``, or ``auto`` to clear it."""
        key, port = check_key(key), check_port(port)
        app, label = check_word("app", app), check_word("label", label)
        protocol = check_protocol(protocol)
        if description is not None and (len(description) > 1000 or "\n" in description):
            raise RegistryError("invalid description: one line of at most 1000 characters")

        def write(db):
            holder = db.execute("SELECT key FROM ports WHERE port = ? AND key != ?", (port, key)).fetchone()
            if holder:
                raise RegistryError(f"port {port} is registered to key {holder[0]}", "conflict")
            now = time.time()
            old = db.execute(f"SELECT {COLUMNS} FROM ports WHERE key = ?", (key,)).fetchone()
            spoken = None if protocol == AUTO else protocol
            if old is None:
                entry = Entry(key, port, app, label, description or "", now, now, spoken)
                db.execute(_INSERT, entry.astuple())
            else:
                current = Entry(*old)
                entry = Entry(
                    key,
                    port,
                    app if app is not None else current.app,
                    label if label is not None else current.label,
                    description if description is not None else current.description,
                    current.created,
                    now,
                    spoken if protocol is not None else current.protocol,
                )
                db.execute(
                    "UPDATE ports SET port = ?, app = ?, label = ?, description = ?, updated = ?, protocol = ? WHERE key = ?",
                    (entry.port, entry.app, entry.label, entry.description, entry.updated, entry.protocol, key),
                )
            return entry

        return self._write(write)

    def label(self, key: str, port, label: str | None) -> Entry:
        """Set (or, given None or "", clear) ``key``'s label, creating ``key`` at ``port`` when
        it does not exist; never moves a key: one registered at another port is a conflict.
        What the dashboard may do with its cookie (see ``aether.server.registry_api``)."""
        key, port, label = check_key(key), check_port(port), check_word("label", label)

        def write(db):
            old = db.execute(f"SELECT {COLUMNS} FROM ports WHERE key = ?", (key,)).fetchone()
            if old is None:
                holder = db.execute("SELECT key FROM ports WHERE port = ?", (port,)).fetchone()
                if holder:
                    raise RegistryError(f"port {port} is registered to key {holder[0]}", "conflict")
                now = time.time()
                entry = Entry(key, port, None, label, "", now, now)
                db.execute(_INSERT, entry.astuple())
                return entry
            current = Entry(*old)
            if current.port != port:
                raise RegistryError(f"key {key} is registered at port {current.port}, not {port}", "conflict")
            now = time.time()
            db.execute("UPDATE ports SET label = ?, updated = ? WHERE key = ?", (label, now, key))
            return Entry(key, port, current.app, label, current.description, current.created, now, current.protocol)

        return self._write(write)

    def delete(self, key: str) -> bool:
        key = check_key(key)
        return self._write(lambda db: db.execute("DELETE FROM ports WHERE key = ?", (key,)).rowcount > 0)

    def allocate(self, app: str, labels: list[str], first: int, last: int, avoid: Iterable[int] = ()) -> list[Entry]:
        """Register a contiguous block for ``app``'s ``labels`` (keys ``{app}-{label}``) inside
        ``first``-``last``, skipping registered ports and ``avoid``. An app that already has all
        these labels gets its ports back unchanged."""
        name = check_word("app", app)
        if name is None:
            raise RegistryError("allocate needs an app name")
        app = name
        words = [check_word("label", label) for label in labels]
        if not words or None in words or len(set(words)) != len(words):
            raise RegistryError("allocate needs distinct labels, e.g. --labels api,ui,health")
        labels = [word for word in words if word is not None]  # every one, after that check
        keys = [check_key(f"{app}-{label}".lower()) for label in labels]
        first, last = check_port(first), check_port(last)
        if first > last:
            raise RegistryError(f"invalid range {first}-{last}")
        avoid = set(avoid)

        def write(db):
            existing = {
                row[0]: Entry(*row)
                for row in db.execute(f"SELECT {COLUMNS} FROM ports WHERE key IN ({','.join('?' * len(keys))})", keys)
            }
            if len(existing) == len(keys):
                return [existing[key] for key in keys]
            if existing:
                raise RegistryError(
                    f"app {app} already has {', '.join(sorted(existing))}: delete them or allocate those labels alone",
                    "conflict",
                )
            taken = {row[0] for row in db.execute("SELECT port FROM ports WHERE port BETWEEN ? AND ?", (first, last))}
            need = len(keys)
            start = first
            while start + need - 1 <= last:
                block = range(start, start + need)
                clash = [p for p in block if p in taken or p in avoid]
                if not clash:
                    now = time.time()
                    entries = [Entry(key, port, app, label, "", now, now) for key, port, label in zip(keys, block, labels)]
                    db.executemany(_INSERT, (e.astuple() for e in entries))
                    return entries
                start = clash[-1] + 1
            raise RegistryError(f"no {need} contiguous free ports in {first}-{last} for app {app}", "conflict")

        return self._write(write)
