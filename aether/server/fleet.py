"""Fleet mode in ``aether serve`` (``--fleet-redis``): the server's side of
:class:`aether.fleet.publisher.Publisher`.

:class:`Workspace` is the publisher's :class:`~aether.fleet.publisher.State`, read from the
server at each write: the open ports (the monitor's table, which leaves ignored ports and the
server's own out) with their visibility, every public port, and the registry's names. It tells
the publisher of every change (a port event, a visibility set, a registry change); the publisher
coalesces them, so a burst of events is one write.

Imported only in fleet mode: without ``--fleet-redis`` the ``redis`` module is never loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aether.fleet import auth, blob
from aether.fleet.publisher import Identity, PrefixTaken, Publisher

__all__ = ["PrefixTaken", "Workspace", "start"]

log = logging.getLogger("aether.fleet")


class Workspace:
    """What the publisher publishes, read live from the server's parts."""

    def __init__(self, table, visibility, entries: Callable[[], list]):
        self.table = table
        self.visibility = visibility
        self.entries = entries  # the registry's entries

    def ports(self) -> dict[int, str]:
        return {port: self.visibility.of(port) for port in self.table.ports()}

    def public(self) -> frozenset[int]:
        return self.visibility.public

    def names(self) -> dict[str, int]:
        # A registry key the fleet's host names cannot carry (none can be, but the record is
        # checked whole by every gateway) is left out here rather than void the whole record.
        return {entry.key: entry.port for entry in self.entries() if blob.NAME.match(entry.key) and not entry.key.isdigit()}


async def start(settings, server) -> Publisher:
    """The publisher of ``server``'s workspace, started and fed. Raises
    :class:`~aether.fleet.publisher.PrefixTaken` when another live project holds the prefix."""
    identity = Identity(
        settings.project_prefix,
        settings.project_id,
        settings.workspace_id,
        settings.fleet_advertise,
        auth.verifier(settings.fleet_keys, settings.token, settings.project_prefix),
    )
    workspace = Workspace(server.monitor.table, server.visibility, server.registry_api.reader.entries)
    publisher = Publisher(
        settings.fleet_redis,
        identity,
        workspace,
        heartbeat=settings.fleet_heartbeat,
        dead_after=settings.fleet_dead_after,
    )
    await publisher.start()  # PrefixTaken: the caller stops
    changed = publisher.changed
    server.monitor.subscribe(lambda event: changed())
    server.visibility.subscribe(changed)
    server.registry_changed.append(lambda entries: changed())
    return publisher
