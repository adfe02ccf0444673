"""The rules in force, read again whenever one of their files changes.

config.json (in the state directory), ``.devcontainer/devcontainer.json``,
``.devcontainer.json`` and ``.gitpod.yml`` (beneath the workspace root) are read off the loop
(:func:`aether.attributes.sources.load`), at start and after a change. Changes are learnt from
one inotify instance watching the directories they are in (not the files: an editor's save
replaces a file, and a file made later has no watch of its own), read on the loop; nothing runs
while none of those directories changes. A burst of changes (a ``git checkout``, an editor's
write-and-rename) is read once, :data:`SETTLE` seconds after it began.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path

from aether.attributes import sources
from aether.attributes.rules import EMPTY, Problem, Ruleset
from aether.files import libc

log = logging.getLogger("aether.attributes")

#: Seconds between the first change of a burst and the read: an editor's save is a write, a
#: rename and an attribute change within a millisecond or two.
SETTLE = 0.05
#: Problems logged per read at most (every one is in :attr:`LiveRules.problems`).
MAX_LOGGED = 20
CONFIG = "config.json"

_IN_CLOSE_WRITE = 0x00000008
_IN_MOVED_FROM = 0x00000040
_IN_MOVED_TO = 0x00000080
_IN_CREATE = 0x00000100
_IN_DELETE = 0x00000200
_IN_DELETE_SELF = 0x00000400
_IN_MOVE_SELF = 0x00000800
_IN_ONLYDIR = 0x01000000
_MASK = _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR
_EVENT = struct.Struct("=iIII")  # struct inotify_event without its name
_HEADER = _EVENT.size


def read_all(root: Path | None, config_path: Path | None) -> tuple[Ruleset, list[Problem]]:
    """Every file's rules now (blocking). A config.json that is not a JSON object is reported
    and its rules left out; the workspace's files are still read."""
    config: dict | None = None
    problems: list[Problem] = []
    if config_path is not None:
        try:
            import json

            text = config_path.read_text()
            config = json.loads(text)
            if not isinstance(config, dict):
                raise ValueError("must hold a JSON object")
        except FileNotFoundError:
            config = None
        except (OSError, ValueError) as exc:
            problems.append(Problem(CONFIG, None, "unreadable", f"{exc}; its rules not used"))
            config = None
    ruleset, found = sources.load(root, config, CONFIG)
    return ruleset, problems + found


class LiveRules:
    """The rules of ``root`` (the workspace root, None for none) and ``config_path`` (the state
    directory's config.json, None for none); ``on_change()`` after each read that changed them."""

    def __init__(self, root: Path | None, config_path: Path | None, on_change: Callable[[], None] | None = None):
        self.root = Path(root) if root is not None else None
        self.config_path = Path(config_path) if config_path is not None else None
        self.on_change = on_change
        self.ruleset: Ruleset = EMPTY
        self.problems: list[Problem] = []
        #: Reads done (for tests and metrics).
        self.reads = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd: int | None = None
        self._watches: dict[int, str] = {}  # watch descriptor -> directory, relative to the root ("" for it)
        self._pending: asyncio.TimerHandle | None = None
        self._reading = False
        self._again = False
        self._closed = False

    def __call__(self) -> Ruleset:
        return self.ruleset

    async def start(self) -> None:
        """Read the rules, and follow their files from now on."""
        self._loop = asyncio.get_running_loop()
        try:
            self._fd = libc.inotify_init()
        except OSError as exc:
            log.warning("rules files not followed", extra={"error": str(exc)})
        else:
            if self.root is not None:
                for rel in sources.WATCH_DIRECTORIES:
                    self._watch(rel)
            if self.config_path is not None:
                self._watch_path(str(self.config_path.parent), "@state")
            self._loop.add_reader(self._fd, self._readable)
        await self._read()

    def close(self) -> None:
        self._closed = True
        if self._pending is not None:
            self._pending.cancel()
        if self._fd is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None

    # -- internals -------------------------------------------------------------------------

    def _watch(self, rel: str) -> None:
        rel = "" if rel in (".", "") else rel
        assert self.root is not None  # only a rooted instance watches the workspace
        self._watch_path(str(self.root / rel) if rel else str(self.root), rel)

    def _watch_path(self, path: str, rel: str) -> None:
        assert self._fd is not None  # start made it before any watch
        try:
            # A link is not followed: .devcontainer leading elsewhere is not watched (nor read).
            wd = libc.inotify_add_watch(self._fd, path, _MASK | 0x02000000)  # IN_DONT_FOLLOW
        except OSError:
            return  # not there (yet): its creation in the directory above is seen
        self._watches[wd] = rel

    def _readable(self) -> None:
        assert self._fd is not None and self._loop is not None  # start added this reader
        loop = self._loop
        try:
            data = os.read(self._fd, 64 << 10)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("rules files no longer followed", extra={"error": str(exc)})
            loop.remove_reader(self._fd)
            return
        offset, relevant = 0, False
        while offset + _HEADER <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _HEADER : offset + _HEADER + length].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            offset += _HEADER + length
            where = self._watches.get(wd)
            if where is None:
                relevant = True  # an overflow (wd -1): read again to be sure
                continue
            if where == "@state":
                relevant = relevant or name == CONFIG
                continue
            path = f"{where}/{name}" if where else name
            if not name or sources.affects(path):
                relevant = True
            if where == "" and name == ".devcontainer" and mask & (_IN_CREATE | _IN_MOVED_TO):
                self._watch(".devcontainer")
        if relevant and self._pending is None:
            self._pending = loop.call_later(SETTLE, lambda: loop.create_task(self._read()))

    async def _read(self) -> None:
        self._pending = None
        if self._reading:
            self._again = True
            return
        self._reading = True
        assert self._loop is not None  # start set it; only its reader schedules this
        try:
            while True:
                self._again = False
                ruleset, problems = await self._loop.run_in_executor(None, read_all, self.root, self.config_path)
                if self._closed:
                    return
                self.reads += 1
                changed = _shape(ruleset) != _shape(self.ruleset) or problems != self.problems
                self.ruleset, self.problems = ruleset, problems
                if changed:
                    log.info("port attributes read", extra={"files": list(ruleset.files), "rules": len(ruleset)})
                    for problem in problems[:MAX_LOGGED]:
                        log.warning("port attribute not used", extra={"file": problem.file, "why": str(problem)})
                    if self.on_change is not None:
                        self.on_change()
                if not self._again:
                    return
        finally:
            self._reading = False


def _shape(ruleset: Ruleset) -> tuple:
    """What decides a ruleset's answers, comparable (a ruleset's cache is not)."""
    return tuple(
        (
            layer.file,
            layer.style,
            tuple((rule.origin, str(rule.selector), type(rule.selector).__name__, dict(rule.attrs)) for rule in layer.rules),
            (layer.other.origin, dict(layer.other.attrs)) if layer.other is not None else None,
            layer.forward_ports,
        )
        for layer in ruleset.layers
    )
