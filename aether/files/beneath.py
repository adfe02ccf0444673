"""Paths resolved beneath the workspace root by the kernel, and descriptors to act on.

:class:`Root` opens the root (no symbolic link on its path: it was resolved when the server
started) and resolves a client's path from that descriptor with ``openat2(2)`` and
``RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS``: the kernel follows links and ``..`` as it always
does, but fails (EXDEV) any step that would leave the root, at the moment of the lookup. The
operations then act on what it opened: the file itself, or the directory holding a name
(``unlinkat``, ``mkdirat``, ``renameat2``, ``fstatat``, ``openat`` through ``dir_fd``). So a
directory swapped for a link to the outside between two steps cannot carry one outside: each
starts from the root again, and each step is checked by the kernel.

Where there is no openat2 (Linux before 5.6, or a seccomp filter that refuses it;
``AETHER_FILES_NO_OPENAT2=1`` forces this, for tests), and for what ``RESOLVE_BENEATH``
refuses outright though the workspace allows it, the path is walked here one component at a
time, each opened with ``O_NOFOLLOW`` relative to the directory before it. A link is read and
its target walked the same way (an absolute one only when it names the root or below it), a
``..`` goes back to the directory the walk came from, and none goes above the root. The walk
also runs for a client path holding ``..``: it names where the path led for the reply. Either
way the kernel never follows a link the walk has not looked at.

``RESOLVE_BENEATH`` refuses absolute links (EXDEV) and magic links such as ``/proc/self/fd/N``
(ELOOP), and a lookup of ``..`` that races a rename fails with EAGAIN: the first two go to the
walk (which follows the first when it stays inside and treats the second as the name it
reads), the last is tried again (``_RETRIES``), then walked.
"""

from __future__ import annotations

import errno
import logging
import os
import stat as stat_
import threading
from typing import NamedTuple

from aether.files import FileError, libc
from aether.files.paths import Parsed, escape, inside, parse

#: Links a path may go through, as the kernel allows (MAXSYMLINKS): past it, ELOOP.
MAX_LINKS = 40
#: openat2 tries on EAGAIN (a rename racing a ``..``) before the walk takes over.
_RETRIES = 3

_BENEATH = libc.RESOLVE_BENEATH | libc.RESOLVE_NO_MAGICLINKS
_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC

log = logging.getLogger("aether.files")

#: Whether openat2 is used: None until first asked.
OPENAT2: bool | None = None
_probing = threading.Lock()  # file operations run in executor threads: one probe, one log line


def has_openat2() -> bool:
    global OPENAT2
    if OPENAT2 is not None:
        return OPENAT2
    with _probing:
        if OPENAT2 is not None:
            return OPENAT2
        why = None
        from aether.settings import sources

        if sources.value("files_no_openat2"):
            why = "AETHER_FILES_NO_OPENAT2=1"
        else:
            try:
                os.close(libc.openat2(libc.AT_FDCWD, "/", _PATH_DIR, 0))
            except OSError as exc:  # ENOSYS; EPERM from a seccomp filter that does not know it
                why = f"openat2: {exc.strerror}"
        OPENAT2 = why is None
        extra = {"resolver": "openat2"} if OPENAT2 else {"resolver": "walk", "why": why}
        # The usual case is news for debugging only; every command that reads a workspace file
        # (``aether ports list`` reads the attribute rules) would print it to a terminal.
        (log.debug if OPENAT2 else log.warning)("files: paths resolved beneath the workspace root", extra=extra)
    return OPENAT2


class Place(NamedTuple):
    """A name beneath the root: ``dirfd``, a descriptor (``O_PATH``) of the directory that
    holds it, and ``name`` in it; ``"."`` for the directory itself. ``rel``: the client's
    path as replies name it. ``fd``: where the walk opened what is there (``O_PATH``), or -1."""

    dirfd: int
    name: str
    rel: str
    fd: int = -1

    def lstat(self) -> os.stat_result:
        return os.stat(self.name, dir_fd=self.dirfd, follow_symlinks=False)


class _Refused(Exception):
    """openat2 would not resolve it (an absolute or magic link, an escape): the walk decides."""


def fd_path(fd: int) -> str:
    """The path the kernel has for ``fd`` now."""
    return os.readlink(f"/proc/self/fd/{fd}")


class Root:
    """The workspace root, open for one operation, and the places resolved beneath it. A
    context manager: the descriptors of places are closed with it; those :meth:`open`
    returns are the caller's."""

    def __init__(self, root: str):
        self.root = root
        self.fd = -1
        self._held: list[int] = []

    def __enter__(self) -> Root:
        self.fd = _open_root(self.root)
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._held:
            os.close(fd)
        self._held.clear()
        os.close(self.fd)
        self.fd = -1

    def _hold(self, fd: int) -> int:
        self._held.append(fd)
        return fd

    # -- what the operations ask ----------------------------------------------------------

    def place(self, path: str, follow: bool = False) -> Place:
        """Where the client's ``path`` is: its directory, opened beneath the root, and the
        last name. With ``follow`` a link in the last place is followed (beneath the root
        too) to the name it leads to, which need not exist. FileError for a path that is
        refused (``forbidden``, ``invalid``, ``not_a_directory`` for ``name/`` on something
        else); OSError as the kernel reports the rest (a directory on the way missing)."""
        parsed = parse(self.root, path, follow)
        place = self._place(parsed, follow, path)
        if parsed.directory:
            self._must_be_directory(place, path)
        return place

    def open(self, path: str, flags: int) -> tuple[int, str]:
        """The client's ``path`` opened with ``flags`` (a link in the last place followed,
        beneath the root), and its rel path; the descriptor is the caller's to close."""
        parsed = parse(self.root, path, True)
        fd, rel = self._open(parsed, flags | os.O_CLOEXEC, path)
        if parsed.directory and not stat_.S_ISDIR(_fstat(fd).st_mode):
            os.close(fd)
            raise _not_a_directory(path)
        return fd, rel

    def makedirs(self, path: str, exist_ok: bool = False, parents_only: bool = False) -> str:
        """Make the directory ``path`` and every one missing on the way (only those on the
        way with ``parents_only``), one level at a time, each with ``mkdirat`` in a
        directory reached beneath the root; its rel path. FileExistsError when it exists,
        unless ``exist_ok``."""
        parsed = parse(self.root, path, False)
        parts = parsed.parts[:-1] if parents_only else parsed.parts
        if parts:
            self._makedirs(parts, path, exist_ok or parents_only)
        elif not exist_ok:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
        return parsed.rel if parsed.rel is not None else self._place(parsed, False, path).rel

    # -- resolving ----------------------------------------------------------------------------

    def _place(self, parsed: Parsed, follow: bool, path: str) -> Place:
        if not parsed.parts:
            return Place(self.fd, ".", ".")
        if parsed.dotdot or not has_openat2():
            return self._walk(parsed, follow, path)
        name = parsed.parts[-1]
        try:
            dirfd = self._hold(self._beneath("/".join(parsed.parts[:-1]) or ".", _PATH_DIR))
        except _Refused:
            return self._walk(parsed, follow, path)
        if follow:
            try:
                st: os.stat_result | None = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and stat_.S_ISLNK(st.st_mode):
                return self._walk(parsed, follow, path)
        return Place(dirfd, name, parsed.rel or ".")

    def _open(self, parsed: Parsed, flags: int, path: str) -> tuple[int, str]:
        if parsed.parts and not parsed.dotdot and has_openat2():
            try:
                return self._beneath("/".join(parsed.parts), flags), parsed.rel or "."
            except _Refused:
                pass
        place = self._walk(parsed, True, path)
        opened = place.dirfd if place.name == "." else place.fd
        if opened < 0:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        # What the walk opened, opened again with the flags asked for: through its
        # descriptor, so it is the same file whatever has been renamed since.
        return os.open(f"/proc/self/fd/{opened}", flags), place.rel

    def _beneath(self, rel: str, flags: int) -> int:
        """openat2 of ``rel`` beneath the root; _Refused where the walk must decide."""
        for _ in range(_RETRIES):
            try:
                return libc.openat2(self.fd, rel, flags, _BENEATH)
            except OSError as exc:
                if exc.errno in (errno.EXDEV, errno.ELOOP):
                    raise _Refused() from None
                if exc.errno != errno.EAGAIN:
                    raise
        raise _Refused()

    def _walk(self, parsed: Parsed, follow: bool, path: str) -> Place:
        """The path resolved one component at a time (see the module's docstring)."""
        stack = [self.fd]  # the directories from the root down to where the walk is
        names: list[str] = []  # their names, for the reply's rel
        todo = [(part, False) for part in reversed(parsed.parts)]  # (component, from a link)
        client_left = len(parsed.parts)
        rel = parsed.rel
        links = 0
        try:
            while todo:
                part, from_link = todo.pop()
                if not from_link:
                    client_left -= 1
                if part == "..":
                    if len(stack) == 1:
                        raise escape(path, from_link)
                    os.close(stack.pop())
                    names.pop()
                    if rel is None and client_left == 0:
                        rel = "/".join(names) or "."
                    continue
                if rel is None and client_left == 0 and not from_link:
                    rel = "/".join([*names, part])
                last = not todo
                if last and not follow:
                    return self._handed(stack, part, rel)
                try:
                    fd = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stack[-1])
                except FileNotFoundError:
                    if last:
                        return self._handed(stack, part, rel)  # a name to create
                    raise
                try:
                    mode = os.fstat(fd).st_mode
                    # Read through the descriptor: the name may be something else by now.
                    target = os.readlink("", dir_fd=fd) if stat_.S_ISLNK(mode) else None
                except BaseException:
                    os.close(fd)
                    raise
                if target is not None:
                    os.close(fd)
                    links += 1
                    if links > MAX_LINKS:
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
                    if target.startswith("/"):
                        if not inside(self.root, target):
                            raise escape(path, True)
                        for held in stack[1:]:
                            os.close(held)
                        del stack[1:], names[:]
                        target = target[len(self.root) :]
                    todo.extend((p, True) for p in reversed(target.split("/")) if p not in ("", "."))
                    continue
                if last:
                    return self._handed(stack, part, rel, fd)
                if not stat_.S_ISDIR(mode):
                    os.close(fd)
                    raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
                stack.append(fd)
                names.append(part)
            return self._handed(stack, ".", rel)
        except BaseException:
            for held in stack[1:]:
                os.close(held)
            raise

    def _handed(self, stack: list[int], name: str, rel: str | None, fd: int = -1) -> Place:
        """The walk's end: the directory it is in, and ``fd`` (what it opened there), are
        held (closed with the root); those above it closed."""
        for held in stack[1:-1]:
            os.close(held)
        if len(stack) > 1:
            self._hold(stack[-1])
        if fd >= 0:
            self._hold(fd)
        return Place(stack[-1], name, rel or ".", fd)

    def _directory(self, parts: tuple[str, ...], path: str) -> int:
        """A descriptor (``O_PATH``, held) of the directory ``parts`` leads to."""
        parsed = Parsed(parts, None if ".." in parts else "/".join(parts) or ".", ".." in parts, False)
        return self._hold(self._open(parsed, _PATH_DIR, path)[0])

    def _makedirs(self, parts: tuple[str, ...], path: str, exist_ok: bool) -> None:
        # The deepest directory on the way that exists, then each missing one made in the
        # one before it.
        have = len(parts) - 1
        while True:
            try:
                dirfd = self._directory(parts[:have], path)
                break
            except FileNotFoundError:
                if have == 0:
                    raise
                have -= 1
        for at in range(have, len(parts)):
            name, last = parts[at], at == len(parts) - 1
            if name == "..":
                dirfd = self._directory(parts[: at + 1], path)
                continue
            try:
                os.mkdir(name, dir_fd=dirfd)
            except FileExistsError:
                if last and not exist_ok:
                    raise
            if last:
                return
            try:
                dirfd = self._hold(os.open(name, _PATH_DIR | os.O_NOFOLLOW, dir_fd=dirfd))
            except OSError:
                # A link there (the client's own, or put there since): followed as the
                # kernel would, beneath the root.
                dirfd = self._directory(parts[: at + 1], path)

    def _must_be_directory(self, place: Place, path: str) -> None:
        """A path ending in ``/`` must be a directory where something is there (as the
        kernel has it); a missing one is left to the operation."""
        try:
            st = place.lstat()
        except OSError:
            return
        if not stat_.S_ISDIR(st.st_mode):
            raise _not_a_directory(path)


def _not_a_directory(path: str) -> FileError:
    return FileError("not_a_directory", path, f"{path}: not a directory (a path ending in / names one)")


def _fstat(fd: int) -> os.stat_result:
    try:
        return os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise


def _open_root(root: str) -> int:
    """The root's descriptor, with no link on its path: the server resolved it when it
    started, so a link there now was put there since (the root renamed away and a link to
    somewhere else put in its place)."""
    try:
        if has_openat2():
            return libc.openat2(libc.AT_FDCWD, root, _PATH_DIR, libc.RESOLVE_NO_SYMLINKS | libc.RESOLVE_NO_MAGICLINKS)
        fd = os.open("/", _PATH_DIR)
        try:
            for part in root.split("/"):
                if part:
                    step = os.open(part, _PATH_DIR | os.O_NOFOLLOW, dir_fd=fd)
                    os.close(fd)
                    fd = step
        except BaseException:
            os.close(fd)
            raise
        return fd
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise FileError("forbidden", None, f"the workspace root {root} has a symbolic link on its path now") from None
        raise FileError("not_found", None, f"the workspace root {root}: {exc.strerror}") from None


def below(dir_fd: int, rel: str, flags: int) -> int:
    """``rel`` opened beneath ``dir_fd`` with ``flags`` and no symbolic link followed on the
    way or at the end: for a path made of names the kernel reported (a watch's directories)."""
    if has_openat2():
        for _ in range(_RETRIES):
            try:
                return libc.openat2(dir_fd, rel, flags | os.O_CLOEXEC, libc.RESOLVE_BENEATH | libc.RESOLVE_NO_SYMLINKS)
            except OSError as exc:
                if exc.errno != errno.EAGAIN:
                    raise
    parts = rel.split("/")
    if ".." in parts:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), rel)
    fd = dir_fd
    try:
        for part in parts[:-1]:
            fd, up = os.open(part, _PATH_DIR | os.O_NOFOLLOW, dir_fd=fd), fd
            if up != dir_fd:
                os.close(up)
        opened = os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    finally:
        if fd != dir_fd:
            os.close(fd)
    return opened
