"""The operations of the ``files`` channel on names, as blocking functions over a workspace
root: ``list``, ``stat``, ``mkdir``, ``delete``, ``rename``; reading and writing content are
``reading`` and ``writing``. Here too: the entry of a name.

Each takes the root (absolute and resolved) and the client's path, resolves the path beneath
the root (see ``paths`` and ``beneath``) and acts on the descriptors that gave, and returns
what the reply needs or raises :class:`FileError` whose message names the path and the cause.
None of them knows of asyncio: the channel runs them in a thread pool.
"""

from __future__ import annotations

import errno
import heapq
import os
import stat as stat_

from aether.files import FileError
from aether.files.beneath import Root
from aether.files.libc import rename_noreplace
from aether.files.paths import os_error

#: Entries a ``list`` returns at most; a larger directory is ``too_large``. Its replies are
#: built whole before the first is sent (100 bytes or more an entry as JSON), and held while
#: the client reads them.
MAX_LIST_ENTRIES = 100_000
#: Entries sorted, or freed, in one step of C: a few milliseconds.
_SORT_RUN = 4096

_KINDS = {stat_.S_IFDIR: "directory", stat_.S_IFREG: "file", stat_.S_IFLNK: "symlink"}


def entry(name: str, st: os.stat_result, dir_fd: int) -> dict:
    """One ``list`` entry (or ``stat`` body) from an lstat result of ``name`` in ``dir_fd``."""
    kind = _KINDS.get(stat_.S_IFMT(st.st_mode), "other")
    info = {
        "name": name,
        "type": kind,
        "size": st.st_size,
        "mtime": st.st_mtime_ns // 1_000_000,
        "mode": format(stat_.S_IMODE(st.st_mode), "04o"),
    }
    if kind == "symlink":
        try:
            info["target"] = os.readlink(name, dir_fd=dir_fd)
        except OSError:
            info["target"] = None
    return info


def list_dir(root: str, path: str) -> tuple[str, list[dict]]:
    """The directory's rel path and its entries sorted by name (links not followed);
    ``too_large`` past ``MAX_LIST_ENTRIES``."""
    entries: list[dict] = []
    try:
        with Root(root) as beneath:
            fd, rel = beneath.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with os.scandir(fd) as it:
                for item in it:
                    if len(entries) == MAX_LIST_ENTRIES:
                        free(entries)
                        raise FileError(
                            "too_large",
                            path,
                            f"{path}: holds more than {MAX_LIST_ENTRIES} entries, more than a list returns",
                        )
                    try:
                        st = item.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # deleted since the directory was read
                    entries.append(entry(item.name, st, fd))
        finally:
            os.close(fd)
    except OSError as exc:
        raise os_error(exc, path) from None
    return rel, _by_name(entries)


def free(items: list) -> None:
    """Empty ``items`` a run at a time: freeing 100,000 entries at once is ~50 ms of C in
    which no other thread, the event loop's included, gets the interpreter lock."""
    while items:
        del items[-_SORT_RUN:]


def _name(entry: dict) -> str:
    return entry["name"]


def _by_name(entries: list[dict]) -> list[dict]:
    """``entries`` sorted by name without holding the interpreter lock for long: one sort of
    100,000 names is ~50 ms of C the event loop's thread cannot interrupt, so runs of
    ``_SORT_RUN`` are sorted (a few ms each) and merged in Python, which lets it in."""
    if len(entries) <= _SORT_RUN:
        return sorted(entries, key=_name)
    runs = [sorted(entries[i : i + _SORT_RUN], key=_name) for i in range(0, len(entries), _SORT_RUN)]
    return list(heapq.merge(*runs, key=_name))


def stat(root: str, path: str) -> tuple[str, dict]:
    """The rel path and the ``stat`` body of the name itself (a link is not followed)."""
    try:
        with Root(root) as beneath:
            place = beneath.place(path)
            return place.rel, entry(place.name, place.lstat(), place.dirfd)
    except OSError as exc:
        raise os_error(exc, path) from None


def mkdir(root: str, path: str, parents: bool = False) -> str:
    """Make the directory (with ``parents``, every missing one on the way); its rel path."""
    try:
        with Root(root) as beneath:
            if parents:
                return beneath.makedirs(path)
            place = beneath.place(path)
            os.mkdir(place.name, dir_fd=place.dirfd)
            return place.rel
    except FileExistsError:
        raise FileError("exists", path, f"{path}: already exists") from None
    except FileNotFoundError:
        raise FileError("not_found", path, f"{path}: the parent directory does not exist (parents makes it)") from None
    except OSError as exc:
        raise os_error(exc, path) from None


def delete(root: str, path: str, recursive: bool = False) -> str:
    """Delete a file, a link (never what it points to) or a directory (``recursive`` when it
    is not empty). The root itself is never deleted."""
    try:
        with Root(root) as beneath:
            place = beneath.place(path)
            if place.name == ".":
                raise FileError("forbidden", path, f"{path}: is the workspace root")
            if not stat_.S_ISDIR(place.lstat().st_mode):
                os.unlink(place.name, dir_fd=place.dirfd)
            elif recursive:
                remove_tree(place.dirfd, place.name)
            else:
                os.rmdir(place.name, dir_fd=place.dirfd)
            return place.rel
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileError("not_empty", path, f"{path}: directory not empty (recursive deletes it all)") from None
        raise os_error(exc, path) from None


def rename(root: str, source: str, dest: str, overwrite: bool = False) -> tuple[str, str]:
    """Move ``source`` to ``dest`` (links themselves, not what they point to); ``exists``
    when ``dest`` is there, unless ``overwrite``."""
    with Root(root) as beneath:
        try:
            src = beneath.place(source)
            if src.name == ".":
                raise FileError("forbidden", source, f"{source}: is the workspace root")
            src.lstat()
        except OSError as exc:
            raise os_error(exc, source) from None
        try:
            dst = beneath.place(dest)
        except OSError as exc:
            raise os_error(exc, dest) from None
        if dst.name == ".":
            raise FileError("forbidden", dest, f"{dest}: is the workspace root")
        try:
            if overwrite:
                os.rename(src.name, dst.name, src_dir_fd=src.dirfd, dst_dir_fd=dst.dirfd)
            else:
                rename_noreplace(src.dirfd, src.name, dst.dirfd, dst.name)
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                raise FileError("exists", dest, f"{dest}: already exists (overwrite replaces it)") from None
            if exc.errno == errno.ENOTEMPTY:
                raise FileError("not_empty", dest, f"{dest}: a directory that is not empty cannot be replaced") from None
            if exc.errno == errno.EXDEV:
                raise FileError("io", source, f"{source} -> {dest}: on another file system; copy and delete instead") from None
            if exc.errno == errno.EINVAL:
                raise FileError("invalid", source, f"{source}: cannot move a directory into itself ({dest})") from None
            raise os_error(exc, source, f"{source} -> {dest}") from None
    return src.rel, dst.rel


def remove_tree(dir_fd: int, name: str) -> None:
    """Delete directory ``name`` in ``dir_fd`` and everything in it. Each directory is opened
    relative to the one above it with ``O_NOFOLLOW | O_DIRECTORY``, so what was put in place
    of one meanwhile (a link, a FIFO) is removed as a name and never followed or waited on.
    Each directory is read once, as ``rmtree`` does (what is added to it meanwhile makes it
    ``ENOTEMPTY``); one descriptor a level and no recursion, so a tree as deep as the kernel
    allows fits."""
    stack = [_frame(dir_fd, name)]  # (descriptor, its directory's, its name, subdirectories left)
    try:
        while stack:
            fd, parent, here, left = stack[-1]
            if left:
                sub = left.pop()
                try:
                    stack.append(_frame(fd, sub))
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                        raise
                    os.unlink(sub, dir_fd=fd)  # a link or a file now, in its place
                continue
            stack.pop()
            os.close(fd)
            try:
                os.rmdir(here, dir_fd=parent)
            except FileNotFoundError:
                if not stack:
                    raise
    finally:
        for fd, _parent, _here, _left in stack:
            os.close(fd)


def _frame(dir_fd: int, name: str) -> tuple[int, int, str, list[str]]:
    """Directory ``name`` opened, emptied of all but its subdirectories, and their names."""
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    subdirectories = []
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        subdirectories.append(entry.name)
                    else:
                        os.unlink(entry.name, dir_fd=fd)
                except IsADirectoryError:
                    subdirectories.append(entry.name)  # a directory now, in its place
                except FileNotFoundError:
                    pass
    except BaseException:
        os.close(fd)
        raise
    return fd, dir_fd, name, subdirectories
