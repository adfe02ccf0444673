"""Settings of ``aether serve``, each from (first found) its command-line flag, its ``AETHER_*``
variable, the state directory's ``config.json`` (same names, snake_case), or its default."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import socket
from pathlib import Path
from typing import Any, Optional

from aether import config
from aether.excerpt import excerpt
from aether.preview import visibility
from aether.server.state import StateDir, default_state_dir


@dataclasses.dataclass
class Settings:
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
        return self.preview_url.format(
            port=port, prefix=self.project_prefix, domain=self.preview_domain, server_port=self.port
        )

    @property
    def preview_url_pattern(self) -> str:
        """The preview URL with everything but ``{port}`` filled in."""
        return self.preview_url_for("{port}")


#: name -> (type, default). ``None`` defaults are computed in :func:`resolve`.
OPTIONS: dict[str, tuple[type, Any]] = {
    "host": (str, "127.0.0.1"),
    "port": (int, 3001),
    "workspace_id": (str, None),
    "project_id": (str, None),
    "preview_domain": (str, "preview.localhost"),
    "preview_url": (str, "http://{port}-{prefix}.{domain}:{server_port}"),
    "prefix_length": (int, 6),
    "token": (str, None),
    "token_file": (str, None),
    "backend": (str, config.DEFAULT_BACKEND),
    "ping_interval": (float, 45.0),
    "pong_timeout": (float, 120.0),
    "write_timeout": (float, 30.0),
    "max_message_bytes": (int, 1 << 20),
    # The kernel would otherwise grow a stalled client's send buffer to net.ipv4.tcp_wmem's
    # maximum (4 MiB here), hiding it from the write deadline and pinning memory per client.
    "send_buffer_bytes": (int, 256 << 10),
    "max_connections": (int, 10000),
    # Connections one client address may hold before the first answer on them (0: no cap). A
    # browser opens at most 6 per host, and each preview is its own host: the dashboard and
    # ten previews restored at once, each with its 6, is ~66 before one is answered; 128
    # leaves as much again for tools beside it (curl loops, wscat, a test runner). One address
    # then holds at most 128 of the 10,000 connections.
    "max_unauthenticated_per_address": (int, 128),
    "kill_grace": (float, 5.0),
    # Without a byte either way for this long, a proxied request ends (504 before the response).
    "preview_timeout": (float, 60.0),
    # "localhost" sends Host: localhost:{port} upstream (dev servers refuse unknown hosts);
    # "original" passes the preview host on.
    "preview_upstream_host": (str, "localhost"),
    # Where the terminal and files channels work: files outside it are refused.
    "workspace_root": (str, None),
    "shell": (str, None),
    "terminal_max_sessions": (int, 32),
    "terminal_scrollback_bytes": (int, 256 << 10),
    # Seconds a session with nobody attached keeps running; 0 keeps it until its process ends.
    "terminal_idle_timeout": (float, 0.0),
    "terminal_max_input_bytes": (int, 64 << 10),
}


def command_line(raw: Any) -> tuple[str, ...]:
    """A command's argv: a JSON array of strings (config.json, or a flag or variable starting
    with ``[``), or one shell-quoted string split as the shell would (``--agent-command``)."""
    if isinstance(raw, str):
        raw = json.loads(raw) if raw.lstrip().startswith("[") else shlex.split(raw)
    if not isinstance(raw, (list, tuple)) or not all(isinstance(arg, str) and "\x00" not in arg for arg in raw):
        raise ValueError("not a command")
    if raw and not raw[0]:
        raise ValueError("an empty program name")
    return tuple(raw)


command_line.what = "command: a JSON array of strings, or one shell-quoted string"  # type: ignore[attr-defined]

OPTIONS.update({
    # The agent backend (see docs/protocol.md): started once per turn. Unset: prompts get
    # not_configured. config.json may also nest these as {"agent": {"command": [...], ...}}.
    "agent_command": (command_line, ()),
    # Seconds without a byte on the backend's stdout before it is killed.
    "agent_timeout": (float, 120.0),
    # Bytes a backend may write in one turn, stdout and stderr together.
    "agent_max_output_bytes": (int, 4 << 20),
})

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def boolean(raw: Any) -> bool:
    """A yes/no setting: JSON true/false, or true/false, 1/0, yes/no, on/off in any case."""
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
        return raw.strip().lower() in _TRUE
    raise ValueError("not a boolean")


boolean.what = "boolean: true or false (1/0, yes/no, on/off)"  # type: ignore[attr-defined]

OPTIONS.update({
    # GET /metrics without the token, for a scraper that cannot send one.
    "metrics_public": (boolean, False),
})


def networks(raw: Any) -> tuple:
    """Addresses or networks: ``127.0.0.1,::1,10.0.0.0/8`` (a flag or variable), or a JSON
    array of them (config.json)."""
    import ipaddress

    items = raw.split(",") if isinstance(raw, str) else raw
    if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
        raise ValueError("not a list")
    return tuple(ipaddress.ip_network(item.strip(), strict=False) for item in items if item.strip())


networks.what = "list of addresses or networks, e.g. 127.0.0.1,::1"  # type: ignore[attr-defined]

OPTIONS.update({
    # The TLS front(s) whose X-Forwarded-Proto and X-Forwarded-Port previews believe (and pass
    # on to the app); from anyone else those headers are replaced by what aether itself saw.
    "trusted_proxies": (networks, ()),
})
#: config.json's nested ``agent`` object: its keys and the settings they stand for.
AGENT_KEYS = {"command": "agent_command", "timeout": "agent_timeout", "max_output_bytes": "agent_max_output_bytes"}


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for name, (kind, default) in OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        if kind is boolean:
            parser.add_argument(flag, action="store_true", default=None, help=f"(env AETHER_{name.upper()}=1; default off)")
            continue
        shown = {"workspace_id": "the host name", "token_file": "none", "workspace_root": "the home directory", "shell": "the user's login shell",
                 "agent_command": "none (the agent channel answers not_configured)",
                 "trusted_proxies": "none"}.get(name, "generated once" if default is None else default)
        parser.add_argument(flag, type=kind, default=None, help=f"(env AETHER_{name.upper()}; default {shown})")
    parser.add_argument("--state-dir", default=None, help="(env AETHER_STATE_DIR; default ~/.local/state/aether)")
    parser.add_argument("--ignore", default=None, help="ignored ports (env AETHER_IGNORED_PORTS; default 22,2222,3001)")


def _pick(name: str, kind: type, args: argparse.Namespace, file: dict) -> Optional[Any]:
    value = getattr(args, name, None)
    if value is not None:
        return value
    env = os.environ.get(f"AETHER_{name.upper()}")
    source = f"AETHER_{name.upper()}" if env is not None else f"config.json key {name}"
    raw = env if env is not None else file.get(name)
    if raw is None:
        return None
    try:
        return kind(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{source} must be a {getattr(kind, 'what', kind.__name__)}, not {excerpt(raw)}") from None


def _flatten_agent(file: dict, path: Path) -> dict:
    """config.json's ``{"agent": {"command": [...]}}`` read as ``agent_command`` (and so on);
    a flat key, when both are given, wins."""
    nested = file.get("agent")
    if nested is None:
        return file
    if not isinstance(nested, dict):
        raise ValueError(f"{path}: agent must be an object, e.g. {{\"command\": [\"my-agent\", \"--stdio\"]}}")
    unknown = sorted(set(nested) - set(AGENT_KEYS))
    if unknown:
        raise ValueError(f"{path}: agent: unknown key {unknown[0]}; known: {', '.join(AGENT_KEYS)}")
    return {**{AGENT_KEYS[key]: value for key, value in nested.items()}, **file}


def state_path(args: argparse.Namespace) -> Path:
    """The state directory: ``--state-dir``, ``AETHER_STATE_DIR``, or the default. Creates nothing."""
    return Path(getattr(args, "state_dir", None) or os.environ.get("AETHER_STATE_DIR") or default_state_dir())


def peek(name: str, args: argparse.Namespace, file: dict) -> Any:
    """One setting as :func:`resolve` picks it, without resolving the rest (which generates the
    project id and token): ``aether doctor`` reads the host and port this way."""
    kind, default = OPTIONS[name]
    value = _pick(name, kind, args, file)
    return default if value is None else value


def resolve(args: argparse.Namespace) -> Settings:
    """Settings from flags, environment, state dir and defaults; ValueError naming a bad one."""
    state = StateDir(state_path(args))
    file = _flatten_agent(state.load_config(), state.config_path)
    values = {}
    for name, (kind, default) in OPTIONS.items():
        value = _pick(name, kind, args, file)
        values[name] = default if value is None else value
    if not 1 <= values["port"] <= 65535:
        raise ValueError(f"--port / AETHER_PORT must be 1-65535, not {values['port']}")
    if values["backend"] not in ("auto", "ebpf", "sockdiag"):
        raise ValueError(f"--backend / AETHER_BACKEND must be auto, ebpf or sockdiag, not {values['backend']!r}")
    for name in ("ping_interval", "pong_timeout", "write_timeout"):
        if not values[name] > 0:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} / AETHER_{name.upper()} must be positive, not {values[name]}")
    if values["max_connections"] < 1:
        raise ValueError("--max-connections / AETHER_MAX_CONNECTIONS must be at least 1")
    if values["max_unauthenticated_per_address"] < 0:
        raise ValueError("--max-unauthenticated-per-address / AETHER_MAX_UNAUTHENTICATED_PER_ADDRESS must be 0 (no cap) or more")
    if not values["preview_timeout"] > 0:
        raise ValueError("--preview-timeout / AETHER_PREVIEW_TIMEOUT must be positive")
    if values["preview_upstream_host"] not in ("localhost", "original"):
        raise ValueError("--preview-upstream-host / AETHER_PREVIEW_UPSTREAM_HOST must be localhost or original")
    if not 1 <= values["prefix_length"] <= 32:
        raise ValueError("--prefix-length / AETHER_PREFIX_LENGTH must be 1-32")
    for name, low in (("terminal_max_sessions", 1), ("terminal_scrollback_bytes", 0), ("terminal_max_input_bytes", 1)):
        if values[name] < low:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} / AETHER_{name.upper()} must be at least {low}")
    if not values["agent_timeout"] > 0:
        raise ValueError("--agent-timeout / AETHER_AGENT_TIMEOUT must be positive")
    if values["agent_max_output_bytes"] < 1:
        raise ValueError("--agent-max-output-bytes / AETHER_AGENT_MAX_OUTPUT_BYTES must be at least 1")
    if values["terminal_idle_timeout"] < 0:
        raise ValueError("--terminal-idle-timeout / AETHER_TERMINAL_IDLE_TIMEOUT must be 0 (never) or more")
    root = Path(values["workspace_root"] or os.path.expanduser("~")).resolve()
    if not root.is_dir():
        raise ValueError(f"--workspace-root / AETHER_WORKSPACE_ROOT: {root} is not a directory")
    values["workspace_root"] = root
    values["shell"] = values["shell"] or login_shell()
    workspace_id = values["workspace_id"] or socket.gethostname()
    project_id = values["project_id"] or state.project_id()
    token_file = values.pop("token_file")
    if values["token"]:
        token, source = values["token"], "given"
    elif token_file:
        try:
            token, source = Path(token_file).read_text().strip(), token_file
        except OSError as exc:
            raise ValueError(f"token file {token_file}: {exc.strerror}") from None
        if not token:
            raise ValueError(f"token file {token_file} is empty")
    else:
        token, source = state.token(), str(state.token_path)
    if args.ignore is not None or os.environ.get("AETHER_IGNORED_PORTS") is not None:
        ignored = config.ignored_ports(args.ignore)
    elif "ignored_ports" in file:
        from aether.server.channels.config import validate_ignored_ports

        try:
            ignored = validate_ignored_ports(file["ignored_ports"])
        except ValueError as exc:
            raise ValueError(f"{state.config_path}: ignored_ports: {exc}") from None
    else:
        ignored = config.DEFAULT_IGNORED_PORTS
    try:
        public = visibility.load(file.get("preview_public_ports", []))
    except ValueError as exc:
        raise ValueError(f"{state.config_path}: {exc}") from None
    values.update(
        preview_public_ports=public,
        workspace_id=workspace_id,
        project_id=project_id,
        token=token,
        token_source=source,
        state_dir=state.path,
        ignored_ports=ignored,
    )
    return Settings(**values)
