"""Every setting of aether, in one table: its name (the ``config.json`` key), flag, ``AETHER_*``
variable, kind, default, where it applies and what it is. The command line (``add_flags``),
the environment and ``config.json`` (``sources``, ``serve``) are read from it, and the tables
of docs/settings.md are written from it (``markdown``: ``python -m aether.settings --write``).

A setting applies to one of four places:

- ``serve``: a flag of ``aether serve``, its variable, and its key in the state directory's
  ``config.json``; ``commands`` names the other commands that take the same flag (as
  ``command_flag`` where it has another name there: ``--fleet-redis`` is ``--redis`` on
  ``aether gateway``);
- ``gateway``: a flag of ``aether gateway`` and its variable (the gateway reads no
  ``config.json``), beside the ``serve`` settings it shares;
- ``global``: a flag given before the command (``aether --log-level debug serve``), or its
  variable;
- ``env``: the variable alone, read by whichever part it concerns; one may also have a flag of
  its own on one command (``aether ports watch --interval``).
"""

from __future__ import annotations

from typing import Any

from aether.log import FORMATS, LEVELS
from aether.ports import BACKENDS, EBPF_BUFFERS
from aether.settings.kinds import Boolean, Command, Directory, Integer, Kind, Networks, Ports, PowerOfTwo, Seconds, Text

SERVE, GLOBAL, ENV, GATEWAY = "serve", "global", "env", "gateway"


class Setting:
    """One row of the table. (A plain class: ``aether port`` reads the table at each start, and a
    dataclass would bring in ``inspect`` and ``ast``, a named tuple compile its annotations.)"""

    __slots__ = ("name", "kind", "default", "help", "scope", "flag", "key", "shown", "commands", "secret", "command_flag")

    def __init__(
        self,
        name: str,
        kind: Kind,
        default: Any,
        help: str,
        scope: str = SERVE,
        flag: str | None = None,
        key: str | None = None,
        shown: str = "",
        commands: tuple[str, ...] = (),
        secret: bool = False,
        command_flag: str | None = None,
    ):
        self.name = name
        self.kind = kind
        self.default = default
        #: Markdown, as the docs' "what it is" column; ``--help`` shows it plain.
        self.help = help
        self.scope = scope
        #: ``None``: no flag (the variable alone).
        self.flag = flag
        #: Its key in ``config.json``; ``None``: not read from there.
        self.key = key
        #: The default as the docs say it (Markdown), where the value alone would not say it.
        self.shown = shown
        #: Commands other than ``serve`` that take the flag: ``"ports watch"``.
        self.commands = commands
        #: Never passed on to a process aether starts (a terminal, an agent backend).
        self.secret = secret
        #: Its flag on ``commands``, where that is not ``flag``.
        self.command_flag = command_flag

    def flag_on(self, command: str) -> str | None:
        """Its flag on ``command`` (one that takes it)."""
        if self.command_flag and command in self.commands:
            return self.command_flag
        return self.flag

    @property
    def env(self) -> str:
        return "AETHER_" + self.name.upper()

    def __repr__(self) -> str:
        return f"Setting({self.name!r})"


def _serve(name: str, kind: Kind, default: Any, help: str, *, flag: str = "", key: bool = True, **more) -> Setting:
    return Setting(name, kind, default, help, SERVE, flag or "--" + name.replace("_", "-"), name if key else None, **more)


def _global(name: str, kind: Kind, default: Any, help: str, **more) -> Setting:
    return Setting(name, kind, default, help, GLOBAL, "--" + name.replace("_", "-"), **more)


def _gateway(name: str, kind: Kind, default: Any, help: str, *, flag: str = "", **more) -> Setting:
    return Setting(name, kind, default, help, GATEWAY, flag or "--" + name.replace("_", "-"), **more)


def _env(name: str, kind: Kind, default: Any, help: str, **more) -> Setting:
    return Setting(name, kind, default, help, ENV, **more)


SETTINGS: tuple[Setting, ...] = (
    _serve(
        "host",
        Text(),
        "127.0.0.1",
        "the address the server listens on (API, WebSocket, previews and dashboard alike)",
        commands=("doctor",),
    ),
    _serve(
        "port", Integer(1, 65535), 3001, "the port it listens on, 1-65535; never reported as an open port", commands=("doctor",)
    ),
    _serve(
        "workspace_id",
        Text(),
        None,
        "the `{workspaceId}` of the WebSocket path `/workspaces/{workspaceId}/ws`",
        shown="the host name",
    ),
    _serve(
        "project_id",
        Text(),
        None,
        "the project whose prefix names the preview hosts",
        shown="generated once (32 hex digits), kept in the state directory as `project-id`",
    ),
    _serve(
        "preview_domain",
        Text(),
        "preview.localhost",
        "the domain under which previews are served: `{port}-{prefix}.{domain}`",
        commands=("gateway",),
    ),
    _serve(
        "preview_url",
        Text(),
        "http://{port}-{prefix}.{domain}:{server_port}",
        "the template of each port's `url`; behind a TLS front, `https://{port}-{prefix}.{domain}`",
    ),
    _serve("prefix_length", Integer(1, 32), 6, "how many characters of the project id make the `{prefix}`, 1-32"),
    _serve(
        "token",
        Text(),
        None,
        "the workspace token; never passed on to terminals or agent backends",
        shown="generated once (URL-safe, 256 bits), kept 0600 in the state directory as `token`",
        secret=True,
    ),
    _serve("token_file", Text(), None, "a file to read the token from, when `token` is not given"),
    _serve(
        "backend",
        Text(BACKENDS),
        "auto",
        "how ports are watched: `auto` (eBPF where the probe loads, else sock_diag), `ebpf` (exit 1 if the "
        "probe cannot load) or `sockdiag`",
        commands=("ports list", "ports watch"),
    ),
    _serve(
        "ignored_ports",
        Ports(),
        (22, 2222, 3001),
        "ports never reported nor previewed: SSH, internal SSH and aether's own. A comma-separated list; in "
        "`config.json` an array of at most 1,024 ports, which the `config` channel's `set` writes",
        flag="--ignore",
        commands=("ports list", "ports watch", "ports kill"),
    ),
    _serve(
        "docker_socket",
        Text(metavar="PATH"),
        None,
        "the Unix socket dockerd answers on, asked which container publishes a port that `docker-proxy` or "
        "`dockerd` holds ([ports](ports.md#what-aether-finds-out-about-a-port))",
        shown="`DOCKER_HOST`'s path where it is `unix://PATH`, else `/var/run/docker.sock`",
        commands=("ports list", "ports watch"),
    ),
    _serve("ping_interval", Seconds(), 45.0, "seconds between the server's WebSocket pings; positive"),
    _serve("pong_timeout", Seconds(), 120.0, "seconds without a pong before a client is dropped; positive"),
    _serve("write_timeout", Seconds(), 30.0, "seconds a client may take to take in a frame before it is dropped; positive"),
    _serve(
        "max_message_bytes",
        Integer(1, size=True),
        1 << 20,
        "the largest client message; a larger one closes the connection with 1009",
    ),
    # The kernel would otherwise grow a stalled client's send buffer to net.ipv4.tcp_wmem's
    # maximum (4 MiB here), hiding it from the write deadline and pinning memory per client.
    _serve(
        "send_buffer_bytes",
        Integer(1, size=True),
        256 << 10,
        "each client's kernel send buffer, capped so a stalled reader is noticed and costs bounded memory",
    ),
    _serve(
        "max_connections",
        Integer(1),
        10000,
        "every connection at once (API, WebSocket and previews alike); past it a new one is closed at once; at least 1",
        commands=("gateway",),
    ),
    # A browser opens at most 6 connections per host, and each preview is its own host: the
    # dashboard and ten previews restored at once, each with its 6, is ~66 before one is
    # answered; 128 leaves as much again for tools beside it (curl loops, wscat, a test
    # runner). One address then holds at most 128 of the 10,000 connections.
    _serve(
        "max_unauthenticated_per_address",
        Integer(0, zero="no cap"),
        128,
        "connections one client address (an IPv6 /64) may hold before any of them authenticated or was "
        "answered; past it a new one is closed at once; `0` turns the cap off; `--trusted-proxies` are exempt",
        commands=("gateway",),
    ),
    _serve(
        "kill_grace",
        Seconds(positive=False),
        5.0,
        "seconds between SIGTERM and SIGKILL: for a port's `kill`, and for what is left of a closed terminal session",
    ),
    _serve(
        "preview_timeout",
        Seconds(),
        60.0,
        "seconds without a byte either way before a proxied request ends (504 before the response); positive",
        commands=("gateway",),
    ),
    # Dev servers refuse a Host they do not know: localhost:{port} is one they all accept.
    _serve(
        "preview_upstream_host",
        Text(("localhost", "original")),
        "localhost",
        "the `Host` the app gets: `localhost` (`localhost:PORT`, which dev servers accept) or `original` (the preview host)",
    ),
    _serve(
        "workspace_root",
        Directory(),
        None,
        "where terminals start and what `files` may touch; must be a directory",
        shown="the home directory",
    ),
    _serve(
        "shell",
        Text(),
        None,
        "the login shell of a terminal session started without a command",
        shown="`$SHELL`, else the passwd entry's shell, else `/bin/sh`",
    ),
    _serve("terminal_max_sessions", Integer(1), 32, "terminal sessions running at once; at least 1"),
    _serve("terminal_scrollback_bytes", Integer(0, size=True), 256 << 10, "the output replayed on `attach`; 0 or more"),
    _serve(
        "terminal_idle_timeout",
        Seconds(positive=False, zero="never"),
        0.0,
        "seconds a session with nobody attached keeps running; 0: until its process ends",
    ),
    _serve("terminal_max_input_bytes", Integer(1, size=True), 64 << 10, "the largest `input` message; at least 1"),
    _serve(
        "agent_command",
        Command(),
        (),
        "the agent backend, started once per turn: one shell-quoted string, or a JSON array of strings "
        '(`config.json`: an array, or `{"agent": {"command": [...]}}`)',
        shown="none: a `prompt` gets `not_configured`",
    ),
    _serve(
        "agent_timeout",
        Seconds(),
        120.0,
        "seconds without output from the backend before it is stopped (`timeout`); positive "
        "(`config.json`: also `agent.timeout`)",
    ),
    _serve(
        "agent_max_output_bytes",
        Integer(1, size=True),
        4 << 20,
        "what a backend may write in one turn, stdout and stderr together (`too_large` past it); at least 1 "
        "(`config.json`: also `agent.max_output_bytes`)",
    ),
    _serve("metrics_public", Boolean(), False, "serve `GET /metrics` without a token", commands=("gateway",)),
    # From anyone else, X-Forwarded-Proto and -Port are replaced by what aether itself saw.
    _serve(
        "trusted_proxies",
        Networks(),
        (),
        "addresses or networks (`127.0.0.1,::1,10.0.0.0/8`; in `config.json` an array) of a TLS front whose "
        "`X-Forwarded-Proto` and `-Port` previews believe and pass on",
        commands=("gateway",),
    ),
    # A URL may carry the password: kept from the processes aether starts, as the token is.
    _serve(
        "fleet_redis",
        Text(metavar="URL"),
        None,
        "fleet mode: the fleet's Redis, `redis://HOST:PORT/DB`, `rediss://...` or "
        "`redis+sentinel://H1:P1,H2:P2/MASTER/DB` ([fleet mode](fleet.md)); `aether gateway` and "
        "`aether fleet status` take it as `--redis`; without it nothing of fleet mode runs",
        commands=("fleet status", "gateway"),
        command_flag="--redis",
        secret=True,
    ),
    _serve(
        "fleet_advertise",
        Text(metavar="HOST:PORT"),
        None,
        "fleet mode: where the fleet's gateways reach this server (`10.0.0.5:3001`, `[fd00::5]:3001`); "
        "needed with `--fleet-redis`",
    ),
    _serve(
        "fleet_key_file",
        Text(metavar="PATH"),
        None,
        "fleet mode: the fleet key, the same file on every VM and gateway (at least 32 bytes, mode 0600); "
        "`NEW,OLD` while rotating; needed with `--fleet-redis`",
        commands=("gateway",),
    ),
    _serve("fleet_heartbeat", Seconds(), 1.0, "fleet mode: seconds between heartbeats; positive, below `--fleet-dead-after`"),
    _serve(
        "fleet_dead_after",
        Seconds(),
        3.0,
        "fleet mode: seconds after the last heartbeat when gateways take this workspace for dead (503)",
    ),
    _serve(
        "state_dir",
        Text(),
        None,
        "the state directory",
        key=False,
        shown="`~/.local/state/aether`, or systemd's (see [the state directory](#the-state-directory))",
        commands=("doctor",),
    ),
    _global(
        "log_format",
        Text(tuple(FORMATS)),
        "json",
        "`json` or `logfmt`, one record a line on stderr ([logs](metrics-and-logs.md#logs))",
    ),
    _global("log_level", Text(LEVELS, lower=True), "info", "`debug`, `info`, `warning` or `error`"),
    _gateway(
        "gateway_host",
        Text(metavar="HOST"),
        "127.0.0.1",
        "the address the gateway listens on (previews, `/healthz`, `/metrics`)",
        flag="--host",
    ),
    _gateway("gateway_port", Integer(1, 65535), 8080, "the port it listens on, 1-65535", flag="--port"),
    _gateway(
        "gateway_reload_interval",
        Seconds(),
        300.0,
        "seconds between full loads of the route table besides those after a gap or a reconnect (±10 %)",
        flag="--reload-interval",
    ),
    _gateway(
        "gateway_liveness_interval",
        Seconds(),
        0.1,
        "seconds between checks of the workspaces' heartbeat deadlines",
        flag="--liveness-interval",
    ),
    _gateway(
        "gateway_metrics_token_file",
        Text(metavar="PATH"),
        None,
        "a file holding the token `GET /metrics` wants as `Authorization: Bearer` (else `--metrics-public`, or no metrics)",
        flag="--metrics-token-file",
    ),
    _env(
        "sockdiag_interval",
        Seconds(),
        0.25,
        "seconds between the `sockdiag` backend's snapshots, the minimum: the interval stretches to keep them "
        "within 2% of a core (`aether ports watch --interval` overrides it)",
        flag="--interval",
        commands=("ports watch",),
    ),
    _env(
        "ebpf_buffer",
        Text(EBPF_BUFFERS),
        "auto",
        "how probe records reach aether: `ring` (a BPF ring buffer), `perf` (per-CPU perf buffers), or `auto` "
        "(ring on kernels 5.8 and later)",
    ),
    _env(
        "ebpf_pages",
        PowerOfTwo(),
        None,
        "the buffer's size in pages (ring: in all; perf: per CPU), a power of two",
        shown="ring `512`, perf `64`",
    ),
    _env(
        "cache_dir",
        Text(),
        None,
        "where the compiled probe is cached ([ports](ports.md))",
        shown="`$CACHE_DIRECTORY`, else `/var/cache/aether` (root) or `~/.cache/aether`",
    ),
    _env(
        "bpf_dir",
        Text(),
        None,
        "the directory holding the probe's source, `listen_events.c`",
        shown="the source tree's `bpf/`, else `share/aether/bpf` under the installation's prefix",
    ),
    _env(
        "cgroups",
        Text(("auto", "off")),
        "auto",
        "`auto` (a cgroup v2 per terminal session and agent turn where the kernel allows) or `off` (process "
        "trees found in /proc: see [the protocol](protocol.md#terminal-channel))",
    ),
    _env(
        "files_no_openat2",
        Boolean(),
        False,
        "`1`: paths of the `files` channel are walked one component at a time even where the kernel has "
        "`openat2`, as on kernels without it (for testing that fallback)",
        shown="off",
    ),
)

#: name -> its setting.
BY_NAME: dict[str, Setting] = {setting.name: setting for setting in SETTINGS}


def of(scope: str) -> tuple[Setting, ...]:
    return tuple(setting for setting in SETTINGS if setting.scope == scope)
