"""Redis clients from the URLs fleet mode takes, and those URLs as logs may show them.

- ``redis://[[user]:password@]host:port/db``, ``rediss://...`` (TLS), ``unix:///path?db=N``:
  as the ``redis`` client reads them;
- ``redis+sentinel://[[user]:password@]h1:p1,h2:p2/MASTER[/DB]`` (``rediss+sentinel`` for TLS
  to the master): the master named ``MASTER`` as those Sentinels say it is, found again after a
  failover. The password is the master's; ``?sentinel_password=`` is the Sentinels' own.

Clients never retry on their own (callers reconnect with their own backoff and know what a
failure means to them), and time out a command after ``socket_timeout``: a Redis that hangs
counts as down, like one that refuses.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
SCHEMES = ("redis", "rediss", "unix") + SENTINEL_SCHEMES
SENTINEL_PORT = 26379
_PASSWORD = re.compile(r"(//[^/@]*?:)[^/@]*@")


def describe(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``: fit for a log line."""
    url = _PASSWORD.sub(r"\1***@", url, count=1)
    return re.sub(r"((?:sentinel_)?password=)[^&]*", r"\1***", url)


def check(url: str) -> str:
    """``url``, or ValueError saying what is wrong with it (no connection made)."""
    scheme, sep, _ = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise ValueError(f"{describe(url)} is not a Redis URL: it starts with one of {', '.join(s + '://' for s in SCHEMES)}")
    if scheme in SENTINEL_SCHEMES:
        parse_sentinel(url)
    return url


def parse_sentinel(url: str) -> dict[str, Any]:
    """A ``redis+sentinel://`` URL's parts: sentinels, service, db, username, password,
    sentinel_password, ssl."""
    scheme, _, rest = url.partition("://")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        hosts = netloc
    username = password = None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinels = []
    for item in hosts.split(","):
        if not item:
            continue
        if item.startswith("["):
            host, _, port = item[1:].partition("]")
            port = port.lstrip(":")
        else:
            host, _, port = item.partition(":")
        if not host or (port and not port.isdigit()):
            raise ValueError(f"{describe(url)}: {item!r} is not HOST:PORT")
        sentinels.append((host, int(port) if port else SENTINEL_PORT))
    parts = [part for part in path.split("/") if part]
    if not sentinels or not 1 <= len(parts) <= 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ValueError(f"{describe(url)} is not redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER[/DB]")
    sentinel_password = parse_qs(query).get("sentinel_password")
    return {
        "sentinels": sentinels,
        "service": unquote(parts[0]),
        "db": int(parts[1]) if len(parts) == 2 else 0,
        "username": username,
        "password": password,
        "sentinel_password": sentinel_password[0] if sentinel_password else None,
        "ssl": scheme == "rediss+sentinel",
    }


def client(url: str, *, socket_timeout: float = 2.0, connect_timeout: float = 1.0):
    """A ``redis.asyncio`` client for ``url`` (bytes in, bytes out; hiredis parses replies
    when installed). Connects on first use."""
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    common: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }
    scheme = url.partition("://")[0]
    if scheme not in SENTINEL_SCHEMES:
        check(url)
        return Redis.from_url(url, **common)
    from redis.asyncio.sentinel import Sentinel

    parts = parse_sentinel(url)
    sentinel_kwargs = {"socket_timeout": socket_timeout, "socket_connect_timeout": connect_timeout}
    if parts["sentinel_password"]:
        sentinel_kwargs["password"] = parts["sentinel_password"]
    master = dict(common, db=parts["db"], username=parts["username"], password=parts["password"])
    if parts["ssl"]:
        master["ssl"] = True
    return Sentinel(parts["sentinels"], sentinel_kwargs=sentinel_kwargs).master_for(parts["service"], **master)


T = TypeVar("T")


def _consume(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: a command finished after its caller left is no error


async def call(command: Awaitable[T]) -> T:
    """Await a Redis command without letting a cancellation reach it: the caller is cancelled
    at once, the command finishes (or times out) on its own. redis-py (8.2, seen with XREAD
    BLOCK) can swallow a CancelledError that arrives mid-read and go on reading, so the
    cancelled task hangs until the read ends."""
    task = asyncio.ensure_future(command)
    task.add_done_callback(_consume)
    return await asyncio.shield(task)


def is_down(exc: BaseException) -> bool:
    """Whether ``exc`` says Redis cannot be reached (as opposed to refusing a command)."""
    from redis.exceptions import BusyLoadingError, ConnectionError, ReadOnlyError, TimeoutError

    return isinstance(exc, (ConnectionError, TimeoutError, BusyLoadingError, ReadOnlyError, OSError))
