"""The eBPF probe: LISTEN transitions from the kernel, delivered into an asyncio loop.

bcc compiles ``bpf/listen_events.c`` and attaches it to ``sock:inet_sock_set_state``. Records
arrive through a BPF ring buffer (kernel 5.8+) or per-CPU perf buffers, whose file descriptors
are registered with the event loop: nothing wakes the process while no port changes, and no
thread or timer sits between the kernel and the consumer.

The ctypes callbacks only copy each record's bytes into a list; decoding and everything after
happen in ordinary Python once the buffers are drained, so an exception can never be swallowed
inside a C callback.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import platform
import re
import socket
import struct
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Optional

from aether import caps

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


def decode(raw: bytes) -> ListenRecord:
    skaddr, pid_tgid, ts_ns, family, port, old, new, addr, comm = _RECORD.unpack_from(raw)
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
    candidates = []
    if os.environ.get("AETHER_BPF_DIR"):
        candidates.append(Path(os.environ["AETHER_BPF_DIR"]))
    candidates.append(Path(__file__).resolve().parents[2] / "bpf")
    candidates.append(Path(sys.prefix) / "share" / "aether" / "bpf")
    for directory in candidates:
        path = directory / "listen_events.c"
        if path.is_file():
            return path
    raise ProbeUnavailable("bpf/listen_events.c not found (set AETHER_BPF_DIR)")


def kernel_version(release: Optional[str] = None) -> Optional[tuple[int, int]]:
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


def find_tracepoint_format() -> tuple[Optional[Path], Optional[Path]]:
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


def tracepoint_format() -> Path:
    """The tracepoint's ``format`` file; ProbeUnavailable if no tracefs shows it, or this
    process may not read it."""
    path, denied = find_tracepoint_format()
    if path is not None:
        return path
    if denied is not None:
        raise ProbeUnavailable(
            f"{denied} not readable by uid {os.geteuid()}: tracefs is root's (mode 0700); "
            "grant CAP_DAC_READ_SEARCH"
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
    if not Path(f"/lib/modules/{platform.release()}/build").exists():
        raise ProbeUnavailable(
            f"no kernel headers at /lib/modules/{platform.release()}/build (run deploy/setup.sh)"
        )
    try:
        from bcc import BPF  # noqa: F401
    except ImportError as exc:
        raise ProbeUnavailable(
            f"python module bcc not importable ({exc}); install python3-bpfcc "
            "(the PyPI package named bcc is unrelated)"
        ) from exc


class Probe:
    """The loaded probe. ``start`` attaches its buffers to a loop; ``stop`` detaches and unloads.

    ``on_batch`` receives a list of ``ListenRecord`` each time the buffers have been drained;
    ``lost`` is the number of records the probe could not deliver (ring full, perf output
    failed), which only grows. Ring records arrive in the order they happened; perf records
    are ordered within a batch, and a consumer must expect a socket's close to come one batch
    before its listen.
    """

    def __init__(self, buffer: str = "auto", pages: Optional[int] = None):
        if buffer not in ("auto", "ring", "perf"):
            raise ValueError(f"buffer must be auto, ring or perf, not {buffer!r}")
        check_environment()
        self.buffer = ("ring" if kernel_has_ringbuf() else "perf") if buffer == "auto" else buffer
        self.pages = pages or (DEFAULT_RING_PAGES if self.buffer == "ring" else DEFAULT_PERF_PAGES)
        self._bpf = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._fds: list[int] = []
        self._pending: list[bytes] = []
        self.perf_lost_reported = 0
        self._on_batch: Optional[Callable[[list[ListenRecord]], None]] = None
        self._load()

    def _load(self) -> None:
        from bcc import BPF

        cflags = [f"-DAETHER_RING_PAGES={self.pages}"]
        if self.buffer == "perf":
            cflags.append("-DAETHER_PERF_BUFFER=1")
        source = program_path().read_bytes()
        # bcc prints compiler diagnostics on fd 2 itself; its exception says only "failed".
        try:
            self._bpf = BPF(text=source, cflags=cflags)
        except Exception as exc:
            # bcc reports compile, load and attach failures as a bare Exception. Anything more
            # specific (TypeError, AttributeError...) is a bug of ours and must not pass for
            # "the kernel cannot do it", which would turn failing tests into skipped ones.
            if type(exc) is not Exception:
                raise
            raise ProbeUnavailable(f"bcc could not load the probe: {exc}") from exc
        self._lost_map = self._bpf[b"lost"]

    def start(self, loop: asyncio.AbstractEventLoop, on_batch: Callable[[list[ListenRecord]], None]) -> None:
        self._loop = loop
        self._on_batch = on_batch
        events = self._bpf[b"events"]
        pending = self._pending
        if self.buffer == "ring":

            def ring_cb(_ctx, data, size):
                pending.append(ctypes.string_at(data, size))
                return 0

            events.open_ring_buffer(ring_cb)
            # bcc keeps libbpf's ring_buffer behind _ringbuf_manager and offers no epoll fd.
            # Debian's libbcc links libbpf.so.1 dynamically, so this CDLL is the very library
            # that made the ring_buffer, and ring_buffer__epoll_fd (libbpf 0.3+) applies to it.
            libbpf = ctypes.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1")
            libbpf.ring_buffer__epoll_fd.restype = ctypes.c_int
            libbpf.ring_buffer__epoll_fd.argtypes = [ctypes.c_void_p]
            fd = libbpf.ring_buffer__epoll_fd(self._bpf._ringbuf_manager)
            if fd < 0:
                raise ProbeUnavailable("libbpf gave no epoll fd for the ring buffer")
            self._fds = [fd]
            consume = self._bpf.ring_buffer_consume
        else:

            def perf_cb(_cpu, data, size):
                pending.append(ctypes.string_at(data, size))

            def lost_cb(count):
                # Diagnostics only: the probe's own counter already has these, and sooner.
                self.perf_lost_reported += count

            events.open_perf_buffer(perf_cb, page_cnt=self.pages, lost_cb=lost_cb)
            from bcc.libbcc import lib

            self._fds = [lib.perf_reader_fd(reader) for reader in self._bpf.perf_buffers.values()]
            consume = self._bpf.perf_buffer_consume

        self._consume = consume
        for fd in self._fds:
            loop.add_reader(fd, self.drain)

    def drain(self) -> None:
        """Deliver what the buffers hold now. Called with an empty batch too: a wake-up that
        brought only loss notifications must still reach the consumer, which checks ``lost``."""
        if self._bpf is None:
            return
        self._consume()
        batch = [decode(raw) for raw in self._pending]
        self._pending.clear()
        if self.buffer == "perf":
            # Per-CPU buffers: records of different CPUs are drained in CPU order, not in
            # the order they happened. A socket's close and the listen of the socket that
            # reuses its address may sit on two CPUs.
            batch.sort(key=lambda record: record.ts_ns)
        self._on_batch(batch)

    @property
    def lost(self) -> int:
        """Records the probe could not deliver so far (a counter in the probe's own map)."""
        return int(self._lost_map[ctypes.c_int(0)].value)

    def stop(self) -> None:
        if self._loop is not None:
            for fd in self._fds:
                self._loop.remove_reader(fd)
            self._fds = []
            self._loop = None
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
