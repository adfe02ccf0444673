"""Writing a file for the ``files`` channel: replaced atomically, or in place at an offset
for an upload in several messages. Blocking: the channel runs it in its thread pool.
"""

from __future__ import annotations

import base64
import binascii
import errno
import functools
import os
import secrets
import stat as stat_

from aether.files import FileError
from aether.files.beneath import Place, Root
from aether.files.paths import os_error

#: Names tried for a temporary file before giving up (each random: another taken is rare).
_TEMP_TRIES = 100


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


def _write_all(fd: int, data: bytes, offset: int | None = None) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[n:]
        if offset is not None:
            offset += n


def write(root: str, path: str, data: bytes, offset: int | None = None, create_parents: bool = False) -> tuple[str, int]:
    """Write ``data``; the rel path and the bytes written.

    Without ``offset`` (or at 0 on a file that does not exist) the file is replaced atomically:
    a temporary file beside it, fsync'ed, then renamed over it, with the old file's mode (a new
    file gets 0644 less the umask). With ``offset`` the bytes go into the existing file in
    place, for uploads in several messages; an offset past the end is refused, and so is a file
    with other hard links (they may be outside the root, and would change too).

    The temporary file is made, renamed and (on failure) removed in the directory's
    descriptor, so it stays in the directory the path was resolved to, whatever is renamed.
    """
    try:
        with Root(root) as beneath:
            try:
                place = beneath.place(path, follow=True)  # a link inside the root is written through
            except FileNotFoundError:
                if not create_parents:
                    raise FileError(
                        "not_found", path, f"{path}: the parent directory does not exist (createParents makes it)"
                    ) from None
                beneath.makedirs(path, parents_only=True)
                place = beneath.place(path, follow=True)
            try:
                st: os.stat_result | None = place.lstat()
            except FileNotFoundError:
                st = None
            if st is not None and stat_.S_ISDIR(st.st_mode):
                raise FileError("is_a_directory", path, f"{path}: is a directory")
            if st is not None and not stat_.S_ISREG(st.st_mode):
                raise FileError("invalid", path, f"{path}: not a regular file")
            if st is None and path.endswith("/"):
                raise FileError("invalid", path, f"{path}: a path ending in / names a directory, not a file")
            if offset is not None and (offset > 0 or st is not None):
                return place.rel, _write_at(place, path, data, offset)
            _replace(place, data, st)
            return place.rel, len(data)
    except OSError as exc:
        raise os_error(exc, path) from None


def _write_at(place: Place, path: str, data: bytes, offset: int) -> int:
    try:
        # O_NONBLOCK: what is there now may be a FIFO put in its place, not to be waited on.
        fd = os.open(place.name, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=place.dirfd)
    except FileNotFoundError:
        raise FileError("not_found", path, f"{path}: no such file (a write with offset goes into an existing file)") from None
    try:
        st = os.fstat(fd)  # of the file opened, not the one stat'ed before
        if not stat_.S_ISREG(st.st_mode):
            raise FileError("invalid", path, f"{path}: not a regular file")
        if st.st_nlink > 1:
            raise FileError(
                "forbidden",
                path,
                f"{path}: has other hard links, which may be outside the workspace root; write it whole (without offset) instead",
            )
        if offset > st.st_size:
            raise FileError("invalid", path, f"{path}: offset {offset} is past the end of the file ({st.st_size} bytes)")
        _write_all(fd, data, offset)
    finally:
        os.close(fd)
    return len(data)


def _temporary(dir_fd: int) -> tuple[int, str]:
    """A new file, open for writing (mode 0600), in directory ``dir_fd``, and its name."""
    for _ in range(_TEMP_TRIES):
        name = f".aether-write-{secrets.token_hex(6)}.tmp"
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            return os.open(name, flags, 0o600, dir_fd=dir_fd), name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", ".aether-write-*.tmp")


def _replace(place: Place, data: bytes, old: os.stat_result | None) -> None:
    fd, temp = _temporary(place.dirfd)
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
        os.replace(temp, place.name, src_dir_fd=place.dirfd, dst_dir_fd=place.dirfd)
    except BaseException:
        try:
            os.unlink(temp, dir_fd=place.dirfd)
        except OSError:
            pass
        raise
    _fsync_dir(place.dirfd)


def _fsync_dir(dir_fd: int) -> None:
    # So the rename survives a crash too; a file system that cannot do it is no error.
    try:
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
