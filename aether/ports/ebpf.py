"""The eBPF probe: LISTEN transitions from the kernel, delivered into an asyncio loop.

``bpf/listen_events.c`` is attached to ``sock:inet_sock_set_state``. Records arrive through a
BPF ring buffer (kernel 5.8+) or per-CPU perf buffers, whose file descriptors are registered
with the event loop: nothing wakes the process while no port changes, and no thread or timer
sits between the kernel and the consumer.

With a ring buffer, bcc and its LLVM never enter this process: a helper process compiles the
probe (:mod:`aether.ports.loader`), this one loads the result with bpf(2) itself
(:mod:`aether.ports.compiled`, cached so a restart skips the compile) and reads the ring from
its mapping (:mod:`aether.ports.ringbuf`). Perf buffers are bcc's (:mod:`aether.ports.bccperf`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import re
import socket
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from aether import caps
from aether.ports import EBPF_BUFFERS

if TYPE_CHECKING:  # imported where used: a daemon on one buffer has no use for the other's modules
    from aether.ports.bccperf import PerfProbe
    from aether.ports.bpfsys import Counter
    from aether.ports.compiled import LoadedProbe
    from aether.ports.ringbuf import RingReader

log = logging.getLogger("aether.ports")

TCP_LISTEN = 10
TCP_CLOSE = 7

#: 2 MiB. One process makes ~150,000 listen/close records a second (bench/burst.py), faster than
#: any Python consumer drains them, so the ring must hold a whole burst: for 10,000 pairs a
#: 256 KiB ring lost 62-75% (then resynchronised), 1 MiB 20%, 2 MiB none.
DEFAULT_RING_PAGES = 512
#: Per CPU, for kernels without a ring buffer.
DEFAULT_PERF_PAGES = 64

# struct listen_event in bpf/listen_events.c
_RECORD = struct.Struct("=QQQHHBB2x16s16s")


class ProbeUnavailable(RuntimeError):
    """The probe cannot run here; the message says why, in one line."""


class ListenRecord(NamedTuple):
    """One decoded probe record."""

    skaddr: int
    tgid: int
    tid: int
    ts_ns: int
    family: int
    port: int
    oldstate: int
    newstate: int
    address: str
    comm: str

    @property
    def is_listen(self) -> bool:
        return self.newstate == TCP_LISTEN

    @property
    def is_close(self) -> bool:
        return self.oldstate == TCP_LISTEN and self.newstate == TCP_CLOSE


def decode(raw, offset: int = 0) -> ListenRecord:
    """The record at ``offset`` of ``raw`` (bytes, or the ring buffer's mapping)."""
    skaddr, pid_tgid, ts_ns, family, port, old, new, addr, comm = _RECORD.unpack_from(raw, offset)
    if family == socket.AF_INET:
        address = socket.inet_ntop(socket.AF_INET, addr[:4])
    else:
        address = socket.inet_ntop(socket.AF_INET6, addr)
    return ListenRecord(
        skaddr,
        pid_tgid >> 32,
        pid_tgid & 0xFFFFFFFF,
        ts_ns,
        family,
        port,
        old,
        new,
        address,
        comm.split(b"\0", 1)[0].decode("utf-8", "replace"),
    )


def program_path() -> Path:
    """Where ``listen_events.c`` is: ``AETHER_BPF_DIR``, the source tree, or the install prefix."""
    from aether.settings import sources

    candidates = []
    if sources.value("bpf_dir"):
        candidates.append(Path(sources.value("bpf_dir")))
    candidates.append(Path(__file__).resolve().parents[2] / "bpf")
    candidates.append(Path(sys.prefix) / "share" / "aether" / "bpf")
    for directory in candidates:
        path = directory / "listen_events.c"
        if path.is_file():
            return path
    raise ProbeUnavailable("bpf/listen_events.c not found (set AETHER_BPF_DIR)")


def kernel_version(release: str | None = None) -> tuple[int, int] | None:
    """``"6.18.44-fc-v782"`` -> ``(6, 18)``; None if the release does not start with one."""
    match = re.match(r"(\d+)\.(\d+)", release or platform.release())
    return (int(match[1]), int(match[2])) if match else None


def kernel_has_ringbuf() -> bool:
    """BPF ring buffers arrived in Linux 5.8 (an unreadable release is taken for a new one)."""
    return (kernel_version() or (99, 0)) >= (5, 8)


#: Where tracefs shows the tracepoint: its own mount, or under debugfs on older systems.
TRACEPOINT_DIRS = (
    Path("/sys/kernel/tracing/events/sock/inet_sock_set_state"),
    Path("/sys/kernel/debug/tracing/events/sock/inet_sock_set_state"),
)


def find_tracepoint_format() -> tuple[Path | None, Path | None]:
    """(the tracepoint's ``format`` file, which bcc reads to compile the probe's arguments, None)
    when this process can read it; else (None, the one it may not read, or None if none shows)."""
    denied = None
    for directory in TRACEPOINT_DIRS:
        path = directory / "format"
        try:
            with open(path, "rb"):
                return path, None
        except PermissionError:
            denied = denied or path
        except OSError:
            continue
    return None, denied


def tracepoint_id(format_path: Path) -> int:
    """The tracepoint's id, which a perf event names it by (beside its ``format``)."""
    try:
        return int((format_path.parent / "id").read_text())
    except (OSError, ValueError) as exc:
        raise ProbeUnavailable(f"tracepoint id unreadable: {exc}") from exc


def tracepoint_format() -> Path:
    """The tracepoint's ``format`` file; ProbeUnavailable if no tracefs shows it, or this
    process may not read it."""
    path, denied = find_tracepoint_format()
    if path is not None:
        return path
    if denied is not None:
        raise ProbeUnavailable(
            f"{denied} not readable by uid {os.geteuid()}: tracefs is root's (mode 0700); grant CAP_DAC_READ_SEARCH"
        )
    raise ProbeUnavailable(
        "tracepoint sock:inet_sock_set_state not visible: tracefs not mounted "
        "(mount -t tracefs nodev /sys/kernel/tracing) or the kernel lacks it"
    )


def check_environment() -> None:
    """Raise ProbeUnavailable with the first reason the probe cannot load, if any."""
    lacking = caps.missing_for_probe()
    if lacking:
        raise ProbeUnavailable(
            f"lacking {' and '.join(caps.names(lacking))}: loading an eBPF program needs root, "
            "or CAP_BPF and CAP_PERFMON (with CAP_DAC_READ_SEARCH for tracefs)"
        )
    tracepoint_format()


def check_compiler() -> None:
    """Raise ProbeUnavailable if bcc cannot compile the probe here: what only compiling
    needs (the ring buffer's daemon loads a cached probe without either)."""
    if not Path(f"/lib/modules/{platform.release()}/build").exists():
        raise ProbeUnavailable(f"no kernel headers at /lib/modules/{platform.release()}/build (run deploy/setup.sh)")
    try:
        from bcc import BPF  # noqa: F401
    except ImportError as exc:
        raise ProbeUnavailable(
            f"python module bcc not importable ({exc}); install python3-bpfcc (the PyPI package named bcc is unrelated)"
        ) from exc


def bcc_compile(source: bytes, cflags: list[str]):
    """bcc's BPF object for ``source``: compiled, loaded and attached; ProbeUnavailable if not.
    bcc prints compiler diagnostics on fd 2 itself; its exception says only "failed"."""
    from bcc import BPF

    try:
        return BPF(text=source, cflags=cflags)
    except Exception as exc:
        # bcc reports compile, load and attach failures as a bare Exception. Anything more
        # specific (TypeError, AttributeError...) is a bug of ours and must not pass for
        # "the kernel cannot do it", which would turn failing tests into skipped ones.
        if type(exc) is not Exception:
            raise
        raise ProbeUnavailable(f"bcc could not load the probe: {exc}") from exc


class Probe:
    """The loaded probe. ``start`` attaches its buffers to a loop; ``stop`` detaches and unloads.

    ``on_batch`` receives a list of ``ListenRecord`` each time the buffers have been drained;
    ``lost`` is the number of records the probe could not deliver (ring full, perf output
    failed), which only grows. Ring records arrive in the order they happened; perf records
    are ordered within a batch, and a consumer must expect a socket's close to come one batch
    before its listen.

    ``cache=False`` neither reads nor writes the compiled-probe cache (``aether doctor``
    compiles, as a first start on a new kernel would, and changes nothing). ``origin`` says
    where the ring buffer's program came from: ``cache`` or ``compiled``.
    """

    def __init__(self, buffer: str = "auto", pages: int | None = None, cache: bool = True):
        if buffer not in EBPF_BUFFERS:
            raise ValueError(f"buffer must be one of {', '.join(EBPF_BUFFERS)}, not {buffer!r}")
        check_environment()
        self.buffer = ("ring" if kernel_has_ringbuf() else "perf") if buffer == "auto" else buffer
        self.pages = pages or (DEFAULT_RING_PAGES if self.buffer == "ring" else DEFAULT_PERF_PAGES)
        self.origin = ""
        #: Where the ring buffer's compiled program is cached (whether or not it is yet).
        self.cache_file: Path | None = None
        self.compile_seconds: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_batch: Callable[[list[ListenRecord]], None] | None = None
        self._perf: PerfProbe | None = None
        self._loaded: LoadedProbe | None = None
        self._ring: RingReader | None = None
        self._lost: Counter | None = None
        cflags = [f"-DAETHER_RING_PAGES={self.pages}"]
        source = program_path().read_bytes()
        if self.buffer == "perf":
            check_compiler()
            from aether.ports.bccperf import PerfProbe

            self._perf = PerfProbe(source, [*cflags, "-DAETHER_PERF_BUFFER=1"])
        else:
            self._load_ring(source, cflags, cache)

    def _load_ring(self, source: bytes, cflags: list[str], cache: bool) -> None:
        # Imported here: a daemon on sock_diag, or on perf buffers, has no use for them.
        from aether.ports import compiled
        from aether.ports.bpfsys import BpfError, Counter

        format_path = tracepoint_format()
        tp_id = tracepoint_id(format_path)
        key = compiled.cache_key(source, cflags, format_path.read_bytes())
        self.cache_file = compiled.cache_path(key)
        loaded = None
        if cache:
            program, why = compiled.read_cache(key)
            if program is not None and _prepared(program) is None:
                program, why = None, f"{self.cache_file}: not this probe's maps"
            if program is not None:
                try:
                    loaded = _prepared(program).load(tp_id)
                    self.origin = "cache"
                except BpfError as exc:
                    log.warning(
                        "cached probe did not load; compiling it again", extra={"path": str(self.cache_file), "error": str(exc)}
                    )
            elif why != "missing":
                log.warning("cached probe ignored; compiling it again", extra={"reason": why})
        if loaded is None:
            from aether.ports.loader import compile_in_helper

            started = time.monotonic()
            program = compile_in_helper(source, cflags)
            self.compile_seconds = time.monotonic() - started
            if _prepared(program) is None:
                raise ProbeUnavailable("the probe must have a ring buffer map named events and an array named lost")
            try:
                loaded = _prepared(program).load(tp_id)
            except BpfError as exc:
                detail = next((line for line in reversed(exc.log.splitlines()) if line.strip()), "")
                raise ProbeUnavailable(f"could not load the compiled probe: {exc}" + (f" ({detail})" if detail else "")) from exc
            self.origin = "compiled"
            if cache:
                error = compiled.write_cache(key, program)
                if error:
                    log.info("compiled probe not cached", extra={"reason": error})
        assert program is not None  # the one ``loaded`` came from
        self._loaded = loaded
        self.ring_fd = loaded.maps["events"]
        self.ring_size = program.maps[program.map_named("events")].max_entries
        try:
            self._lost = Counter(loaded.maps["lost"])
        except BpfError as exc:
            loaded.close()
            raise ProbeUnavailable(f"could not map the probe's lost counter: {exc}") from exc
        log.debug("probe loaded", extra={"origin": self.origin, "compile_s": self.compile_seconds})

    def start(self, loop: asyncio.AbstractEventLoop, on_batch: Callable[[list[ListenRecord]], None]) -> None:
        self._loop = loop
        self._on_batch = on_batch
        if self._perf is not None:
            self._perf.start(loop, self.pages, self.drain)
            return
        from aether.ports.ringbuf import RingReader

        self._ring = RingReader(self.ring_fd, self.ring_size)
        loop.add_reader(self.ring_fd, self.drain)

    def drain(self) -> None:
        """Deliver what the buffers hold now. Called with an empty batch too: a wake-up that
        brought only loss notifications must still reach the consumer, which checks ``lost``."""
        if self._perf is not None:
            batch = self._perf.drain()
        elif self._ring is not None:
            batch = self._ring.drain(_decode_ring)
        else:
            return
        assert self._on_batch is not None  # drain runs from the readers start registers
        self._on_batch(batch)

    @property
    def lost(self) -> int:
        """Records the probe could not deliver so far (a counter in the probe's own map)."""
        if self._perf is not None:
            return self._perf.lost
        return self._lost() if self._lost is not None else 0

    def stop(self) -> None:
        if self._perf is not None:
            self._perf.stop()
            self._perf = None
        if self._ring is not None:
            if self._loop is not None:
                self._loop.remove_reader(self.ring_fd)
            self._ring.close()
            self._ring = None
        self._loop = None
        if self._loaded is not None:
            self._loaded.close()
            self._loaded = None
        if self._lost is not None:
            self._lost.close()
            self._lost = None


def _prepared(program):
    """The program with ``lost`` made mappable, so reading it after every batch is a memory
    load; None unless the maps this class reads are there, of the kinds it reads them as."""
    import dataclasses

    from aether.ports.bpfsys import BPF_F_MMAPABLE, BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_RINGBUF

    kinds = {spec.name: (spec.type, spec.value_size) for spec in program.maps}
    if kinds.get("events", (None,))[0] != BPF_MAP_TYPE_RINGBUF or kinds.get("lost") != (BPF_MAP_TYPE_ARRAY, 8):
        return None
    maps = tuple(spec._replace(flags=spec.flags | BPF_F_MMAPABLE) if spec.name == "lost" else spec for spec in program.maps)
    return dataclasses.replace(program, maps=maps)


def _decode_ring(data, offset: int, length: int) -> ListenRecord | None:
    return decode(data, offset) if length >= _RECORD.size else None
