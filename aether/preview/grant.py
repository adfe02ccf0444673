"""Short-lived grants that open one private preview host, so a page that holds no token (the
dashboard: its cookie is HttpOnly) can send a browser to a private preview.

A grant is ``EXPIRY.NONCE.MAC``: ``EXPIRY`` in Unix seconds, ``NONCE`` 32 random hex digits,
``MAC`` the HMAC-SHA256 of the preview host name, the expiry and the nonce, keyed with the
workspace token. The nonce makes every grant its own: two minted in the same second for the
same host (two browsers, two clicks) are two grants, each good once. The gate takes it as
``?aether_grant=`` exactly like ``?token=``: it sets that host's cookie and redirects to the
URL without it. Unlike the token, a grant that leaks (browser history, a proxy's log) opens one
preview host, and never the API: the gate takes each grant once (a grant seen again opens
nothing, see :func:`redeem`), and none after ``TTL_SECONDS``. What it opens is the host's
cookie, which lasts as the ``?token=`` one does.
"""

from __future__ import annotations

import hmac
import re
import secrets
import time

from aether import credentials

PARAMETER = b"aether_grant"
TTL_SECONDS = 60
NONCE_BYTES = 16
#: One spelling per grant: an expiry without a leading zero, the nonce and MAC in lower-case hex.
_GRANT = re.compile(rb"([1-9][0-9]{0,11})\.([0-9a-f]{%d})\.([0-9a-f]{64})" % (2 * NONCE_BYTES))


def _mac(token: bytes, host_name: bytes, expiry: int, nonce: bytes) -> bytes:
    return credentials.derive(token, b"aether-grant:%s:%d:%s" % (host_name.lower(), expiry, nonce))


def mint(token: bytes, host_name: bytes, now: float | None = None) -> bytes:
    """A new grant for ``host_name`` (a preview host name, without port), valid ``TTL_SECONDS``."""
    expiry = int(now if now is not None else time.time()) + TTL_SECONDS
    nonce = secrets.token_hex(NONCE_BYTES).encode()
    return b"%d.%s.%s" % (expiry, nonce, _mac(token, host_name, expiry, nonce))


def check(token: bytes, host_name: bytes, grant: bytes, now: float | None = None) -> tuple[int, bytes] | None:
    """(expiry, nonce) of ``grant`` when it was minted with ``token`` for ``host_name`` and has
    not expired, else None. An expiry further ahead than a grant is ever minted for is refused."""
    match = _GRANT.fullmatch(grant)
    if match is None:
        return None
    expiry, nonce, mac = match.groups()
    expiry_at = int(expiry)
    now = now if now is not None else time.time()
    if not now <= expiry_at <= now + TTL_SECONDS + 1:
        return None
    if not hmac.compare_digest(mac, _mac(token, host_name, expiry_at, nonce)):
        return None
    return expiry_at, nonce


def valid(token: bytes, host_name: bytes, grant: bytes, now: float | None = None) -> bool:
    """Whether ``grant`` was minted with ``token`` for ``host_name`` and has not expired."""
    return check(token, host_name, grant, now) is not None


#: Nonces kept in a used set at most. Only a signed-in dashboard mints grants, one a click: 4,096
#: in the minute a grant lives is far past any use, and holds ~0.5 MB.
MAX_USED = 4096


def redeem(
    used: dict[bytes, int], token: bytes, host_name: bytes, grant: bytes, now: float | None = None, limit: int = MAX_USED
) -> bool:
    """Whether ``grant`` is live for ``host_name`` and its nonce is not in ``used`` (nonce ->
    expiry); it is added now, so a grant is good once.

    Bounded: expired nonces are dropped once ``used`` holds ``limit``, and while ``limit`` live
    ones are held a new grant opens nothing (as a used one would) rather than an old one being
    forgotten, which would let it open its host a second time.
    """
    now = now if now is not None else time.time()
    checked = check(token, host_name, grant, now)
    if checked is None:
        return False
    expiry, nonce = checked
    if nonce in used:
        return False
    if len(used) >= limit:
        for old in [old for old, until in used.items() if until < now]:
            del used[old]
        if len(used) >= limit:
            return False
    used[nonce] = expiry
    return True
