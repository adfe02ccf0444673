"""The C library calls the ``files`` package needs and the standard library lacks, through
ctypes: inotify(7), and renameat2(2) for a rename that never replaces.

A dependency would be one more thing to build for four system calls. Each wrapper raises
OSError with the kernel's errno.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Union

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
# glibc has had it since 2.28; older ones fall back to a check before rename(2).
_renameat2 = getattr(_libc, "renameat2", None)
if _renameat2 is not None:
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), what)
    return result


def inotify_init() -> int:
    """A new inotify instance: non-blocking, closed on exec."""
    return _check(_libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC), "inotify_init1")


def inotify_add_watch(fd: int, path: Union[str, bytes], mask: int) -> int:
    """The watch descriptor for ``path``; the same one again for a directory already watched."""
    return _check(_libc.inotify_add_watch(fd, os.fsencode(path), mask), os.fsdecode(path))


def inotify_rm_watch(fd: int, wd: int) -> None:
    """Remove a watch; one the kernel removed already (its directory went) is no error."""
    if _libc.inotify_rm_watch(fd, wd) < 0 and ctypes.get_errno() != errno.EINVAL:
        _check(-1, "inotify_rm_watch")


def rename_noreplace(source: str, dest: str) -> None:
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
