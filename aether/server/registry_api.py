"""The port registry as the server serves it (:class:`RegistryApi`): the REST API under ``/api/``,
the ``registry`` push on the ``config`` channel, and the key -> port map that named previews
route by.

Reads run on the event loop (SQLite answers them from its page cache in microseconds); writes run
in one worker thread, since a writer may wait on another process's lock. A write by anyone (this
server, the CLI) bumps SQLite's ``data_version``: the server looks at it after its own writes and,
while clients are connected, once a second, then pushes the new registry to every client.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import tornado.web
import ujson

from aether import credentials
from aether.errors import Refusal
from aether.excerpt import excerpt
from aether.registry import rules
from aether.registry.store import Entry, Registry, RegistryError
from aether.server import cookie

if TYPE_CHECKING:
    from aether.server.app import WorkspaceServer

log = logging.getLogger("aether.server")

WATCH_SECONDS = 1.0
_STATUS = {"invalid": 400, "conflict": 409, "not_found": 404, "unavailable": 503}


class RegistryApi:
    def __init__(self, path: Path, on_change: Callable[[list[Entry]], None], watching: Callable[[], bool]):
        self.path = path
        self.reader = Registry(path)
        self.on_change = on_change
        self.watching = watching
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="registry")
        self._writer: Registry | None = None
        self._version = self.reader.version()
        self._timer: asyncio.TimerHandle | None = None
        self.ports_by_key: dict[str, int] = {}
        self.protocols_by_port: dict[int, tuple[str, str]] = {}  # port -> (protocol, key)
        self._reload()

    def _reload(self) -> list[Entry]:
        entries = self.reader.entries()
        self.ports_by_key = {entry.key: entry.port for entry in entries}
        self.protocols_by_port = {entry.port: (entry.protocol, entry.key) for entry in entries if entry.protocol}
        return entries

    async def write(self, method: str, *args):
        """``Registry.<method>(*args)`` in the worker thread; RegistryError passes through."""

        def run():
            if self._writer is None:
                self._writer = Registry(self.path)
            return getattr(self._writer, method)(*args)

        result = await asyncio.get_running_loop().run_in_executor(self._executor, run)
        self.check()
        return result

    def check(self) -> None:
        """Reload and push if anyone has written since the last look."""
        version = self.reader.version()
        if version != self._version:
            self._version = version
            self.on_change(self._reload())

    def port_of(self, key: str) -> int | None:
        """The port registered as ``key`` now, another process's latest write included (one
        ``PRAGMA data_version``, microseconds, before the lookup)."""
        self.check()
        return self.ports_by_key.get(key)

    def protocol_at(self, port: int) -> tuple[str, str] | None:
        """The protocol ``port``'s entry sets, and that entry's key (a port has one entry at
        most); None where none does. As of the last look (:meth:`check`): a dict lookup, for the
        event path."""
        return self.protocols_by_port.get(port)

    def watch(self) -> None:
        """Look once a second while ``watching()`` holds (clients are connected); no timer
        otherwise, so an idle server is never woken."""
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(WATCH_SECONDS, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self.check()
        if self.watching():
            self.watch()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._executor.shutdown(wait=False)
        self.reader.close()


class ApiHandler(tornado.web.RequestHandler):
    """JSON in and out, the workspace token as ``Authorization: Bearer``; or, for the methods in
    ``COOKIE_METHODS``, the dashboard's cookie from a page of this origin (``by_cookie``)."""

    COOKIE_METHODS: frozenset[str] = frozenset()

    def initialize(self, server: WorkspaceServer) -> None:
        self.server = server
        self.by_cookie = False

    def prepare(self) -> None:
        header = self.request.headers.get("Authorization", "").encode("latin-1", "replace")
        if credentials.bearer(header, self.server.settings.token.encode()):
            return
        # The cookie is sent by the browser to any server on this host, which could replay it:
        # it opens only what the handler allows it (a label), and only with this origin's
        # ``Origin``, which a cross-site page cannot forge (its PUT would need a CORS preflight
        # that is never granted).
        if (
            self.request.method in self.COOKIE_METHODS
            and cookie.present(self.request, self.server.settings.token)
            and cookie.same_origin(self.request)
        ):
            self.by_cookie = True
            return
        self.set_header("WWW-Authenticate", 'Bearer realm="aether"')
        self.fail(401, "unauthorized", "send Authorization: Bearer with the workspace token")

    def fail(self, status: int, code: str, message: str) -> None:
        self.set_status(status)
        self.finish({"error": code, "message": message})

    def body(self) -> dict:
        try:
            value = ujson.loads(self.request.body or b"{}")
        except ValueError:
            raise RegistryError("the body is not valid JSON") from None
        if not isinstance(value, dict):
            raise RegistryError("the body must be a JSON object")
        return value

    def write_error(self, status_code: int, **kwargs) -> None:
        # A refusal raised by a handler is its answer, as an HTTPError is Tornado's.
        refusal = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(refusal, Refusal):
            self.set_status(_STATUS.get(refusal.code, 400))
            self.finish({"error": refusal.code, "message": refusal.message})
            return
        self.finish({"error": "internal" if status_code >= 500 else "invalid", "message": self._reason})

    def log_exception(self, typ, value, tb) -> None:
        if not isinstance(value, Refusal):
            super().log_exception(typ, value, tb)

    @property
    def api(self) -> RegistryApi:
        return self.server.registry_api


def joined(server: WorkspaceServer) -> list[dict]:
    """The registry joined with what listens now (from the monitor, no /proc walk)."""
    live = {event.port: (event.pid, event.process) for event in server.monitor.open_events()}
    return [entry.with_live(live.get(entry.port)) for entry in server.registry_api.reader.entries()]


class PortsHandler(ApiHandler):
    def get(self) -> None:
        self.finish(ujson.dumps(joined(self.server)))


#: What a PUT may carry: the fields it sets, and those a GET adds (a client may send an entry
#: back as it got it; the key and times are the registry's own, and not changed).
ENTRY_FIELDS = frozenset({"port", "app", "label", "description", "protocol", "key", "created", "updated"})


class PortHandler(ApiHandler):
    def get(self, key: str) -> None:
        entry = self.api.reader.get(key)
        if entry is None:
            return self.fail(404, "not_found", f"no port registered as {key}")
        self.finish(entry.to_json())

    COOKIE_METHODS = frozenset({"PUT"})

    async def put(self, key: str) -> None:
        body = self.body()
        if self.by_cookie:
            # The dashboard names a port's entry (or a new one) and its label, nothing else.
            if not set(body) <= {"port", "label"} or "port" not in body:
                return self.fail(403, "forbidden", "the dashboard's cookie may set a label only: send port and label")
            entry = await self.api.write("label", key, body["port"], body.get("label"))
            self.finish(entry.to_json())
            return
        unknown = sorted(set(body) - ENTRY_FIELDS)
        if unknown:
            # Dropped with a 200, a field the registry has not would look kept.
            return self.fail(
                400, "invalid", f"unknown field {excerpt(unknown[0])}: an entry has port, app, label, description and protocol"
            )
        fields = (body.get(name) for name in ("port", "app", "label", "description", "protocol"))
        entry = await self.api.write("set", key, *fields)
        self.finish(entry.to_json())

    async def delete(self, key: str) -> None:
        deleted = await self.api.write("delete", key)
        if not deleted:
            return self.fail(404, "not_found", f"no port registered as {key}")
        self.set_status(204)
        self.finish()


class AllocateHandler(ApiHandler):
    async def post(self, app: str) -> None:
        body = self.body()
        labels = body.get("labels")
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise RegistryError('labels must be an array of words, e.g. ["api", "ui"]')
        first, last = rules.parse_range(str(body.get("range", "apps")), rules.ranges(self.server.settings.state_dir))
        avoid = set(self.server.monitor.table.ports()) | rules.udp_ports() | rules.NEVER_ALLOCATED
        entries = await self.api.write("allocate", app, labels, first, last, avoid)
        self.finish(ujson.dumps([entry.to_json() for entry in entries]))


def routes(server: WorkspaceServer) -> list:
    return [
        (r"/api/ports", PortsHandler, {"server": server}),
        (r"/api/ports/([^/]+)", PortHandler, {"server": server}),
        (r"/api/apps/([^/]+)/allocate", AllocateHandler, {"server": server}),
    ]
