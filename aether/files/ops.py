"""The operations of the ``files`` channel on names, as blocking functions over a workspace
root: ``list``, ``stat``, ``mkdir``, ``delete``, ``rename``; reading and writing content are
``reading`` and ``writing``. Here too: the error for an OSError, and the entry of a name.

Each takes the root (absolute and resolved) and the client's path, confines the path first
(see ``paths``), and returns what the reply needs or raises :class:`FileError` whose message
names the path and the cause. None of them knows of asyncio: the channel runs them in a
thread pool.
"""

from __future__ import annotations

import errno
import heapq
import os
import shutil
import stat as stat_
from typing import Optional

from aether.files import FileError
from aether.files.libc import rename_noreplace
from aether.files.paths import resolve

#: Entries a ``list`` returns at most; a larger directory is ``too_large``. Its replies are
#: built whole before the first is sent (100 bytes or more an entry as JSON), and held while
#: the client reads them.
MAX_LIST_ENTRIES = 100_000
#: Entries sorted, or freed, in one step of C: a few milliseconds.
_SORT_RUN = 4096

_CODES = {
    errno.ENOENT: "not_found", errno.ENOTDIR: "not_a_directory", errno.EISDIR: "is_a_directory",
    errno.EEXIST: "exists", errno.ENOTEMPTY: "not_empty", errno.EINVAL: "invalid",
    errno.ENAMETOOLONG: "invalid", errno.ELOOP: "invalid", errno.EACCES: "forbidden",
    errno.EPERM: "forbidden", errno.EROFS: "forbidden", errno.EFBIG: "too_large",
}
_KINDS = {stat_.S_IFDIR: "directory", stat_.S_IFREG: "file", stat_.S_IFLNK: "symlink"}


def os_error(exc: OSError, path: str, what: Optional[str] = None) -> FileError:
    """The FileError for an OSError on the client's ``path`` (``what`` names it in the
    message, when not the path alone)."""
    return FileError(_CODES.get(exc.errno, "io"), path, f"{what or path}: {exc.strerror or exc}")


def entry(name: str, path: str, st: os.stat_result) -> dict:
    """One ``list`` entry (or ``stat`` body) from an lstat result."""
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
            info["target"] = os.readlink(path)
        except OSError:
            info["target"] = None
    return info


def list_dir(root: str, path: str) -> tuple[str, list[dict]]:
    """The directory's rel path and its entries sorted by name (links not followed);
    ``too_large`` past ``MAX_LIST_ENTRIES``."""
    target = resolve(root, path)
    entries = []
    try:
        with os.scandir(target.path) as it:
            for item in it:
                if len(entries) == MAX_LIST_ENTRIES:
                    free(entries)
                    raise FileError(
                        "too_large", path,
                        f"{path}: holds more than {MAX_LIST_ENTRIES} entries, more than a list returns",
                    )
                try:
                    st = item.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # deleted since the directory was read
                entries.append(entry(item.name, item.path, st))
    except OSError as exc:
        raise os_error(exc, path) from None
    return target.rel, _by_name(entries)


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
    target = resolve(root, path, follow=False)
    try:
        st = os.lstat(target.path)
    except OSError as exc:
        raise os_error(exc, path) from None
    return target.rel, entry(os.path.basename(target.rel) or ".", target.path, st)


def mkdir(root: str, path: str, parents: bool = False) -> str:
    """Make the directory (with ``parents``, every missing one on the way); its rel path."""
    target = resolve(root, path, follow=False)
    try:
        if parents:
            os.makedirs(target.path)
        else:
            os.mkdir(target.path)
    except FileExistsError:
        raise FileError("exists", path, f"{path}: already exists") from None
    except FileNotFoundError:
        raise FileError("not_found", path, f"{path}: the parent directory does not exist (parents makes it)") from None
    except OSError as exc:
        raise os_error(exc, path) from None
    return target.rel


def delete(root: str, path: str, recursive: bool = False) -> str:
    """Delete a file, a link (never what it points to) or a directory (``recursive`` when it
    is not empty). The root itself is never deleted."""
    target = resolve(root, path, follow=False)
    if target.path == root:
        raise FileError("forbidden", path, f"{path}: is the workspace root")
    try:
        st = os.lstat(target.path)
        if not stat_.S_ISDIR(st.st_mode):
            os.unlink(target.path)
        elif recursive:
            shutil.rmtree(target.path)  # never follows links; fd-based on Linux
        else:
            os.rmdir(target.path)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileError("not_empty", path, f"{path}: directory not empty (recursive deletes it all)") from None
        raise os_error(exc, path) from None
    return target.rel


def rename(root: str, source: str, dest: str, overwrite: bool = False) -> tuple[str, str]:
    """Move ``source`` to ``dest`` (links themselves, not what they point to); ``exists``
    when ``dest`` is there, unless ``overwrite``."""
    src = resolve(root, source, follow=False)
    dst = resolve(root, dest, follow=False)
    for target, given in ((src, source), (dst, dest)):
        if target.path == root:
            raise FileError("forbidden", given, f"{given}: is the workspace root")
    try:
        os.lstat(src.path)
    except OSError as exc:
        raise os_error(exc, source) from None
    if dst.path.startswith(src.path + "/"):
        raise FileError("invalid", source, f"{source}: cannot move a directory into itself ({dest})")
    try:
        if overwrite:
            os.rename(src.path, dst.path)
        else:
            rename_noreplace(src.path, dst.path)
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise FileError("exists", dest, f"{dest}: already exists (overwrite replaces it)") from None
        if exc.errno == errno.ENOTEMPTY:
            raise FileError("not_empty", dest, f"{dest}: a directory that is not empty cannot be replaced") from None
        if exc.errno == errno.EXDEV:
            raise FileError("io", source, f"{source} -> {dest}: on another file system; copy and delete instead") from None
        raise os_error(exc, source, f"{source} -> {dest}") from None
    return src.rel, dst.rel
