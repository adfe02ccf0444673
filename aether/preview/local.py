"""The addresses of this network namespace: the only upstreams the preview proxy may reach.

Anyone can listen on an address that is not the workspace's (``IP_FREEBIND``,
``IP_TRANSPARENT``), and a connection to it would leave for another host; an address removed
from its interface leaves its listeners behind in the same way. So an upstream must be
loopback or an address the kernel has assigned to an interface here.

:class:`LocalAddresses` keeps that set from a ``NETLINK_ROUTE`` socket: one ``RTM_GETADDR``
dump, then the ``RTM_NEWADDR``/``RTM_DELADDR`` notifications, read on the event loop as they
come (nothing is polled). The subscription is made before the dump on the same socket, so no
change falls between the two. When the socket's buffer overflows (``ENOBUFS``: notifications
were lost) a fresh socket dumps again and replaces the set. Checking an address is a lookup
in :attr:`LocalAddresses.addresses`, a set that is updated in place.

An IPv6 address still in duplicate address detection, or one that failed it, is not yet (or
never) the interface's, and counts as absent until the kernel says otherwise.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
from collections.abc import Callable, Collection

log = logging.getLogger("aether.preview")

# <linux/rtnetlink.h>, <linux/if_addr.h>
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR = 0x10, 0x100
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
IFA_F_DADFAILED, IFA_F_TENTATIVE = 0x08, 0x40
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, interface index
_RTATTR = struct.Struct("=HH")  # length, type
_FLAGS = struct.Struct("=I")
#: Several hundred notifications (each ~1 KiB of buffer) before an overflow forces a new dump.
_RECV_BUFFER = 256 << 10
_DUMP_TIMEOUT = 5.0

#: Always local, whatever the interfaces say: the loopback addresses never leave the host.
LOOPBACK = frozenset({"127.0.0.1", "::1"})


def is_local(address: str, local: Collection[str]) -> bool:
    """Whether connecting to ``address`` stays on this host: it is in ``local`` (the
    interfaces' addresses, loopback's included) or anywhere in 127.0.0.0/8."""
    return address in local or address.startswith("127.")


def parse(data: bytes) -> list[tuple[int, tuple[bool, int, str] | None]]:
    """The netlink messages in one datagram: (type, (assigned, interface, address)) for each
    address message, (type, None) for any other; ``assigned`` is False for a deletion and
    for an address not yet usable (tentative, or failed duplicate address detection).
    An error message raises ``OSError``."""
    out: list[tuple[int, tuple[bool, int, str] | None]] = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, kind, _flags, _sequence, _port = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size or offset + length > len(data):
            raise OSError(errno.EPROTO, "rtnetlink: truncated message")
        body = offset + _HEADER.size
        if kind == _NLMSG_ERROR:
            code = -struct.unpack_from("=i", data, body)[0]
            if code:
                raise OSError(code, f"rtnetlink: {errno.errorcode.get(code, code)}")
            out.append((kind, None))
        elif kind in (RTM_NEWADDR, RTM_DELADDR) and length >= _HEADER.size + _IFADDRMSG.size:
            out.append((kind, _address(kind, data, body, offset + length)))
        else:
            out.append((kind, None))
        offset += (length + 3) & ~3
    return out


def _address(kind: int, data: bytes, start: int, end: int) -> tuple[bool, int, str] | None:
    family, _prefix, flags, _scope, index = _IFADDRMSG.unpack_from(data, start)
    if family == socket.AF_INET:
        size = 4
    elif family == socket.AF_INET6:
        size = 16
    else:
        return None
    local = address = None
    at = start + _IFADDRMSG.size
    while at + _RTATTR.size <= end:
        length, kind_ = _RTATTR.unpack_from(data, at)
        if length < _RTATTR.size:
            break
        value = data[at + _RTATTR.size : at + length]
        if kind_ == IFA_LOCAL and len(value) == size:
            local = value
        elif kind_ == IFA_ADDRESS and len(value) == size:
            address = value
        elif kind_ == IFA_FLAGS and len(value) == 4:
            flags = _FLAGS.unpack(value)[0]  # the full 32 bits; the header has the low 8
        at += (length + 3) & ~3
    # IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on a point-to-point
    # link, and the only one for most IPv6 addresses.
    raw = local if local is not None else address
    if raw is None:
        return None
    assigned = kind == RTM_NEWADDR and not flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED)
    return assigned, index, socket.inet_ntop(family, raw)


def _dump_request(sequence: int) -> bytes:
    body = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    return _HEADER.pack(_HEADER.size + len(body), RTM_GETADDR, _NLM_F_REQUEST | _NLM_F_DUMP, sequence, 0) + body


class LocalAddresses:
    """The set of this namespace's addresses, kept current on ``loop``; see the module
    docstring. ``on_change(added, removed)`` runs on the loop after each change."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_change: Callable[[set[str], set[str]], None] = lambda a, r: None):
        self.loop = loop
        self.on_change = on_change
        #: Every address assigned here now, and loopback's. Updated in place: hold it.
        self.addresses: set[str] = set(LOOPBACK)
        self._interfaces: dict[str, set[int]] = {}  # address -> the interfaces that have it
        self._sock: socket.socket | None = None
        self._sequence = 0
        self.resyncs = 0  # dumps after lost notifications

    def start(self) -> None:
        """Read the addresses and subscribe to their changes; ``OSError`` if netlink fails."""
        self._resync()

    def close(self) -> None:
        if self._sock is not None:
            self.loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def _resync(self) -> None:
        for attempt in range(3):
            try:
                return self._open()
            except OSError as exc:
                # Notifications can overflow the new socket while it dumps, too: try again.
                if exc.errno != errno.ENOBUFS or attempt == 2:
                    raise

    def _open(self) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECV_BUFFER)
            sock.bind((0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
            self._sequence += 1
            sock.settimeout(_DUMP_TIMEOUT)  # the kernel answers a dump at once; never hang on it
            sock.send(_dump_request(self._sequence))
            interfaces: dict[str, set[int]] = {}
            done = False
            while not done:
                for kind, entry in parse(sock.recv(1 << 16)):
                    if entry is not None:
                        _apply(interfaces, entry)
                    # Notifications carry sequence 0, so the only DONE (or ERROR 0) is the dump's.
                    done = done or kind in (_NLMSG_DONE, _NLMSG_ERROR)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.close()
        self._sock = sock
        self._replace(interfaces)
        self.loop.add_reader(sock.fileno(), self._readable)

    def _replace(self, interfaces: dict[str, set[int]]) -> None:
        before = set(self._interfaces)
        self._interfaces = interfaces
        after = set(interfaces)
        self._publish(after - before, before - after)

    def _publish(self, added: set[str], removed: set[str]) -> None:
        removed -= LOOPBACK
        self.addresses -= removed
        self.addresses |= added
        if added or removed:
            # At most a few of each in the line: a namespace can hold thousands.
            log.info(
                "local addresses changed",
                extra={
                    "added": sorted(added)[:8],
                    "removed": sorted(removed)[:8],
                    "count": len(self.addresses),
                },
            )
            self.on_change(added, removed)

    def _readable(self) -> None:
        sock = self._sock
        assert sock is not None  # the reader is registered only while it is open
        added: set[str] = set()
        removed: set[str] = set()
        try:
            for _ in range(64):  # a bounded batch per wake-up; the rest wakes the loop again
                try:
                    data = sock.recv(1 << 16)
                except (BlockingIOError, InterruptedError):
                    break
                for _kind, entry in parse(data):
                    if entry is None:
                        continue
                    had = entry[2] in self._interfaces
                    _apply(self._interfaces, entry)
                    has = entry[2] in self._interfaces
                    if had and not has:
                        added.discard(entry[2])
                        removed.add(entry[2])
                    elif has and not had:
                        removed.discard(entry[2])
                        added.add(entry[2])
        except OSError as exc:
            self._publish(added, removed)
            if exc.errno != errno.ENOBUFS:
                log.warning("local address notifications failed; reading them again", extra={"error": str(exc)})
            self.resyncs += 1
            try:
                self._resync()
            except OSError as again:
                # Without notifications the set could go stale: keep loopback only, which is
                # never wrong, rather than addresses that may have moved to another host.
                log.error("local addresses unavailable; previews reach loopback only", extra={"error": str(again)})
                self.close()
                self._replace({})
            return
        self._publish(added, removed)


def _apply(interfaces: dict[str, set[int]], entry: tuple[bool, int, str]) -> None:
    assigned, index, address = entry
    if assigned:
        interfaces.setdefault(address, set()).add(index)
    else:
        holders = interfaces.get(address)
        if holders is not None:
            holders.discard(index)
            if not holders:
                del interfaces[address]
