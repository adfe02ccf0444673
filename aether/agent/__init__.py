"""The agent: conversations kept in SQLite, each turn answered by a configured backend command
that speaks JSON lines on its stdin and stdout (see ``stdio`` and docs/protocol.md)."""
