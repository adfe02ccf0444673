"""The ``terminal`` channel: terminal sessions (a PTY and its process, ``aether.terminal``) that
keep running without a client.

A client ``create``s a session (and is attached to it) or ``attach``es to one by id, which
replays the scrollback and then streams live output; any number of clients may be attached.
A WebSocket closing detaches it and nothing more. A session ends when its process does, on
``close`` (hang-up, then SIGKILL to its whole process tree after the kill grace), or after
``terminal_idle_timeout`` seconds with nobody attached. Each session's processes are one
:class:`aether.cgroup.Tree`; daemon exit kills every one, those of ended sessions too. An
ended session nobody saw end is kept, with its scrollback and exit status, until a client
attaches or ``EXITED_KEEP`` seconds pass (at most ``terminal_max_sessions`` of them; a new
session may take an ended one's id).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from aether.cgroup import Trees
from aether.errors import Refusal
from aether.files import FileError
from aether.files.paths import resolve
from aether.protocol import Message
from aether.server.channels import Channel
from aether.terminal.process import PtyProcess, child_env
from aether.terminal.session import Terminal
from aether.wire import reply, with_id

if TYPE_CHECKING:
    from aether.server.client import Client

log = logging.getLogger("aether.terminal")

EXITED_KEEP = 300.0
#: How long daemon shutdown waits for hung-up sessions before SIGKILL.
SHUTDOWN_GRACE = 0.3


class Settings(Protocol):
    """The settings the channel reads."""

    state_dir: Path
    workspace_root: Path
    shell: str
    kill_grace: float
    terminal_max_sessions: int
    terminal_scrollback_bytes: int
    terminal_idle_timeout: float
    terminal_max_input_bytes: int


class TerminalChannel(Channel):
    name = "terminal"

    def __init__(self, settings: Settings):
        self.settings = settings
        #: sessionId -> its terminal session
        self.terminals: dict[str, Terminal] = {}
        self.trees = Trees(str(settings.state_dir), "terminal")
        self._sweeper: asyncio.TimerHandle | None = None
        self.handlers = {
            "create": self._create,
            "attach": self._attach,
            "detach": self._detach,
            "input": self._input,
            "resize": self._resize,
            "close": self._close,
            "list": self._list,
        }

    # -- clients ------------------------------------------------------------------------

    def on_close(self, client: Client) -> None:
        for terminal in list(self.terminals.values()):
            if client in terminal.clients or client in terminal.closers:
                terminal.detach(client)
        self._schedule_sweep()

    def _get(self, message: Message, running: bool = True) -> Terminal:
        session_id = message.body["sessionId"]
        terminal = self.terminals.get(session_id)
        if terminal is None or (running and (terminal.exit is not None or terminal.closing)):
            raise Refusal("not_found", f"no terminal session {session_id}")
        return terminal

    # -- messages -----------------------------------------------------------------------

    def _create(self, client: Client, message: Message) -> None:
        body, settings = message.body, self.settings
        session_id = body.get("sessionId") or f"t-{secrets.token_hex(6)}"
        if session_id in self.terminals and self.terminals[session_id].exit is None:
            raise Refusal("exists", f"terminal session {session_id} is running; attach to it or pick another id")
        running = sum(1 for t in self.terminals.values() if t.exit is None)
        if running >= settings.terminal_max_sessions:
            raise Refusal("limit", f"at most {settings.terminal_max_sessions} terminal sessions run at once; close one first")
        cwd, shown = self._cwd(body.get("cwd", "."))
        command = body.get("command")
        if command is None:
            argv = [settings.shell, "-l"]
        elif isinstance(command, str):
            argv = [settings.shell, "-c", command]
        else:
            argv = list(command)
        env = child_env(body.get("env"), session_id)
        tree = self.trees.new()
        try:
            process = PtyProcess(argv, cwd, env, body["cols"], body["rows"], tree)
        except Refusal:
            self.trees.done(tree)
            raise
        terminal = Terminal(session_id, process, argv, shown, settings.terminal_scrollback_bytes, self._ended, self.trees.done)
        self.terminals.pop(session_id, None)  # an ended session of that id, replaced
        self.terminals[session_id] = terminal
        log.info("terminal created", extra={"session": session_id, "pid": process.pid, "command": argv[0]})
        terminal.attach(client, reply(message, "created"))

    def _cwd(self, path: str) -> tuple[str, str]:
        """The working directory inside the workspace root, and how replies name it."""
        try:
            target = resolve(str(self.settings.workspace_root), path)
        except FileError as exc:
            raise Refusal(exc.code, exc.message) from None  # without the files channel's ``path``
        if not os.path.isdir(target.path):
            code = "not_found" if not os.path.exists(target.path) else "not_a_directory"
            raise Refusal(code, f"cwd {path}: {code.replace('_', ' ')}")
        return target.path, target.rel

    def _attach(self, client: Client, message: Message) -> None:
        terminal = self._get(message, running=False)
        if client in terminal.clients:
            raise Refusal("attached", f"already attached to terminal session {terminal.id}")
        terminal.attach(client, reply(message, "attached"))
        if terminal.exit is not None:
            del self.terminals[terminal.id]  # its end has been seen
        self._schedule_sweep()

    def _detach(self, client: Client, message: Message) -> None:
        terminal = self._get(message)
        if client not in terminal.clients:
            raise Refusal("not_attached", f"not attached to terminal session {terminal.id}")
        terminal.detach(client)
        client.send(reply(message, "detached", sessionId=terminal.id))
        self._schedule_sweep()

    def _input(self, client: Client, message: Message) -> None:
        terminal = self._get(message)
        data = message.body["data"]
        if message.body.get("encoding") == "base64":
            try:
                raw = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise Refusal("invalid", "data is not valid base64") from None
        else:
            raw = data.encode("utf-8", "surrogateescape")
        limit = self.settings.terminal_max_input_bytes
        if len(raw) > limit:
            raise Refusal("too_large", f"input of {len(raw)} bytes; at most {limit} per message")
        terminal.write(raw)

    def _resize(self, client: Client, message: Message) -> None:
        terminal = self._get(message)
        cols, rows = message.body["cols"], message.body["rows"]
        terminal.resize(cols, rows)
        resized = {"channel": "terminal", "type": "resized", "sessionId": terminal.id, "cols": cols, "rows": rows}
        for other in list(terminal.clients | {client}):
            other.send(with_id(resized, message.id) if other is client else resized)

    def _close(self, client: Client, message: Message) -> None:
        terminal = self._get(message)
        client.send(reply(message, "closing", sessionId=terminal.id))
        if client not in terminal.clients:
            terminal.closers.add(client)  # it hears the exit, as an attached client does
        terminal.hang_up(self.settings.kill_grace)
        log.info("terminal closing", extra={"session": terminal.id})

    def _list(self, client: Client, message: Message) -> None:
        described = [t.describe() for t in sorted(self.terminals.values(), key=lambda t: t.created)]
        client.send(reply(message, "list", sessions=described))

    # -- ending -------------------------------------------------------------------------

    def _ended(self, terminal: Terminal) -> None:
        if terminal.clients:
            # Its end was sent to the clients attached: nothing to keep.
            self.terminals.pop(terminal.id, None)
            terminal.clients.clear()
            return
        terminal.detached_since = time.monotonic()
        # Every ended session kept has detached_since: it ended detached, or was left after.
        ended = sorted((t for t in self.terminals.values() if t.exit is not None), key=lambda t: t.detached_since or 0.0)
        for old in ended[: max(0, len(ended) - self.settings.terminal_max_sessions)]:
            del self.terminals[old.id]  # the oldest unseen ends go first
        self._schedule_sweep()

    def _schedule_sweep(self) -> None:
        """One timer for the next thing to end: an idle session, or a kept ended one."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        idle = self.settings.terminal_idle_timeout
        deadlines = []
        for terminal in self.terminals.values():
            if terminal.detached_since is None or (terminal.closing and terminal.exit is None):
                continue
            if terminal.exit is not None:
                deadlines.append(terminal.detached_since + EXITED_KEEP)
            elif idle > 0:
                deadlines.append(terminal.detached_since + idle)
        if deadlines:
            delay = max(0.0, min(deadlines) - time.monotonic())
            self._sweeper = asyncio.get_running_loop().call_later(delay + 0.01, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        now, idle = time.monotonic(), self.settings.terminal_idle_timeout
        for terminal in list(self.terminals.values()):
            if terminal.detached_since is None or terminal.clients or (terminal.closing and terminal.exit is None):
                continue
            if terminal.exit is not None and now >= terminal.detached_since + EXITED_KEEP:
                del self.terminals[terminal.id]
            elif terminal.exit is None and idle > 0 and now >= terminal.detached_since + idle:
                log.info("terminal idle: hanging up", extra={"session": terminal.id})
                terminal.hang_up(self.settings.kill_grace)
        self._schedule_sweep()

    def close(self) -> None:
        """At shutdown: hang up every session, give them ``SHUTDOWN_GRACE``, then SIGKILL
        what is left. It blocks the loop for that long: nothing else runs at shutdown."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        running = [t for t in self.terminals.values() if t.exit is None]
        for terminal in running:
            terminal.shutdown()
        deadline = time.monotonic() + SHUTDOWN_GRACE
        waiting = running
        while waiting and time.monotonic() < deadline:
            waiting = [t for t in waiting if t.process.exit_status() is None]
            if waiting:
                time.sleep(0.02)
        for terminal in running:
            terminal.finish_shutdown()
        self.trees.close()  # every tree: those of ended sessions may have processes left
        self.terminals.clear()
