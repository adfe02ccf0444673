"""The settings of ``aether serve``, each from (first found) its command-line flag, its
``AETHER_*`` variable, the state directory's ``config.json`` (same names, snake_case), or its
default (see ``table``), with what is generated once and kept (project id, token)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aether.settings import sources
from aether.settings.table import BY_NAME, SERVE, of
from aether.state import StateDir, locate

if TYPE_CHECKING:
    import argparse


@dataclasses.dataclass
class Settings:
    """The resolved settings: one field per setting of ``table`` whose scope is ``serve``
    (``token_file`` and ``state_dir`` are read into ``token`` and ``state_dir``), with the
    generated and computed ones filled in."""

    host: str
    port: int
    workspace_id: str
    project_id: str
    preview_domain: str
    preview_url: str
    prefix_length: int
    token: str = dataclasses.field(repr=False)
    token_source: str
    backend: str
    state_dir: Path
    ignored_ports: tuple[int, ...]
    docker_socket: str | None
    ping_interval: float
    pong_timeout: float
    write_timeout: float
    max_message_bytes: int
    send_buffer_bytes: int
    max_connections: int
    max_unauthenticated_per_address: int
    kill_grace: float
    preview_timeout: float
    preview_upstream_host: str
    workspace_root: Path
    shell: str
    terminal_max_sessions: int
    terminal_scrollback_bytes: int
    terminal_idle_timeout: float
    terminal_max_input_bytes: int
    agent_command: tuple[str, ...]
    agent_timeout: float
    agent_max_output_bytes: int
    preview_public_ports: frozenset[int] = frozenset()
    metrics_public: bool = False
    trusted_proxies: tuple = ()
    fleet_redis: str | None = dataclasses.field(default=None, repr=False)  # may carry a password
    fleet_advertise: str | None = None
    fleet_key_file: str | None = None
    fleet_heartbeat: float = 1.0
    fleet_dead_after: float = 3.0
    #: The fleet key (``aether.fleet.auth.FleetKeys``), read from ``fleet_key_file`` in fleet mode.
    fleet_keys: Any = dataclasses.field(default=None, repr=False)

    @property
    def fleet(self) -> bool:
        """Whether this server is a VM of a fleet (``--fleet-redis``)."""
        return bool(self.fleet_redis)

    @property
    def monitor_ignored(self) -> frozenset[int]:
        """What the monitor leaves out: the configured ports and the server's own."""
        return frozenset(self.ignored_ports) | {self.port}

    @property
    def project_prefix(self) -> str:
        return self.project_id[: self.prefix_length]

    @property
    def ws_path(self) -> str:
        return f"/workspaces/{self.workspace_id}/ws"

    def preview_url_for(self, port: int | str) -> str:
        return self.preview_url.format(port=port, prefix=self.project_prefix, domain=self.preview_domain, server_port=self.port)

    @property
    def preview_url_pattern(self) -> str:
        """The preview URL with everything but ``{port}`` filled in."""
        return self.preview_url_for("{port}")


#: config.json's nested ``agent`` object: its keys and the settings they stand for.
AGENT_KEYS = {"command": "agent_command", "timeout": "agent_timeout", "max_output_bytes": "agent_max_output_bytes"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``aether serve``."""
    sources.add_flags(parser, SERVE)


def login_shell() -> str:
    """``$SHELL``, else the passwd entry's shell, else ``/bin/sh``."""
    shell = os.environ.get("SHELL")
    if not shell:
        import pwd

        try:
            shell = pwd.getpwuid(os.getuid()).pw_shell
        except KeyError:
            shell = ""
    return shell or "/bin/sh"


def config_file(state: StateDir) -> sources.ConfigFile:
    """The state directory's ``config.json``, ``{"agent": {"command": [...]}}`` read as
    ``agent_command`` (and so on); a flat key, when both are given, wins."""
    values = state.load_config()
    path = str(state.config_path)
    nested = values.get("agent")
    if nested is None:
        return sources.ConfigFile(values, path)
    if not isinstance(nested, dict):
        raise ValueError(f'{path}: agent must be an object, e.g. {{"command": ["my-agent", "--stdio"]}}')
    unknown = sorted(set(nested) - set(AGENT_KEYS))
    if unknown:
        raise ValueError(f"{path}: agent: unknown key {unknown[0]}; known: {', '.join(AGENT_KEYS)}")
    origins = {AGENT_KEYS[key]: f"agent.{key}" for key in nested if AGENT_KEYS[key] not in values}
    return sources.ConfigFile({**{AGENT_KEYS[key]: value for key, value in nested.items()}, **values}, path, origins)


def peek(name: str, args: argparse.Namespace, file: dict, path: Path | str = "config.json") -> Any:
    """One setting as :func:`resolve` picks it, from ``file``, the config.json at ``path``,
    without resolving the rest (which generates the project id and token): ``aether doctor``
    reads the host and port this way."""
    return sources.pick(BY_NAME[name], getattr(args, name, None), sources.ConfigFile(file, str(path)))


def resolve(args: argparse.Namespace) -> Settings:
    """Settings from flags, environment, state dir and defaults; ValueError naming a bad one."""
    state = StateDir(locate(args.state_dir))
    file = config_file(state)
    values = {
        setting.name: sources.pick(setting, getattr(args, setting.name, None), file)
        for setting in of(SERVE)
        if setting.name != "state_dir"
    }
    if values["workspace_root"] is None:
        home = Path(os.path.expanduser("~")).resolve()
        if not home.is_dir():
            raise ValueError(f"--workspace-root / AETHER_WORKSPACE_ROOT: the default, {home}, is not a directory")
        values["workspace_root"] = home
    values["shell"] = values["shell"] or login_shell()
    if not values["workspace_id"]:
        import socket

        values["workspace_id"] = socket.gethostname()
    values["project_id"] = values["project_id"] or state.project_id()
    token_file = values.pop("token_file")
    if values["token"]:
        source = "given"
    elif token_file:
        try:
            values["token"], source = Path(token_file).read_text().strip(), token_file
        except OSError as exc:
            raise ValueError(f"token file {token_file}: {exc.strerror}") from None
        if not values["token"]:
            raise ValueError(f"token file {token_file} is empty")
    else:
        values["token"], source = state.token(), str(state.token_path)
    from aether.preview import visibility

    try:
        public = visibility.load(file.values.get("preview_public_ports", []))
    except ValueError as exc:
        raise ValueError(f"{state.config_path}: {exc}") from None
    keys = _fleet(values) if values["fleet_redis"] else None
    return Settings(**values, token_source=source, state_dir=state.path, preview_public_ports=public, fleet_keys=keys)


def _fleet(values: dict):
    """Fleet mode's settings checked together; its key read. (Nothing here imports redis.)"""
    from aether.fleet import auth, blob, connection

    connection.check(values["fleet_redis"])
    if not values["fleet_advertise"]:
        raise ValueError("--fleet-redis needs --fleet-advertise HOST:PORT: where the fleet's gateways reach this server")
    try:
        blob.split_address(values["fleet_advertise"])
    except ValueError as exc:
        raise ValueError(f"--fleet-advertise {values['fleet_advertise']}: {exc}") from None
    if not values["fleet_key_file"]:
        raise ValueError("--fleet-redis needs --fleet-key-file: the fleet key its gateways have")
    if not 0 < values["fleet_heartbeat"] < values["fleet_dead_after"]:
        raise ValueError("--fleet-heartbeat must be positive and shorter than --fleet-dead-after")
    return auth.FleetKeys.load(values["fleet_key_file"])
