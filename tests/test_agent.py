"""The agent channel through a real `aether serve`, real WebSocket clients and real backend
processes: the example backend of examples/, and tests/agents/scripted.py, which streams,
crashes, hangs, floods or writes garbage as its prompt says."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sqlite3
import sys
import time
from pathlib import Path

import pytest
from support import ROOT
from support.clients import recv_json
from support.processes import NOHUP, gone
from support.servers import Server
from support.waiting import wait_for

SCRIPTED = ROOT / "tests" / "agents" / "scripted.py"
EXAMPLE = ROOT / "examples" / "workspace_agent.py"


def command(script: Path) -> str:
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}"


@pytest.fixture
def start(workspace_server):
    """`aether serve` rooted in a fresh workspace, the scripted backend unless told otherwise."""

    def run(*args: str, backend: Path | None = SCRIPTED, **kw) -> Server:
        agent = ("--agent-command", command(backend)) if backend else ()
        return workspace_server(*agent, *args, **kw)

    return run


def saved_text(server: Server, turn_id: str) -> str:
    """A turn's text as the daemon last saved it (it saves a running turn's text every
    quarter second or so), read from its database as another process would."""
    with contextlib.closing(sqlite3.connect(f"file:{server.state_dir / 'agent.db'}?mode=ro", uri=True)) as db:
        row = db.execute("SELECT text FROM turns WHERE id = ?", (turn_id,)).fetchone()
    return (row and row[0]) or ""


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class Agent:
    """One WebSocket client's view of the agent channel."""

    def __init__(self, server: Server):
        self.server = server
        self.ws = server.connect().__enter__()  # closed by close() or when the server stops

    def send(self, **message) -> None:
        self.ws.send(json.dumps({"channel": "agent", **message}))

    def next(self, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            message = recv_json(self.ws, max(0.01, deadline - time.monotonic()))
            if message["channel"] == "agent":
                return message

    def until(self, kind: str, timeout: float = 10.0) -> list[dict]:
        """Agent messages up to and including the next of type ``kind``."""
        seen = []
        deadline = time.monotonic() + timeout
        while not seen or seen[-1]["type"] != kind:
            seen.append(self.next(deadline - time.monotonic()))
        return seen

    def ask(self, text: str, timeout: float = 10.0, **fields) -> dict:
        """Prompt and follow the turn to its ``done``: its messages by type."""
        self.send(type="prompt", text=text, id="p", **fields)
        return turn_of(self.until("done", timeout))

    def config(self) -> dict:
        self.ws.send('{"channel": "config", "type": "get", "id": "c"}')
        while (message := recv_json(self.ws))["channel"] != "config":
            pass
        return message["config"]

    def close(self) -> None:
        self.ws.close()


def turn_of(messages: list[dict]) -> dict:
    turn: dict = {"deltas": [], "tools": [], "errors": [], "all": messages}
    for message in messages:
        kind = message["type"]
        if kind in ("delta", "tool", "error"):
            turn[kind + "s"].append(message)
        else:
            turn[kind] = message
    return turn


def test_example_backend_answers_about_a_real_listener(start, listeners):
    server = start(backend=EXAMPLE)
    http = listeners.http_server()
    port = http.port
    agent, watcher = Agent(server), Agent(server)
    turn = agent.ask(f"What listens on port {port}?", timeout=30)
    started, message = turn["started"], turn["message"]
    conversation = started["conversationId"]
    assert started["id"] == "p" and started["title"] == f"What listens on port {port}?"
    assert started["prompt"]["text"] == f"What listens on port {port}?" and started["prompt"]["role"] == "user"
    assert [t["name"] for t in turn["tools"]] == ["aether ports list", "aether port list"]
    assert len(turn["deltas"]) > 5
    assert "".join(d["text"] for d in turn["deltas"]) == message["text"]
    assert f"Port {port}: python" in message["text"] and f"(pid {http.pid})" in message["text"]
    assert turn["done"]["status"] == "complete" and not turn["errors"]
    assert {m["turnId"] for m in turn["all"][1:]} == {started["turnId"]}
    # Every client hears the turn; only the asker's started carries its id.
    heard = turn_of(watcher.until("done"))
    assert "id" not in heard["started"] and heard["message"] == message
    # A follow-up in the same conversation, then the persisted history.
    follow = agent.ask("what is registered?", conversationId=conversation, timeout=30)
    assert "The port registry is empty" in follow["message"]["text"]
    agent.send(type="history", id="h")
    history = agent.next()
    assert history["id"] == "h" and history["conversationId"] == conversation and history["running"] is False
    assert [(t["role"], t["status"], t["seq"]) for t in history["turns"]] == [
        ("user", "complete", 1),
        ("assistant", "complete", 2),
        ("user", "complete", 3),
        ("assistant", "complete", 4),
    ]
    assert history["turns"][1]["text"] == message["text"]
    assert [t["name"] for t in history["turns"][1]["tools"]] == ["aether ports list", "aether port list"]
    agent.send(type="list", id="l")
    listing = agent.next()
    assert [(c["conversationId"], c["turns"], c["running"]) for c in listing["conversations"]] == [(conversation, 4, False)]
    assert "I answer questions about this workspace" in agent.ask("help")["message"]["text"]


def test_not_configured_and_empty_history(start):
    server = start(backend=None)
    agent = Agent(server)
    agent.send(type="prompt", text="hello", id=1)
    assert agent.next() == {
        "channel": "agent",
        "type": "error",
        "code": "not_configured",
        "id": 1,
        "message": "no agent backend is configured: set agent_command in the state directory's config.json, or --agent-command (see docs/settings.md)",
    }
    agent.send(type="history", id=2)
    assert agent.next() == {
        "channel": "agent",
        "type": "history",
        "conversationId": None,
        "title": None,
        "running": False,
        "turns": [],
        "id": 2,
    }
    agent.send(type="list", id=3)
    assert agent.next() == {"channel": "agent", "type": "list", "conversations": [], "id": 3}
    assert agent.config()["agent"] == {"configured": False, "command": [], "timeout": 120.0, "maxOutputBytes": 4 << 20}


def test_config_json_nested_agent_command(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "config.json").write_text(json.dumps({"agent": {"command": [sys.executable, str(SCRIPTED)], "timeout": 7}}))
    server = Server("sockdiag", state, "--workspace-root", str(tmp_path))
    try:
        agent = Agent(server)
        assert agent.config()["agent"]["command"] == [sys.executable, str(SCRIPTED)]
        assert agent.config()["agent"]["timeout"] == 7.0
        assert agent.ask("echo this")["message"]["text"] == "you said: echo this"
    finally:
        server.stop()


def test_bad_input_gets_clear_errors_and_changes_nothing(start):
    server = start()
    agent = Agent(server)
    first = agent.ask("stream 2 0")
    conversation = first["started"]["conversationId"]
    cases = [
        ({"type": "prompt", "text": ""}, "bad_message", "field text must be a string that is not empty or blank"),
        ({"type": "prompt", "text": " \n "}, "bad_message", "field text must be a string that is not empty or blank"),
        ({"type": "prompt"}, "bad_message", "field text is missing"),
        ({"type": "prompt", "text": "x" * (64 << 10) + "y"}, "too_large", "a prompt of 65537 bytes; at most 65536 (64 KiB)"),
        ({"type": "prompt", "text": "hi", "conversationId": "c-000000000000"}, "not_found", "no conversation c-000000000000"),
        (
            {"type": "prompt", "text": "hi", "conversationId": "../x"},
            "bad_message",
            "field conversationId must be 1-64 characters of A-Z a-z 0-9 . _ : -",
        ),
        ({"type": "cancel", "conversationId": conversation}, "not_found", f"no turn is running in conversation {conversation}"),
        ({"type": "history", "conversationId": "nope"}, "not_found", "no conversation nope"),
        ({"type": "explain"}, "unknown_type", "unknown type for channel agent; one of cancel, history, list, prompt"),
    ]
    for fields, code, text in cases:
        agent.send(**fields, id="bad")
        reply = agent.next()
        assert (reply["type"], reply["code"], reply["message"], reply["id"]) == ("error", code, text, "bad"), fields
    agent.send(type="list")
    assert [(c["conversationId"], c["turns"]) for c in agent.next()["conversations"]] == [(conversation, 2)]
    assert agent.ask("stream 1 0", conversationId=conversation)["done"]["status"] == "complete"
    # Requests that read the history are answered in the order sent (or refused busy past 32
    # waiting), on a connection that stays.
    for n in range(100):
        agent.send(type="history" if n % 2 else "list", id=n)
    answers = [agent.next() for _ in range(100)]
    assert [a["id"] for a in answers] == list(range(100))
    assert all(a["type"] == ("history" if a["id"] % 2 else "list") or a.get("code") == "busy" for a in answers)


def test_busy_conversation_cancel_and_concurrent_conversations(start):
    server = start()
    agent = Agent(server)
    agent.send(type="prompt", text="stream 50", id="long")
    started = agent.until("delta")[0]
    conversation = started["conversationId"]
    agent.send(type="prompt", text="stream 1 0", conversationId=conversation, id="again")
    refusal = agent.until("error")[-1]
    assert refusal == {
        "channel": "agent",
        "type": "error",
        "code": "busy",
        "id": "again",
        "conversationId": conversation,
        "message": f"a turn is already running in conversation {conversation}: wait for its done, or cancel it",
    }
    # Another conversation runs meanwhile.
    other = agent.ask("stream 3 0")
    assert other["done"]["status"] == "complete" and other["started"]["conversationId"] != conversation
    agent.send(type="cancel", conversationId=conversation, id="stop")
    messages = agent.until("done")
    assert messages[-1] == {
        "channel": "agent",
        "type": "done",
        "conversationId": conversation,
        "turnId": started["turnId"],
        "status": "cancelled",
        "id": "stop",
    }
    assert not [m for m in messages if m["type"] in ("message", "error")]
    pid = int((server.root / "agent.pid").read_text())
    wait_for(lambda: not alive(pid))
    agent.send(type="history", conversationId=conversation)
    turn = agent.next()["turns"][-1]
    assert turn["status"] == "cancelled" and turn["text"].startswith("0 ") and "finished" in turn
    assert agent.ask("stream 2 0", conversationId=conversation)["message"]["text"] == "0 1 "


def test_replay_sends_other_running_conversations_as_stubs(start):
    server = start()
    agent = Agent(server)
    agent.send(type="prompt", text="stream 200", id="a")
    other = agent.until("delta")[0]["conversationId"]
    agent.send(type="prompt", text="stream 200", id="b")
    active = agent.until("started")[-1]["conversationId"]
    late = Agent(server)
    full, stub = late.next(), late.next()
    assert full["conversationId"] == active and len(full["turns"]) == 2 and "truncated" not in full
    assert stub["conversationId"] == other and stub["running"] and stub["truncated"]
    assert [(t["role"], t["status"], t["truncated"]) for t in stub["turns"]] == [("assistant", "running", True)]
    assert stub["turns"][0]["text"].startswith("0 ")
    for conversation in (other, active):
        agent.send(type="cancel", conversationId=conversation)


def test_every_cancel_of_a_turn_gets_its_done(start):
    server = start()
    first, second = Agent(server), Agent(server)
    first.send(type="prompt", text="stream 100", id="long")
    conversation = first.until("delta")[0]["conversationId"]
    second.until("delta")
    first.send(type="cancel", conversationId=conversation, id="a")
    second.send(type="cancel", conversationId=conversation, id="b")
    assert first.until("done")[-1]["id"] == "a"
    broadcast = second.until("done")[-1]  # every client's copy, then the second's own
    assert "id" not in broadcast and second.next() == {**broadcast, "id": "b"}


@pytest.mark.slow
def test_broken_backends_fail_their_turn_alone(start):
    server = start("--agent-timeout", "1", "--agent-max-output-bytes", "3000000")
    agent = Agent(server)
    expected = {
        "crash": ("backend_failed", "the backend exited with status 3; its stderr ends: scripted: boom"),
        "hang": ("timeout", "the backend wrote nothing for 1 s"),
        "garbage": (
            "bad_output",
            'line 1 of the backend\'s output is not JSON: "Traceback (most recent call last): this is not JSON"',
        ),
        "flood": ("too_large", "the backend wrote more than 3000000 bytes"),
        "chatter": ("too_large", "the reply grew past 768 KiB"),
        "longline": ("too_large", "the backend wrote a line of more than 1048576 bytes"),
        "silent": ("bad_output", "the backend exited without writing a reply"),
        "error": ("backend_error", "scripted refusal"),
    }
    conversations = {}
    for mode, (code, text) in expected.items():
        began = time.monotonic()
        turn = agent.ask(mode)
        took = time.monotonic() - began
        conversations[mode] = turn["started"]["conversationId"]
        assert [(e["code"], e["message"]) for e in turn["errors"]] == [(code, text)], mode
        assert turn["done"]["status"] == "failed" and "message" not in turn, mode
        assert agent.config()["workspaceId"] == "ws-test"  # the daemon and its other channels go on
        if mode == "hang":
            # SIGTERM is ignored, so SIGKILL follows 2 s later, to the child as well.
            assert 2.5 < took < 6, took
            pids = [int(p) for p in (server.root / "agent.pid").read_text().split()]
            assert len(pids) == 2 and not any(map(alive, pids))
        else:
            assert took < 4, (mode, took)
    agent.send(type="history", conversationId=conversations["crash"])
    crashed = agent.next()["turns"][-1]
    assert crashed["status"] == "failed" and crashed["text"] == "about to crash "
    assert crashed["error"] == {"code": "backend_failed", "message": expected["crash"][1]}
    assert agent.ask("stream 3 0")["message"]["text"] == "0 1 2 "
    assert server.proc.poll() is None


def test_reconnect_mid_turn_replays_then_streams_on(start):
    server = start()
    first = Agent(server)
    first.send(type="prompt", text="stream 20", id=1)
    seen = first.until("delta") + [first.next(), first.next()]
    assert [m["type"] for m in seen] == ["started", "delta", "delta", "delta"]
    conversation, turn_id = seen[0]["conversationId"], seen[0]["turnId"]
    # Meanwhile another conversation runs a turn, so it is the one updated last.
    first.send(type="prompt", text="echo quick")
    quick = turn_of([m for m in first.until("done") if m["conversationId"] != conversation])
    assert quick["message"]["text"] == "you said: echo quick"
    first.close()
    # Deltas go on with nobody connected: saved past what the first client saw.
    wait_for(lambda: saved_text(server, turn_id).startswith("0 1 2 3 "))
    second = Agent(server)
    active, replay = second.next(), second.next()
    assert active["type"] == replay["type"] == "history" and active["replay"] is replay["replay"] is True
    assert (active["conversationId"], active["running"]) == (quick["started"]["conversationId"], False)
    assert replay["conversationId"] == conversation and replay["running"] is True and replay["truncated"] is True
    [running] = replay["turns"]  # not the active conversation: a stub of its running turn alone
    assert (running["turnId"], running["status"], running["truncated"]) == (turn_id, "running", True)
    assert running["text"].startswith("0 1 2 3 ") and "finished" not in running
    rest = turn_of(second.until("done", 5))
    assert rest["done"]["status"] == "complete" and rest["deltas"]
    assert running["text"] + "".join(d["text"] for d in rest["deltas"]) == rest["message"]["text"]
    assert rest["message"]["text"] == "".join(f"{i} " for i in range(20))


def test_history_survives_a_restart_and_a_running_turn_is_failed(start, tmp_path):
    server = start(state="kept")
    agent = Agent(server)
    done = agent.ask("stream 2 0")
    conversation = done["started"]["conversationId"]
    agent.send(type="prompt", text="stream 100", conversationId=conversation)
    agent.until("delta")
    agent.next()
    pid = int((server.root / "agent.pid").read_text())
    assert server.stop() == 0
    assert not alive(pid)

    server = start(state="kept")
    again = Agent(server)
    replay = again.next()
    assert replay["replay"] is True and replay["conversationId"] == conversation and replay["running"] is False
    assert replay["title"] == "stream 2 0"
    turns = replay["turns"]
    assert [(t["role"], t["status"]) for t in turns] == [
        ("user", "complete"),
        ("assistant", "complete"),
        ("user", "complete"),
        ("assistant", "failed"),
    ]
    assert turns[1]["text"] == "0 1 "
    assert turns[3]["text"].startswith("0 1") and turns[3]["error"]["code"] == "interrupted"
    assert turns[3]["error"]["message"] == "the daemon stopped during this turn"
    # The backend gets the whole conversation, failed turn included.
    answer = again.ask("count", conversationId=conversation)
    assert answer["message"]["text"] == (
        "5 messages: user:complete assistant:complete user:complete assistant:failed user:complete"
    )
    assert answer["tools"][0]["name"] == "count"


def test_a_daemon_killed_mid_turn_leaves_it_failed_on_restart(start):
    server = start(state="kept")
    agent = Agent(server)
    agent.send(type="prompt", text="stream 100")
    turn_id = agent.until("delta")[0]["turnId"]
    wait_for(lambda: saved_text(server, turn_id).startswith("0 1 2 "))  # a save of the text so far
    pid = int((server.root / "agent.pid").read_text())
    server.proc.kill()
    server.proc.wait()
    wait_for(lambda: not alive(pid))  # its next write finds no reader
    again = Agent(start(state="kept"))
    turn = again.next()["turns"][-1]
    assert turn["status"] == "failed" and turn["error"]["code"] == "interrupted"
    assert turn["text"].startswith("0 1 2 ")


def test_a_backend_that_cannot_start(start):
    server = start("--agent-command", "/nonexistent/agent --stdio", backend=None)
    agent = Agent(server)
    assert agent.config()["agent"]["command"] == ["/nonexistent/agent", "--stdio"]
    turn = agent.ask("hello")
    assert [(e["code"], e["message"]) for e in turn["errors"]] == [
        ("backend_failed", "cannot start /nonexistent/agent: No such file or directory")
    ]
    assert turn["done"]["status"] == "failed"


def test_a_nohup_daemon_starts_backends_with_default_signals(start):
    # A shell, as Python ignores SIGPIPE and SIGXFSZ itself when it starts.
    server = start("--agent-command", f"/bin/sh {ROOT / 'tests' / 'agents' / 'signals.sh'}", backend=None, wrap=NOHUP)
    text = Agent(server).ask("signals")["message"]["text"]
    fields = dict(part.split("=") for part in text.split())
    assert int(fields["SigIgn"], 16) & ((1 << 31) - 1) == 0, text  # glibc keeps 32 and 33 (see test_terminal)
    assert int(fields["SigBlk"], 16) == 0, text


def _trees(server: Server) -> dict:
    [line] = [l for l in server.log if l.get("msg", "").startswith("process trees") and l.get("kind") == "agent"]
    return line


def test_a_turn_cancel_exit_and_a_crash_end_the_whole_tree(start):
    server = start(state="kept")
    assert _trees(server)["msg"] == "process trees: cgroup", f"these tests need cgroup v2 with cgroup.kill: {_trees(server)}"
    agent = Agent(server)
    assert agent.ask("escape")["done"]["status"] == "complete"
    finished = [int(p) for p in (server.root / "agent.pid").read_text().split()]
    assert len(finished) == 3
    wait_for(lambda: all(map(gone, finished)), 10)

    agent.send(type="prompt", text="escape wait", id="w")
    started = agent.until("delta")[0]
    cancelled = [int(p) for p in (server.root / "agent.pid").read_text().split()]
    agent.send(type="cancel", conversationId=started["conversationId"])
    assert agent.until("done")[-1]["status"] == "cancelled"
    wait_for(lambda: all(map(gone, cancelled)), 10)

    agent.send(type="prompt", text="escape wait")
    agent.until("delta")
    stopped = [int(p) for p in (server.root / "agent.pid").read_text().split()]
    assert server.stop() == 0
    wait_for(lambda: all(map(gone, stopped)), 10)

    server = start(state="kept")
    agent = Agent(server)
    agent.send(type="prompt", text="escape wait")
    agent.until("delta")
    crashed = [int(p) for p in (server.root / "agent.pid").read_text().split()]
    server.proc.kill()
    server.proc.wait()
    assert not any(map(gone, crashed))
    start(state="kept")
    wait_for(lambda: all(map(gone, crashed)), 10)


def test_without_cgroups_a_turn_still_ends_its_session_and_children(start):
    """The fallback: what is in the backend's session or process group, or descends from it
    while the backend lives (held by pidfd from the SIGTERM on)."""
    server = start("--agent-timeout", "1", env={"AETHER_CGROUPS": "off"})
    assert _trees(server)["why"] == "AETHER_CGROUPS=off"
    agent = Agent(server)
    agent.send(type="prompt", text="escape wait no-orphan")
    started = agent.until("delta")[0]
    pids = [int(p) for p in (server.root / "agent.pid").read_text().split()]
    agent.send(type="cancel", conversationId=started["conversationId"])
    assert agent.until("done")[-1]["status"] == "cancelled"
    wait_for(lambda: all(map(gone, pids)), 10)
    assert agent.ask("escape no-orphan")["done"]["status"] == "complete"
    left, nohup = map(int, (server.root / "agent.pid").read_text().split())
    try:
        wait_for(lambda: gone(nohup), 10)  # still in the backend's session when the turn ended
    finally:
        # Left the session, and init adopted it when the backend exited: what the fallback misses.
        pidfd = os.pidfd_open(left)
        if Path(f"/proc/{left}/cmdline").read_bytes() == b"sleep\x001000\x00":
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        os.close(pidfd)
