"""Conversations and their running turns: what the ``agent`` channel asks for, apart from any
connection.

A ``prompt`` is checked at once, on the event loop, and its place reserved; then the prompt is
written as a complete user turn and the reply as a running assistant turn. Only once that write
has succeeded is ``started`` announced and the backend run (``backend.BackendRun``); if it
fails (another process holds ``agent.db`` locked, say) the reservation is undone and the
requester alone is answered ``unavailable``. What the backend produces is announced through
``emit`` as it comes and saved at most every ``SAVE_INTERVAL`` seconds, then once more at the
end, which is awaited: a turn whose end cannot be saved ends ``failed`` (``unavailable``). One turn runs per
conversation at a time; a second prompt to it is refused (``busy``), not queued, so a client
never has a prompt in flight that it cannot see or cancel.

Every database read and write runs in one worker thread, in the order queued (see ``store``).
A read snapshots the running turns' text when it is queued, so what it returns plus the events
announced after it is exactly the turn; the channel keeps that order per connection.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aether.agent import stdio
from aether.agent.backend import BackendRun, Outcome
from aether.agent.store import INTERRUPTED, AgentStore, AgentStoreLocked, millis, recent, shortened
from aether.cgroup import Trees
from aether.errors import Refusal
from aether.settings.sources import child_environment

log = logging.getLogger("aether.agent")

MAX_PROMPT_BYTES = 64 << 10
#: Turns running at once, over all conversations: each is a process.
MAX_RUNNING = 8
#: A running turn's text so far is written to the database at most every SAVE_INTERVAL
#: seconds, and less often as it grows: each save rewrites it whole, so a long reply costs at
#: most SAVE_RATE bytes a second of writes.
SAVE_INTERVAL = 0.25
SAVE_RATE = 256 << 10
#: A ``history`` message holds the most recent turns that fit in this many bytes.
HISTORY_BUDGET = 900_000
#: On connect, a conversation other than the active one with a turn running is replayed as that
#: turn alone, with at most the last this many bytes of its text.
STUB_TEXT = 64 << 10
MAX_LISTED = 1000
TITLE_LENGTH = 80

#: ``emit(message, reply_to)``: ``message`` to every client; ``reply_to`` is (client, request)
#: for the client whose request it answers, whose copy carries that request's id.
Emit = Callable[[dict, tuple[Any, Any] | None], None]
#: ``answer(reply_to, message)``: ``message`` (or the error reply of a refusal) to the one
#: client of ``reply_to``, as the answer to its request.
Answer = Callable[[tuple[Any, Any], dict | Refusal], None]


def title_of(text: str) -> str:
    return " ".join(text.split())[:TITLE_LENGTH]


class Turn:
    """An assistant turn while it runs."""

    def __init__(self, conversation_id: str, turn_id: str, seq: int):
        self.conversation_id, self.id, self.seq = conversation_id, turn_id, seq
        self.backend: BackendRun | None = None
        self.task: asyncio.Future | None = None
        self.save_timer: asyncio.TimerHandle | None = None
        #: Who asked to cancel it, first first: the first gets ``done`` with its id, the others a copy.
        self.cancelled_by: list[tuple[Any, Any]] = []
        self.cancelled = False
        #: Its end is being written: close() leaves it to that write.
        self.finishing = False

    @property
    def reply(self) -> stdio.Reply:
        return self.backend.reply if self.backend is not None else stdio.Reply()

    def snapshot(self) -> dict:
        reply = self.reply
        return {"text": reply.text, "tools": list(reply.tools)}


class AgentService:
    def __init__(self, settings, emit: Emit, answer: Answer):
        self.settings = settings
        self.emit, self.answer = emit, answer
        #: Why the channel answers ``unavailable`` to everything (the store could not be opened
        #: for a lock another process held), or None.
        self.unavailable: str | None = None
        self.store: AgentStore | None = None
        #: conversation id -> seq of its last turn; a prompt is checked against it at once.
        self.sequences: dict[str, int] = {}
        self.trees = Trees(str(settings.state_dir), "agent")
        try:
            self.store = AgentStore(settings.state_dir / "agent.db")
        except AgentStoreLocked as exc:
            # Locked is not broken: the rest of the daemon is still worth serving.
            self.unavailable = str(exc)
            log.error("agent channel unavailable: %s", exc)
        else:
            if self.store.interrupted:
                log.warning(
                    "agent turns closed as failed: the daemon stopped while they ran", extra={"turns": self.store.interrupted}
                )
            self.sequences = self.store.last_sequences()
        self.running: dict[str, Turn] = {}
        self.closed = False
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="agent-db")

    @property
    def configured(self) -> bool:
        return bool(self.settings.agent_command)

    def _check_available(self) -> None:
        if self.unavailable is not None:
            raise Refusal("unavailable", self.unavailable)

    @property
    def _store(self) -> AgentStore:
        """The store, for work that runs once :meth:`_check_available` has passed: it is None
        only while the channel is unavailable."""
        assert self.store is not None
        return self.store

    # -- the database -------------------------------------------------------------------

    def read(self, work: Callable[[], Any]) -> asyncio.Future:
        """``work()`` in the worker thread, after every write queued so far."""
        return asyncio.get_running_loop().run_in_executor(self._pool, work)

    def _write(self, fn: Callable, *args) -> None:
        if self.closed:
            return

        def write():
            try:
                fn(*args)
            except Exception:
                log.exception("agent history write failed")

        self._pool.submit(write)

    def history(self, conversation_id: str | None) -> Callable[[], dict | None]:
        """Work for :meth:`read`: the conversation (default: the one updated last) with its
        most recent turns, running ones as of now; None if there is no such conversation."""
        self._check_available()
        now = self._running_now()
        return lambda: self._history(conversation_id or self._store.active(), now)

    def replay(self) -> Callable[[], list[dict]]:
        """Work for :meth:`read`: what a new connection is told, as of now: the conversation
        updated last in full, then for every other one with a turn running (whose events it will
        hear) a stub with that turn alone, its text cut to its last ``STUB_TEXT`` bytes: eight
        full histories at once would overflow what a session may have pending."""
        if self.unavailable is not None:
            return lambda: []
        now = self._running_now()
        running = {cid: turn.id for cid, turn in self.running.items()}

        def work() -> list[dict]:
            active = self._store.active()
            found = [history] if active and (history := self._history(active, now)) is not None else []
            for cid, turn_id in running.items():
                if cid != active and (stub := self._stub(cid, turn_id, now)) is not None:
                    found.append(stub)
            return found

        return work

    def _stub(self, conversation_id: str, turn_id: str, now: dict[str, dict]) -> dict | None:
        """In the worker thread: the conversation with only its running turn, marked truncated."""
        conversation = self._store.conversation(conversation_id)
        turn = next((t for t in self._store.turns(conversation_id) if t["turnId"] == turn_id), None)
        if conversation is None or turn is None:
            return None
        turn = shortened({**turn, **now.get(turn_id, {})}, STUB_TEXT)
        return {**conversation, "running": True, "turns": [turn], "truncated": True}

    def _running_now(self) -> dict[str, dict]:
        return {turn.id: turn.snapshot() for turn in self.running.values()}

    def _history(self, conversation_id: str | None, now: dict[str, dict]) -> dict | None:
        """In the worker thread: a conversation's history, ``now`` the running turns' text."""
        if not conversation_id:
            return None
        conversation = self._store.conversation(conversation_id)
        if conversation is None:
            return None
        turns = [{**t, **now[t["turnId"]]} if t["turnId"] in now else t for t in self._store.turns(conversation_id)]
        for turn in turns:
            if not turn.get("tools"):
                turn.pop("tools", None)
        kept, truncated = recent(turns, HISTORY_BUDGET)
        answer = {**conversation, "running": any(t["status"] == "running" for t in turns), "turns": kept}
        if truncated:
            answer["truncated"] = True
        return answer

    def listing(self) -> Callable[[], dict]:
        self._check_available()

        def work() -> dict:
            conversations, more = self._store.conversations(MAX_LISTED)
            answer: dict[str, Any] = {"conversations": conversations}
            if more:
                answer["truncated"] = True
            return answer

        return work

    # -- turns --------------------------------------------------------------------------

    def start(self, conversation_id: str | None, text: str, reply_to: tuple[Any, Any] | None) -> None:
        """Take a prompt or raise Refusal, changing nothing. Once it is written, ``started`` is
        announced; if that write fails, the requester is answered ``unavailable`` instead."""
        if not self.configured:
            raise Refusal(
                "not_configured",
                "no agent backend is configured: set agent_command in the state directory's config.json, or --agent-command (see docs/settings.md)",
            )
        self._check_available()
        size = len(text.encode("utf-8"))
        if size > MAX_PROMPT_BYTES:
            raise Refusal("too_large", f"a prompt of {size} bytes; at most {MAX_PROMPT_BYTES} (64 KiB)")
        if conversation_id is not None:
            if conversation_id not in self.sequences:
                raise Refusal("not_found", f"no conversation {conversation_id}")
            if conversation_id in self.running:
                raise Refusal(
                    "busy", f"a turn is already running in conversation {conversation_id}: wait for its done, or cancel it"
                )
        if len(self.running) >= MAX_RUNNING:
            raise Refusal("limit", f"{MAX_RUNNING} agent turns are running already; wait for one to finish")
        now = time.time()
        title = None
        previous = self.sequences.get(conversation_id) if conversation_id is not None else None
        if conversation_id is None:
            conversation_id = f"c-{secrets.token_hex(6)}"
            while conversation_id in self.sequences:
                conversation_id = f"c-{secrets.token_hex(6)}"
            title = title_of(text)
            self.sequences[conversation_id] = 0
        seq = self.sequences[conversation_id] + 1
        self.sequences[conversation_id] = seq + 1
        user_id, turn_id = f"{conversation_id}.{seq}", f"{conversation_id}.{seq + 1}"
        # Reserved now, so a second prompt to the conversation is ``busy`` while this is written.
        turn = self.running[conversation_id] = Turn(conversation_id, turn_id, seq + 1)
        prompt = {
            "turnId": user_id,
            "seq": seq,
            "role": "user",
            "text": text,
            "status": "complete",
            "started": millis(now),
            "finished": millis(now),
        }
        started = {"channel": "agent", "type": "started", "conversationId": conversation_id, "turnId": turn_id, "prompt": prompt}
        if title is not None:
            started["title"] = title

        def begin() -> None:
            self._store.begin_turn(conversation_id, title, (user_id, seq, text), (turn_id, seq + 1), now)

        def undo() -> None:
            if self.running.get(conversation_id) is turn:
                del self.running[conversation_id]
            if previous is None:
                self.sequences.pop(conversation_id, None)
            else:
                self.sequences[conversation_id] = previous

        turn.task = asyncio.ensure_future(self._begin(turn, begin, undo, started, reply_to))

    async def _begin(
        self, turn: Turn, begin: Callable[[], None], undo: Callable[[], None], started: dict, reply_to: tuple[Any, Any] | None
    ) -> None:
        """Write the turn's start, then announce and run it; or undo the reservation and refuse."""
        try:
            await self.read(begin)
        except asyncio.CancelledError:
            raise  # the daemon is stopping
        except Exception as exc:
            log.exception("agent history write failed; prompt refused", extra={"conversation": turn.conversation_id})
            undo()
            if reply_to is not None:
                self.answer(
                    reply_to, Refusal("unavailable", f"the agent history could not be written ({exc}); the prompt was not taken")
                )
            for canceller in turn.cancelled_by:  # they asked to stop a turn that never started
                self.answer(canceller, Refusal("not_found", f"no turn is running in conversation {turn.conversation_id}"))
            return
        self.emit(started, reply_to)
        log.info("agent turn started", extra={"conversation": turn.conversation_id, "turn": turn.id})
        await self._run(turn)

    def cancel(self, conversation_id: str, reply_to: tuple[Any, Any] | None) -> None:
        """Stop the conversation's running turn; its ``done`` (cancelled) answers the request
        (every request, when several asked)."""
        turn = self.running.get(conversation_id)
        if turn is None:
            raise Refusal("not_found", f"no turn is running in conversation {conversation_id}")
        turn.cancelled = True
        if reply_to is not None:
            turn.cancelled_by.append(reply_to)
        if turn.backend is not None:
            turn.backend.cancel()

    async def _run(self, turn: Turn) -> None:
        try:
            messages = await self.read(lambda: self._backend_messages(turn))
            settings = self.settings
            workspace = {
                "root": str(settings.workspace_root),
                "serverPort": settings.port,
                "workspaceId": settings.workspace_id,
                "stateDir": str(settings.state_dir),
            }
            request = stdio.turn_request(turn.conversation_id, turn.id, messages, workspace)
            turn.backend = BackendRun(
                settings.agent_command,
                request,
                cwd=str(settings.workspace_root),
                env=self._env(turn),
                timeout=settings.agent_timeout,
                max_output=settings.agent_max_output_bytes,
                on_event=lambda event: self._event(turn, event),
                trees=self.trees,
            )
            if turn.cancelled:
                turn.backend.cancel()
            outcome = await turn.backend.run()
        except asyncio.CancelledError:
            raise  # the daemon is stopping: close() has ended the turn
        except Exception:
            log.exception("agent turn failed", extra={"turn": turn.id})
            if turn.backend is not None:
                turn.backend.kill()
            outcome = Outcome("failed", ("internal", "the server failed running this turn; it logged why"))
        await self._finish(turn, outcome)

    def _backend_messages(self, turn: Turn) -> list[dict]:
        """The conversation up to the prompt, for the backend (runs in the worker thread)."""
        return [
            {"role": t["role"], "text": t["text"], "status": t["status"]}
            for t in self._store.turns(turn.conversation_id)
            if t["seq"] < turn.seq
        ]

    def _env(self, turn: Turn) -> dict:
        env = child_environment()
        env["AETHER_STATE_DIR"] = str(self.settings.state_dir)
        env["AETHER_AGENT_CONVERSATION"] = turn.conversation_id
        return env

    @staticmethod
    def _message(turn: Turn, kind: str, **fields) -> dict:
        return {"channel": "agent", "type": kind, "conversationId": turn.conversation_id, "turnId": turn.id, **fields}

    def _event(self, turn: Turn, event: stdio.Event) -> None:
        if isinstance(event, stdio.Delta):
            if not event.text:
                return
            self.emit(self._message(turn, "delta", text=event.text), None)
        elif isinstance(event, stdio.Tool):
            self.emit(self._message(turn, "tool", name=event.name, text=event.text), None)
        if turn.save_timer is None:
            delay = max(SAVE_INTERVAL, turn.reply.size / SAVE_RATE)
            turn.save_timer = asyncio.get_running_loop().call_later(delay, self._save, turn)

    def _save(self, turn: Turn) -> None:
        turn.save_timer = None
        if self.running.get(turn.conversation_id) is turn:
            reply = turn.reply
            self._write(self._store.save_turn, turn.id, reply.text, list(reply.tools))

    async def _finish(self, turn: Turn, outcome: Outcome) -> None:
        if self.closed:
            return
        if turn.save_timer is not None:
            turn.save_timer.cancel()
            turn.save_timer = None
        reply = turn.reply
        turn.finishing = True
        end = (turn.id, reply.text, list(reply.tools), outcome.status, outcome.error, time.time())
        try:
            await self.read(lambda: self._store.save_turn(*end))
        except asyncio.CancelledError:
            raise  # the daemon is stopping; the write is queued before its thread ends
        except Exception as exc:
            # The file still says running: a restart closes it as interrupted. Say so now, and
            # do not call it complete when the history cannot show that.
            log.exception("agent history write failed; turn failed", extra={"turn": turn.id})
            outcome = Outcome(
                "failed", ("unavailable", f"the end of this turn could not be written to the agent history ({exc})")
            )
        if self.closed:
            return
        del self.running[turn.conversation_id]
        if outcome.status == "complete":
            message = self._message(turn, "message", role="assistant", text=reply.text)
            if reply.tools:
                message["tools"] = reply.tools
            self.emit(message, None)
        if outcome.error is not None:
            code, text = outcome.error
            self.emit(self._message(turn, "error", code=code, message=text), None)
        done = self._message(turn, "done", status=outcome.status)
        requesters = turn.cancelled_by if outcome.status == "cancelled" else []
        self.emit(done, requesters[0] if requesters else None)
        for later in requesters[1:]:
            self.answer(later, done)
        extra = {"conversation": turn.conversation_id, "turn": turn.id, "status": outcome.status}
        if outcome.error is not None:
            extra["error"] = outcome.error[0]
        log.info("agent turn ended", extra=extra)

    def close(self) -> None:
        """At shutdown: kill every running backend, save its turn as failed, close the file."""
        for turn in list(self.running.values()):
            if turn.finishing:
                continue  # its end is queued already
            if turn.save_timer is not None:
                turn.save_timer.cancel()
            if turn.backend is not None:
                turn.backend.kill()
            if turn.task is not None:
                turn.task.cancel()
            reply = turn.reply
            self._write(self._store.save_turn, turn.id, reply.text, list(reply.tools), "failed", INTERRUPTED, time.time())
        self.running.clear()
        self.trees.close()
        self.closed = True
        self._pool.shutdown(wait=True)
        if self.store is not None:
            self.store.close()
