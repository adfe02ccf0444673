"""A BPF ring buffer read from user space: two mappings of the map's fd, no library.

The layout is kernel ABI (kernel/bpf/ringbuf.c; libbpf's src/ringbuf.c reads it the same way):
offset 0 of the map is one page holding the consumer position, which user space writes; at
one page in, a read-only page holding the producer position, then the data area mapped twice
in a row, so a record that wraps round the end reads as one run of bytes. Each record starts
with an 8-byte header: a u32 length whose top bits say the record is still being written
(BUSY) or was dropped (DISCARD), and a u32 the kernel keeps for itself. Records are 8-byte
aligned. Positions only grow; ``position & (size - 1)`` is the offset in the data area.

The map's fd polls readable while the producer is ahead of the consumer (level-triggered),
so it goes straight into an event loop: the kernel wakes the reader when a record is
committed, and nothing runs in between.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
from collections.abc import Callable

from aether.ports.bpfsys import map_memory, memory_view, unmap_memory

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER = 8

#: x86 orders memory for us (TSO: every load acquires, every store releases), so plain
#: loads and stores of aligned words are what libbpf's smp_load_acquire/smp_store_release
#: compile to there. Elsewhere the reader goes through libatomic's acquire and release.
PLAIN_ORDER_MACHINES = ("x86_64", "i686", "i386")


class _Atomics:
    """Acquire loads and release stores through libatomic, for machines that reorder."""

    def __init__(self):
        lib = ctypes.CDLL("libatomic.so.1")
        self.load4, self.load8, self.store8 = (getattr(lib, f"__atomic_{name}") for name in ("load_4", "load_8", "store_8"))
        self.load4.restype, self.load4.argtypes = ctypes.c_uint32, [ctypes.c_void_p, ctypes.c_int]
        self.load8.restype, self.load8.argtypes = ctypes.c_uint64, [ctypes.c_void_p, ctypes.c_int]
        self.store8.restype, self.store8.argtypes = None, [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int]


_ACQUIRE, _RELEASE = 2, 3  # __ATOMIC_ACQUIRE, __ATOMIC_RELEASE


def _unmapped(*_args: int) -> int:
    """What a closed reader's loads and stores become: its pages are gone."""
    raise ValueError("the ring buffer is unmapped")


class RingReader:
    """Reads one ring buffer map. ``drain(decode)`` returns every committed record's decoded
    value, in the order the producer reserved them, and frees their space."""

    _load_header: Callable[[int], int]
    _load_producer: Callable[[int], int]
    _load_consumer: Callable[[int], int]
    _store_consumer: Callable[[int, int], object]

    def __init__(self, map_fd: int, size: int, ordered: bool | None = None):
        if size <= 0 or size & (size - 1) or size % mmap.PAGESIZE:
            raise ValueError(f"ring buffer size must be a power of 2 and a multiple of the page, not {size}")
        page = mmap.PAGESIZE
        self.fd, self.size = map_fd, size
        self._mask = size - 1
        self._regions: list[tuple[int, int]] = []
        self._views: list[memoryview] = []
        self.data: memoryview | None = None
        try:
            self._map(page, ordered)
        except BaseException:
            self.close()
            raise

    def _map(self, page: int, ordered: bool | None) -> None:
        map_fd, size = self.fd, self.size
        consumer = map_memory(map_fd, page, mmap.PROT_READ | mmap.PROT_WRITE, 0)
        self._regions.append((consumer, page))
        producer = map_memory(map_fd, page + 2 * size, mmap.PROT_READ, page)
        self._regions.append((producer, page + 2 * size))
        #: The data area twice over: a record is one slice however it sits.
        self.data = memory_view(producer + page, 2 * size)
        words = self.data[:size].cast("I")
        consumer_word = memory_view(consumer, 8).cast("Q")
        producer_word = memory_view(producer, 8).cast("Q")
        if ordered is None:
            ordered = platform.machine() not in PLAIN_ORDER_MACHINES
        self.ordered = ordered
        if ordered:
            atomics = _Atomics()
            base = producer + page
            self._load_header = lambda index: atomics.load4(base + 4 * index, _ACQUIRE)
            self._load_producer = lambda _index: atomics.load8(producer, _ACQUIRE)
            self._load_consumer = lambda _index: atomics.load8(consumer, _ACQUIRE)
            self._store_consumer = lambda _index, value: atomics.store8(consumer, value, _RELEASE)
        else:
            self._load_header = words.__getitem__
            self._load_producer = producer_word.__getitem__
            self._load_consumer = consumer_word.__getitem__
            self._store_consumer = consumer_word.__setitem__
        self._views = [words, consumer_word, producer_word]

    def drain(self, decode: Callable[[memoryview, int, int], object], limit: int | None = None) -> list:
        """``decode(data, offset, length)`` for each committed record, oldest first, until the
        consumer reaches the producer, a record still being written, or ``limit`` records;
        the values it returned, but None.

        Each record is decoded before its space is released (the consumer position stored
        after it, as libbpf does): the producer may write there again at once."""
        if self.data is None:
            return []
        load_header, load_producer, store = self._load_header, self._load_producer, self._store_consumer
        mask, data = self._mask, self.data
        limit = limit if limit is not None else self.size // HEADER
        out: list = []
        consumer = self._load_consumer(0)
        while len(out) < limit:
            producer = load_producer(0)
            if consumer >= producer:
                break
            while consumer < producer:
                offset = consumer & mask
                header = load_header(offset >> 2)
                if header & BUSY_BIT:
                    # Reserved, not yet committed: its commit finds the consumer here and
                    # wakes the loop again.
                    return out
                length = header & ~(BUSY_BIT | DISCARD_BIT)
                if not header & DISCARD_BIT:
                    value = decode(data, offset + HEADER, length)
                    if value is not None:
                        out.append(value)
                consumer += (length + HEADER + 7) & ~7
                store(0, consumer)
                if len(out) >= limit:
                    break
        return out

    def close(self) -> None:
        """Unmap. The views go first: nothing may read the pages once they are gone."""
        for view in self._views:
            view.release()
        self._views = []
        self.data = None
        self._load_header = self._load_producer = self._load_consumer = _unmapped
        self._store_consumer = _unmapped
        for address, length in self._regions:
            unmap_memory(address, length)
        self._regions = []
