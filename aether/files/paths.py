"""Confinement: a client's path, and where it leads beneath the workspace root.

A client path is relative to the root, or absolute. It is resolved beneath the root as the
kernel resolves a path, ``..`` and symbolic links followed, and must stay at the root or below
it at every step. ``a/../b`` is fine; ``../x``, ``/etc/passwd``, ``link/x`` where ``link``
points outside, and a ``..`` that climbs above the root (even to come back) are
``forbidden``. An absolute path names the root by its resolved path; one that reaches it some
other way (through a link elsewhere) is resolved from ``/`` first, and what it names below the
root is then resolved beneath it like a relative one.

Operations on a name itself (``stat``, ``delete``, ``rename``, ``mkdir``) resolve only the
parent directory and keep the last component as it is (``follow=False``): a link is stat'ed,
deleted or renamed as a link, wherever it points, so such a path must end in a name (not ``.``
or ``..``). Everything that reads or writes content, or lists or watches a directory, follows
the last component too, so a link leading out is refused there.

The kernel holds the boundary (``beneath``): every operation starts from a descriptor of the
root and resolves the path with ``openat2(RESOLVE_BENEATH)``, or one component at a time with
``O_NOFOLLOW``, and acts on what that opened, so a directory swapped for a link to the outside
between two steps can no longer lead an operation there. This module is the part without
descriptors: what the client's path says, and the error for an OSError on it.

A hard link cannot be told from any other file: one to a file outside the root is read like
any file. An atomic write replaces the name with a new file, leaving the other one alone;
``writing`` refuses in-place writes to a file with more than one link. The client holding the
token also has the ``terminal`` channel, a shell that can go anywhere, so this guards against
mistakes and hostile links and processes in the tree, not against the token's holder.
"""

from __future__ import annotations

import dataclasses
import errno
import os

from aether.files import FileError

_CODES: dict[int | None, str] = {  # keyed by OSError.errno, which may be None
    errno.ENOENT: "not_found",
    errno.ENOTDIR: "not_a_directory",
    errno.EISDIR: "is_a_directory",
    errno.EEXIST: "exists",
    errno.ENOTEMPTY: "not_empty",
    errno.EINVAL: "invalid",
    errno.ENAMETOOLONG: "invalid",
    errno.ELOOP: "invalid",
    errno.ENXIO: "invalid",
    errno.EACCES: "forbidden",
    errno.EPERM: "forbidden",
    errno.EROFS: "forbidden",
    errno.EXDEV: "forbidden",
    errno.EFBIG: "too_large",
}


def os_error(exc: OSError, path: str, what: str | None = None) -> FileError:
    """The FileError for an OSError on the client's ``path`` (``what`` names it in the
    message, when not the path alone)."""
    return FileError(_CODES.get(exc.errno, "io"), path, f"{what or path}: {exc.strerror or exc}")


@dataclasses.dataclass(frozen=True)
class Target:
    """``path``: the absolute path it led to when resolved. ``rel``: the path as replies name it."""

    path: str
    rel: str


@dataclasses.dataclass(frozen=True)
class Parsed:
    """What a client's path asks for, before anything is opened.

    ``parts``: the components below the root (``.`` and empty ones dropped; ``..`` kept, and
    then ``dotdot``). ``rel``: the path as replies name it, normalised; None when it holds
    ``..``, whose meaning the links before it decide: the walk names where it led.
    ``directory``: it ends in ``/``, so what is there must be a directory."""

    parts: tuple[str, ...]
    rel: str | None
    dotdot: bool
    directory: bool


def inside(root: str, path: str) -> bool:
    """Whether absolute ``path`` is ``root`` or below it, by name."""
    if path == root:
        return True
    return path.startswith(root if root.endswith("/") else root + "/")


def relative(root: str, path: str) -> str:
    """``path`` (inside ``root``) relative to it in POSIX form; ``.`` for the root."""
    return os.path.relpath(path, root)


def escape(path: str, by_link: bool) -> FileError:
    why = "a symbolic link on the way leads outside the workspace root" if by_link else "outside the workspace root"
    return FileError("forbidden", path, f"{path}: {why}")


def parse(root: str, path: str, follow: bool) -> Parsed:
    """The client's ``path`` below ``root``, or FileError: ``invalid`` for a name that is no
    file name (a lone surrogate, a NUL) or, with ``follow=False``, a path ending in ``.`` or ``..``
    (``link/.`` would be the link's target under the link's name) other than the root itself
    written as ``.``; ``forbidden`` for an absolute path that is not in the root."""
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        raise FileError("invalid", path, f"{path!r}: not a valid file name (a lone surrogate)") from None
    if "\0" in path:  # no name holds one; the C calls would stop at it
        raise FileError("invalid", path, f"{path!r}: not a valid file name (a NUL character)")
    joined = os.path.join(root, path)
    head, name = os.path.split(joined.rstrip("/") or "/")
    special = name in ("", ".", "..")
    dotdot = ".." in path.split("/")
    lexical = os.path.normpath(joined)
    rel: str | None
    if not inside(root, joined):
        # An absolute path elsewhere: it may reach the root through a link (an alias of
        # it), which the kernel follows from /. Only what it names below the root is used,
        # and that is resolved beneath the root like any path.
        located = os.path.realpath(joined) if special else os.path.join(os.path.realpath(head), name)
        if not inside(root, located):
            raise escape(path, inside(root, lexical) and not dotdot)
        parts = tuple(relative(root, located).split("/")) if located != root else ()
        dotdot, rel = False, "/".join(parts) or "."
    else:
        parts = tuple(part for part in joined[len(root) :].split("/") if part not in ("", "."))
        rel = None if dotdot else "/".join(parts) or "."
    if not follow and name in (".", "..") and (dotdot or lexical != root):
        raise FileError("invalid", path, f"{path}: ends in {name!r}, which is no name of its own; name the directory itself")
    return Parsed(parts, rel, dotdot, path.endswith("/") and not special)


def resolve(root: str, path: str, follow: bool = True) -> Target:
    """Where ``path`` leads beneath ``root`` now, as a path, for what must be given one (a
    terminal's working directory); FileError as the operations raise it (``forbidden``
    outside, ``not_found`` for a directory on the way that does not exist, ...). The last
    component need not exist. With ``follow`` a link there is followed, and must stay inside."""
    from aether.files.beneath import Root, fd_path  # beneath builds on this module

    try:
        with Root(root) as beneath:
            place = beneath.place(path, follow)
            where = fd_path(place.dirfd) if place.dirfd != beneath.fd else root
            return Target(where if place.name == "." else os.path.join(where, place.name), place.rel)
    except OSError as exc:
        raise os_error(exc, path) from None
