"""From a client's frame to the handler of its message, and every refusal to its error reply.

A frame is parsed (``aether.protocol``), checked against what the client may send (a dashboard
cookie opens less than the token), and handed to the handler its channel's table names for its
type. Whatever a handler raises ends here: a :class:`~aether.errors.Refusal` becomes the error reply (``aether.wire.refused``), any
other exception ``internal``, logged with its traceback. Work a handler starts for later (a
kill, a file operation in the pool, a database read) runs through :class:`Jobs`, which does the
same for what that work raises. No channel builds an error reply of its own.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Collection, Coroutine, Mapping, MutableMapping
from typing import TYPE_CHECKING

from aether import protocol, wire
from aether.errors import Refusal
from aether.protocol import Message
from aether.server.channels import Channel

if TYPE_CHECKING:
    from aether.server.client import Client

log = logging.getLogger("aether.server")

#: Where a reply goes: a client's ``send``, or a place a channel keeps in line for it.
Reply = Callable[[dict], None]


FORBIDDEN = (
    "the dashboard's cookie opens the ports channel and config get/registry only: connect with the workspace token for this"
)


class Dispatcher:
    """The channels by name, each with its table of handlers; ``received`` counts messages by
    (channel, type). A client that holds the dashboard's cookie hears ``heard`` channels only."""

    def __init__(
        self, channels: Mapping[str, Channel], received: MutableMapping[tuple[str, str], int], heard: Collection[str] = ()
    ):
        self.channels = channels
        self.received = received
        self.heard = heard

    def open(self, client: Client) -> None:
        for name, channel in self.channels.items():
            if client.allowed is None or name in self.heard:
                channel.on_open(client)

    def close(self, client: Client) -> None:
        for channel in self.channels.values():
            channel.on_close(client)

    def receive(self, client: Client, frame: str | bytes) -> None:
        try:
            message = protocol.parse(frame)
        except protocol.ProtocolError as exc:
            # parse names only a channel, and a type, that the protocol has.
            self.received[(exc.channel or "unknown", exc.type or "unknown")] += 1
            client.send(wire.refused(exc, channel=exc.channel, id=exc.id))
            return
        self.received[(message.channel, message.type)] += 1
        if client.allowed is not None and (message.channel, message.type) not in client.allowed:
            client.send(wire.refused(Refusal("forbidden", FORBIDDEN), message))
            return
        self.dispatch(client, message)

    def dispatch(self, client: Client, message: Message) -> None:
        """``message`` to its handler; what it raises to the channel's reply."""
        channel = self.channels[message.channel]
        try:
            channel.handlers[message.type](client, message)
        except Refusal as refusal:
            channel.reply(client, wire.refused(refusal, message))
        except Exception:
            log.exception("message handling failed", extra={"channel": message.channel, "type": message.type})
            channel.reply(client, wire.refused(wire.INTERNAL, message))


class Jobs:
    """What a channel's handlers start and finish later, each the answer to one request: when
    it raises Refusal, ``reply`` gets the error reply; anything else is logged and answered
    ``internal``. :meth:`cancel` ends what is still running (at shutdown)."""

    def __init__(self) -> None:
        self._running: dict[asyncio.Future, Coroutine] = {}

    def start(self, work: Coroutine, request: Message, reply: Reply) -> asyncio.Future:
        # The reply is sent in the step that ends the work, as the work's own would be: before
        # a request it held back (behind a lock) runs.
        task = asyncio.ensure_future(self._run(work, request, reply))
        self._running[task] = work
        task.add_done_callback(self._running.pop)
        return task

    @staticmethod
    async def _run(work: Coroutine, request: Message, reply: Reply) -> None:
        try:
            await work
        except Refusal as refusal:
            reply(wire.refused(refusal, request))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("request failed", extra={"channel": request.channel, "type": request.type})
            reply(wire.refused(wire.INTERNAL, request))

    def cancel(self) -> None:
        for task, work in list(self._running.items()):
            task.cancel()
            if inspect.getcoroutinestate(work) == inspect.CORO_CREATED:
                work.close()  # cancelled before it began: never to be awaited
