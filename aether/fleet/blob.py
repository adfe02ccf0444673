"""A workspace as Redis keeps it: one compact JSON object, ~250 bytes + ~30 per open port.

``{"v":1,"prefix":"abc123","project":"<project id>","workspace":"<workspace id>",
"address":"10.0.0.5:3001","epoch":"<16 hex>","started":<ms>,"dead_after":3000,
"verifier":"<43 base64url>","alive":true,"ports":{"3000":{"visibility":"private"}},
"closed_public":[8080],"names":{"web":3000}}``

- ``ports``: the ports open now, each with its visibility; a gateway answers 502 for any other.
- ``closed_public``: public ports that are not open now, so a closed public port answers the
  self-refreshing 502 to anyone (as the VM itself does) instead of asking for a credential.
- ``names``: registry key -> port, for ``{key}-{prefix}`` hosts (keys are never all digits).
- ``alive`` false: the VM stopped cleanly; gateways answer 503 at once.
- ``dead_after``: the VM's heartbeat deadline in ms (``aether fleet status`` shows the last
  heartbeat from it; a gateway's grace after Redis lost its data is twice it).

Fields a reader does not know are ignored, so a field can be added without a new ``v``.
:func:`decode` checks everything a gateway relies on and raises :class:`BlobError` for the
rest; a caller skips such a workspace with a log line, it never fails on one.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping

import ujson

VERSION = 1
PREFIX = re.compile(r"[a-z0-9]{1,64}\Z")
#: As the registry's keys, which preview host names carry before ``-{prefix}``.
NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}\Z")
EPOCH = re.compile(r"[0-9a-f]{16}\Z")
VERIFIER = re.compile(r"[A-Za-z0-9_-]{43}\Z")
_HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?\Z")
_PORT = re.compile(r"[1-9][0-9]{0,4}\Z")
_IDENTITY_MAX = 256
VISIBILITIES = ("private", "public")


class BlobError(ValueError):
    """A blob that is not a workspace this code can route to; the message says why."""


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (a name, an IPv4 address or ``[IPv6]``) as (host, port), or ValueError."""
    host, sep, port = address.rpartition(":")
    if not sep or not _PORT.match(port) or int(port) > 65535:
        raise ValueError(f"{address!r} is not HOST:PORT with a port of 1-65535")
    if host.startswith("[") and host.endswith("]"):
        import ipaddress

        try:
            host = str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            raise ValueError(f"{address!r}: {host} is not an IPv6 address") from None
    elif not _HOST_NAME.match(host):
        raise ValueError(f"{address!r}: {host!r} is not a host name or address (IPv6 goes in brackets)")
    return host, int(port)


class Workspace:
    """One decoded blob. ``open``: port -> public; ``raw``: the blob's bytes, so a reload that
    finds the same bytes keeps this object instead of decoding again."""

    __slots__ = (
        "prefix",
        "project",
        "workspace",
        "address",
        "host",
        "port",
        "epoch",
        "started",
        "dead_after",
        "verifier",
        "alive",
        "open",
        "closed_public",
        "names",
        "raw",
    )
    # Annotated for the type checker only: a bare annotation makes no class attribute, so the
    # slots stay as they are.
    prefix: str
    project: str
    workspace: str
    address: str
    host: str
    port: int
    epoch: str
    started: int
    dead_after: int
    verifier: bytes
    alive: bool
    open: dict[int, bool]
    closed_public: frozenset[int]
    names: dict[str, int]
    raw: bytes

    def is_public(self, port: int) -> bool:
        public = self.open.get(port)
        return port in self.closed_public if public is None else public

    def to_json(self) -> dict:
        return ujson.loads(self.raw)

    def __repr__(self) -> str:
        return f"<Workspace {self.prefix} {self.address} epoch={self.epoch} ports={sorted(self.open)}>"


def encode(
    *,
    prefix: str,
    project: str,
    workspace: str,
    address: str,
    epoch: str,
    started: int,
    dead_after: int,
    verifier: str,
    alive: bool,
    ports: Mapping[int, str],
    public: Collection[int] = (),
    names: Mapping[str, int] = {},
) -> bytes:
    """The blob of a workspace whose open ports are ``ports`` (port -> visibility), whose
    public ports (open or not) are ``public`` and whose registry is ``names``."""
    blob = {
        "v": VERSION,
        "prefix": prefix,
        "project": project,
        "workspace": workspace,
        "address": address,
        "epoch": epoch,
        "started": int(started),
        "dead_after": int(dead_after),
        "verifier": verifier,
        "alive": bool(alive),
        "ports": {str(port): {"visibility": ports[port]} for port in sorted(ports)},
        "closed_public": sorted(port for port in public if port not in ports),
        "names": {key: names[key] for key in sorted(names)},
    }
    return ujson.dumps(blob, ensure_ascii=False, escape_forward_slashes=False).encode()


def _port(value, what: str) -> int:
    if type(value) is not int or not 1 <= value <= 65535:
        raise BlobError(f"{what}: {value!r} is not a port number")
    return value


def _text(blob: dict, field: str, pattern: re.Pattern | None = None) -> str:
    value = blob.get(field)
    if not isinstance(value, str) or not value or len(value) > _IDENTITY_MAX:
        raise BlobError(f"{field} must be a string of 1-{_IDENTITY_MAX} characters")
    if pattern is not None and not pattern.match(value):
        raise BlobError(f"{field} {value[:80]!r} is malformed")
    return value


def decode(raw: bytes, prefix: str | None = None) -> Workspace:
    """The workspace in ``raw`` (stored under ``prefix``, when given: it must say the same)."""
    try:
        blob = ujson.loads(raw)
    except (ValueError, TypeError) as exc:
        raise BlobError(f"not JSON: {exc}") from None
    if not isinstance(blob, dict):
        raise BlobError("not a JSON object")
    if blob.get("v") != VERSION:
        raise BlobError(f"version {blob.get('v')!r}, not {VERSION}")
    ws = Workspace()
    ws.raw = raw
    ws.prefix = _text(blob, "prefix", PREFIX)
    if prefix is not None and ws.prefix != prefix:
        raise BlobError(f"stored under {prefix!r} but says prefix {ws.prefix!r}")
    ws.project = _text(blob, "project")
    ws.workspace = _text(blob, "workspace")
    ws.epoch = _text(blob, "epoch", EPOCH)
    ws.verifier = _text(blob, "verifier", VERIFIER).encode()
    ws.address = _text(blob, "address")
    try:
        ws.host, ws.port = split_address(ws.address)
    except ValueError as exc:
        raise BlobError(f"address {exc}") from None
    for field in ("started", "dead_after"):
        value = blob.get(field)
        if type(value) is not int or value < (1 if field == "dead_after" else 0):
            raise BlobError(f"{field} must be a positive integer of milliseconds")
    ws.started, ws.dead_after = blob["started"], blob["dead_after"]
    alive = blob.get("alive")
    if type(alive) is not bool:
        raise BlobError("alive must be true or false")
    ws.alive = alive

    ports = blob.get("ports")
    if not isinstance(ports, dict):
        raise BlobError("ports must be an object")
    open_ = {}
    for key, value in ports.items():
        # One spelling per port (decimal, no leading zero), as in a preview host name.
        if not _PORT.match(key) or int(key) > 65535:
            raise BlobError(f"ports: {key[:20]!r} is not a port number")
        visibility = value.get("visibility") if isinstance(value, dict) else None
        if visibility not in VISIBILITIES:
            raise BlobError(f"ports: {key}: visibility must be private or public")
        open_[int(key)] = visibility == "public"
    ws.open = open_
    closed_public = blob.get("closed_public", [])
    if not isinstance(closed_public, list):
        raise BlobError("closed_public must be an array of port numbers")
    ws.closed_public = frozenset(_port(port, "closed_public") for port in closed_public)
    names = blob.get("names", {})
    if not isinstance(names, dict):
        raise BlobError("names must be an object")
    for key, port in names.items():
        if not NAME.match(key) or key.isdigit():
            raise BlobError(f"names: {key[:80]!r} is not a registry key")
        _port(port, f"names: {key}")
    ws.names = names
    return ws
