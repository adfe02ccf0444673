"""The file operations of the ``files`` channel, as blocking functions over a workspace root.

Each takes the root (absolute and resolved) and the client's path, confines the path first
(see ``paths``), and returns what the reply needs or raises :class:`FileError` whose message
names the path and the cause. None of them knows of asyncio: the channel runs them in a
thread pool.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import errno
import functools
import os
import shutil
import stat as stat_
import tempfile
from typing import Optional

from aether.files import FileError
from aether.files.paths import Target, resolve

#: Raw bytes per ``read`` message: 256 KiB is ~350 KB as base64, well under the 1 MiB limit.
CHUNK_BYTES = 256 << 10
#: Most a single ``read`` request returns; beyond it the client asks by offset and length.
MAX_READ_BYTES = 64 << 20
#: Upper bound on a chunk's JSON-escaped text; above it the chunk goes as base64 instead.
MAX_TEXT_BYTES = 900_000

_CODES = {
    errno.ENOENT: "not_found", errno.ENOTDIR: "not_a_directory", errno.EISDIR: "is_a_directory",
    errno.EEXIST: "exists", errno.ENOTEMPTY: "not_empty", errno.EINVAL: "invalid",
    errno.ENAMETOOLONG: "invalid", errno.EACCES: "forbidden", errno.EPERM: "forbidden",
    errno.EROFS: "forbidden", errno.EFBIG: "too_large",
}
_KINDS = {stat_.S_IFDIR: "directory", stat_.S_IFREG: "file", stat_.S_IFLNK: "symlink"}
# Control characters other than these five become \u00XX (6 bytes) in JSON.
_SHORT_ESCAPES = b"\b\t\n\f\r"
_LONG_ESCAPES = bytes(c for c in range(32) if c not in _SHORT_ESCAPES)
_SHORT_ESCAPES += b'"\\'


def os_error(exc: OSError, path: str, what: Optional[str] = None) -> FileError:
    """The FileError for an OSError on the client's ``path`` (``what`` names it in the
    message, when not the path alone)."""
    return FileError(_CODES.get(exc.errno, "io"), path, f"{what or path}: {exc.strerror or exc}")


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    # os.umask can only be read by setting it, which races with other threads; the kernel
    # shows it in /proc (Linux 4.7+).
    try:
        with open("/proc/self/status") as status:
            return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError):
        return 0o022


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


# -- reading ---------------------------------------------------------------------------


def list_dir(root: str, path: str) -> tuple[str, list[dict]]:
    """The directory's rel path and its entries sorted by name (links not followed)."""
    target = resolve(root, path)
    entries = []
    try:
        with os.scandir(target.path) as it:
            for item in it:
                try:
                    st = item.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # deleted since the directory was read
                entries.append(entry(item.name, item.path, st))
    except OSError as exc:
        raise os_error(exc, path) from None
    entries.sort(key=lambda e: e["name"])
    return target.rel, entries


def stat(root: str, path: str) -> tuple[str, dict]:
    """The rel path and the ``stat`` body of the name itself (a link is not followed)."""
    target = resolve(root, path, follow=False)
    try:
        st = os.lstat(target.path)
    except OSError as exc:
        raise os_error(exc, path) from None
    return target.rel, entry(os.path.basename(target.rel) or ".", target.path, st)


def json_text_bytes(data: bytes) -> int:
    """An upper bound on the size of UTF-8 ``data`` as a JSON string's content."""
    return (
        len(data)
        + len(data) - len(data.translate(None, _SHORT_ESCAPES))
        + 5 * (len(data) - len(data.translate(None, _LONG_ESCAPES)))
    )


def encode_chunk(data: bytes, final: bool) -> tuple[str, str, int]:
    """``(encoding, content, bytes used)`` for one chunk of a file.

    Strict UTF-8 goes as text. A character cut by the chunk's end (when more follows) is left
    for the next chunk, so ``used`` may be up to 3 bytes short of ``len(data)``. Anything else,
    or text that would escape to more than ``MAX_TEXT_BYTES``, goes as base64, all of it.
    """
    used = len(data)
    try:
        text: Optional[str] = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = None
        # The first error being an incomplete sequence at the very end means all before it
        # is valid.
        cut = exc.start
        if not final and exc.reason == "unexpected end of data" and 0 < cut and cut >= len(data) - 3:
            used = cut
            text = data[:used].decode("utf-8")
    if text is not None and json_text_bytes(data[:used]) <= MAX_TEXT_BYTES:
        return "utf-8", text, used
    return "base64", base64.b64encode(data).decode("ascii"), len(data)


class Reader:
    """An open regular file and the byte range a ``read`` sends of it, chunk by chunk."""

    def __init__(self, root: str, path: str, offset: int = 0, length: Optional[int] = None):
        if length is not None and length > MAX_READ_BYTES:
            raise FileError("too_large", path, f"{path}: a read returns at most {MAX_READ_BYTES >> 20} MiB; ask for less")
        target = resolve(root, path)
        self.rel = target.rel
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer. O_NOFOLLOW: the path is
            # resolved, so a link there now was put there since.
            self.fd = os.open(target.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)
        except OSError as exc:
            raise os_error(exc, path) from None
        try:
            st = os.fstat(self.fd)
            if stat_.S_ISDIR(st.st_mode):
                raise FileError("is_a_directory", path, f"{path}: is a directory; list it instead")
            if not stat_.S_ISREG(st.st_mode):
                raise FileError("invalid", path, f"{path}: not a regular file")
            self.size = st.st_size
            if length is None and self.size - offset > MAX_READ_BYTES:
                raise FileError(
                    "too_large",
                    path,
                    f"{path}: {self.size - offset} bytes from offset {offset} is more than one read "
                    f"returns ({MAX_READ_BYTES >> 20} MiB); read it in parts with offset and length",
                )
        except BaseException:
            os.close(self.fd)
            raise
        self.path = path
        self.offset = offset
        self.end = self.size if length is None else min(self.size, offset + length)

    def next(self) -> dict:
        """The next chunk's message fields; ``eof`` on the last one."""
        start = self.offset
        want = max(0, min(CHUNK_BYTES, self.end - start))
        try:
            data = os.pread(self.fd, want, start) if want else b""
        except OSError as exc:
            raise os_error(exc, self.path) from None
        if len(data) < want:
            self.end = start + len(data)  # the file shrank: stop at its new end
        final = start + len(data) >= self.end
        encoding, content, used = encode_chunk(data, final)
        self.offset = start + used
        return {
            "offset": start,
            "length": used,
            "size": self.size,
            "encoding": encoding,
            "content": content,
            "eof": self.offset >= self.end,
        }

    def close(self) -> None:
        os.close(self.fd)


# -- changing --------------------------------------------------------------------------


def decode_content(content: str, encoding: str, path: str) -> bytes:
    if encoding == "base64":
        try:
            return base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise FileError("invalid", path, f"{path}: content is not valid base64") from None
    try:
        return content.encode("utf-8")
    except UnicodeEncodeError:
        raise FileError("invalid", path, f"{path}: content is not valid Unicode (a lone surrogate)") from None


def _write_all(fd: int, data: bytes, offset: Optional[int] = None) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[n:]
        if offset is not None:
            offset += n


def write(root: str, path: str, data: bytes, offset: Optional[int] = None, create_parents: bool = False) -> tuple[str, int]:
    """Write ``data``; the rel path and the bytes written.

    Without ``offset`` (or at 0 on a file that does not exist) the file is replaced atomically:
    a temporary file beside it, fsync'ed, then renamed over it, with the old file's mode (a new
    file gets 0644 less the umask). With ``offset`` the bytes go into the existing file in
    place, for uploads in several messages; an offset past the end is refused.
    """
    target = resolve(root, path)  # a link inside the root is written through
    try:
        st: Optional[os.stat_result] = os.stat(target.path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise os_error(exc, path) from None
    if st is not None and stat_.S_ISDIR(st.st_mode):
        raise FileError("is_a_directory", path, f"{path}: is a directory")
    if st is not None and not stat_.S_ISREG(st.st_mode):
        raise FileError("invalid", path, f"{path}: not a regular file")
    if offset is not None and (offset > 0 or st is not None):
        return target.rel, _write_at(target, path, data, offset, st)
    parent = os.path.dirname(target.path)
    if not os.path.isdir(parent):
        if not create_parents:
            raise FileError("not_found", path, f"{path}: the parent directory does not exist (createParents makes it)")
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise os_error(exc, path) from None
    _replace(target.path, path, data, st)
    return target.rel, len(data)


def _write_at(target: Target, path: str, data: bytes, offset: int, st: Optional[os.stat_result]) -> int:
    if st is None:
        raise FileError("not_found", path, f"{path}: no such file (a write with offset goes into an existing file)")
    if offset > st.st_size:
        raise FileError("invalid", path, f"{path}: offset {offset} is past the end of the file ({st.st_size} bytes)")
    try:
        fd = os.open(target.path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            _write_all(fd, data, offset)
        finally:
            os.close(fd)
    except OSError as exc:
        raise os_error(exc, path) from None
    return len(data)


def _replace(real: str, path: str, data: bytes, old: Optional[os.stat_result]) -> None:
    parent = os.path.dirname(real)
    try:
        fd, temp = tempfile.mkstemp(prefix=".aether-write-", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise os_error(exc, path) from None
    try:
        try:
            _write_all(fd, data)
            os.fchmod(fd, stat_.S_IMODE(old.st_mode) if old else 0o644 & ~_umask())
            if old is not None and (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
                try:
                    os.fchown(fd, old.st_uid, old.st_gid)
                except OSError:
                    pass  # not ours to give away: the file becomes the server user's
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, real)
    except OSError as exc:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise os_error(exc, path) from None
    _fsync_dir(parent)


def _fsync_dir(path: str) -> None:
    # So the rename survives a crash too; a file system that cannot do it is no error.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def mkdir(root: str, path: str, parents: bool = False) -> str:
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


_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _rename_noreplace(source: str, dest: str) -> None:
    """rename(2) that fails with EEXIST instead of replacing, atomically where the file system
    supports it (renameat2), else checked just before."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(dest), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), source)
    if os.path.lexists(dest):
        raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), dest)
    os.rename(source, dest)


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
            _rename_noreplace(src.path, dst.path)
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise FileError("exists", dest, f"{dest}: already exists (overwrite replaces it)") from None
        if exc.errno == errno.ENOTEMPTY:
            raise FileError("not_empty", dest, f"{dest}: a directory that is not empty cannot be replaced") from None
        if exc.errno == errno.EXDEV:
            raise FileError("io", source, f"{source} -> {dest}: on another file system; copy and delete instead") from None
        raise os_error(exc, source, f"{source} -> {dest}") from None
    return src.rel, dst.rel

