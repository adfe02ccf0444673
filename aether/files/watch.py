"""A client's watch: a directory (and, when recursive, everything below it) over the
server's inotify instance, its events paired, coalesced and sent at most every 50 ms.

A change after a quiet spell is sent at once (after the kernel's batch it came in); what follows
within ``WINDOW_SECONDS`` is gathered and sent when that window closes, at most one event per
path (see ``coalescer``). So a lone save is told in about a millisecond, and a storm costs
at most one message per window. A window with
more than ``coalescer.MAX_PENDING_PATHS`` paths, or one in which the kernel dropped events, is sent as one
``overflow``, so a save storm or a ``git checkout`` costs a bounded number of messages. While
the client is behind on reading, the window stays open and keeps merging.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Callable

from aether.files import FileError
from aether.files.coalescer import CREATED, DELETED, DIRECTORY, FILE, MODIFIED, MOVED, Coalescer
from aether.files.dirs import Directories
from aether.files.inotify import (
    IN_ATTRIB,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_ISDIR,
    IN_MODIFY,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_UNMOUNT,
    Event,
    Instance,
    join_rel,
)
from aether.files.ops import os_error

log = logging.getLogger("aether.files")

#: After one flush, the next comes no sooner than this.
WINDOW_SECONDS = 0.05
#: How long a rename's first half waits for its second once nothing else has come: the kernel
#: queues them one after the other, and a read can fall in between.
PAIR_SECONDS = 0.01


class WatchTree:
    """One client watch over ``real`` (named ``base`` in messages): the directory of
    (device, inode) ``ident`` that was there (None: the one there when it starts).
    ``deliver(messages)`` sends event messages; ``hold(resume)`` returns True when the client
    is behind, and then calls ``resume`` once it has caught up; ``ended(tree)`` is called
    when the watched directory itself goes."""

    def __init__(
        self,
        instance: Instance,
        real: str,
        base: str,
        recursive: bool,
        deliver: Callable[[list[dict]], None],
        hold: Callable[[Callable[[], None]], bool],
        ended: Callable[[WatchTree], object],  # what it returns is not used
        ident: tuple[int, int] | None = None,
    ):
        self.instance = instance
        self.real = real
        self.ident = ident
        self.base = base
        self.recursive = recursive
        self.dirs = Directories()
        self.events = Coalescer()
        self.closed = False
        self._moves: dict[int, tuple[int, str, str]] = {}  # cookie -> moved-from (directory's wd, name, kind)
        self._deliver, self._hold, self._ended = deliver, hold, ended
        self._timer: asyncio.TimerHandle | None = None
        self._pair_timer: asyncio.TimerHandle | None = None
        self._last_flush = float("-inf")
        self._held = False
        self._limited = False
        self._rescans = 0  # whole-tree scans after an overflow: running, and one more asked for
        self._tasks: set[asyncio.Task] = set()

    async def start(self, path: str) -> None:
        """Watch the tree; FileError (naming the client's ``path``) when it cannot be watched
        or holds more directories than the server may watch."""
        try:
            found = await self.instance.watch(self, "", None, report=False)
        except OSError as exc:
            self.close()
            if exc.errno == errno.ENOSPC:
                raise FileError(
                    "too_large", path, f"{path}: the kernel's limit of inotify watches is reached (fs.inotify.max_user_watches)"
                ) from None
            if exc.errno == errno.ENOTDIR:
                raise FileError("not_a_directory", path, f"{path}: not a directory; watch the directory it is in") from None
            raise os_error(exc, path) from None
        if found.truncated:
            self.close()
            raise FileError(
                "too_large",
                path,
                f"{path}: watching it would take the server past {self.instance.max_dirs} watched directories; "
                "watch a subdirectory, or without recursive",
            )

    def close(self) -> None:
        """Stop watching (idempotent). A scan under way runs to its end, and what it added is
        removed then."""
        self.closed = True
        for timer in (self._timer, self._pair_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._pair_timer = None
        self.instance.remove(self)

    def grow(self, parent: int | None, name: str, report: bool) -> None:
        """Watch directory ``name`` that appeared in ``parent`` (None: the whole tree again),
        and below it; with ``report``, tell what it holds already as created (it may have
        filled before its watch was in place)."""
        rel: str | None
        if parent is None:
            rel = ""
        else:
            rel = self._path(parent, name)
            if rel is None:
                return
        task = asyncio.ensure_future(self._grow(rel, parent, report))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _grow(self, rel: str, parent: int | None, report: bool) -> None:
        try:
            found = await self.instance.watch(self, rel, parent, report)
        except (OSError, FileError):
            return  # gone again already (or a link now): its own events say so
        except Exception:
            log.exception("watching a new directory failed", extra={"path": self.display(rel)})
            return
        finally:
            if parent is None:
                self._rescanned()
        if self.closed:
            return
        for path, kind in found.entries:
            self.events.add(CREATED, path, kind)
        self.arm()
        if found.truncated and not self._limited:
            self._limited = True
            message = (
                f"{self.base}: the server watches {self.instance.max_dirs} directories already; new ones here are not watched"
            )
            self._deliver([{"type": "error", "code": "too_large", "path": self.base, "message": message}])

    # -- what the inotify instance calls ----------------------------------------------------

    def identify(self, ident: tuple[int, int] | None) -> None:
        """The scan of the top found directory (device, inode) ``ident``: when the tree was
        not given one, that directory is the one it watches from now on."""
        if self.ident is None:
            self.ident = ident

    def watches(self, wd: int) -> bool:
        """Whether descriptor ``wd`` is one of this tree's directories."""
        return wd in self.dirs

    def place(self, wd: int, parent: int | None, name: str) -> None:
        """Descriptor ``wd`` is directory ``name`` in ``parent`` (None and ``""``: the top)."""
        self.dirs.add(wd, parent, name)

    def take_descriptors(self) -> list[int]:
        """Every descriptor of the tree, forgotten here (the instance releases them)."""
        wds = list(self.dirs)
        self.dirs.clear()
        return wds

    def display(self, rel: str) -> str:
        """A path in the tree as replies name it: relative to the workspace root."""
        if not rel:
            return self.base
        return rel if self.base == "." else f"{self.base}/{rel}"

    def _path(self, wd: int, name: str) -> str | None:
        """Entry ``name`` of directory ``wd`` as a path in the tree; None if ``wd`` has none."""
        rel = self.dirs.path(wd)
        return None if rel is None else join_rel(rel, name)

    def _add(self, type_: str, wd: int, name: str, kind: str, source: str | None = None) -> None:
        if not self.events.overflowed:  # an overflowed window keeps nothing: no path needed
            path = self._path(wd, name)
            if path is not None:
                self.events.add(type_, path, kind, source)

    def on_event(self, event: Event) -> None:
        """One event on a directory of this tree (``event.wd`` is in ``dirs``)."""
        mask = event.mask
        if not event.name:
            if mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT) and self.dirs.is_top(event.wd):
                self.gone()
            return
        if self._moves and not (mask & IN_MOVED_TO and event.cookie in self._moves):
            # The kernel queues a rename's two halves one after the other: a half alone left
            # the tree, and is told in its place.
            self._unpaired()
        is_dir = bool(mask & IN_ISDIR)
        if self.events.overflowed and not is_dir:
            return  # the window is one overflow already, and a file's event changes nothing else
        name = os.fsdecode(event.name)
        kind = DIRECTORY if is_dir else FILE
        if mask & IN_CREATE:
            self._add(CREATED, event.wd, name, kind)
            if is_dir and self.recursive:
                self.grow(event.wd, name, report=True)
        elif mask & IN_MOVED_FROM:
            self._moves[event.cookie] = (event.wd, name, kind)
        elif mask & IN_MOVED_TO:
            source = self._moves.pop(event.cookie, None)
            if source is not None:
                from_wd, from_name, _kind = source
                if not self.events.overflowed:
                    was = self._path(from_wd, from_name)
                    self._add(CREATED if was is None else MOVED, event.wd, name, kind, was)
                if is_dir:
                    if self.dirs.child(from_wd, from_name) is not None:
                        self.dirs.move(from_wd, from_name, event.wd, name)
                    elif self.recursive:
                        # Never watched where it was: its grow found it moved on already (a
                        # rename storm). Nothing else would watch it where it is now, nor tell
                        # what was made in it before any watch: report what it holds.
                        self.grow(event.wd, name, report=True)
            else:
                self._add(CREATED, event.wd, name, kind)
                if is_dir and self.recursive:
                    self.grow(event.wd, name, report=False)
        elif mask & IN_DELETE:
            self._add(DELETED, event.wd, name, kind)
        elif mask & (IN_MODIFY | IN_ATTRIB):
            self._add(MODIFIED, event.wd, name, kind)

    def end_batch(self) -> None:
        """After one read's events: a move whose other half has not come by ``PAIR_SECONDS``
        (or before another event) left the tree."""
        if self.closed:
            return
        if self._moves and self._pair_timer is None:
            self._pair_timer = asyncio.get_running_loop().call_later(PAIR_SECONDS, self._unpaired_late)
        self.arm()

    def _unpaired_late(self) -> None:
        self._pair_timer = None
        if not self.closed:
            self._unpaired()
            self.arm()

    def _unpaired(self) -> None:
        if self._pair_timer is not None:
            self._pair_timer.cancel()
            self._pair_timer = None
        moves, self._moves = self._moves, {}
        for wd, name, kind in moves.values():
            self._add(DELETED, wd, name, kind)
            if kind == DIRECTORY:
                child = self.dirs.child(wd, name)
                if child is not None:
                    self.instance.release(self, self.dirs.remove(child))

    def arm(self) -> None:
        if self.events and self._timer is None and not self._held and not self.closed:
            loop = asyncio.get_running_loop()
            wait = self._last_flush + WINDOW_SECONDS - loop.time()
            if wait <= 0:
                self.flush()  # the leading edge: nothing was sent for a window
            else:
                self._timer = loop.call_later(wait, self.flush)

    def flush(self) -> None:
        self._timer = None
        if self.closed:
            return
        if self._hold(self.flush):
            self._held = True
            return
        self._held = False
        self._last_flush = asyncio.get_running_loop().time()
        events = self.events.take()
        if events is None:
            self._deliver([{"type": "overflow"}])
        elif events:
            self._deliver([self._message(*e) for e in events])

    def _message(self, type_: str, path: str, kind: str, source: str | None) -> dict:
        message = {"type": type_, "path": self.display(path), "kind": kind}
        if type_ == MOVED:
            message["from"] = self.display(source or "")
        return message

    def overflow(self) -> None:
        """The kernel dropped events: the client re-lists, and new directories may have been
        missed, so the tree is walked again: once, and once more after it if the kernel
        drops more meanwhile."""
        self.events.overflow()
        self.arm()
        if self.recursive and not self.closed:
            self._rescans = min(self._rescans + 1, 2)
            if self._rescans == 1:
                self.grow(None, "", report=False)

    def _rescanned(self) -> None:
        self._rescans -= 1
        if self._rescans and not self.closed:
            self.grow(None, "", report=False)

    def forget(self, wd: int) -> None:
        """The kernel removed watch ``wd`` (its directory went)."""
        if self.dirs.is_top(wd):
            self.gone()
        else:
            self.dirs.discard(wd)

    def gone(self) -> None:
        """The watched directory itself was deleted or moved away: say so, and end."""
        if self.closed:
            return
        self._unpaired()
        events = self.events.take()
        self.close()
        # Sent now, not held for a slow client: there is no later window.
        messages = [{"type": "overflow"}] if events is None else [self._message(*e) for e in events]
        messages.append(self._message(DELETED, "", DIRECTORY, None))
        self._deliver(messages)
        self._ended(self)
