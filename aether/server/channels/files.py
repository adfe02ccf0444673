"""The ``files`` channel (stub until written)."""

from __future__ import annotations

from aether.server.protocol import Message, ProtocolError


class FilesChannel:
    name = "files"

    def __init__(self, server):
        self.server = server

    def on_open(self, session) -> None:
        pass

    def on_close(self, session) -> None:
        pass

    def handle(self, session, message: Message) -> None:
        raise ProtocolError("not_implemented", "files is being written", self.name, message.id)

    def close(self) -> None:
        pass
