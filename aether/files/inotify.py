"""inotify(7), and the server's one inotify instance that every watch shares.

:class:`Instance` is opened for the first watched directory and closed after the last, and read
on the event loop, at most 64 KiB of events (4,096 at the most) per wake-up so other work
runs between.
inotify watches directories one at a time, so a recursive watch adds one per subdirectory:
:func:`scan` walks a tree and adds them, in the thread pool, one scan at a time so each counts
what the last added against the server's limit. Events that arrive for a descriptor a scan has
not handed back yet are kept until it has. Users watching the same directory share its
descriptor (the kernel gives the same one), counted once against the server's limit, and
removed when the last lets go.

inotify takes a path. Each directory is opened first, below the watch's top with no symbolic
link followed, and watched through its descriptor (``/proc/self/fd/N``): what is watched is
the directory that was opened there, whatever is renamed meanwhile. The top is the directory
:func:`locate` resolved beneath the workspace root, checked by device and inode each time it is
opened again.
"""

from __future__ import annotations

import asyncio
import errno
import os
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, NamedTuple

from aether.files import FileError, libc
from aether.files.beneath import Root, below, fd_path
from aether.files.paths import os_error

if TYPE_CHECKING:
    from aether.files.watch import WatchTree

# <sys/inotify.h>
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000

#: What a directory watch asks for: its entries' changes and its own end. Only directories
#: (IN_ONLYDIR), and nothing about files already unlinked but still open (IN_EXCL_UNLINK).
#: The path given is /proc/self/fd/N, a link the kernel follows to the directory open there
#: (so not IN_DONT_FOLLOW).
DIRECTORY_MASK = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
    | IN_EXCL_UNLINK
)
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC

_HEADER = struct.Struct("=iIII")  # wd, mask, cookie, len: struct inotify_event
#: Bytes of events read in one wake-up: at 16 bytes the smallest, at most 4,096 events are
#: handled before the loop runs again; the rest waits in the kernel for the next.
READ_BYTES = 64 << 10
#: Room one read needs: any single event fits (header + NAME_MAX + 1, padded).
_MIN_READ = _HEADER.size + 256 + 16

init = libc.inotify_init
rm_watch = libc.inotify_rm_watch


def add_watch(fd: int, dir_fd: int) -> int:
    """The watch descriptor for the directory open as ``dir_fd``; the same one again for a
    directory already watched."""
    return libc.inotify_add_watch(fd, b"/proc/self/fd/%d" % dir_fd, DIRECTORY_MASK)


class Top(NamedTuple):
    """The directory a watch watches: its path when the watch began, its path as replies name
    it, and its (device, inode)."""

    real: str
    rel: str
    ident: tuple[int, int]


def locate(root: str, path: str) -> Top:
    """The directory ``path`` leads to beneath ``root`` (a link followed, and staying
    inside), for a watch; FileError when there is none. Blocking."""
    try:
        with Root(root) as beneath:
            fd, rel = beneath.open(path, _DIRECTORY)
        try:
            st = os.fstat(fd)
            real = fd_path(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:
            raise FileError("not_a_directory", path, f"{path}: not a directory; watch the directory it is in") from None
        raise os_error(exc, path) from None
    return Top(real, rel, (st.st_dev, st.st_ino))


def open_top(real: str, ident: tuple[int, int] | None) -> tuple[int, tuple[int, int]]:
    """The watch's top directory opened again, and its identity; OSError ENOENT when what is
    at ``real`` now is another directory than ``ident`` (None: any, and it becomes the one)."""
    fd = os.open(real, _DIRECTORY)
    st = os.fstat(fd)
    if ident is not None and (st.st_dev, st.st_ino) != ident:
        os.close(fd)
        raise OSError(errno.ENOENT, "the watched directory is no longer there", real)
    return fd, (st.st_dev, st.st_ino)


def add_watch_below(fd: int, real: str, ident: tuple[int, int] | None, rel: str) -> int:
    """Watch directory ``rel`` of the watch whose top is ``real`` (``""``: the top)."""
    top, _ident = open_top(real, ident)
    try:
        if not rel:
            return add_watch(fd, top)
        directory = below(top, rel, _DIRECTORY)
        try:
            return add_watch(fd, directory)
        finally:
            os.close(directory)
    finally:
        os.close(top)


class Event(NamedTuple):
    wd: int
    mask: int
    cookie: int
    name: bytes  # b"" for an event on the watched directory itself


def parse(buffer: bytes) -> list[Event]:
    """The events in what one read(2) returned (the kernel never splits an event)."""
    events = []
    offset, end = 0, len(buffer)
    while offset + _HEADER.size <= end:
        wd, mask, cookie, length = _HEADER.unpack_from(buffer, offset)
        offset += _HEADER.size
        name = buffer[offset : offset + length].split(b"\0", 1)[0]
        offset += length
        events.append(Event(wd, mask, cookie, name))
    return events


#: Directories watched at once by the whole server (each one a kernel watch).
MAX_WATCHED_DIRS = 10_000
_MAX_ORPHANS = 10_000


class Scan(NamedTuple):
    dirs: list[tuple[str, int, int]]  # (path in the tree, watch descriptor, index of its parent here; -1: the top)
    entries: list[tuple[str, str]]  # (path in the tree, kind) of what was found, when asked
    truncated: bool  # stopped at the directory limit
    ident: tuple[int, int] | None  # the top's (device, inode)


def join_rel(rel: str, name: str) -> str:
    """``name`` inside ``rel``, a path relative to a watch's top ("" for the top itself)."""
    return f"{rel}/{name}" if rel else name


def scan(
    fd: int, real: str, ident: tuple[int, int] | None, rel: str, recursive: bool, known: frozenset, budget: int, report: bool
) -> Scan:
    """Watch directory ``rel`` of the watch whose top is ``real`` (``""``: the top) and, when
    ``recursive``, every directory below it (links not followed), adding at most ``budget``
    descriptors not in ``known``; parents come before their children. Blocking: runs in the
    pool. OSError when ``rel`` itself cannot be watched."""
    dirs: list[tuple[str, int, int]] = []
    entries: list[tuple[str, str]] = []
    added = 0
    top, ident = open_top(real, ident)
    try:
        stack = [(rel, -1)]
        while stack:
            r, up = stack.pop()
            try:
                directory = below(top, r, _DIRECTORY) if r else top
            except OSError:
                if not dirs:
                    raise
                continue  # gone, or a link now, since it was listed
            try:
                try:
                    wd = add_watch(fd, directory)
                except OSError as exc:
                    if not dirs:
                        raise
                    if exc.errno == errno.ENOSPC:
                        return Scan(dirs, entries, True, ident)
                    continue
                if wd not in known:
                    added += 1
                    if added > budget:
                        rm_watch(fd, wd)
                        return Scan(dirs, entries, True, ident)
                here = len(dirs)
                dirs.append((r, wd, up))
                if not recursive:
                    break
                try:
                    with os.scandir(directory) as it:
                        for item in it:
                            child = join_rel(r, item.name)
                            is_dir = item.is_dir(follow_symlinks=False)
                            if report:
                                entries.append((child, "directory" if is_dir else "file"))
                            if is_dir:
                                stack.append((child, here))
                except OSError:
                    continue
            finally:
                if directory != top:
                    os.close(directory)
    finally:
        os.close(top)
    return Scan(dirs, entries, False, ident)


class Instance:
    """The server's inotify instance. Its users are :class:`~aether.files.watch.WatchTree`\\ s:
    each keeps its own descriptors and where they are (told through its ``identify``,
    ``place``, ``watches`` and ``take_descriptors``); this keeps which users each descriptor
    has. ``run(fn, *args)`` runs blocking work in the thread pool."""

    def __init__(self, run: Callable[..., Awaitable], max_dirs: int = MAX_WATCHED_DIRS):
        self._run = run
        self.max_dirs = max_dirs
        self.fd: int | None = None
        self.users: dict[int, set[WatchTree]] = {}
        self.trees: set[WatchTree] = set()
        self._lock = asyncio.Lock()  # one scan at a time
        self._scanning = False
        self._dead: set[int] = set()  # removed while a scan was running
        self._orphans: dict[int, list[Event]] = {}
        self._orphan_count = 0

    async def watch(self, tree: WatchTree, rel: str, parent: int | None, report: bool) -> Scan:
        """Watch directory ``rel`` of ``tree``, and below it when the tree is recursive: the
        top (``""``, ``parent`` None), or an entry of directory ``parent`` (a descriptor of the
        tree), where it is placed whatever is renamed while the scan runs. OSError when that
        directory cannot be watched."""
        async with self._lock:
            # The budget is taken after the last scan has added its own: scans that ran side
            # by side would each see all of it.
            if tree.closed:
                return Scan([], [], False, tree.ident)
            if self.fd is None:
                self.fd = init()
                asyncio.get_running_loop().add_reader(self.fd, self._readable)
            self.trees.add(tree)
            budget = self.max_dirs - len(self.users)
            self._scanning = True
            try:
                found = await self._run(
                    scan,
                    self.fd,
                    tree.real,
                    tree.ident,
                    rel,
                    tree.recursive,
                    frozenset(self.users),
                    budget,
                    report,
                )
                if self.fd is None:
                    raise OSError(errno.EBADF, "the inotify instance was closed")
                tree.identify(found.ident)
                self._register(tree, parent, found.dirs)
            finally:
                self._scanning = False
                self._dead.clear()
                self._orphans.clear()
                self._orphan_count = 0
                self._close_if_idle()
            return found

    def release(self, tree: WatchTree, wds: list[int]) -> None:
        """``tree`` no longer uses ``wds``; those no one uses are removed."""
        for wd in wds:
            users = self.users.get(wd)
            if users is None:
                continue
            users.discard(tree)
            if not users:
                del self.users[wd]
                if self._scanning:
                    self._dead.add(wd)
                assert self.fd is not None  # open while any descriptor has a user
                rm_watch(self.fd, wd)

    def remove(self, tree: WatchTree) -> None:
        self.trees.discard(tree)
        self.release(tree, tree.take_descriptors())
        self._close_if_idle()

    def _register(self, tree: WatchTree, parent: int | None, dirs: list[tuple[str, int, int]]) -> None:
        fd = self.fd
        assert fd is not None  # watch, the one caller, has checked
        placed: list[int | None] = []  # each scanned directory's descriptor as registered
        orphans = False
        for rel, wd, up in dirs:
            holder = parent if up < 0 else placed[up]
            if tree.closed or (up >= 0 and holder is None) or (holder is not None and not tree.watches(holder)):
                # Ended meanwhile, or its parent is no longer in the tree: not watched here.
                placed.append(None)
                if wd not in self.users and wd not in self._dead:
                    rm_watch(fd, wd)
                continue
            if wd in self._dead:  # removed by another user while this scan ran: watch again
                try:
                    wd = add_watch_below(fd, tree.real, tree.ident, rel)
                except OSError:
                    placed.append(None)
                    continue
            placed.append(wd)
            self.users.setdefault(wd, set()).add(tree)
            tree.place(wd, holder, rel.rpartition("/")[2] if holder is not None else "")
            for event in self._orphans.pop(wd, ()):
                orphans = True
                self._dispatch(event)
        if orphans:
            tree.end_batch()

    def _readable(self) -> None:
        touched: dict[WatchTree, None] = {}
        room = READ_BYTES
        # Read again at once while there is room: what follows a change within microseconds
        # (a file's first write after its creation) is then told with it.
        while room >= _MIN_READ and self.fd is not None:
            try:
                buffer = os.read(self.fd, room)
            except BlockingIOError:
                break
            if not buffer:
                break
            room -= len(buffer)
            for event in parse(buffer):
                touched.update(dict.fromkeys(self._dispatch(event)))
        for tree in touched:
            tree.end_batch()
        self._close_if_idle()

    def _dispatch(self, event: Event) -> list[WatchTree]:
        if event.mask & IN_Q_OVERFLOW:
            for tree in list(self.trees):
                tree.overflow()
            return []
        users = self.users.get(event.wd)
        if users is None:
            # A descriptor a scan has added but not handed back yet (or one just removed).
            if self._scanning and self._orphan_count < _MAX_ORPHANS:
                self._orphans.setdefault(event.wd, []).append(event)
                self._orphan_count += 1
            return []
        if event.mask & IN_IGNORED:
            del self.users[event.wd]
            for tree in list(users):
                tree.forget(event.wd)
            return []
        trees = list(users)
        for tree in trees:
            if tree.watches(event.wd) and not tree.closed:  # an earlier one may have ended it
                tree.on_event(event)
        return trees

    def _close_if_idle(self) -> None:
        if self.fd is not None and not self.users and not self._scanning:
            asyncio.get_running_loop().remove_reader(self.fd)
            os.close(self.fd)
            self.fd = None

    def close(self) -> None:
        """At shutdown: end every watch and close the instance."""
        for tree in list(self.trees):
            tree.close()
        self.trees.clear()
        self.users.clear()
        if self.fd is not None:
            asyncio.get_running_loop().remove_reader(self.fd)
            os.close(self.fd)
            self.fd = None
