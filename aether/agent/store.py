"""Agent conversations in SQLite (``agent.db`` in the state directory): conversations and their
turns, kept across daemon restarts.

The server opens one connection and then uses it from one worker thread only, where reads and
writes run in the order they were queued: a read sees every write queued before it. WAL,
``busy_timeout`` and ``user_version`` migrations as for the registry (``aether.sqlite``).
A turn that a previous daemon left ``running`` is closed as ``failed`` when the file is opened:
whatever ran it is gone. Statements wait at most ``BUSY_TIMEOUT_MS`` for another process's lock,
so a prompt fails in seconds rather than hanging while something else holds the file.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from aether import sqlite
from aether.wire import encoded_size

#: Shorter than the registry's: a prompt waits on this before it is answered.
BUSY_TIMEOUT_MS = 5_000
#: A turn longer than the whole history budget is sent with its text cut to this many bytes.
TRUNCATED_TEXT = 64 << 10

INTERRUPTED = ("interrupted", "the daemon stopped during this turn")

MIGRATIONS = [
    # 1: conversations and their turns.
    """
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        title TEXT NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE INDEX conversations_updated ON conversations (updated);
    CREATE TABLE turns (
        id TEXT PRIMARY KEY,
        conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        text TEXT NOT NULL DEFAULT '',
        tools TEXT,
        status TEXT NOT NULL CHECK (status IN ('complete', 'running', 'failed', 'cancelled')),
        error_code TEXT,
        error TEXT,
        started REAL NOT NULL,
        finished REAL,
        UNIQUE (conversation_id, seq)
    );
    """,
]

_TURN_COLUMNS = "id, seq, role, text, tools, status, error_code, error, started, finished"


class AgentStoreError(Exception):
    """The database cannot be used; the message names the file and says why."""


class AgentStoreLocked(AgentStoreError):
    """Another process held the database locked past ``BUSY_TIMEOUT_MS``: the file is fine,
    only not usable right now."""


def millis(seconds: float | None) -> int | None:
    return None if seconds is None else int(seconds * 1000)


def turn_json(row: tuple) -> dict:
    """A turn as the protocol sends it (times in milliseconds since the epoch)."""
    turn_id, seq, role, text, tools, status, error_code, error, started, finished = row
    turn = {"turnId": turn_id, "seq": seq, "role": role, "text": text, "status": status, "started": millis(started)}
    if finished is not None:
        turn["finished"] = millis(finished)
    if tools:
        turn["tools"] = json.loads(tools)
    if error_code:
        turn["error"] = {"code": error_code, "message": error}
    return turn


def shortened(turn: dict, limit: int = TRUNCATED_TEXT) -> dict:
    """``turn`` with its text cut to about its last ``limit`` bytes and its error message to
    ``limit`` bytes, marked ``"truncated": true``; its tool notes left out."""
    text = turn.get("text", "").encode("utf-8")[-limit:].decode("utf-8", "ignore")
    cut = {**turn, "text": text, "truncated": True}
    cut.pop("tools", None)
    if "error" in cut:
        message = cut["error"]["message"] or ""
        cut["error"] = {**cut["error"], "message": message.encode("utf-8")[:limit].decode("utf-8", "ignore")}
    return cut


def recent(turns: list[dict], budget: int) -> tuple[list[dict], bool]:
    """The most recent ``turns`` whose JSON fits in ``budget`` bytes, and whether any were cut.
    When the newest alone does not fit, it comes :func:`shortened` (a client is never told a
    conversation has turns without being shown the last one)."""
    used, start = 0, len(turns)
    while start > 0:
        size = encoded_size(turns[start - 1]) + 1
        if used + size > budget:
            break
        used += size
        start -= 1
    if start == len(turns) and turns:
        return [shortened(turns[-1], min(TRUNCATED_TEXT, budget // 2))], True
    return turns[start:], start > 0


class AgentStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        db: sqlite3.Connection | None = None
        try:
            # Used from one thread at a time: opened here, then only in the server's worker.
            self._db = db = sqlite.connect(self.path, check_same_thread=False, busy_timeout_ms=BUSY_TIMEOUT_MS)
            db.execute("PRAGMA foreign_keys = ON")
            sqlite.migrate(db, MIGRATIONS)
            self.interrupted = self._close_interrupted()
        except BaseException:
            if db is not None:
                db.close()  # a server that goes on without it must not keep the file open
            self._translate_open_error()

    def _translate_open_error(self) -> None:
        """Re-raise the exception being handled as an AgentStoreError, or as it is."""
        try:
            raise
        except sqlite.SchemaTooNew as exc:
            raise AgentStoreError(f"{self.path}: {exc}") from None
        except sqlite3.OperationalError as exc:
            if not sqlite.is_locked(exc):
                raise AgentStoreError(
                    f"{self.path}: not a readable aether agent database ({exc}); move it away to start a new one"
                ) from None
            raise AgentStoreLocked(
                f"{self.path} is locked by another process ({exc}); "
                "the agent channel is unavailable until the daemon is restarted"
            ) from None
        except sqlite3.DatabaseError as exc:
            raise AgentStoreError(
                f"{self.path}: not a readable aether agent database ({exc}); move it away to start a new one"
            ) from None
        except OSError as exc:
            raise AgentStoreError(f"{self.path}: {exc.strerror}") from None

    def close(self) -> None:
        self._db.close()

    def _close_interrupted(self) -> int:
        # Read first: the usual start, with nothing left running, then takes no write lock.
        if self._db.execute("SELECT 1 FROM turns WHERE status = 'running' LIMIT 1").fetchone() is None:
            return 0
        code, message = INTERRUPTED
        return sqlite.transaction(
            self._db,
            lambda db: (
                db.execute(
                    "UPDATE turns SET status = 'failed', error_code = ?, error = ?, finished = ? WHERE status = 'running'",
                    (code, message, time.time()),
                ).rowcount
            ),
        )

    # -- reads ------------------------------------------------------------------------------

    def last_sequences(self) -> dict[str, int]:
        """Every conversation's id -> the seq of its last turn (0 for none)."""
        rows = self._db.execute(
            "SELECT c.id, COALESCE(MAX(t.seq), 0) FROM conversations c LEFT JOIN turns t ON t.conversation_id = c.id GROUP BY c.id"
        )
        return dict(rows.fetchall())

    def active(self) -> str | None:
        """The conversation updated last, if there is one."""
        row = self._db.execute("SELECT id FROM conversations ORDER BY updated DESC, rowid DESC LIMIT 1").fetchone()
        return row[0] if row else None

    def conversation(self, conversation_id: str) -> dict | None:
        row = self._db.execute(
            "SELECT id, title, created, updated FROM conversations WHERE id = ?", (conversation_id,)
        ).fetchone()
        if row is None:
            return None
        return {"conversationId": row[0], "title": row[1], "created": millis(row[2]), "updated": millis(row[3])}

    def turns(self, conversation_id: str) -> list[dict]:
        rows = self._db.execute(f"SELECT {_TURN_COLUMNS} FROM turns WHERE conversation_id = ? ORDER BY seq", (conversation_id,))
        return [turn_json(row) for row in rows]

    def conversations(self, limit: int) -> tuple[list[dict], bool]:
        """The ``limit`` conversations updated last, newest first, and whether there are more."""
        rows = self._db.execute(
            """SELECT c.id, c.title, c.created, c.updated, COUNT(t.id), SUM(t.status = 'running')
               FROM conversations c LEFT JOIN turns t ON t.conversation_id = c.id
               GROUP BY c.id ORDER BY c.updated DESC, c.rowid DESC LIMIT ?""",
            (limit + 1,),
        ).fetchall()
        found = [
            {
                "conversationId": r[0],
                "title": r[1],
                "created": millis(r[2]),
                "updated": millis(r[3]),
                "turns": r[4],
                "running": bool(r[5]),
            }
            for r in rows[:limit]
        ]
        return found, len(rows) > limit

    # -- writes -----------------------------------------------------------------------------

    def begin_turn(
        self, conversation_id: str, title: str | None, user: tuple[str, int, str], assistant: tuple[str, int], now: float
    ) -> None:
        """The prompt as a complete user turn and the reply as a running assistant turn; a new
        conversation first when ``title`` is given."""

        def write(db):
            if title is not None:
                db.execute("INSERT INTO conversations VALUES (?, ?, ?, ?)", (conversation_id, title, now, now))
            else:
                db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (now, conversation_id))
            user_id, user_seq, text = user
            db.execute(
                "INSERT INTO turns (id, conversation_id, seq, role, text, status, started, finished) VALUES (?, ?, ?, 'user', ?, 'complete', ?, ?)",
                (user_id, conversation_id, user_seq, text, now, now),
            )
            db.execute(
                "INSERT INTO turns (id, conversation_id, seq, role, status, started) VALUES (?, ?, ?, 'assistant', 'running', ?)",
                (assistant[0], conversation_id, assistant[1], now),
            )

        sqlite.transaction(self._db, write)

    def save_turn(
        self,
        turn_id: str,
        text: str,
        tools: list[dict],
        status: str = "running",
        error: tuple[str, str] | None = None,
        finished: float | None = None,
    ) -> None:
        """A running turn's text so far, or its end (``finished`` given), which also marks its
        conversation updated."""
        code, message = error if error else (None, None)
        tools_json = json.dumps(tools, ensure_ascii=False) if tools else None

        def write(db):
            db.execute(
                "UPDATE turns SET text = ?, tools = ?, status = ?, error_code = ?, error = ?, finished = ? WHERE id = ?",
                (text, tools_json, status, code, message, finished, turn_id),
            )
            if finished is not None:
                db.execute(
                    "UPDATE conversations SET updated = MAX(updated, ?) WHERE id = (SELECT conversation_id FROM turns WHERE id = ?)",
                    (finished, turn_id),
                )

        sqlite.transaction(self._db, write)
