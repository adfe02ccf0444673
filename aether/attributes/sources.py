"""The files rules come from, read: config.json's value (the settings have parsed it), and,
beneath the workspace root when present, ``.devcontainer/devcontainer.json`` (else
``.devcontainer.json``, the spec's other place) and ``.gitpod.yml``.

Workspace files are opened beneath the root by the kernel (:class:`aether.files.beneath.Root`:
openat2 ``RESOLVE_BENEATH``, else a descriptor walk): a ``.gitpod.yml`` that is a link to
``/etc/shadow``, or a ``.devcontainer`` that leads outside, is refused, not read. They are
opened without blocking (a FIFO put there cannot stall the reader), must be regular files and
at most :data:`MAX_BYTES`. Each reader returns what it found and the problems; a file with a
problem is reported and skipped, never raised.

Reading is blocking file I/O: call :func:`load` off the event loop (it reads three small files;
matching is then :meth:`~aether.attributes.rules.Ruleset.resolve`, which is pure). To follow
edits, watch :data:`WATCH_DIRECTORIES` (not recursively) and call :func:`load` again when
:func:`affects` says a changed path matters.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aether.attributes import formats, jsonc
from aether.attributes.rules import Layer, Problem, Ruleset
from aether.files import FileError
from aether.files.beneath import Root

#: Bytes a rules file may hold. The devcontainer.json files of large projects are a few KiB;
#: this is fifty times that, and a read and parse of one this size takes about 25 ms on an
#: otherwise idle 2-vCPU VM (bench/attributes.py).
MAX_BYTES = 256 << 10
#: Where devcontainer.json is looked for, in order (the spec's two default places; a
#: ``.devcontainer/NAME/devcontainer.json`` is one of several a person picks from, so it is
#: not read).
DEVCONTAINER_FILES = (".devcontainer/devcontainer.json", ".devcontainer.json")
GITPOD_FILES = (".gitpod.yml",)
WATCHED = DEVCONTAINER_FILES + GITPOD_FILES
#: Directories (relative to the root) whose changes can change the rules: the root itself and
#: ``.devcontainer`` (which may be created, replaced or removed).
WATCH_DIRECTORIES = (".", ".devcontainer")

_OPEN = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY


class _Unreadable(Exception):
    """The file is there but cannot be used; the message says why."""


def _read(root: Root, name: str) -> str | None:
    """The text of ``name`` beneath the root; None when it is not there."""
    try:
        fd, _ = root.open(name, _OPEN)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None  # a file named .devcontainer: no devcontainer.json beneath it
    except FileError as exc:
        if exc.code == "forbidden":
            raise _Unreadable("leads outside the workspace root: not read") from None
        raise _Unreadable(f"not read: {exc}") from None
    except OSError as exc:
        raise _Unreadable(f"not read: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _Unreadable("not a regular file: not read")
        if info.st_size > MAX_BYTES:
            raise _Unreadable(f"{info.st_size} bytes: larger than {MAX_BYTES}, not read")
        chunks, size = [], 0
        while size <= MAX_BYTES:
            chunk = os.read(fd, MAX_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_BYTES:
            raise _Unreadable(f"grew past {MAX_BYTES} bytes while read: not read")
    except OSError as exc:
        raise _Unreadable(f"not read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Unreadable(f"not UTF-8 (byte {exc.start}): not read") from None


def _first(root_path: Path, names: tuple[str, ...]) -> tuple[str | None, str | None, list[Problem]]:
    """(the first of ``names`` that is there, its text, problems)."""
    problems: list[Problem] = []
    try:
        with Root(str(root_path)) as root:
            for name in names:
                try:
                    text = _read(root, name)
                except _Unreadable as exc:
                    problems.append(Problem(name, None, "unreadable", str(exc)))
                    continue
                if text is not None:
                    return name, text, problems
    except FileError as exc:
        problems.append(Problem(names[0], None, "unreadable", f"the workspace root: {exc}"))
    return None, None, problems


def read_devcontainer(root_path: Path) -> tuple[Layer | None, list[Problem]]:
    """devcontainer.json's rules beneath ``root_path``: (a layer or None, problems)."""
    name, text, problems = _first(Path(root_path), DEVCONTAINER_FILES)
    if name is None or text is None:
        return None, problems
    duplicates: list[str] = []
    try:
        data = jsonc.loads(text, duplicates)
    except jsonc.JsoncError as exc:
        return None, [*problems, Problem(name, None, "unreadable", f"not JSON with comments: {exc}; not used")]
    seen = set()
    for key in duplicates:
        if key not in seen:
            seen.add(key)
            problems.append(Problem(name, key, "ignored", "given twice in one object: the last one is used"))
    layer, found = formats.from_devcontainer(data, name)
    return layer, problems + found


def _yaml(text: str) -> Any:
    import yaml  # only when a .gitpod.yml is there

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's, where PyYAML has it
    try:
        return yaml.load(text, Loader=loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ValueError(f"{where}{exc.problem or exc.context or 'invalid'}") from None
    except RecursionError:
        raise ValueError("nested too deep") from None
    except Exception as exc:  # noqa: BLE001 - a constructor's own error (a date such as 2001-02-30)
        raise ValueError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


def read_gitpod(root_path: Path) -> tuple[Layer | None, list[Problem]]:
    """.gitpod.yml's ``ports`` beneath ``root_path``: (a layer or None, problems)."""
    name, text, problems = _first(Path(root_path), GITPOD_FILES)
    if name is None or text is None:
        return None, problems
    try:
        data = _yaml(text)
    except ValueError as exc:
        return None, [*problems, Problem(name, None, "unreadable", f"not YAML: {exc}; not used")]
    layer, found = formats.from_gitpod(data, name)
    return layer, problems + found


def read_config(config: Mapping | None, file: str = formats.CONFIG) -> tuple[Layer | None, list[Problem]]:
    """config.json's rules from its parsed value (None: no config.json)."""
    if config is None:
        return None, []
    return formats.from_config(config, file)


def load(
    root_path: Path | None, config: Mapping | None = None, config_file: str = formats.CONFIG
) -> tuple[Ruleset, list[Problem]]:
    """Every file's rules, most important first (config.json, devcontainer.json,
    .gitpod.yml), and every problem found. ``root_path`` is the workspace root as the settings
    resolved it (no symbolic link on its path); None reads no workspace file."""
    layers: list[Layer] = []
    problems: list[Problem] = []
    readers = [lambda: read_config(config, config_file)]
    if root_path is not None:
        readers += [lambda: read_devcontainer(Path(root_path)), lambda: read_gitpod(Path(root_path))]
    for reader in readers:
        layer, found = reader()
        problems += found
        if layer is not None:
            layers.append(layer)
    return Ruleset(layers), problems


def affects(path: str) -> bool:
    """Whether a change at ``path`` (relative to the workspace root, as a watch names it) can
    change the rules: one of :data:`WATCHED`, or a directory on the way to one (``.devcontainer``
    created, renamed or removed)."""
    path = path.strip("/")
    while path.startswith("./"):
        path = path[2:]
    if not path or path == ".":
        return False
    return path in WATCHED or any(name.startswith(path + "/") for name in WATCHED)


def watched(root_path: Path) -> tuple[Path, ...]:
    """The absolute paths of the files the rules are read from, present or not."""
    return tuple(Path(root_path) / name for name in WATCHED)
