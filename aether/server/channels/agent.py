"""The ``agent`` channel: conversations with the configured backend, streamed to every client
(seed 001: "AI agent interaction and streaming").

The agent belongs to the workspace, not to a connection: every client hears every turn's
``started``, ``delta``, ``tool``, ``message``, ``error`` and ``done``, and the client whose
request caused one gets its copy with the request's ``id``. On connect, a client gets the
history of the conversation updated last, marked ``"replay": true`` (seed 001: "agent
conversation history is replayed automatically"), a running turn in it with its text so far;
the live events that follow extend exactly that.

Replies that read the database (``history``, ``list``, the replay) take a moment in the
service's worker thread. Each connection's messages keep their order meanwhile: what comes
after such a reply waits for it (``_Outbox``).
"""

from __future__ import annotations

import collections
import logging
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from aether.agent.service import AgentService
from aether.errors import Refusal
from aether.protocol import Message
from aether.wire import frame, refused, with_id

if TYPE_CHECKING:
    from aether.server.app import WorkspaceServer
    from aether.server.client import Client

log = logging.getLogger("aether.agent")

#: Replies of one connection waiting on the database; past this, ``busy`` (a client that asks
#: faster than they are read would otherwise queue work without bound).
MAX_WAITING = 32


class _Outbox:
    """One client's agent messages (dicts, or frames built once for every client), in order: a
    reply still being read from the database holds back the messages after it."""

    def __init__(self, client: "Client"):
        self.client = client
        self.waiting = 0
        #: Places in line: [None] while a reply is read, then [its messages].
        self._queue: collections.deque[list] = collections.deque()

    def send(self, message: Union[dict, bytes]) -> None:
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

    def fill(self, slot: list, messages: list[Union[dict, bytes]]) -> None:
        """Put the reply's messages (maybe none) in its place; send what is ready."""
        slot[0] = messages
        self.waiting -= 1
        while self._queue and self._queue[0][0] is not None:
            for message in self._queue.popleft()[0]:
                self.client.send(message)


class AgentChannel:
    name = "agent"

    def __init__(self, server: "WorkspaceServer"):
        self.server = server
        self.service = AgentService(server.settings, self._emit, self._answer_one)
        self._outboxes: dict["Client", _Outbox] = {}
        self._handlers = {"prompt": self._prompt, "cancel": self._cancel, "history": self._history, "list": self._list}

    # -- connections --------------------------------------------------------------------

    def on_open(self, client: "Client") -> None:
        outbox = self._outboxes[client] = _Outbox(client)

        def replay(histories: list[dict]) -> list[dict]:
            return [{"channel": self.name, "type": "history", "replay": True, **history} for history in histories]

        self._answer(outbox, self.service.replay(), replay)

    def on_close(self, client: "Client") -> None:
        self._outboxes.pop(client, None)

    def handle(self, client: "Client", message: Message) -> None:
        outbox = self._outboxes.get(client)
        if outbox is None:  # not open yet or already closed: nothing to answer into
            return
        try:
            self._handlers[message.type](client, outbox, message)
        except Refusal as refusal:
            outbox.send(self._error(refusal, message))

    def _error(self, refusal: Refusal, message: Optional[Message]) -> dict:
        return refused(refusal, message, channel=self.name)

    def _emit(self, message: dict, reply_to: Optional[tuple[Any, Message]]) -> None:
        """``message`` to every connection; the requester's copy carries its ``id``."""
        built = frame(message)
        sender, id_ = (reply_to[0], reply_to[1].id) if reply_to is not None else (None, None)
        for client, outbox in list(self._outboxes.items()):
            outbox.send(frame(with_id(message, id_)) if client is sender and id_ is not None else built)

    def _answer_one(self, reply_to: tuple[Any, Message], message: Union[dict, Refusal]) -> None:
        """``message`` to the requester of ``reply_to`` alone, as the answer to its request."""
        client, request = reply_to
        outbox = self._outboxes.get(client)
        if outbox is not None:
            outbox.send(self._error(message, request) if isinstance(message, Refusal) else with_id(message, request.id))

    def _answer(self, outbox: _Outbox, work: Callable[[], Any], render: Callable[[Any], Any],
                message: Optional[Message] = None) -> None:
        """Run ``work`` in the database thread; send ``render(result)`` (a message, or a list of
        them) in the outbox's order."""
        if outbox.waiting >= MAX_WAITING:
            raise Refusal("busy", f"{MAX_WAITING} agent requests of this connection are waiting for their answers; wait for them")
        slot = outbox.hold()

        def done(future) -> None:
            if self._outboxes.get(outbox.client) is not outbox:
                return  # the connection closed meanwhile
            try:
                reply = render(future.result())
            except Refusal as refusal:
                reply = self._error(refusal, message)
            except Exception as exc:
                log.exception("agent history read failed")
                reply = self._error(Refusal("unavailable", f"the agent history could not be read: {exc}"), message)
            if isinstance(reply, dict) and message is not None and message.id is not None:
                reply["id"] = message.id  # last, as in every other reply
            outbox.fill(slot, reply if isinstance(reply, list) else [reply])

        try:
            self.service.read(work).add_done_callback(done)
        except RuntimeError:  # the daemon is stopping: its thread is gone
            outbox.fill(slot, [])

    # -- messages -----------------------------------------------------------------------

    def _prompt(self, client: "Client", outbox: _Outbox, message: Message) -> None:
        self.service.start(message.body.get("conversationId"), message.body["text"], (client, message))

    def _cancel(self, client: "Client", outbox: _Outbox, message: Message) -> None:
        self.service.cancel(message.body["conversationId"], (client, message))

    def _history(self, client: "Client", outbox: _Outbox, message: Message) -> None:
        wanted = message.body.get("conversationId")

        def render(history: Optional[dict]) -> dict:
            if history is None and wanted is not None:
                raise Refusal("not_found", f"no conversation {wanted}")
            if history is None:  # no conversation yet
                history = {"conversationId": None, "title": None, "running": False, "turns": []}
            return {"channel": self.name, "type": "history", **history}

        self._answer(outbox, self.service.history(wanted), render, message)

    def _list(self, client: "Client", outbox: _Outbox, message: Message) -> None:
        self._answer(outbox, self.service.listing(), lambda found: {"channel": self.name, "type": "list", **found}, message)

    def close(self) -> None:
        self.service.close()
        self._outboxes.clear()
