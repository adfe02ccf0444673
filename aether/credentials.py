"""The workspace token's proofs, in bytes, for every door that takes one: the WebSocket and REST
handlers (Tornado's strings, encoded) and the preview gate (raw request bytes).

A derived value (``derive``) is HMAC-SHA256 keyed with the token: it shows the token was known,
cannot be turned back into it, and stops working when the token changes. The dashboard's cookie,
each preview host's cookie and the dashboard's grants are such values, each over its own message.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable


def derive(token: bytes, message: bytes) -> bytes:
    """HMAC-SHA256 of ``message`` keyed with ``token``, in lower-case hex."""
    return hmac.new(token, message, hashlib.sha256).hexdigest().encode()


def bearer(authorization: bytes, token: bytes) -> bool:
    """Whether an ``Authorization`` value is ``Bearer <token>``."""
    scheme, _, given = authorization.strip().partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), token)


def has_cookie(headers: Iterable[bytes], name: bytes, expected: bytes) -> bool:
    """Whether any ``Cookie`` header holds ``name=expected``."""
    for header in headers:
        for pair in header.split(b";"):
            key, _, value = pair.strip().partition(b"=")
            if key == name and hmac.compare_digest(value.strip(), expected):
                return True
    return False


def same_origin(origins: list[bytes], host: bytes) -> bool:
    """Whether the request's one ``Origin`` is ``http(s)://`` + its ``Host``: what a browser
    sends from a page of the host it opens a WebSocket to (a page cannot set either header)."""
    if len(origins) != 1 or not host:
        return False
    scheme, sep, rest = origins[0].strip().partition(b"://")
    return (
        bool(sep)
        and scheme.lower() in (b"http", b"https")
        and bool(rest)
        and b"/" not in rest
        and rest.lower() == host.strip().lower()
    )
