"""The C library calls the ``files`` package needs and the standard library lacks, through
ctypes: inotify(7), openat2(2) for resolving a path beneath a directory, and renameat2(2) for
a rename that never replaces.

A dependency would be one more thing to build for five system calls. Each wrapper raises
OSError with the kernel's errno.
"""

from __future__ import annotations

import ctypes
import errno
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
# glibc has had it since 2.28; older ones fall back to a check before rename(2).
_renameat2 = getattr(_libc, "renameat2", None)
if _renameat2 is not None:
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]

# syscall(2) as openat2 takes it: with the types declared, a call costs ~1 us less.
_openat2 = _libc.syscall
_openat2.restype = ctypes.c_long
_openat2.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]

AT_FDCWD = -100
_RENAME_NOREPLACE = 1
#: openat2's number is the same on every architecture (system calls added since Linux 5.1
#: share one table); glibc has no wrapper for it.
_SYS_OPENAT2 = 437
# <linux/openat2.h>
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


# One struct per (flags, resolve), kept with its address: the kernel only reads it, so
# threads may share them.
_hows: dict[tuple[int, int], tuple[_OpenHow, int]] = {}
_HOW_SIZE = ctypes.sizeof(_OpenHow)


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), what)
    return result


def inotify_init() -> int:
    """A new inotify instance: non-blocking, closed on exec."""
    return _check(_libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC), "inotify_init1")


def inotify_add_watch(fd: int, path: str | bytes, mask: int) -> int:
    """The watch descriptor for ``path``; the same one again for a directory already watched."""
    wd = _libc.inotify_add_watch(fd, os.fsencode(path), mask)
    return wd if wd >= 0 else _check(wd, os.fsdecode(path))


def inotify_rm_watch(fd: int, wd: int) -> None:
    """Remove a watch; one the kernel removed already (its directory went) is no error."""
    if _libc.inotify_rm_watch(fd, wd) < 0 and ctypes.get_errno() != errno.EINVAL:
        _check(-1, "inotify_rm_watch")


def openat2(dir_fd: int, path: str, flags: int, resolve: int) -> int:
    """openat2(2): ``path`` opened relative to ``dir_fd`` with ``flags`` (never O_CREAT: no
    mode is passed), resolved under the ``RESOLVE_*`` rules in ``resolve``. OSError ENOSYS
    where the kernel has no openat2 (before 5.6)."""
    held = _hows.get((flags, resolve))
    if held is None:
        how = _OpenHow(flags, 0, resolve)
        held = _hows.setdefault((flags, resolve), (how, ctypes.addressof(how)))
    encoded = os.fsencode(path)
    while True:
        fd = _openat2(_SYS_OPENAT2, dir_fd, encoded, held[1], _HOW_SIZE)
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err), path)


def rename_noreplace(source_dir: int, source: str, dest_dir: int, dest: str) -> None:
    """renameat(2) of ``source`` in directory ``source_dir`` to ``dest`` in ``dest_dir`` that
    fails with EEXIST instead of replacing, atomically where the file system supports it
    (renameat2), else checked just before."""
    if _renameat2 is not None:
        if _renameat2(source_dir, os.fsencode(source), dest_dir, os.fsencode(dest), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), source)
        # EINVAL is also the kernel's answer to moving a directory into itself: the plain
        # rename below gives it again.
    try:
        os.stat(dest, dir_fd=dest_dir, follow_symlinks=False)
    except FileNotFoundError:
        os.rename(source, dest, src_dir_fd=source_dir, dst_dir_fd=dest_dir)
    else:
        raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), dest)
