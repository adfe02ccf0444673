"""The one kind of refusal: what any layer raises when it will not do what it was asked.

A :class:`Refusal` carries the protocol's error ``code``, a ``message`` for a person, and the
fields its error reply adds (``path``, ``port``...). It is raised anywhere (a file operation,
a kill, the registry, the agent, a terminal's spawn) and turned into the client's reply in one
place, the server's dispatcher (``aether.wire.refused``), as Tornado turns an ``HTTPError``
into a response; the CLI prints its message. Modules whose callers catch their own kind keep a
subclass (``FileError``, ``KillRefused``, ``RegistryError``). Nothing here imports anything:
the CLI's fast paths import it too.
"""

from __future__ import annotations

from typing import Any


class Refusal(Exception):
    """A request that cannot be acted on: ``code`` (``not_found``, ``busy``...), ``message``,
    and ``fields``, added to the error reply as they are."""

    def __init__(self, code: str, message: str, **fields: Any):
        super().__init__(message)
        self.code = code
        self.message = message
        self.fields = fields
