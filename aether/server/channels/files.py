"""The ``files`` channel: list, stat, read, write, mkdir, delete and rename under the workspace
root, and watches that belong to the client's connection (nothing is replayed after a
reconnect; ``list`` and ``read`` give the current state).

The operations block, so they run in a small thread pool of the channel's own; the event loop
only sends. A client's requests start in the order they came, each once the one before it
has done its work (a read, once it has opened its file), so a read sent after a write sees
that write; those of a client that has gone are dropped unstarted. A read or a long listing
then streams its messages apart from that order, each sent only once the client has no more
than ``client.BACKLOG_BYTES`` unsent (so several streams at once cannot pile up more),
stopping if it goes. A listing's messages are built in the pool, ready to send.

Every request is answered by a message of its own type with its ``id``, or by an ``error``
carrying ``code``, ``message`` and the request's ``path``. Nothing of a traceback reaches a
client: an unexpected failure is logged and answered ``internal``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aether.errors import Refusal
from aether.files import FileError, ops, reading, writing
from aether.files.inotify import Instance, locate
from aether.files.watch import WatchTree
from aether.protocol import Message
from aether.server.channels import Channel
from aether.server.dispatch import Jobs
from aether.wire import frame, reply, with_id

if TYPE_CHECKING:
    from aether.server.client import Client

log = logging.getLogger("aether.files")

#: Threads for file system work: enough that a slow disk or a large delete does not hold up
#: every other request, few enough to bound what the clients can make the server do at once.
POOL_THREADS = 4
MAX_WATCHES_PER_CONNECTION = 64
#: Requests of one connection started or waiting; past this, ``busy`` (a client that sends
#: faster than the disk answers would otherwise queue without bound).
MAX_QUEUED_PER_CONNECTION = 256
#: Upper bound (estimated high) on one ``list`` message's entries, so each stays under 1 MiB.
MAX_LIST_BYTES = 800_000


def list_pages(entries: list[dict], budget: int = MAX_LIST_BYTES) -> list[list[dict]]:
    """``entries`` cut into runs whose JSON stays under ``budget`` bytes (at least one run)."""
    runs: list[list[dict]] = [[]]
    used = 0
    for item in entries:
        # Every character escaped to 6 bytes, plus the fixed fields: never less than the truth.
        size = 6 * (len(item["name"]) + len(item.get("target") or "")) + 160
        if runs[-1] and used + size > budget:
            runs.append([])
            used = 0
        runs[-1].append(item)
        used += size
    return runs


class _ClientState:
    """What the channel keeps per client."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()  # FIFO: requests start in arrival order
        self.watches: dict[str, WatchTree] = {}
        self.next_watch = 1
        self.queued = 0

    def finished(self) -> None:
        self.queued -= 1


#: One request's work, in its client's order: it returns the stream to send after (a read's
#: chunks, a listing's pages), or None.
Operation = Callable[["Client", _ClientState, Message], Awaitable[Awaitable[None] | None]]


class FilesChannel(Channel):
    """Files under ``root``, the workspace root."""

    name = "files"

    def __init__(self, root: Path):
        self.root = str(root.resolve())
        self._pool = ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="aether-files")
        self._inotify = Instance(self._blocking)
        self._states: dict[Client, _ClientState] = {}
        self._jobs = Jobs()
        operations: dict[str, Operation] = {
            "list": self._list,
            "stat": self._stat,
            "read": self._read,
            "write": self._write,
            "mkdir": self._mkdir,
            "delete": self._delete,
            "rename": self._rename,
            "watch": self._watch,
            "unwatch": self._unwatch,
        }
        self.handlers = {kind: functools.partial(self._request, operation) for kind, operation in operations.items()}

    # -- the channel's life ---------------------------------------------------------------

    def on_open(self, client: Client) -> None:
        self._states[client] = _ClientState()

    def on_close(self, client: Client) -> None:
        state = self._states.pop(client, None)
        if state is not None:
            for tree in state.watches.values():
                tree.close()
            state.watches.clear()

    def close(self) -> None:
        for client in list(self._states):
            self.on_close(client)
        self._inotify.close()
        self._jobs.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _request(self, operation: Operation, client: Client, message: Message) -> None:
        state = self._states.get(client)
        if state is None:
            return
        if state.queued >= MAX_QUEUED_PER_CONNECTION:
            raise Refusal("busy", f"more than {MAX_QUEUED_PER_CONNECTION} files requests are waiting; wait for replies")
        state.queued += 1
        task = self._jobs.start(self._serve(operation, client, state, message), message, client.send)
        task.add_done_callback(lambda _task: state.finished())

    async def _serve(self, operation: Operation, client: Client, state: _ClientState, message: Message) -> None:
        async with state.lock:
            if client.closed or self._states.get(client) is not state:
                return  # nobody to answer
            stream = await operation(client, state, message)
        if stream is not None:
            await stream

    # -- sending ----------------------------------------------------------------------------

    async def _blocking(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    @staticmethod
    def _reply(client: Client, message: Message, fields: dict) -> None:
        client.send(reply(message, message.type, **fields))

    @staticmethod
    def _hold(client: Client, resume: Callable[[], None]) -> bool:
        """For a watch: whether to keep its events back until the client has caught up."""
        if client.closed or not client.backlogged:
            return False
        client.when_drained(resume)
        return True

    # -- requests ----------------------------------------------------------------------------

    async def _list(self, client: Client, state: _ClientState, message: Message):
        frames = await self._blocking(self._list_frames, message.body["path"], message.id)
        return self._stream_list(client, frames)

    def _list_frames(self, path: str, id_: Any) -> list[bytes]:
        """In the pool: the directory's ``list`` replies, each a whole frame ready to send
        (as JSON they take a fraction of what the entries take as dicts)."""
        rel, entries = ops.list_dir(self.root, path)
        total = len(entries)
        pages = list_pages(entries)
        entries.clear()  # the pages hold them now
        frames = []
        for number, page in enumerate(pages, 1):
            page_reply = {
                "channel": self.name,
                "type": "list",
                "path": rel,
                "entries": page,
                "total": total,
                "eof": number == len(pages),
            }
            frames.append(frame(with_id(page_reply, id_)))
            page.clear()  # freed a page at a time (see ops.free)
        return frames

    async def _stream_list(self, client: Client, frames: list[bytes]) -> None:
        for built in frames:
            if not await client.caught_up():
                return
            client.send(built)

    async def _stat(self, client: Client, state: _ClientState, message: Message) -> None:
        rel, info = await self._blocking(ops.stat, self.root, message.body["path"])
        self._reply(client, message, {"path": rel, "stat": info})

    async def _read(self, client: Client, state: _ClientState, message: Message):
        body = message.body
        reader = await self._blocking(reading.Reader, self.root, body["path"], body.get("offset", 0), body.get("length"))
        return self._stream_read(client, message, reader)

    async def _stream_read(self, client: Client, message: Message, reader: reading.Reader) -> None:
        try:
            # Before reading a chunk, so a waiting read holds none; and again before sending
            # it, as another stream may have filled the client meanwhile.
            while await client.caught_up():
                chunk = await self._blocking(reader.next)
                if not await client.caught_up():
                    return
                self._reply(client, message, {"path": reader.rel, **chunk})
                if chunk["eof"]:
                    return
        finally:
            reader.close()

    async def _write(self, client: Client, state: _ClientState, message: Message) -> None:
        body = message.body
        path = body["path"]

        def write() -> tuple[str, int]:
            data = writing.decode_content(body["content"], body.get("encoding", "utf-8"), path)
            return writing.write(self.root, path, data, body.get("offset"), body.get("createParents", False))

        rel, size = await self._blocking(write)
        self._reply(client, message, {"path": rel, "size": size})

    async def _mkdir(self, client: Client, state: _ClientState, message: Message) -> None:
        rel = await self._blocking(ops.mkdir, self.root, message.body["path"], message.body.get("parents", False))
        self._reply(client, message, {"path": rel})

    async def _delete(self, client: Client, state: _ClientState, message: Message) -> None:
        rel = await self._blocking(ops.delete, self.root, message.body["path"], message.body.get("recursive", False))
        self._reply(client, message, {"path": rel})

    async def _rename(self, client: Client, state: _ClientState, message: Message) -> None:
        body = message.body
        source, dest = await self._blocking(ops.rename, self.root, body["from"], body["to"], body.get("overwrite", False))
        self._reply(client, message, {"from": source, "to": dest})

    async def _watch(self, client: Client, state: _ClientState, message: Message) -> None:
        path, recursive = message.body["path"], message.body.get("recursive", False)
        if len(state.watches) >= MAX_WATCHES_PER_CONNECTION:
            raise FileError(
                "too_large", path, f"{path}: a connection has at most {MAX_WATCHES_PER_CONNECTION} watches; unwatch one first"
            )
        top = await self._blocking(locate, self.root, path)
        watch_id = f"w{state.next_watch}"
        state.next_watch += 1

        def deliver(events: list[dict]) -> None:
            for event in events:
                client.send({"channel": self.name, "type": event["type"], "watchId": watch_id, **event})

        tree = WatchTree(
            self._inotify,
            top.real,
            top.rel,
            recursive,
            deliver,
            lambda resume: self._hold(client, resume),
            lambda _tree: state.watches.pop(watch_id, None),
            top.ident,
        )
        await tree.start(path)
        if self._states.get(client) is not state:
            tree.close()  # the connection closed meanwhile
            return
        state.watches[watch_id] = tree
        self._reply(client, message, {"watchId": watch_id, "path": top.rel, "recursive": recursive})

    async def _unwatch(self, client: Client, state: _ClientState, message: Message) -> None:
        watch_id = message.body["watchId"]
        tree: WatchTree | None = state.watches.pop(watch_id, None)
        if tree is None:
            raise FileError("not_found", None, f"no watch {watch_id} on this connection")
        tree.close()
        self._reply(client, message, {"watchId": watch_id})
