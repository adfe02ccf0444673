"""The probe for kernels before 5.8, which have no BPF ring buffer: compiled and read by bcc
in this process, through per-CPU perf buffers.

This path keeps bcc (and LLVM) loaded for the life of the process: its buffers are
libbcc's perf readers. Kernels new enough for ring buffers never take it unless asked
(``AETHER_EBPF_BUFFER=perf``).

The ctypes callbacks only copy each record's bytes into a list; decoding happens once the
buffers are drained, so an exception can never be swallowed inside a C callback.
"""

from __future__ import annotations

import asyncio
import ctypes
from collections.abc import Callable

from aether.ports.ebpf import bcc_compile, decode


class PerfProbe:
    """``events`` as a perf event array, ``lost`` as an array map, both bcc's."""

    def __init__(self, source: bytes, cflags: list[str]):
        self._bpf = bcc_compile(source, cflags)
        self._lost_map = self._bpf[b"lost"]
        self._pending: list[bytes] = []
        self._fds: list[int] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.lost_reported = 0

    def start(self, loop: asyncio.AbstractEventLoop, pages: int, on_wake: Callable[[], None]) -> None:
        pending = self._pending

        def perf_cb(_cpu, data, size):
            pending.append(ctypes.string_at(data, size))

        def lost_cb(count):
            # Diagnostics only: the probe's own counter already has these, and sooner.
            self.lost_reported += count

        self._bpf[b"events"].open_perf_buffer(perf_cb, page_cnt=pages, lost_cb=lost_cb)
        from bcc.libbcc import lib

        self._fds = [lib.perf_reader_fd(reader) for reader in self._bpf.perf_buffers.values()]
        self._loop = loop
        for fd in self._fds:
            loop.add_reader(fd, on_wake)

    def drain(self) -> list:
        """Every record the buffers hold now, in the order they happened."""
        if self._bpf is None:
            return []
        self._bpf.perf_buffer_consume()
        batch = [decode(raw) for raw in self._pending]
        self._pending.clear()
        # Per-CPU buffers: records of different CPUs are drained in CPU order, not in the
        # order they happened. A socket's close and the listen of the socket that reuses its
        # address may sit on two CPUs.
        batch.sort(key=lambda record: record.ts_ns)
        return batch

    @property
    def lost(self) -> int:
        return int(self._lost_map[ctypes.c_int(0)].value)

    def stop(self) -> None:
        if self._loop is not None:
            for fd in self._fds:
                self._loop.remove_reader(fd)
            self._fds, self._loop = [], None
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
