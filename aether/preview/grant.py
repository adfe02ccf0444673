"""Short-lived grants that open one private preview host, so a page that holds no token (the
dashboard: its cookie is HttpOnly) can send a browser to a private preview.

A grant is ``EXPIRY.MAC``: ``EXPIRY`` in Unix seconds, ``MAC`` the HMAC-SHA256 of the preview
host name and the expiry, keyed with the workspace token. The gate takes it as
``?aether_grant=`` exactly like ``?token=``: it sets that host's cookie and redirects to the
URL without it. Unlike the token, a grant that leaks (browser history, a proxy's log) opens one
preview host, and never the API: the gate takes each grant once (a grant seen again opens nothing), and
none after ``TTL_SECONDS``. What it opens is the host's cookie, which lasts as the ``?token=``
one does.
"""

from __future__ import annotations

import hmac
import time
from typing import Optional

from aether import credentials

PARAMETER = b"aether_grant"
TTL_SECONDS = 60


def _mac(token: bytes, host_name: bytes, expiry: int) -> bytes:
    return credentials.derive(token, b"aether-grant:%s:%d" % (host_name.lower(), expiry))


def mint(token: bytes, host_name: bytes, now: Optional[float] = None) -> bytes:
    """A grant for ``host_name`` (a preview host name, without port), valid ``TTL_SECONDS``."""
    expiry = int(now if now is not None else time.time()) + TTL_SECONDS
    return b"%d.%s" % (expiry, _mac(token, host_name, expiry))


def valid(token: bytes, host_name: bytes, grant: bytes, now: Optional[float] = None) -> bool:
    """Whether ``grant`` was minted with ``token`` for ``host_name`` and has not expired. An
    expiry further ahead than a grant is ever minted for is refused too."""
    expiry, dot, mac = grant.partition(b".")
    # One spelling per grant (no leading zero): the gate takes each grant once, by its bytes.
    if not dot or not expiry.isdigit() or len(expiry) > 12 or expiry.startswith(b"0"):
        return False
    expiry_at = int(expiry)
    now = now if now is not None else time.time()
    if not now <= expiry_at <= now + TTL_SECONDS + 1:
        return False
    return hmac.compare_digest(mac, _mac(token, host_name, expiry_at))
