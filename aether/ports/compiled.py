"""A compiled probe as data, loaded into the kernel without bcc; and its cache.

bcc compiles ``bpf/listen_events.c`` in a short-lived helper (:mod:`aether.ports.loader`),
which hands back what the kernel needs to load the program again: its instructions, the maps
they use, and where in the instructions each map's file descriptor goes (the ``ld_imm64``
instructions bcc filled with its own fds, BPF_PSEUDO_MAP_FD). The daemon creates the maps,
writes their fds there, loads the program with BPF_PROG_LOAD and attaches it with a perf
event on the tracepoint: the kernel's verifier checks it as it checked bcc's copy.

The same data, with a checksum, is the cache: ``probe-<key>.json`` in :func:`cache_dir`, the
key a hash of the kernel (release and build), the tracepoint's format, the probe's source and
its compile flags. Any of those changing selects another file; one that does not parse, fails
its checksum, is not this user's alone, or does not load, is ignored and the probe compiled
again.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import platform
import stat
import sys
from pathlib import Path

from aether.ports import bpfsys
from aether.ports.bpfsys import MapSpec

FORMAT = 1
LD_IMM64 = 0x18  # BPF_LD | BPF_IMM | BPF_DW: two instruction slots
BPF_PSEUDO_MAP_FD = 1
PROG_NAME = "aether_listen"  # as bpftool prog list shows it


def _src_reg(regs: int) -> int:
    # struct bpf_insn: __u8 dst_reg:4, src_reg:4; bit-field order follows the byte order.
    return regs >> 4 if sys.byteorder == "little" else regs & 0x0F


def map_fd_slots(insns: bytes) -> list[tuple[int, int]]:
    """(instruction index, the fd in its immediate) of each ld_imm64 naming a map by fd.
    ValueError for any other relocation kind, which this loader cannot replay."""
    if len(insns) % 8:
        raise ValueError(f"{len(insns)} bytes of instructions is not a whole number of them")
    slots, index = [], 0
    while index < len(insns) // 8:
        code, regs = insns[8 * index], insns[8 * index + 1]
        if code == LD_IMM64:
            src = _src_reg(regs)
            if src == BPF_PSEUDO_MAP_FD:
                slots.append((index, int.from_bytes(insns[8 * index + 4 : 8 * index + 8], sys.byteorder, signed=True)))
            elif src != 0:
                raise ValueError(f"instruction {index} is a ld_imm64 of kind {src}, not a map fd")
            index += 2
        else:
            index += 1
    return slots


@dataclasses.dataclass(frozen=True)
class CompiledProbe:
    """A tracepoint program and its maps, independent of any process's fds."""

    insns: bytes
    license: bytes
    kern_version: int
    maps: tuple[MapSpec, ...]
    #: (instruction index, index into ``maps``) for each map fd to write in.
    relocations: tuple[tuple[int, int], ...]

    def __post_init__(self):
        slots = [index for index, _fd in map_fd_slots(self.insns)]
        if sorted(index for index, _map in self.relocations) != slots:
            raise ValueError("relocations do not match the instructions' map loads")
        if any(not 0 <= which < len(self.maps) for _index, which in self.relocations):
            raise ValueError("a relocation names no map")

    def map_named(self, name: str) -> int:
        for index, spec in enumerate(self.maps):
            if spec.name == name:
                return index
        raise ValueError(f"the probe has no map named {name!r}")

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "insns": base64.b64encode(self.insns).decode(),
            "license": self.license.decode(),
            "kern_version": self.kern_version,
            "maps": [list(spec) for spec in self.maps],
            "relocations": [list(pair) for pair in self.relocations],
        }

    @classmethod
    def from_json(cls, data: dict) -> CompiledProbe:
        """ValueError (or KeyError, TypeError) for anything but what :meth:`to_json` wrote."""
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, not {FORMAT}")
        return cls(
            base64.b64decode(data["insns"], validate=True),
            data["license"].encode(),
            int(data["kern_version"]),
            tuple(MapSpec(str(m[0]), *(int(v) for v in m[1:])) for m in data["maps"]),
            tuple((int(i), int(m)) for i, m in data["relocations"]),
        )

    def load(self, tracepoint_id: int) -> LoadedProbe:
        """Create the maps, load the program, attach it. BpfError says which step failed."""
        fds: list[int] = []
        prog_fd = None
        try:
            for spec in self.maps:
                fds.append(bpfsys.map_create(spec))
            insns = bytearray(self.insns)
            for index, which in self.relocations:
                insns[8 * index + 4 : 8 * index + 8] = fds[which].to_bytes(4, sys.byteorder, signed=True)
            prog_fd = bpfsys.prog_load(bpfsys.BPF_PROG_TYPE_TRACEPOINT, bytes(insns), self.license, PROG_NAME, self.kern_version)
            # The perf event holds the program, and the program its maps: the program's own
            # fd is not needed once attached.
            link = bpfsys.attach_tracepoint(prog_fd, tracepoint_id)
        except BaseException:
            bpfsys.close_all([prog_fd, *fds])
            raise
        bpfsys.close_all([prog_fd])
        return LoadedProbe(link, dict(zip((spec.name for spec in self.maps), fds)))


@dataclasses.dataclass
class LoadedProbe:
    """The fds that keep the program attached (``link``) and let user space read its maps."""

    link: int
    maps: dict[str, int]

    def close(self) -> None:
        """Detach first, so the program never runs with its maps half gone."""
        bpfsys.close_all([self.link, *self.maps.values()])
        self.link, self.maps = -1, {}


# -- the cache -------------------------------------------------------------------------------


def cache_dir() -> Path:
    """``AETHER_CACHE_DIR``; systemd's ``CACHE_DIRECTORY`` (``CacheDirectory=`` in the unit);
    /var/cache/aether for root; else ``$XDG_CACHE_HOME/aether`` (~/.cache/aether)."""
    from aether.settings import sources

    if sources.value("cache_dir"):
        return Path(sources.value("cache_dir"))
    if os.environ.get("CACHE_DIRECTORY"):
        return Path(os.environ["CACHE_DIRECTORY"].split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/cache/aether")
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aether"


def cache_key(source: bytes, cflags: list[str], tracepoint_format: bytes) -> str:
    digest = hashlib.sha256()
    uname = os.uname()
    for part in (str(FORMAT), uname.release, uname.version, platform.machine(), *cflags):
        digest.update(part.encode() + b"\0")
    for blob in (tracepoint_format, source):
        digest.update(len(blob).to_bytes(8, "little") + blob)
    return digest.hexdigest()[:32]


def cache_path(key: str) -> Path:
    return cache_dir() / f"probe-{key}.json"


def _private(st: os.stat_result) -> bool:
    """Ours, and nobody else may write it: what this process loads into the kernel."""
    return st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def read_cache(key: str) -> tuple[CompiledProbe | None, str]:
    """(the cached probe, "") or (None, why not: missing, or what was wrong with the file)."""
    path = cache_path(key)
    directory = None
    try:
        # The file is opened in the directory just checked, not by its path again.
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if not _private(os.fstat(directory)):
            return None, f"{path.parent} is not private to uid {os.geteuid()}"
        fd = os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
    except (FileNotFoundError, NotADirectoryError):
        return None, "missing"
    except OSError as exc:
        return None, f"{path}: {exc.strerror}"
    finally:
        if directory is not None:
            os.close(directory)
    try:
        with os.fdopen(fd, "rb") as file:
            if not _private(os.fstat(file.fileno())):
                return None, f"{path} is not private to uid {os.geteuid()}"
            entry = json.loads(file.read(1 << 20))
        body = json.dumps(entry["probe"], sort_keys=True).encode()
        if entry.get("key") != key or entry.get("sha256") != hashlib.sha256(body).hexdigest():
            return None, f"{path}: checksum mismatch"
        return CompiledProbe.from_json(entry["probe"]), ""
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        return None, f"{path}: unreadable ({type(exc).__name__}: {exc})"


def write_cache(key: str, probe: CompiledProbe) -> str | None:
    """Store the probe atomically (0600 in a 0700 directory); the error, if it could not be,
    and entries for other kernels removed (they would only ever be read after a reboot into
    that kernel, which compiles once again)."""
    path = cache_path(key)
    body = probe.to_json()
    entry = {
        "key": key,
        "kernel": os.uname().release,
        "sha256": hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest(),
        "probe": body,
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not _private(os.stat(path.parent)):
            return f"{path.parent} is not private to uid {os.geteuid()}: nothing written there would be read"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as file:
            json.dump(entry, file)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return f"{path}: {exc.strerror or exc}"
    release = os.uname().release
    for other in path.parent.glob("probe-*.json"):
        if other != path and _kernel_of(other) != release:
            try:
                other.unlink()
            except OSError:
                pass
    return None


def _kernel_of(path: Path) -> str | None:
    try:
        return json.loads(path.read_bytes()).get("kernel")
    except (OSError, ValueError, AttributeError):
        return None
