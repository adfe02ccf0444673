"""Writing a file for the ``files`` channel: replaced atomically, or in place at an offset
for an upload in several messages. Blocking: the channel runs it in its thread pool.
"""

from __future__ import annotations

import base64
import binascii
import functools
import os
import stat as stat_
import tempfile
from typing import Optional

from aether.files import FileError
from aether.files.ops import os_error
from aether.files.paths import Target, resolve


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    # os.umask can only be read by setting it, which races with other threads; the kernel
    # shows it in /proc (Linux 4.7+).
    try:
        with open("/proc/self/status") as status:
            return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError):
        return 0o022


def decode_content(content: str, encoding: str, path: str) -> bytes:
    """A ``write``'s bytes: ``content`` as UTF-8, or decoded from base64."""
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
    place, for uploads in several messages; an offset past the end is refused, and so is a file
    with other hard links (they may be outside the root, and would change too).
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
    if st is None and path.endswith("/"):
        raise FileError("invalid", path, f"{path}: a path ending in / names a directory, not a file")
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
            if os.fstat(fd).st_nlink > 1:  # of the file opened, not the one stat'ed before
                raise FileError(
                    "forbidden", path,
                    f"{path}: has other hard links, which may be outside the workspace root; write it whole (without offset) instead",
                )
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
            if old is not None and (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
                try:
                    os.fchown(fd, old.st_uid, old.st_gid)
                except OSError:
                    pass  # not ours to give away: the file becomes the server user's
            # After the chown, which clears the setuid and setgid bits.
            os.fchmod(fd, stat_.S_IMODE(old.st_mode) if old else 0o644 & ~_umask())
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
