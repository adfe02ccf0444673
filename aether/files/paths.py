"""Confinement: a client's path becomes a path inside the workspace root, or is refused.

A client path is relative to the root, or absolute. It is joined to the root and resolved with
:func:`os.path.realpath`, so ``..`` and every symbolic link along the way are followed as the
kernel would follow them, and the result must be the root or below it. ``a/../b`` is fine;
``../x``, ``/etc/passwd`` and ``link/x`` where ``link`` points outside are ``forbidden``.

Operations on a name itself (``stat``, ``delete``, ``rename``, ``mkdir``) resolve only the
parent directory and keep the last component as it is (``follow=False``): a link is stat'ed,
deleted or renamed as a link, wherever it points, so such a path must end in a name (not ``.``
or ``..``). Everything that reads or writes content, or lists or watches a directory, follows
the last component too, so a link leading out is refused there.

A hard link cannot be told from any other file: one to a file outside the root is read like
any file. An atomic write replaces the name with a new file, leaving the other one alone;
``writing`` refuses in-place writes to a file with more than one link.

The check and the use are two steps: a process that swaps a directory for a link between them
can still lead an operation outside (opening with ``O_NOFOLLOW`` narrows that to the parent
directories). The client holding the token also has the ``terminal`` channel, a shell that can
go anywhere, so this guards against mistakes and hostile links in the tree, not against the
token's holder.
"""

from __future__ import annotations

import dataclasses
import os
import stat

from aether.files import FileError


@dataclasses.dataclass(frozen=True)
class Target:
    """``path``: the absolute path to act on. ``rel``: the path as replies name it."""

    path: str
    rel: str


def inside(root: str, path: str) -> bool:
    """Whether absolute, resolved ``path`` is ``root`` or below it."""
    if path == root:
        return True
    return path.startswith(root if root.endswith("/") else root + "/")


def relative(root: str, path: str) -> str:
    """``path`` (inside ``root``) relative to it in POSIX form; ``.`` for the root."""
    return os.path.relpath(path, root)


def resolve(root: str, path: str, follow: bool = True) -> Target:
    """Where ``path`` leads inside ``root`` (resolved by :func:`os.path.realpath`), or
    FileError: ``forbidden`` when that is outside. Nothing is created or changed.

    With ``follow`` a symbolic link in the last place is followed and must stay inside too.
    With ``follow=False`` the last component is the name acted on, a link stays a link, and
    so it must be a name: a path ending in ``.`` or ``..`` (``link/.`` would be the link's
    target under the link's name) is ``invalid``, except the root itself written as ``.``.
    A path ending in ``/`` names a directory: if something else is there (a link, with
    ``follow=False``), ``not_a_directory``.

    ``rel`` is the path as the client named it, normalised (``.`` and repeated ``/`` dropped,
    an absolute path made relative); when it holds ``..``, which a link before it changes the
    meaning of, ``rel`` is where it resolved to instead.
    """
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        raise FileError("invalid", path, f"{path!r}: not a valid file name (a lone surrogate)") from None
    joined = os.path.join(root, path)
    head, name = os.path.split(joined.rstrip("/") or "/")
    special = name in ("", ".", "..")
    if special:
        located = os.path.realpath(joined)
    else:
        located = os.path.join(os.path.realpath(head), name)
    lexical = os.path.normpath(joined)
    dotdot = ".." in path.split("/")
    if not inside(root, located):
        if inside(root, lexical) and not dotdot:
            why = "a symbolic link on the way leads outside the workspace root"
        else:
            why = "outside the workspace root"
        raise FileError("forbidden", path, f"{path}: {why}")
    if not follow and name in (".", "..") and (dotdot or lexical != root):
        raise FileError("invalid", path, f"{path}: ends in {name!r}, which is no name of its own; name the directory itself")
    real = located
    if follow and not special:
        real = os.path.realpath(located)
        if not inside(root, real):
            raise FileError("forbidden", path, f"{path}: a symbolic link leads outside the workspace root")
    if path.endswith("/") and not special:
        _directory(real, path, follow)
    if dotdot or not inside(root, lexical):
        rel = relative(root, located)
    else:
        rel = relative(root, lexical)
    return Target(real, rel)


def _directory(real: str, path: str, follow: bool) -> None:
    """A path ending in ``/`` must be a directory where something is there (as the kernel
    has it); a missing one is left to the operation."""
    try:
        st = os.stat(real) if follow else os.lstat(real)
    except OSError:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise FileError("not_a_directory", path, f"{path}: not a directory (a path ending in / names one)")
