"""The ports dashboard: ``GET /``, one static page whose script talks the WebSocket protocol.

- ``GET /?token=TOKEN`` sets the dashboard cookie (see ``cookie``) and redirects (303) to ``/``,
  so the token leaves the address bar and the history; a wrong token gets 401 and no cookie.
- ``GET /`` with the cookie is the page; without it, a 401 page saying how to open it. The page
  is given the workspace id, never the token.
- ``GET /open/{port}`` with the cookie redirects to the port's preview: directly when the port is
  public, else with a one-minute grant for that preview host (``aether.preview.grant``), which
  the page could not make (it holds no token).
- ``GET /dashboard/session`` answers 200 with the cookie, 401 without: the page asks it when the
  WebSocket will not reconnect, to tell a stopped server from a changed token.
- ``/dashboard/dashboard.js`` and ``.css`` are public: they hold no data.

The files sit beside this module; nothing is built.
"""

from __future__ import annotations

import functools
import hmac
import html
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import tornado.web

from aether.preview import grant
from aether.server import cookie

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from aether.server.app import WorkspaceServer

HERE = Path(__file__).resolve().parent
ASSETS = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}
#: Scripts and styles from this origin only (none inline), WebSockets to it only, never framed
#: (the kill button must not be clickjacked), no form or base elsewhere.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
SIGN_IN = (
    "Open this page as <code>/?token=TOKEN</code> with the workspace token: "
    "<code>aether serve</code> prints the whole address on its <code>dashboard:</code> line, "
    "and the token is in the state directory's <code>token</code> file."
)


@functools.cache
def asset(name: str) -> bytes:
    return (HERE / name).read_bytes()


def fill(template: str, **values: str) -> str:
    """``template`` with each ``{{name}}`` replaced by its value, HTML-escaped."""
    for name, value in values.items():
        template = template.replace("{{" + name + "}}", html.escape(value, quote=True))
    return template


class DashboardHandler(tornado.web.RequestHandler):
    def initialize(self, server: WorkspaceServer) -> None:
        self.server = server

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("Content-Security-Policy", CSP)

    @property
    def signed_in(self) -> bool:
        return cookie.present(self.request, self.server.settings.token)

    def sign_in_page(self, message: str) -> None:
        """401 and the page that says how to open the dashboard (no workspace detail)."""
        self.set_status(401)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        page = asset("signin.html").decode()
        self.finish(page.replace("{{message}}", message))  # ``message`` is ours, HTML already

    def write_error(self, status_code: int, **kwargs) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(f"{status_code} {self._reason}\n")


class PageHandler(DashboardHandler):
    def get(self) -> None:
        tokens = self.request.query_arguments.get("token")
        if tokens is not None:
            if len(tokens) != 1 or not hmac.compare_digest(tokens[0], self.server.settings.token.encode()):
                return self.sign_in_page("<strong>That is not this workspace's token.</strong> " + SIGN_IN)
            self.set_header("Set-Cookie", cookie.header(self.server.settings.token, cookie.is_tls(self.request)))
            return self.redirect("/", status=303)
        if not self.signed_in:
            return self.sign_in_page(SIGN_IN)
        settings = self.server.settings
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(
            fill(
                asset("index.html").decode(), workspace=settings.workspace_id, wsPath=settings.ws_path, ownPort=str(settings.port)
            )
        )


class OpenHandler(DashboardHandler):
    def get(self, port: str) -> None:
        if not self.signed_in:
            return self.sign_in_page(SIGN_IN)
        number = int(port)
        if not 1 <= number <= 65535:
            raise tornado.web.HTTPError(404, reason="not a port number")
        settings = self.server.settings
        url = urlsplit(settings.preview_url_for(number))
        query = ""
        if number not in self.server.visibility.public:
            value = grant.mint(settings.token.encode(), (url.hostname or "").encode())
            query = f"{grant.PARAMETER.decode()}={value.decode()}"
        self.redirect(urlunsplit((url.scheme, url.netloc, url.path or "/", query, "")), status=303)


class SignedInHandler(DashboardHandler):
    def get(self) -> Awaitable[None] | None:  # finish's, which Tornado awaits
        if not self.signed_in:
            self.set_status(401)
            self.finish({"signedIn": False})
            return None
        settings = self.server.settings
        self.finish({"signedIn": True, "workspaceId": settings.workspace_id, "wsPath": settings.ws_path})
        return None


class AssetHandler(DashboardHandler):
    def get(self, name: str) -> None:
        self.set_header("Content-Type", ASSETS[name])
        self.set_header("Cache-Control", "no-cache")
        self.finish(asset(name))


def routes(server: WorkspaceServer) -> list:
    names = "|".join(name.replace(".", r"\.") for name in ASSETS)
    return [
        (r"/", PageHandler, {"server": server}),
        (r"/open/(\d{1,5})", OpenHandler, {"server": server}),
        (r"/dashboard/session", SignedInHandler, {"server": server}),
        (rf"/dashboard/({names})", AssetHandler, {"server": server}),
    ]
