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

from tornado.httputil import HTTPServerRequest

from aether import credentials

NAME = "aether_dashboard"
#: What a client connected with the cookie may send (channel, type); it hears only these channels.
DASHBOARD = frozenset({("ports", "kill"), ("ports", "visibility"), ("config", "get"), ("config", "registry")})
DASHBOARD_CHANNELS = frozenset(channel for channel, _ in DASHBOARD)


def value(token: str) -> str:
    return credentials.derive(token.encode(), b"aether-dashboard").decode()


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
    headers = [_bytes(raw) for raw in request.headers.get_list("Cookie")]
    return credentials.has_cookie(headers, NAME.encode(), value(token).encode())


def _bytes(text: str) -> bytes:
    # Tornado decoded the header as latin-1: this gives its bytes back.
    return text.encode("latin-1", "replace")


def same_origin(request: HTTPServerRequest) -> bool:
    """Whether the request's one ``Origin`` names the host it was sent to, its ``Host`` (which the
    TLS front passes on unchanged, and a page cannot set on a WebSocket). A missing ``Origin`` is
    refused: every browser sends one on a WebSocket."""
    origins = [_bytes(origin) for origin in request.headers.get_list("Origin")]
    return credentials.same_origin(origins, _bytes(request.headers.get("Host", "")))
