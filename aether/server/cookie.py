"""The dashboard's login cookie, and what it may open.

``GET /?token=TOKEN`` sets ``aether_dashboard``: HttpOnly (the page's scripts never see it),
``SameSite=Lax`` (another site's page never sends it along, though a link from one may open the
page), host-only (no ``Domain``, so preview hosts never get it), ``Secure`` when the request came
over TLS. Its value is HMAC-SHA256 of a fixed label keyed with the workspace token: it proves
the token was shown, cannot be turned back into it, and stops working when the token changes.

Browsers scope cookies by host, not port: every other server the browser visits on the same
host (a dev server on ``127.0.0.1:5173`` beside aether on ``127.0.0.1:3001``) is sent this
cookie too, and could replay it with any ``Origin`` it likes. So the cookie opens less than the
token: the ``ports`` channel and ``config`` ``get``/``registry`` (``DASHBOARD``), what the page
uses, and never terminals, files, the agent or ``config set``.

The WebSocket accepts the cookie in place of the token only from a page of the same origin:
a browser attaches cookies to a WebSocket opened by any site, and WebSockets are not bound by
CORS, so the ``Origin`` is the only defence against cross-site WebSocket hijacking.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Optional

from tornado.httputil import HTTPServerRequest

NAME = "aether_dashboard"
#: What a session opened by the cookie may send (channel, type); it hears only these channels.
DASHBOARD = frozenset({("ports", "kill"), ("ports", "visibility"), ("config", "get"), ("config", "registry")})
DASHBOARD_CHANNELS = frozenset(channel for channel, _ in DASHBOARD)


def value(token: str) -> str:
    return hmac.new(token.encode(), b"aether-dashboard", hashlib.sha256).hexdigest()


def is_tls(request: HTTPServerRequest) -> bool:
    """Whether the browser's connection is TLS: ours, or the TLS front's (``X-Forwarded-Proto``).
    A forged header can only make the cookie ``Secure``, which costs nothing."""
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return request.protocol == "https" or forwarded == "https"


def header(token: str, secure: bool) -> str:
    """The ``Set-Cookie`` value. A session cookie: it goes when the browser's session does."""
    attributes = "Path=/; HttpOnly; SameSite=Lax" + ("; Secure" if secure else "")
    return f"{NAME}={value(token)}; {attributes}"


def present(request: HTTPServerRequest, token: str) -> bool:
    """Whether ``request`` carries a valid dashboard cookie."""
    expected = value(token).encode()
    for raw in request.headers.get_list("Cookie"):
        for pair in raw.split(";"):
            name, _, got = pair.strip().partition("=")
            if name == NAME and hmac.compare_digest(got.strip().encode("utf-8", "replace"), expected):
                return True
    return False


def _authority(origin: str) -> Optional[str]:
    scheme, sep, rest = origin.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest or "/" in rest:
        return None
    return rest.lower()


def same_origin(request: HTTPServerRequest) -> bool:
    """Whether the request's one ``Origin`` names the host it was sent to, its ``Host`` (which the
    TLS front passes on unchanged, and a page cannot set on a WebSocket). A missing ``Origin`` is
    refused: every browser sends one on a WebSocket."""
    origins = request.headers.get_list("Origin")
    if len(origins) != 1:
        return False
    authority = _authority(origins[0].strip())
    host = request.headers.get("Host", "").strip().lower()
    return authority is not None and bool(host) and authority == host
