"""One module a channel. Each channel is a :class:`Channel`: its ``handlers``, one a message type
the protocol has for it (``aether.protocol.SCHEMAS``; a test holds the two to each other), and
what it does as clients come and go. A channel is given what it uses, typed as the small
protocols here and in its module, never the whole server.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from aether.protocol import Message

if TYPE_CHECKING:
    from aether.server.client import Client

#: A handler answers through ``client.send``, raises a Refusal (the dispatcher answers it), or
#: starts a job (``aether.server.dispatch.Jobs``) that answers later.
Handler = Callable[["Client", Message], None]


class Channel:
    name: str
    handlers: Mapping[str, Handler]

    def on_open(self, client: Client) -> None:
        """A client that hears this channel has connected."""

    def on_close(self, client: Client) -> None:
        """A client has gone (whether it heard this channel or not)."""

    def reply(self, client: Client, message: dict) -> None:
        """Send the reply to one of ``client``'s requests (an error reply too)."""
        client.send(message)

    def close(self) -> None:
        """At shutdown: end what the channel keeps beside its clients."""


class Audience(Protocol):
    """Every connected client at once (the hub)."""

    @property
    def clients(self) -> Collection[Any]: ...

    def broadcast(self, message: dict) -> None: ...

    def announce(self, message: dict, sender: Client | None = None, id: Any = None) -> None: ...


#: Writes keys of the state directory's config.json (``StateDir.save_config``); OSError when it
#: cannot, and then nothing changed.
SaveConfig = Callable[[dict], None]
