"""The ``agent`` channel: conversations with the configured backend, streamed to every client.

The agent belongs to the workspace, not to a client: every client hears every turn's
``started``, ``delta``, ``tool``, ``message``, ``error`` and ``done``, and the client whose
request caused one gets its copy with the request's ``id``. On connect, a client gets the
history of the conversation updated last, marked ``"replay": true``, a running turn in it with
its text so far; the live events that follow extend exactly that.

Replies that read the database (``history``, ``list``, the replay) take a moment in the
service's worker thread. Each client's messages keep their order meanwhile: what comes after
such a reply waits for it (``_Outbox``), error replies too.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aether.agent.service import AgentService
from aether.errors import Refusal
from aether.protocol import Message
from aether.server.channels import Channel
from aether.server.dispatch import Jobs
from aether.wire import frame, refused, with_id

if TYPE_CHECKING:
    from aether.server.client import Client

log = logging.getLogger("aether.agent")

#: Replies of one client waiting on the database; past this, ``busy`` (a client that asks
#: faster than they are read would otherwise queue work without bound).
MAX_WAITING = 32
#: What the replay on connect answers: no request of the client's (its error has no ``id``).
REPLAY = Message("agent", "replay", {})


class _Outbox:
    """One client's agent messages (dicts, or frames built once for every client), in order: a
    reply still being read from the database holds back the messages after it."""

    def __init__(self, client: Client):
        self.client = client
        self.waiting = 0
        #: Places in line: [None] while a reply is read, then [its messages].
        self._queue: collections.deque[list] = collections.deque()

    def send(self, message: dict | bytes) -> None:
        if self._queue:
            self._queue.append([[message]])
        else:
            self.client.send(message)

    def hold(self) -> list:
        """A place in line for a reply to come (see :meth:`fill`)."""
        slot: list = [None]
        self._queue.append(slot)
        self.waiting += 1
        return slot

    def fill(self, slot: list, messages: list[dict | bytes]) -> None:
        """Put the reply's messages (maybe none) in its place; send what is ready."""
        slot[0] = messages
        self.waiting -= 1
        while self._queue and self._queue[0][0] is not None:
            for message in self._queue.popleft()[0]:
                self.client.send(message)


class AgentChannel(Channel):
    """The agent service of ``settings`` (its state directory, backend, workspace, limits)."""

    name = "agent"

    def __init__(self, settings: Any):
        self.service = AgentService(settings, self._emit, self._answer_one)
        self._outboxes: dict[Client, _Outbox] = {}
        self._jobs = Jobs()
        self.handlers = {"prompt": self._prompt, "cancel": self._cancel, "history": self._history, "list": self._list}

    # -- clients ------------------------------------------------------------------------

    def on_open(self, client: Client) -> None:
        outbox = self._outboxes[client] = _Outbox(client)

        def replay(histories: list[dict]) -> list[dict]:
            return [{"channel": self.name, "type": "history", "replay": True, **history} for history in histories]

        self._answer(outbox, self.service.replay(), replay, REPLAY)

    def on_close(self, client: Client) -> None:
        self._outboxes.pop(client, None)

    def reply(self, client: Client, message: dict) -> None:
        outbox = self._outboxes.get(client)
        (outbox.send if outbox is not None else client.send)(message)

    def _emit(self, message: dict, reply_to: tuple[Any, Message] | None) -> None:
        """``message`` to every client; the requester's copy carries its ``id``."""
        built = frame(message)
        sender, id_ = (reply_to[0], reply_to[1].id) if reply_to is not None else (None, None)
        for client, outbox in list(self._outboxes.items()):
            outbox.send(frame(with_id(message, id_)) if client is sender and id_ is not None else built)

    def _answer_one(self, reply_to: tuple[Any, Message], message: dict | Refusal) -> None:
        """``message`` to the requester of ``reply_to`` alone, as the answer to its request."""
        client, request = reply_to
        outbox = self._outboxes.get(client)
        if outbox is not None:
            outbox.send(refused(message, request) if isinstance(message, Refusal) else with_id(message, request.id))

    def _answer(self, outbox: _Outbox, work: Callable[[], Any], render: Callable[[Any], Any], request: Message) -> None:
        """Run ``work`` in the database thread; send ``render(result)`` (a message, or a list of
        them) in the outbox's order, or the error reply of what either raises."""
        if outbox.waiting >= MAX_WAITING:
            raise Refusal("busy", f"{MAX_WAITING} agent requests of this connection are waiting for their answers; wait for them")
        slot = outbox.hold()
        try:
            read = self.service.read(work)
        except RuntimeError:  # the daemon is stopping: its thread is gone
            outbox.fill(slot, [])
            return
        self._jobs.start(self._answered(outbox, slot, read, render, request), request, lambda error: outbox.fill(slot, [error]))

    async def _answered(
        self, outbox: _Outbox, slot: list, read: asyncio.Future, render: Callable[[Any], Any], request: Message
    ) -> None:
        try:
            result = await read
        except Exception as exc:
            log.exception("agent history read failed")
            raise Refusal("unavailable", f"the agent history could not be read: {exc}") from None
        if self._outboxes.get(outbox.client) is not outbox:
            return  # the client has gone meanwhile
        reply = render(result)
        if isinstance(reply, dict) and request.id is not None:
            reply["id"] = request.id  # last, as in every other reply
        outbox.fill(slot, reply if isinstance(reply, list) else [reply])

    # -- messages -----------------------------------------------------------------------

    def _outbox(self, client: Client) -> _Outbox | None:
        return self._outboxes.get(client)  # None: not open yet or gone, nothing to answer into

    def _prompt(self, client: Client, message: Message) -> None:
        if self._outbox(client) is not None:
            self.service.start(message.body.get("conversationId"), message.body["text"], (client, message))

    def _cancel(self, client: Client, message: Message) -> None:
        if self._outbox(client) is not None:
            self.service.cancel(message.body["conversationId"], (client, message))

    def _history(self, client: Client, message: Message) -> None:
        outbox = self._outbox(client)
        if outbox is None:
            return
        wanted = message.body.get("conversationId")

        def render(history: dict | None) -> dict:
            if history is None and wanted is not None:
                raise Refusal("not_found", f"no conversation {wanted}")
            if history is None:  # no conversation yet
                history = {"conversationId": None, "title": None, "running": False, "turns": []}
            return {"channel": self.name, "type": "history", **history}

        self._answer(outbox, self.service.history(wanted), render, message)

    def _list(self, client: Client, message: Message) -> None:
        outbox = self._outbox(client)
        if outbox is not None:
            self._answer(outbox, self.service.listing(), lambda found: {"channel": self.name, "type": "list", **found}, message)

    def close(self) -> None:
        self._jobs.cancel()
        self.service.close()
        self._outboxes.clear()
