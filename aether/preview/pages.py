"""The small HTML pages the proxy answers with itself, and the bytes of such a response.

Everything a page reflects (a host name, a path) is HTML-escaped; the pages carry no script.
"""

from __future__ import annotations

import html
from collections.abc import Iterable

REASONS = {
    302: "Found",
    307: "Temporary Redirect",
    308: "Permanent Redirect",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    408: "Request Timeout",
    421: "Misdirected Request",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    508: "Loop Detected",
}

#: Seconds between reloads of the "nothing listens yet" page.
REFRESH_SECONDS = 1


def render(status: int, title: str, text: str, refresh: int | None = None) -> bytes:
    meta = f'<meta http-equiv="refresh" content="{int(refresh)}">' if refresh else ""
    body = (
        "<!doctype html>\n"
        f'<html><head><meta charset="utf-8">{meta}<title>{html.escape(title)}</title>'
        "<style>body{font:15px/1.5 system-ui,sans-serif;margin:3em auto;max-width:40em;color:#222}"
        "code{background:#eee;padding:0 .3em}</style></head>\n"
        f"<body><h1>{status} {html.escape(title)}</h1><p>{text}</p>"
        "<p><small>aether preview proxy</small></p></body></html>\n"
    )
    return body.encode()


def response(
    status: int,
    body: bytes = b"",
    headers: Iterable[tuple[str, str]] = (),
    close: bool = False,
    content_type: str = "text/html; charset=utf-8",
    head_only: bool = False,
) -> bytes:
    """A complete HTTP/1.1 response; ``head_only`` leaves the body out (HEAD)."""
    lines = [
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "X-Content-Type-Options: nosniff",
    ]
    lines.extend(f"{name}: {value}" for name, value in headers)
    if close:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


def escape(value: bytes | str) -> str:
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return html.escape(value, quote=True)


def not_listening_text(port: int) -> str:
    return (
        f"Nothing listens on port {int(port)} in this workspace yet. This page reloads itself "
        f"every {REFRESH_SECONDS} s and shows the app as soon as it starts."
    )


NOT_LOCAL_TITLE = "Not an address of this workspace"


def not_local_text(port: int, address: str) -> str:
    return (
        f"Port {int(port)} listens on {escape(address)}, which is not an address of this workspace: "
        "the preview proxy connects only to the workspace itself (loopback, or an address of its "
        "own network interfaces)."
    )


NOT_HTTP_TITLE = "Not HTTP"
#: The code of the "answers, but not with HTTP" page, in ``X-Aether-Error``, for tools.
NOT_HTTP_CODE = "not_http"


def not_http_text(port: int) -> str:
    return (
        f"Port {int(port)} answers, but not with HTTP: it speaks another protocol (a database, "
        "a message broker, SSH...), which a browser cannot show. Connect to it with that "
        "protocol's own client, or set the port's protocol if it does speak HTTP."
    )


TLS_FAILED_TITLE = "TLS handshake failed"


def chosen_https_text(port: int) -> str:
    return (
        f"Port {int(port)} is set to https (by a port attribute rule, its registry entry, or on the ports channel), so the "
        "proxy spoke TLS to it, but it did not answer TLS: it most likely serves plain HTTP. Set its "
        "protocol to http, or remove the setting and let aether find it."
    )
