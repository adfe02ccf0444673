"""The ``config`` channel: ``get`` the workspace configuration, ``set`` its mutable keys, and
``registry``, the port registry now (pushed to every client after each change, see ``app``).

A ``set`` is validated whole, persisted, then applied; every client gets ``changed``. A value
that fails validation, or a state directory that cannot be written, changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from aether.errors import Refusal
from aether.excerpt import excerpt
from aether.protocol import Message
from aether.server.channels import Audience, Channel, SaveConfig
from aether.wire import reply

if TYPE_CHECKING:
    from aether.server.client import Client
    from aether.settings.serve import Settings


class Monitor(Protocol):
    """What the channel uses of the port monitor."""

    @property
    def backend(self) -> str | None: ...

    def set_ignored(self, ignored: Iterable[int]) -> None: ...


MUTABLE = ("ignoredPorts",)
_MAX_IGNORED = 1024


def validate_ignored_ports(value: Any) -> tuple[int, ...]:
    """A sorted tuple of distinct ports, or ValueError saying what is wrong."""
    if not isinstance(value, list):
        raise ValueError("ignoredPorts must be an array of port numbers")
    if len(value) > _MAX_IGNORED:
        raise ValueError(f"ignoredPorts holds at most {_MAX_IGNORED} ports")
    for port in value:
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise ValueError(f"ignoredPorts: not a port number (1-65535): {excerpt(port)}")
    return tuple(sorted(set(value)))


class ConfigChannel(Channel):
    """``settings`` are read for ``get`` and changed by ``set``; ``registry()`` is the port
    registry's entries now, as JSON."""

    name = "config"

    def __init__(
        self,
        settings: Settings,
        monitor: Monitor,
        clients: Audience,
        save_config: SaveConfig,
        registry: Callable[[], list[dict]],
    ):
        self.settings, self.monitor, self.clients = settings, monitor, clients
        self.save_config, self.registry_entries = save_config, registry
        self.handlers = {"get": self._get, "set": self._set, "registry": self._registry}

    def snapshot(self) -> dict:
        settings, monitor = self.settings, self.monitor
        return {
            "workspaceId": settings.workspace_id,
            "projectIdPrefix": settings.project_prefix,
            "previewDomain": settings.preview_domain,
            "previewUrl": settings.preview_url_pattern,
            "ignoredPorts": list(settings.ignored_ports),
            "serverPort": settings.port,
            "keepalive": {
                "pingInterval": settings.ping_interval,
                "pongTimeout": settings.pong_timeout,
                "writeTimeout": settings.write_timeout,
                "maxMessageBytes": settings.max_message_bytes,
            },
            "backend": monitor.backend,
            "workspaceRoot": str(settings.workspace_root),
            "terminal": {
                "maxSessions": settings.terminal_max_sessions,
                "scrollbackBytes": settings.terminal_scrollback_bytes,
                "idleTimeout": settings.terminal_idle_timeout,
                "maxInputBytes": settings.terminal_max_input_bytes,
            },
            "agent": {
                "configured": bool(settings.agent_command),
                "command": list(settings.agent_command),
                "timeout": settings.agent_timeout,
                "maxOutputBytes": settings.agent_max_output_bytes,
            },
            "mutable": list(MUTABLE),
        }

    def _get(self, client: Client, message: Message) -> None:
        client.send(reply(message, "config", config=self.snapshot()))

    def _registry(self, client: Client, message: Message) -> None:
        client.send(reply(message, "registry", ports=self.registry_entries()))

    def _set(self, client: Client, message: Message) -> None:
        changes = message.body["config"]
        if not changes:
            raise Refusal("invalid", "config holds no key to change")
        for key in changes:
            if key not in MUTABLE:
                known = key in self.snapshot()
                why = f"{key} cannot be changed" if known else f"unknown key {key}"
                raise Refusal("invalid", f"{why}; mutable: {', '.join(MUTABLE)}")
        try:
            ignored = validate_ignored_ports(changes["ignoredPorts"])
        except ValueError as exc:
            raise Refusal("invalid", str(exc)) from None
        try:
            self.save_config({"ignored_ports": list(ignored)})
        except OSError as exc:
            raise Refusal("unavailable", f"could not persist the change: {exc.strerror}") from None
        self.settings.ignored_ports = ignored
        self.monitor.set_ignored(self.settings.monitor_ignored)
        changed = {"channel": self.name, "type": "changed", "config": self.snapshot()}
        self.clients.announce(changed, client, message.id)
