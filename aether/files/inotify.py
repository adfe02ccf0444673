"""inotify(7) through ctypes, and the server's one inotify instance that every watch shares.

The standard library has no binding and a dependency would be one more thing to build for
three system calls; each raises OSError with the kernel's errno.

:class:`Instance` is opened for the first watched directory and closed after the last, and read
on the event loop. inotify watches directories one at a time, so a recursive watch adds one
per subdirectory: :func:`scan` walks a tree and adds them, in the thread pool. Events that
arrive for a descriptor a scan has not handed back yet are kept until it has. Users watching
the same directory share its descriptor (the kernel gives the same one), counted once against
the server's limit, and removed when the last lets go.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import struct
from typing import TYPE_CHECKING, Awaitable, Callable, NamedTuple, Optional, Union

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
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000

#: What a directory watch asks for: its entries' changes and its own end. Only directories
#: (IN_ONLYDIR), never through a link (IN_DONT_FOLLOW), and nothing about files already
#: unlinked but still open (IN_EXCL_UNLINK).
DIRECTORY_MASK = (
    IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
    | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW | IN_EXCL_UNLINK
)

_HEADER = struct.Struct("=iIII")  # wd, mask, cookie, len: struct inotify_event
#: Room for many events per read; any single event fits (header + NAME_MAX + 1).
READ_BYTES = 64 << 10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]


class Event(NamedTuple):
    wd: int
    mask: int
    cookie: int
    name: bytes  # b"" for an event on the watched directory itself


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), what)
    return result


def init() -> int:
    """A new inotify instance: non-blocking, closed on exec."""
    return _check(_libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC), "inotify_init1")


def add_watch(fd: int, path: Union[str, bytes], mask: int = DIRECTORY_MASK) -> int:
    """The watch descriptor for ``path``; the same one again for a directory already watched."""
    return _check(_libc.inotify_add_watch(fd, os.fsencode(path), mask), os.fsdecode(path))


def rm_watch(fd: int, wd: int) -> None:
    """Remove a watch; one the kernel removed already (its directory went) is no error."""
    if _libc.inotify_rm_watch(fd, wd) < 0 and ctypes.get_errno() != errno.EINVAL:
        _check(-1, "inotify_rm_watch")


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


def read_events(fd: int, max_reads: int = 16) -> list[Event]:
    """What is queued, up to ``max_reads`` reads, so one wake-up stays short; the rest waits
    for the next."""
    events: list[Event] = []
    for _ in range(max_reads):
        try:
            buffer = os.read(fd, READ_BYTES)
        except BlockingIOError:
            break
        if not buffer:
            break
        events.extend(parse(buffer))
    return events


#: Directories watched at once by the whole server (each one a kernel watch).
MAX_WATCHED_DIRS = 10_000
_MAX_ORPHANS = 10_000


class Scan(NamedTuple):
    dirs: list[tuple[str, int]]  # (path in the tree, watch descriptor)
    entries: list[tuple[str, str]]  # (path in the tree, kind) of what was found, when asked
    truncated: bool  # stopped at the directory limit


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def scan(fd: int, top: str, rel: str, recursive: bool, known: frozenset, budget: int, report: bool) -> Scan:
    """Watch ``top`` and, when ``recursive``, every directory below it (links not followed),
    adding at most ``budget`` descriptors not in ``known``. Blocking: runs in the pool.
    OSError when ``top`` itself cannot be watched."""
    dirs: list[tuple[str, int]] = []
    entries: list[tuple[str, str]] = []
    added = 0
    stack = [(top, rel)]
    while stack:
        path, r = stack.pop()
        try:
            wd = add_watch(fd, path)
        except OSError as exc:
            if path == top and not dirs:
                raise
            if exc.errno == errno.ENOSPC:
                return Scan(dirs, entries, True)
            continue  # gone or unreadable since it was listed
        if wd not in known:
            added += 1
            if added > budget:
                rm_watch(fd, wd)
                return Scan(dirs, entries, True)
        dirs.append((r, wd))
        if not recursive:
            break
        try:
            with os.scandir(path) as it:
                for item in it:
                    child = _join(r, item.name)
                    is_dir = item.is_dir(follow_symlinks=False)
                    if report:
                        entries.append((child, "directory" if is_dir else "file"))
                    if is_dir:
                        stack.append((item.path, child))
        except OSError:
            continue
    return Scan(dirs, entries, False)


class Instance:
    """The server's inotify instance. Its users are :class:`~aether.files.watch.WatchTree`\\ s:
    each keeps its own descriptor -> path map (``dirs``); this keeps which users each
    descriptor has. ``run(fn, *args)`` runs blocking work in the thread pool."""

    def __init__(self, run: Callable[..., Awaitable], max_dirs: int = MAX_WATCHED_DIRS):
        self._run = run
        self.max_dirs = max_dirs
        self.fd: Optional[int] = None
        self.users: dict[int, set["WatchTree"]] = {}
        self.trees: set["WatchTree"] = set()
        self._scans = 0
        self._dead: set[int] = set()  # removed while a scan was running
        self._orphans: dict[int, list[Event]] = {}
        self._orphan_count = 0

    async def watch(self, tree: "WatchTree", rel: str, report: bool) -> Scan:
        """Watch ``rel`` in ``tree`` (and below it when the tree is recursive). OSError when
        that directory cannot be watched."""
        if self.fd is None:
            self.fd = init()
            asyncio.get_running_loop().add_reader(self.fd, self._readable)
        if not tree.closed:
            self.trees.add(tree)
        top = os.path.join(tree.real, rel) if rel else tree.real
        budget = self.max_dirs - len(self.users)
        self._scans += 1
        try:
            found = await self._run(scan, self.fd, top, rel, tree.recursive, frozenset(self.users), budget, report)
        except BaseException:
            self._scans -= 1
            self._settle()
            raise
        self._scans -= 1
        if self.fd is None:
            raise OSError(errno.EBADF, "the inotify instance was closed")
        if tree.closed:
            for _rel, wd in found.dirs:
                if wd not in self.users:
                    rm_watch(self.fd, wd)
        else:
            self._register(tree, found.dirs)
        self._settle()
        return found

    def release(self, tree: "WatchTree", wds: list[int]) -> None:
        """``tree`` no longer uses ``wds``; those no one uses are removed."""
        for wd in wds:
            users = self.users.get(wd)
            if users is None:
                continue
            users.discard(tree)
            if not users:
                del self.users[wd]
                if self._scans:
                    self._dead.add(wd)
                rm_watch(self.fd, wd)

    def remove(self, tree: "WatchTree") -> None:
        self.trees.discard(tree)
        self.release(tree, list(tree.dirs))
        tree.dirs.clear()
        self._close_if_idle()

    def _register(self, tree: "WatchTree", dirs: list[tuple[str, int]]) -> None:
        for rel, wd in dirs:
            if wd in self._dead:  # removed by another user while this scan ran: watch again
                try:
                    wd = add_watch(self.fd, os.path.join(tree.real, rel) if rel else tree.real)
                except OSError:
                    continue
            self.users.setdefault(wd, set()).add(tree)
            tree.dirs[wd] = rel
            orphans = self._orphans.pop(wd, ())
            for event in orphans:
                self._dispatch(event)
            if orphans:
                tree.end_batch()

    def _readable(self) -> None:
        touched: dict["WatchTree", None] = {}
        for event in read_events(self.fd):
            touched.update(dict.fromkeys(self._dispatch(event)))
        for tree in touched:
            tree.end_batch()
        self._close_if_idle()

    def _dispatch(self, event: Event) -> list["WatchTree"]:
        if event.mask & IN_Q_OVERFLOW:
            for tree in list(self.trees):
                tree.overflow()
            return []
        users = self.users.get(event.wd)
        if users is None:
            # A descriptor a scan has added but not handed back yet (or one just removed).
            if self._scans and self._orphan_count < _MAX_ORPHANS:
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
            rel = tree.dirs.get(event.wd)
            if rel is not None and not tree.closed:  # an earlier one may have ended it
                tree.on_event(rel, event)
        return trees

    def _settle(self) -> None:
        if not self._scans:
            self._dead.clear()
            self._orphans.clear()
            self._orphan_count = 0
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        if self.fd is not None and not self.users and not self._scans:
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
