"""The agent's parts without processes or sockets: the backend's line protocol, the reply's
limits, the SQLite history and the agent settings."""

from __future__ import annotations

import argparse
import json
import re
import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aether.agent import stdio
from aether.agent.store import AgentStore, AgentStoreError, encoded_size, recent
from aether.errors import Refusal
from aether.settings.serve import add_arguments, resolve


@settings(max_examples=500, deadline=None)
@given(
    st.binary(max_size=200)
    | st.builds(
        lambda v: json.dumps(v).encode(),
        st.dictionaries(
            st.sampled_from(["type", "text", "name", "message", "x"]),
            st.sampled_from(["delta", "tool", "message", "error", "", "\ud800"])
            | st.none()
            | st.integers()
            | st.text(max_size=5),
            max_size=4,
        ),
    )
)
def test_any_line_is_an_event_nothing_or_a_fault(line):
    try:
        event = stdio.parse_line(line, 1)
    except Refusal as fault:
        assert fault.code == "bad_output" and fault.message.startswith("line 1 of the backend's output")
        return
    if event is None:
        assert not line.strip()
        return
    for name in event.__slots__:
        getattr(event, name).encode("utf-8")  # what reaches a client is valid Unicode


@pytest.mark.parametrize(
    "line, expected",
    [
        (b'{"type": "delta", "text": "hi "}', ("Delta", {"text": "hi "})),
        (b'{"type": "tool", "name": "ports", "extra": 1}', ("Tool", {"name": "ports", "text": ""})),
        (b'{"type": "message", "text": "all"}\r', ("Final", {"text": "all"})),
        (b'{"type": "error"}', ("Failure", {"message": "the backend reported an error without a message"})),
        (b"   ", None),
    ],
)
def test_lines(line, expected):
    event = stdio.parse_line(line, 1)
    if expected is None:
        assert event is None
    else:
        assert (type(event).__name__, {s: getattr(event, s) for s in event.__slots__}) == expected


@pytest.mark.parametrize(
    "line, message",
    [
        (b"hello", 'line 3 of the backend\'s output is not JSON: "hello"'),
        (b"[1]", 'line 3 of the backend\'s output is not a JSON object: "[1]"'),
        (b'{"type": "thinking"}', 'line 3 of the backend\'s output has type "thinking"; expected delta, tool, message or error'),
        (b'{"text": "x"}', "line 3 of the backend's output has type none; expected delta, tool, message or error"),
        (b'{"type": "delta", "text": 5}', "line 3 of the backend's output: a delta needs text as a string of valid Unicode"),
        (
            b'{"type": "delta", "text": "\\ud800"}',
            "line 3 of the backend's output: a delta needs text as a string of valid Unicode",
        ),
        (b'{"type": "tool", "name": ""}', "line 3 of the backend's output: a tool name must be 1-200 characters"),
        (b"\xff\xfe", 'line 3 of the backend\'s output is not JSON: "\ufffd\ufffd"'),
    ],
)
def test_bad_lines(line, message):
    with pytest.raises(Refusal) as caught:
        stdio.parse_line(line, 3)
    assert (caught.value.code, caught.value.message) == ("bad_output", message)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=30).filter(lambda b: b"\n" not in b), max_size=8), st.lists(st.integers(1, 40), max_size=10))
def test_splitter_gives_the_lines_whatever_the_chunks(lines, cuts):
    stream = b"".join(line + b"\n" for line in lines)
    splitter, got, at = stdio.LineSplitter(), [], 0
    for cut in cuts + [len(stream)]:
        got += splitter.feed(stream[at : at + cut])
        at += cut
    assert got == lines and splitter.end() is None


def test_splitter_refuses_a_long_line_before_its_end():
    splitter = stdio.LineSplitter(10)
    assert splitter.feed(b"0123456789\nabc") == [b"0123456789"]
    with pytest.raises(Refusal, match="a line of more than 10 bytes"):
        splitter.feed(b"defghijk")  # no newline yet: 11 bytes held is already too many
    last = stdio.LineSplitter()
    assert last.feed(b'{"type": "message"') == [] and last.end() == b'{"type": "message"'


def test_reply_text_tools_and_limits():
    reply = stdio.Reply(limit=100)
    assert reply.empty and reply.text == ""
    for part in ("a", "b", "c"):
        reply.add(stdio.Delta(part))
    reply.add(stdio.Tool("t", "note"))
    assert (reply.text, reply.tools, reply.empty) == ("abc", [{"name": "t", "text": "note"}], False)
    reply.add(stdio.Final("the whole answer"))
    assert reply.text == "the whole answer"
    with pytest.raises(Refusal, match="more after its message line"):
        reply.add(stdio.Delta("late"))
    big = stdio.Reply(limit=100)
    big.add(stdio.Delta("x" * 90))
    with pytest.raises(Refusal) as caught:
        big.add(stdio.Delta("\x01" * 2))  # 12 bytes as JSON escapes: past the limit
    assert (caught.value.code, caught.value.message) == ("too_large", "the reply grew past 0 KiB")


def test_turn_request_is_one_line():
    line = stdio.turn_request("c-1", "c-1.2", [{"role": "user", "text": "two\nlines", "status": "complete"}], {"root": "/w"})
    assert line.count(b"\n") == 1 and line.endswith(b"\n")
    assert json.loads(line) == {
        "type": "turn",
        "conversationId": "c-1",
        "turnId": "c-1.2",
        "messages": [{"role": "user", "text": "two\nlines", "status": "complete"}],
        "workspace": {"root": "/w"},
    }


def test_store_keeps_turns_and_fails_those_left_running(tmp_path):
    path = tmp_path / "agent.db"
    store = AgentStore(path)
    assert store.active() is None and store.last_sequences() == {}
    store.begin_turn("c-a", "first", ("c-a.1", 1, "hi"), ("c-a.2", 2), 100.0)
    store.save_turn("c-a.2", "hel", [{"name": "t", "text": ""}])
    store.begin_turn("c-b", "second", ("c-b.1", 1, "yo"), ("c-b.2", 2), 200.0)
    store.save_turn("c-b.2", "done", [], "complete", None, 201.0)
    assert store.active() == "c-b" and store.last_sequences() == {"c-a": 2, "c-b": 2}
    listed, more = store.conversations(1)
    assert more and listed == [
        {"conversationId": "c-b", "title": "second", "created": 200000, "updated": 201000, "turns": 2, "running": False}
    ]
    store.close()
    again = AgentStore(path)  # as a new daemon would
    assert again.interrupted == 1
    turn = again.turns("c-a")[1]
    assert (turn["text"], turn["status"], turn["tools"]) == ("hel", "failed", [{"name": "t", "text": ""}])
    assert turn["error"] == {"code": "interrupted", "message": "the daemon stopped during this turn"}
    assert again.turns("c-b")[1] == {
        "turnId": "c-b.2",
        "seq": 2,
        "role": "assistant",
        "text": "done",
        "status": "complete",
        "started": 200000,
        "finished": 201000,
    }
    again.close()


def test_store_refuses_a_file_that_is_not_its_own(tmp_path):
    (tmp_path / "agent.db").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(AgentStoreError, match="not a readable aether agent database"):
        AgentStore(tmp_path / "agent.db")
    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(AgentStoreError, match="schema version 99 is newer"):
        AgentStore(newer)


def test_recent_keeps_the_newest_turns_that_fit():
    turns = [{"turnId": str(i), "text": "x" * 100} for i in range(10)]
    kept, cut = recent(turns, 3 * (encoded_size(turns[0]) + 1) + 5)
    assert [t["turnId"] for t in kept] == ["7", "8", "9"] and cut
    assert recent(turns, 10_000) == (turns, False)


def _resolve(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return resolve(parser.parse_args(argv))


def test_agent_settings_from_flag_env_and_config(tmp_path, monkeypatch):
    for name in ("AETHER_AGENT_COMMAND", "AETHER_AGENT_TIMEOUT", "AETHER_AGENT_MAX_OUTPUT_BYTES"):
        monkeypatch.delenv(name, raising=False)
    base = ["--state-dir", str(tmp_path), "--workspace-root", str(tmp_path)]
    s = _resolve(base)
    assert (s.agent_command, s.agent_timeout, s.agent_max_output_bytes) == ((), 120.0, 4 << 20)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"agent": {"command": ["my-agent", "--stdio"], "timeout": 30, "max_output_bytes": 1000}}))
    s = _resolve(base)
    assert (s.agent_command, s.agent_timeout, s.agent_max_output_bytes) == (("my-agent", "--stdio"), 30.0, 1000)
    config.write_text(json.dumps({"agent_command": ["flat"], "agent": {"command": ["nested"]}}))
    assert _resolve(base).agent_command == ("flat",)
    monkeypatch.setenv("AETHER_AGENT_COMMAND", '["from env", "x"]')
    assert _resolve(base).agent_command == ("from env", "x")
    assert _resolve(base + ["--agent-command", "/opt/my agent/run --model 'a b'"]).agent_command == (
        "/opt/my",
        "agent/run",
        "--model",
        "a b",
    )
    monkeypatch.delenv("AETHER_AGENT_COMMAND")
    for bad, why in [
        ({"agent_command": "[1, 2]"}, "config.json key agent_command must be a command"),
        ({"agent_command": [1]}, "config.json key agent_command must be a command"),
        ({"agent": ["x"]}, "config.json: agent must be an object"),
        ({"agent": {"comand": ["x"]}}, "config.json: agent: unknown key comand; known: command, timeout, max_output_bytes"),
        ({"agent_timeout": 0}, "config.json key agent_timeout must be a positive number of seconds, not 0"),
        ({"agent": {"timeout": -1}}, "config.json key agent.timeout must be a positive number of seconds, not -1"),
    ]:
        config.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=re.escape(why)):
            _resolve(base)


# -- the service without a socket: what happens when the history cannot be written -------------


def _service(tmp_path, answers: list, emitted: list):
    from types import SimpleNamespace

    from aether.agent.service import AgentService

    settings = SimpleNamespace(
        state_dir=tmp_path,
        agent_command=("true",),
        workspace_root=tmp_path,
        port=0,
        workspace_id="w",
        agent_timeout=5.0,
        agent_max_output_bytes=1 << 20,
    )
    return AgentService(
        settings,
        lambda message, reply_to: emitted.append((message, reply_to)),
        lambda reply_to, message: answers.append((reply_to, message)),
    )


def test_a_prompt_whose_history_write_fails_is_refused_and_undone(tmp_path):
    import asyncio

    answers, emitted = [], []

    async def scenario():
        service = _service(tmp_path, answers, emitted)

        def locked(*args):
            raise sqlite3.OperationalError("database is locked")

        service.store.begin_turn = locked
        service.start(None, "hello", ("s", "p"))
        service.cancel(next(iter(service.running)), ("s", "stop"))  # asked before its write ended
        await next(iter(service.running.values())).task
        assert service.running == {} and service.sequences == {}
        service.close()

    asyncio.run(scenario())
    assert emitted == []  # no started, no backend run
    (first, refusal), (second, stop) = answers
    assert first == ("s", "p") and refusal.code == "unavailable" and "database is locked" in refusal.message
    assert refusal.fields == {}  # the new conversation never existed
    assert second == ("s", "stop") and stop.code == "not_found"


def test_a_locked_agent_db_at_start_leaves_the_channel_unavailable(tmp_path, monkeypatch):
    from aether.agent import store as store_module

    store = AgentStore(tmp_path / "agent.db")
    store.begin_turn("c", "t", ("c.1", 1, "hi"), ("c.2", 2), 1.0)
    store.close()
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_MS", 100)
    other = sqlite3.connect(tmp_path / "agent.db", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(store_module.AgentStoreLocked):
            AgentStore(tmp_path / "agent.db")  # it has a running turn to close, and cannot
        service = _service(tmp_path, [], [])
        assert service.unavailable and "locked by another process" in service.unavailable
        with pytest.raises(Refusal) as refused:
            service.start(None, "hello", None)
        assert refused.value.code == "unavailable"
        assert service.replay()() == []
        service.close()
    finally:
        other.execute("ROLLBACK")


def test_opening_without_running_turns_takes_no_write_lock(tmp_path, monkeypatch):
    from aether.agent import store as store_module

    AgentStore(tmp_path / "agent.db").close()
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_MS", 100)
    other = sqlite3.connect(tmp_path / "agent.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer mid-transaction
    try:
        store = AgentStore(tmp_path / "agent.db")
        assert store.interrupted == 0
        store.close()
    finally:
        other.execute("ROLLBACK")


def test_an_error_line_is_capped():
    event = stdio.parse_line(json.dumps({"type": "error", "message": "\u00e9" * 1_000_000}).encode(), 1)
    assert len(event.message.encode("utf-8")) <= stdio.MAX_ERROR_MESSAGE and event.message.endswith("\u2026")


def test_recent_shortens_a_newest_turn_too_big_for_the_budget():
    turns = [
        {"turnId": "c.1", "text": "a"},
        {"turnId": "c.2", "text": "x" * 10_000 + "end", "tools": [{"name": "n", "text": "t"}]},
    ]
    kept, truncated = recent(turns, 2_000)
    assert truncated and [t["turnId"] for t in kept] == ["c.2"]
    assert kept[0]["truncated"] is True and kept[0]["text"].endswith("end") and encoded_size(kept) <= 2_000
    assert recent([], 10) == ([], False)


def test_deltas_read_together_are_announced_as_one(tmp_path):
    import asyncio
    import sys

    from aether.agent.backend import BackendRun

    script = (
        "import sys; sys.stdin.read(); "
        'sys.stdout.write(\'\'.join(\'{"type": "delta", "text": "%d "}\\n\' % i for i in range(1000)) '
        '+ \'{"type": "tool", "name": "t"}\\n{"type": "delta", "text": "end"}\\n\')'
    )
    events = []

    async def scenario():
        run = BackendRun(
            [sys.executable, "-c", script],
            b"{}\n",
            cwd=str(tmp_path),
            env={},
            timeout=10,
            max_output=1 << 20,
            on_event=events.append,
        )
        return await run.run()

    assert asyncio.run(scenario()).status == "complete"
    kinds = [type(e).__name__ for e in events]
    assert len(events) < 20 and kinds[-2:] == ["Tool", "Delta"] and events[-1].text == "end"
    assert "".join(e.text for e in events if kinds[events.index(e)] == "Delta") == "".join(f"{i} " for i in range(1000)) + "end"
