"""Value types shared by the backends, the port table and the consumers of port events."""

from __future__ import annotations

import dataclasses

OPEN = "open"
CLOSE = "close"
#: An open port's owner, process or address set changed; the event holds the whole new state.
UPDATE = "update"

#: Key kinds. A socket seen by the eBPF probe is keyed by its kernel address; one seen in a
#: sock_diag snapshot by its inode. The two cannot be matched to each other (sock_diag does not
#: report the address), which is why the table reconciles snapshots port by port.
SKADDR = "sk"
INODE = "ino"
#: A socket's key: ``(SKADDR, its kernel address)`` or ``(INODE, its inode)``.
Key = tuple[str, int]


@dataclasses.dataclass(frozen=True, slots=True)
class Listener:
    """One listening TCP socket in this network namespace."""

    key: Key
    port: int
    family: int  # socket.AF_INET or socket.AF_INET6
    address: str
    pid: int | None = None
    inode: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class PortEvent:
    """A port starting (``open``) or stopping (``close``) to listen, or an open port whose
    state changed (``update``: another owner, say once a daemonizing server's parent exits, or
    a listener on another address); ``open`` and ``update`` carry the port's whole state.

    ``to_message`` gives the wire form of the ``ports`` channel (docs/protocol.md); the fields beyond the
    original ones (``addresses``) and the ``update`` type are allowed extras.

    ``seen_ns`` and ``backend`` say when and how the monitor learnt of it (they are not part of
    the event's identity): the probe record's kernel timestamp (``bpf_ktime_get_ns``) and
    ``ebpf``; the start of the snapshot that found it and ``sockdiag``; the moment the
    ignored ports changed and ``config``; or, for an ``update`` after a recorded owner exited,
    the moment its exit was handled and ``pidfd``. ``seen_ns`` is CLOCK_MONOTONIC, ``time.monotonic_ns``.
    """

    type: str
    port: int
    pid: int | None = None
    process: str | None = None
    addresses: tuple[str, ...] = ()
    seen_ns: int = dataclasses.field(default=0, compare=False)
    backend: str = dataclasses.field(default="", compare=False)

    def to_message(self) -> dict:
        if self.type == CLOSE:
            return {"channel": "ports", "type": CLOSE, "port": self.port}
        return {
            "channel": "ports",
            "type": self.type,
            "port": self.port,
            "pid": self.pid,
            "process": self.process,
            "addresses": list(self.addresses),
        }


@dataclasses.dataclass(frozen=True, slots=True)
class PortState:
    """A port that is open now, as ``aether ports list`` shows it."""

    port: int
    pid: int | None
    process: str | None
    addresses: tuple[str, ...]
    pids: tuple[int, ...] = ()

    def to_json(self) -> dict:
        return {
            "port": self.port,
            "pid": self.pid,
            "process": self.process,
            "addresses": list(self.addresses),
            "pids": list(self.pids),
        }
