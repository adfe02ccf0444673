"""The few bpf(2) and perf_event_open(2) calls the daemon makes itself, through ctypes.

Enough to create a program's maps, load its instructions, attach it to a tracepoint and map
its maps' memory: what ``bcc`` would otherwise do in-process, at the price of LLVM's ~120 MB
mapped for the life of the daemon. The attribute layouts are kernel ABI (``union bpf_attr``
and ``struct perf_event_attr`` in include/uapi/linux/{bpf,perf_event}.h); each struct below is
a prefix of the kernel's, which it accepts from older callers.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import struct
from typing import NamedTuple

# enum bpf_cmd
BPF_MAP_CREATE = 0
BPF_PROG_LOAD = 5
BPF_OBJ_GET_INFO_BY_FD = 15

BPF_MAP_TYPE_ARRAY = 2
BPF_F_MMAPABLE = 1 << 10  # an array whose values user space maps (5.5+)
BPF_MAP_TYPE_RINGBUF = 27
BPF_PROG_TYPE_TRACEPOINT = 5

PERF_TYPE_TRACEPOINT = 2
PERF_SAMPLE_RAW = 1 << 10
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_EVENT_IOC_ENABLE = 0x2400  # _IO('$', 0)
PERF_EVENT_IOC_SET_BPF = 0x40042408  # _IOW('$', 8, __u32)

#: (bpf, perf_event_open) by machine: asm/unistd.h of each architecture.
_SYSCALLS = {
    "x86_64": (321, 298),
    "aarch64": (280, 241),
    "riscv64": (280, 241),
    "loongarch64": (280, 241),
    "ppc64le": (361, 319),
    "s390x": (351, 331),
    "i686": (357, 336),
    "armv7l": (386, 364),
}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


class BpfError(OSError):
    """A bpf(2) or perf_event_open(2) call failed; ``log`` holds the verifier's words, if any."""

    errno: int  # always given, where OSError's may be None

    def __init__(self, errnum: int, what: str, log: str = ""):
        super().__init__(errnum, f"{what}: {os.strerror(errnum)}")
        self.log = log


def _numbers() -> tuple[int, int]:
    machine = platform.machine()
    if machine not in _SYSCALLS:
        raise BpfError(errno.ENOSYS, f"bpf() syscall number unknown for {machine}")
    return _SYSCALLS[machine]


def _bpf(cmd: int, attr: ctypes.Structure, what: str) -> int:
    result = _libc.syscall(_numbers()[0], cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if result < 0:
        raise BpfError(ctypes.get_errno(), what)
    return result


class _MapCreate(ctypes.Structure):
    _fields_ = [
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("numa_node", ctypes.c_uint32),
        ("map_name", ctypes.c_char * 16),
    ]


class _ProgLoad(ctypes.Structure):
    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
    ]


class _InfoByFd(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class MapSpec(NamedTuple):
    """What re-creates a map: the head of ``struct bpf_map_info``, less its id."""

    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int


_MAP_INFO = struct.Struct("=IIIIII16s")  # type, id, key_size, value_size, max_entries, map_flags, name


def map_info(fd: int) -> MapSpec:
    buf = ctypes.create_string_buffer(_MAP_INFO.size)
    attr = _InfoByFd(fd, _MAP_INFO.size, ctypes.addressof(buf))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, f"map info of fd {fd}")
    kind, _id, key, value, entries, flags, name = _MAP_INFO.unpack(buf.raw)
    return MapSpec(name.split(b"\0", 1)[0].decode(), kind, key, value, entries, flags)


def _raise_memlock() -> bool:
    """Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK (often 64 KiB); bcc lifts it the
    same way. True if it could be raised."""
    import resource

    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    except (ValueError, OSError):
        return False
    return True


def map_create(spec: MapSpec) -> int:
    attr = _MapCreate(spec.type, spec.key_size, spec.value_size, spec.max_entries, spec.flags, 0, 0, spec.name.encode()[:15])
    try:
        return _bpf(BPF_MAP_CREATE, attr, f"creating map {spec.name}")
    except BpfError as exc:
        if exc.errno != errno.EPERM or not _raise_memlock():
            raise
    return _bpf(BPF_MAP_CREATE, attr, f"creating map {spec.name}")


def prog_load(prog_type: int, insns: bytes, license: bytes, name: str, kern_version: int = 0) -> int:
    """Load a program; on refusal, load it again with a log so the error says why."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license)
    attr = _ProgLoad(
        prog_type, len(insns) // 8, ctypes.addressof(code), ctypes.addressof(lic), 0, 0, 0, kern_version, 0, name.encode()[:15]
    )
    try:
        return _bpf(BPF_PROG_LOAD, attr, f"loading program {name}")
    except BpfError as exc:
        if exc.errno not in (errno.EINVAL, errno.EACCES):
            raise
        log = ctypes.create_string_buffer(1 << 16)
        attr.log_level, attr.log_size, attr.log_buf = 1, len(log), ctypes.addressof(log)
        try:
            return _bpf(BPF_PROG_LOAD, attr, f"loading program {name}")
        except BpfError as again:
            raise BpfError(again.errno, f"loading program {name}", log.value.decode("utf-8", "replace")) from None


_PERF_ATTR = struct.Struct("=IIQQQQQIIQ")  # PERF_ATTR_SIZE_VER0: 64 bytes


def attach_tracepoint(prog_fd: int, tracepoint_id: int) -> int:
    """A perf event on the tracepoint with the program set on it (as bcc and libbpf attach one
    before bpf links); the program stays attached as long as the returned fd is open."""
    attr = ctypes.create_string_buffer(
        _PERF_ATTR.pack(PERF_TYPE_TRACEPOINT, _PERF_ATTR.size, tracepoint_id, 1, PERF_SAMPLE_RAW, 0, 0, 1, 0, 0),
        _PERF_ATTR.size,
    )
    fd = _libc.syscall(_numbers()[1], attr, -1, 0, -1, PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        raise BpfError(ctypes.get_errno(), f"perf_event_open of tracepoint {tracepoint_id}")
    for request, arg, what in (
        (PERF_EVENT_IOC_SET_BPF, prog_fd, "attaching the program"),
        (PERF_EVENT_IOC_ENABLE, 0, "enabling the tracepoint"),
    ):
        if _libc.ioctl(fd, ctypes.c_ulong(request), ctypes.c_int(arg)) < 0:
            errnum = ctypes.get_errno()
            os.close(fd)
            raise BpfError(errnum, what)
    return fd


def map_memory(fd: int, length: int, prot: int, offset: int = 0) -> int:
    """The address of a shared mapping of a map's fd. libc's mmap, not the mmap module's: that
    refuses lengths past a regular file's size, and gives no address for atomic access."""
    address = _libc.mmap(None, length, prot, mmap.MAP_SHARED, fd, offset)
    if address in (None, _MAP_FAILED):
        errnum = ctypes.get_errno()
        raise BpfError(errnum, f"mmap of map fd {fd}")
    return address


def memory_view(address: int, length: int) -> memoryview:
    return memoryview((ctypes.c_ubyte * length).from_address(address)).cast("B")


def unmap_memory(address: int, length: int) -> None:
    _libc.munmap(address, length)


class Counter:
    """A u64 in a BPF_F_MMAPABLE array map, read from memory: no syscall (a lookup costs
    ~2.8 us through ctypes, this ~0.1 us)."""

    def __init__(self, fd: int, index: int = 0):
        self._address = map_memory(fd, mmap.PAGESIZE, mmap.PROT_READ)
        self._view = memory_view(self._address, mmap.PAGESIZE).cast("Q")
        self._index = index
        self._mapped = True

    def __call__(self) -> int:
        return self._view[self._index]

    def close(self) -> None:
        if self._mapped:
            self._mapped = False
            self._view.release()  # a read after this raises ValueError, never touches the unmapped page
            unmap_memory(self._address, mmap.PAGESIZE)


def close_all(fds: list[int | None]) -> None:
    for fd in fds:
        if fd is not None and fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
