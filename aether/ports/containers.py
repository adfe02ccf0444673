"""The container behind a port held by Docker.

A port a container publishes (``docker run -p 8080:80``) is held on the host by
``docker-proxy``, one per published port, whose arguments name the container's address
(``-proto tcp -host-ip 0.0.0.0 -host-port 8080 -container-ip 172.17.0.2 -container-port 80``),
or, with Docker's userland proxy off, by ``dockerd`` itself. Neither names the container: that
is asked of dockerd, ``GET /containers/json`` over its Unix socket, a short request answered
from memory. Nothing is asked unless a port's holder is one of those two; with no socket there,
nothing happens at all.

dockerd opens a container's ports before it starts the container, and lists the container
only once it runs: a listing asked for as the port opens does not name it yet, so the port's
container is asked for again while it stays open (:meth:`Containers.awaited`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping

log = logging.getLogger("aether.ports")

#: Where dockerd answers unless told otherwise (``--docker-socket``, or ``DOCKER_HOST``).
SOCKET = "/var/run/docker.sock"
#: Seconds for the whole exchange with dockerd. It answers /containers/json from memory, in
#: milliseconds for tens of containers; a daemon that takes longer is busy, and the port is
#: named without its container rather than late.
TIMEOUT = 1.0
#: Seconds one answer serves every port that opened before it was asked for: ``docker compose
#: up`` opens its ports together, and one request names them all. A port that opened after
#: the request was sent is asked for anew: the answer cannot know it.
TTL = 2.0
#: Seconds between a listing that does not name a Docker port's container and the next, at
#: first, doubling to :data:`RETRY_MAX`. docker-proxy listens 0.05-0.6 s before dockerd lists
#: the container (Docker 20.10, a busybox image, 2-vCPU VM, idle to loaded): of the asks 0, 0.1,
#: 0.3 and 0.7 s after the open, the second names it on an idle machine, the fourth on a loaded one.
RETRY_FIRST = 0.1
RETRY_MAX = 2.0
#: Seconds after its open a port's container is asked for at most: long enough for a
#: container whose start waits on a slow network or volume plugin; a port of dockerd's that no
#: container publishes (its own API on TCP) costs about twenty requests in all.
RETRY_FOR = 30.0
#: Bytes of answer read at most (about 2 KiB a container).
MAX_ANSWER = 8 << 20
#: Characters kept of a container's name and image.
MAX_NAME = 128

#: Process names (``comm``) of Docker's port holders.
HOLDERS = frozenset({"docker-proxy", "dockerd"})


@dataclasses.dataclass(frozen=True, slots=True)
class ProxyTarget:
    """Where a ``docker-proxy`` forwards to, from its arguments."""

    proto: str
    host_ip: str | None
    host_port: int | None
    container_ip: str | None
    container_port: int | None


@dataclasses.dataclass(frozen=True, slots=True)
class Container:
    id: str
    name: str
    image: str

    @property
    def label(self) -> str:
        """``NAME (IMAGE)``, as a port's row shows it after ``container:``."""
        return f"{self.name} ({self.image})" if self.image else self.name

    def to_json(self) -> dict:
        return {"id": self.id, "name": self.name, "image": self.image}


def socket_path(given: str | None = None, environ: Mapping[str, str] = os.environ) -> str:
    """The socket dockerd answers on: ``given``, else ``DOCKER_HOST``'s path where it is
    ``unix://PATH`` (as the docker CLI reads it), else :data:`SOCKET`. A ``DOCKER_HOST`` of
    another kind (``tcp://``, ``ssh://``) names a daemon that holds no port here."""
    if given:
        return given
    host = environ.get("DOCKER_HOST", "")
    if host.startswith("unix://") and len(host) > len("unix://"):
        return host[len("unix://") :]
    return SOCKET


def is_docker(process: str | None, argv: Iterable[str] | None = None) -> bool:
    """Whether a port's holder is Docker's: by its process name, or the name it was run by."""
    if process in HOLDERS:
        return True
    first = next(iter(argv or ()), "")
    return os.path.basename(first) in HOLDERS


def proxy_target(argv: Iterable[str]) -> ProxyTarget | None:
    """A ``docker-proxy`` command line's target, or None if it has none. Go's flag syntax:
    ``-name value``, ``-name=value``, with one dash or two."""
    flags: dict[str, str] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("-") or arg in ("-", "--"):
            continue
        name = arg.lstrip("-")
        if "=" in name:
            name, value = name.split("=", 1)
        elif name in _FLAGS and i < len(args):
            value = args[i]
            i += 1
        else:
            continue
        flags[name] = value
    target = ProxyTarget(
        proto=flags.get("proto", "tcp"),
        host_ip=flags.get("host-ip"),
        host_port=_port(flags.get("host-port")),
        container_ip=flags.get("container-ip"),
        container_port=_port(flags.get("container-port")),
    )
    return None if target.container_ip is None and target.container_port is None else target


_FLAGS = frozenset({"proto", "host-ip", "host-port", "container-ip", "container-port"})


def _port(text: str | None) -> int | None:
    if text is None or not text.isdigit():
        return None
    port = int(text)
    return port if 0 < port < 65536 else None


def publishers(listing: object, port: int, target: ProxyTarget | None = None) -> list[Container]:
    """The containers of a ``/containers/json`` answer that publish TCP ``port`` on the host;
    with a proxy's target, those on its container address first. Whatever in the answer is
    not as the Engine API documents it is passed over."""
    found: list[tuple[bool, Container]] = []
    for entry in listing if isinstance(listing, list) else ():
        if not isinstance(entry, dict) or not _publishes(entry.get("Ports"), port):
            continue
        names = entry.get("Names")
        name = names[0] if isinstance(names, list) and names and isinstance(names[0], str) else ""
        ident = entry.get("Id")
        ident = ident if isinstance(ident, str) else ""
        image = entry.get("Image")
        image = image if isinstance(image, str) else ""
        name = name.lstrip("/") or ident[:12]
        container = Container(ident[:64], name[:MAX_NAME], image[:MAX_NAME])
        found.append((target is not None and target.container_ip in _addresses(entry), container))
    found.sort(key=lambda pair: not pair[0])
    return [container for _matched, container in found]


def _publishes(ports: object, port: int) -> bool:
    return isinstance(ports, list) and any(
        isinstance(p, dict) and p.get("PublicPort") == port and p.get("Type", "tcp") == "tcp" for p in ports
    )


def _addresses(entry: dict) -> set[str]:
    settings = entry.get("NetworkSettings")
    networks = settings.get("Networks") if isinstance(settings, dict) else None
    if not isinstance(networks, dict):
        return set()
    return {n["IPAddress"] for n in networks.values() if isinstance(n, dict) and isinstance(n.get("IPAddress"), str)}


class AnswerError(Exception):
    pass


def parse_answer(raw: bytes) -> tuple[int, bytes]:
    """An HTTP/1.x response read to its end: (status, body). Chunked or not; AnswerError for
    anything else."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise AnswerError("no end of headers")
    lines = head.split(b"\r\n")
    status = lines[0].split(b" ", 2)
    if len(status) < 2 or not status[0].startswith(b"HTTP/1.") or not status[1].isdigit():
        raise AnswerError("not an HTTP/1 response")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = _dechunk(body)
    elif b"content-length" in headers:
        length = headers[b"content-length"]
        if not length.isdigit() or len(body) < int(length):
            raise AnswerError("body shorter than its Content-Length")
        body = body[: int(length)]
    return int(status[1]), body


def _dechunk(data: bytes) -> bytes:
    out: list[bytes] = []
    pos = 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            raise AnswerError("cut chunked body")
        try:
            size = int(data[pos:end].split(b";", 1)[0], 16)
        except ValueError:
            raise AnswerError("bad chunk size") from None
        if size == 0:
            return b"".join(out)
        start = end + 2
        if len(data) < start + size + 2:
            raise AnswerError("cut chunked body")
        out.append(data[start : start + size])
        pos = start + size + 2


class Containers:
    """Names the containers behind Docker's ports, asking dockerd at most once per ``ttl``
    seconds for the ports that opened before the last request, whatever their number."""

    def __init__(self, path: str = SOCKET, ttl: float = TTL, timeout: float = TIMEOUT):
        self.path = path
        self.ttl = ttl
        self.timeout = timeout
        self._listing: object = None
        self._asked = -float("inf")  # time.monotonic() when the kept answer was asked for
        self._pending: tuple[float, asyncio.Future] | None = None
        #: Requests made to dockerd (for tests and metrics).
        self.requests = 0

    async def publisher(self, port: int, target: ProxyTarget | None = None, since: float = -float("inf")) -> Container | None:
        """The container publishing ``port``, or None: none does, dockerd is not there, or
        it did not answer in time. The answer is one asked for after ``since`` (a
        ``time.monotonic()``, when the port opened). Never raises."""
        listing = await self.listing(since)
        found = publishers(listing, port, target)
        return found[0] if found else None

    async def awaited(
        self, port: int, target: ProxyTarget | None, since: float, wanted: Callable[[], bool] = lambda: True
    ) -> Container | None:
        """:meth:`publisher`, asked again while dockerd does not list the port's container yet
        (it lists a container once it runs, after its ports open), ``wanted()`` holds (the port
        is still open, the same owner's) and :data:`RETRY_FOR` seconds since ``since`` have not
        passed; None as soon as there is no socket."""
        opened, delay = since, RETRY_FIRST
        while True:
            container = await self.publisher(port, target, since)
            if container is not None or not wanted():
                return container
            now = time.monotonic()
            if not os.path.exists(self.path) or now + delay - opened > RETRY_FOR:
                return None
            await asyncio.sleep(delay)
            since, delay = now, min(delay * 2, RETRY_MAX)  # an answer asked for after this one
            if not wanted():
                return None

    async def listing(self, since: float = -float("inf")) -> object:
        """dockerd's ``/containers/json`` asked for after ``since`` and at most ``ttl`` seconds
        ago; None without an answer."""
        if self._asked >= since and time.monotonic() - self._asked < self.ttl:
            return self._listing
        if self._pending is None or self._pending[0] < since:
            asked = time.monotonic()
            self._pending = (asked, asyncio.ensure_future(self._fetch(asked)))
        pending = self._pending
        try:
            return await asyncio.shield(pending[1])
        finally:
            if self._pending is pending and pending[1].done():
                self._pending = None

    async def _fetch(self, asked: float) -> object:
        listing = None
        if os.path.exists(self.path):
            self.requests += 1
            try:
                listing = await asyncio.wait_for(self._get("/containers/json"), self.timeout)
            except (TimeoutError, OSError, AnswerError, ValueError) as exc:
                error = str(exc) or type(exc).__name__
                log.debug("dockerd did not answer", extra={"socket": self.path, "error": error})
        if asked >= self._asked:  # not an older request's answer over a newer one's
            self._listing, self._asked = listing, asked
        return listing

    async def _get(self, path: str) -> object:
        reader, writer = await asyncio.open_unix_connection(self.path)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n".encode())
            raw = bytearray()
            while len(raw) <= MAX_ANSWER:
                more = await reader.read(MAX_ANSWER + 1 - len(raw))
                if not more:
                    break
                raw += more
            if len(raw) > MAX_ANSWER:
                raise AnswerError("answer too long")
        finally:
            writer.close()
        status, body = parse_answer(bytes(raw))
        if status != 200:
            raise AnswerError(f"status {status}")
        return json.loads(body)
