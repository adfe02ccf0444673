"""What to do with one preview request, decided from its head alone: forward it (and how), or
answer it here. No I/O, so every rule can be tested and fuzzed without sockets.

The checks run in this order, each answering on failure:

1. exactly one ``Host``, an origin-form target (400);
2. the Host is a preview host, ``{port}-{prefix}.{previewDomain}[:port]`` or
   ``{registry key}-{prefix}...`` (421: this connection only serves previews), with the port
   in its one spelling, decimal without leading zeros (404), of a registered key (404), of this
   project (404), for a port that is not ignored and not the server's own (403);
3. the request has not been through this proxy already (508); in fleet mode
   (``--fleet-redis``), one that is not from this host's loopback is signed by a gateway
   (``X-Aether-Fleet``, :mod:`aether.fleet.auth`) or refused (403), and only a signed one's
   ``X-Forwarded-*`` is believed;
4. ``?token=`` equal to the workspace token, or ``?aether_grant=`` a live grant for this host
   (see ``grant``): a cookie for this preview host and a redirect to the same URL without it;
5. a signed request the gateway admitted as ``public`` to a port private here: 401 (the
   gateway's view was stale); one it admitted by token or cookie is let through; otherwise
   a private port needs the token (``Authorization: Bearer``) or the cookie (401); a
   cookie-authenticated WebSocket upgrade needs a same-origin ``Origin`` (403);
6. the port must be open now (502, a page that reloads itself), on loopback or an address of
   this host's own interfaces (502: see ``local``).

A forwarded request's decision is kept by its connection (:class:`Route`, in the Forward's
``memo``): the next request on that connection with the same method and the very same header
lines, and a target that carries no credential, goes the same way without the checks, unless
something a check reads changed in between. Every such change bumps :attr:`Gate.generation`
(a port opening, closing or changing its addresses, this host's addresses, a visibility), and
a route of another generation, or made before a change of the ignored ports or of its registry
key's port, is decided afresh. Nothing else a check reads changes while the process runs (the
token, the fleet key, the trusted fronts); what a grant or a signature opens (they are in the
target or vary with it) is never kept.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import secrets
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING
from urllib.parse import unquote_to_bytes

from aether import credentials
from aether.fleet import auth as fleet_auth
from aether.preview import grant, pages, paths
from aether.preview import headers as h
from aether.preview.local import LOOPBACK, is_local
from aether.preview.owner import Answer, Forward
from aether.preview.visibility import Visibility

if TYPE_CHECKING:
    from aether.ports.events import Listener

COOKIE = b"aether_preview"
#: The dashboard's cookie (``aether.server.cookie``): host-only on the server's host, so a path
#: preview, on that host too, receives it; it never goes on to the app.
DASHBOARD_COOKIE = b"aether_dashboard"
#: A Host that is a name or an address (and a port): one a browser would send.
_AUTHORITY = re.compile(rb"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?")
_MAX_CACHED_HOSTS = 1024


def host_pattern(domain: str) -> str:
    """A preview host name, ``{port or key}-{prefix}.{domain}``, without its port; groups:
    the port or key, the prefix, the domain. Matched case-insensitively."""
    return r"([a-z0-9][a-z0-9-]{0,62})-([a-z0-9]{1,64})\.(" + re.escape(domain) + r")"


def upstream_address(listeners: list[Listener], local: Collection[str] = LOOPBACK) -> str | None:
    """Where to connect for a port: a loopback address when a listener accepts on one (a
    wildcard does), else the specific address a listener is bound to, one in ``local`` if
    any is (the caller refuses one that is not)."""
    best, best_rank = None, 9
    for listener in listeners:
        address = listener.address
        if address == "0.0.0.0" or address.startswith("127."):
            rank, target = 0, ("127.0.0.1" if address == "0.0.0.0" else address)
        elif address in ("::", "::1"):
            rank, target = 1, "::1"
        elif address.startswith("::ffff:") and "." in address:
            rank, target = 2, address[7:]
        else:
            rank, target = 2, address
        if rank == 2 and not is_local(target, local):
            rank = 3
        if rank < best_rank:
            best, best_rank = target, rank
    return best


def _redirect_path(target: bytes, token: bytes, granted: Callable[[bytes], bool] = lambda value: False) -> bytes | None:
    """``target`` without ``token=<the workspace token>`` (or ``aether_grant=<a grant that
    ``granted`` accepts>``), or None when it has no such pair.

    Other query pairs keep their exact encoding. Leading slashes and backslashes collapse to
    one slash so the result cannot be read as ``//other-host``.
    """
    path, sep, query = target.partition(b"?")
    if not sep:
        return None
    kept, found = [], False
    for pair in query.split(b"&"):
        name, _, value = pair.partition(b"=")
        name = unquote_to_bytes(name.replace(b"+", b" "))
        value = unquote_to_bytes(value.replace(b"+", b" "))
        if (name == b"token" and hmac.compare_digest(value, token)) or (name == grant.PARAMETER and granted(value)):
            found = True
        else:
            kept.append(pair)
    if not found:
        return None
    path = b"/" + path.lstrip(b"/\\")
    return path + (b"?" + b"&".join(kept) if kept else b"")


class Route:
    """What a forwarded request's decision read, for its connection's next request (see the
    module docstring): the request's ``method`` and ``headers`` (the list, as parsed), the
    gate's ``generation`` and ignored ports then, the registry ``key`` its Host named (None:
    a port number), its ``target``, and the upstream head after the target (``tail``)."""

    __slots__ = ("generation", "ignored", "method", "headers", "key", "target", "tail")

    def __init__(
        self, generation: int, ignored: frozenset[int], method: bytes, headers: h.Headers, key, target: bytes, tail: bytes
    ):
        self.generation = generation
        self.ignored = ignored
        self.method = method
        self.headers = headers
        self.key = key
        self.target = target
        self.tail = tail


def _loopback(client_ip: str) -> bool:
    return client_ip.startswith(("127.", "::ffff:127.")) or client_ip == "::1"


class Gate:
    """Decides for one workspace; ``settings`` and ``monitor`` are read live, so a change of
    ignored ports or a port opening applies to the next request."""

    def __init__(
        self,
        settings,
        monitor,
        visibility: Visibility,
        named: Callable[[str], int | None] = lambda key: None,
        local: Collection[str] = LOOPBACK,
    ):
        self.settings = settings
        self.local = local  # this host's addresses, kept current by the caller (local.LocalAddresses)
        self.named = named  # registry key -> port, for {key}-{prefix} hosts
        self.monitor = monitor
        self.visibility = visibility
        self.token = settings.token.encode()
        self._prefix = settings.project_prefix.lower().encode()
        self._host = re.compile(host_pattern(settings.preview_domain).encode() + rb"(?::(\d{1,5}))?", re.IGNORECASE)
        self._hosts: dict[bytes, tuple | None] = {}
        self._addresses: dict[int, str | None] = {}  # port -> upstream address, until it changes
        self._cookies: dict[bytes, bytes] = {}
        #: Marks requests this process forwarded, so one that comes back is a loop.
        self.via = b"1.1 aether-" + secrets.token_hex(6).encode()
        self._original_host = settings.preview_upstream_host == "original"
        self._trusted_networks = settings.trusted_proxies
        self._trusted: dict[str, bool] = {}  # client address -> is it a trusted front
        self._redeemed: dict[bytes, int] = {}  # grants used, until they expire
        #: Fleet mode: the fleet key, which signs what the gateways forward (``aether.fleet.auth``).
        self.fleet_keys = getattr(settings, "fleet_keys", None)
        #: Bumped by every change of what a kept decision (:class:`Route`) read.
        self.generation = 0
        visibility.subscribe(self.changed)

    # -- pieces -----------------------------------------------------------------------------

    def preview_host(self, host: bytes) -> tuple | None:
        """(port number or registry key, prefix matches, host name, port part) for a preview
        Host value, else None. The key before the last ``-`` of the first label is a port when
        it is all digits (registry keys never are), else a registry key; None in its place
        for a port with leading zeros, so that each port has one host (one origin, one
        cookie)."""
        try:
            return self._hosts[host]
        except KeyError:
            pass
        match = self._host.fullmatch(host)
        if match is None:
            parsed = None
        else:
            target, prefix, _, port_part = match.groups()
            name = host.rpartition(b":")[0] if port_part else host
            if not target.isdigit():
                target = target.decode().lower()
            elif target[0] == 48 and len(target) > 1:  # b"0"
                target = None
            else:
                target = int(target)
            parsed = (target, prefix.lower() == self._prefix, name.lower(), port_part or b"80")
        if len(self._hosts) >= _MAX_CACHED_HOSTS:
            self._hosts.clear()
        self._hosts[host] = parsed
        return parsed

    def cookie_value(self, host_name: bytes) -> bytes:
        """The cookie for one preview host: derived from the token, so it opens that host's
        previews and nothing else (not the WebSocket API, not another port)."""
        value = self._cookies.get(host_name)
        if value is None:
            value = credentials.derive(self.token, b"aether-preview:" + host_name)
            if len(self._cookies) >= _MAX_CACHED_HOSTS:
                self._cookies.clear()
            self._cookies[host_name] = value
        return value

    def is_trusted(self, client_ip: str) -> bool:
        """Whether ``client_ip`` is a TLS front named by ``--trusted-proxies``."""
        known = self._trusted.get(client_ip)
        if known is None:
            try:
                address = ipaddress.ip_address(client_ip)
            except ValueError:
                known = False
            else:
                known = any(address in network for network in self._trusted_networks)
            if len(self._trusted) >= _MAX_CACHED_HOSTS:
                self._trusted.clear()
            self._trusted[client_ip] = known
        return known

    def scheme(self, head: h.RequestHead, client_ip: str, port_part: bytes, signed: bool = False) -> tuple[bytes, bytes]:
        """(proto, port) of the browser's own connection: what a trusted front (or, in fleet
        mode, a gateway's signed request) says it saw, else what this listener saw (plain http
        on the Host's port)."""
        if not head.forwarded_proto or not (signed or (self._trusted_networks and self.is_trusted(client_ip))):
            return b"http", port_part
        proto = b"https" if head.forwarded_proto == b"https" else b"http"
        port = head.forwarded_port if head.forwarded_port.isdigit() else None
        if port is None:
            port = port_part if port_part != b"80" else (b"443" if proto == b"https" else b"80")
        return proto, port

    def _redeem(self, host_name: bytes, value: bytes) -> bool:
        """Whether ``value`` is a live grant for ``host_name`` not used before; it is used now.
        Single use: a grant left in a history or a log after it opened its host opens nothing."""
        return grant.redeem(self._redeemed, self.token, host_name, value)

    def changed(self) -> None:
        """Something a decision reads changed: no kept decision (:class:`Route`) holds."""
        self.generation += 1

    def forget(self, port: int) -> None:
        """The port opened, closed, changed or refused: look its upstream address up again."""
        self._addresses.pop(port, None)
        self.generation += 1

    def forget_all(self) -> None:
        """This host's addresses changed: choose every port's upstream address again."""
        self._addresses.clear()
        self.generation += 1

    # -- the decision -----------------------------------------------------------------------

    def _answer(self, status: int, title: str, text: str, head_only: bool, close: bool, extra=(), refresh=None) -> Answer:
        body = pages.render(status, title, text, refresh)
        return Answer(status, pages.response(status, body, extra, close, head_only=head_only), close)

    def decide(
        self,
        method: bytes,
        target: bytes,
        headers: h.Headers,
        client_ip: str,
        upgrade: bool,
        previous: Forward | None = None,
    ) -> Forward | Answer:
        """What to do with a request whose head is ``method``, ``target`` and ``headers``;
        ``previous``: the connection's last Forward, whose :class:`Route` may decide it."""
        if previous is not None:
            route = previous.memo
            # One line per condition on purpose: each is a reason the kept route does not hold.
            if (
                type(route) is Route
                and route.generation == self.generation
                and route.method == method
                and route.headers == headers
                and not upgrade
                and target[:1] == b"/"
                and b"token=" not in target
                and b"aether_grant=" not in target
                and route.ignored is self.monitor.table.ignored
                and (route.key is None or self.named(route.key) == previous.port)
            ):
                if target == route.target:
                    return previous
                forward = Forward(previous.port, previous.address, method + b" " + target + route.tail)
                forward.has_body = previous.has_body
                forward.chunked = previous.chunked
                # Its own route: ``previous`` is returned only for its own target.
                forward.memo = Route(route.generation, route.ignored, method, headers, route.key, target, route.tail)
                return forward
        head = h.RequestHead(headers)
        head_only = method == b"HEAD"
        close = head.has_body or upgrade
        decision = self._decide(method, target, head, client_ip, upgrade, head_only, close)
        decision.has_body = head.has_body
        decision.chunked = head.chunked
        if type(decision) is Forward and type(decision.memo) is Route:
            decision.memo.headers = headers
        return decision

    def _decide(self, method, target, head: h.RequestHead, client_ip, upgrade, head_only, close):
        if head.bad_framing:
            return self._answer(400, "Bad request", "Transfer-Encoding must end with chunked.", head_only, True)
        if len(head.hosts) != 1:
            return self._answer(400, "Bad request", "A request needs exactly one Host header.", head_only, close)
        host = head.hosts[0]
        if not target.startswith(b"/") and not (method == b"OPTIONS" and target == b"*"):
            return self._answer(
                400, "Bad request", "The proxy takes origin-form request targets only (a path, not a URL).", head_only, close
            )
        parsed = self.preview_host(host)
        path = None
        if parsed is None:
            if not paths.is_path_preview(target):
                return self._not_a_preview(method, target, host, head_only)
            path = paths.parse(target)
            if path is None or path.name is None:
                text = (
                    "No such path preview: <code>/proxy/{port}/</code> or <code>/absproxy/{port}/</code>, "
                    "the port in decimal without leading zeros, or a registry key."
                )
                return self._answer(404, "No such preview", text, head_only, close)
            if path.slash is not None:
                extra = [("Location", path.slash.decode("latin-1"))]
                return Answer(308, pages.response(308, b"", extra, close, head_only=head_only), close)
            # The cookie of a path preview is its own, scoped to its prefix.
            port_part = host.rpartition(b":")[2] if b":" in host.rpartition(b"]")[2] else b"80"
            parsed = (path.name, True, b"path:" + path.prefix, port_part)
        port, prefix_ok, host_name, port_part = parsed
        key = None
        if port is None:
            text = f"{pages.escape(host)} is no preview: a port is written in decimal, without leading zeros."
            return self._answer(404, "No such preview", text, head_only, close)
        if isinstance(port, str):
            key, port = port, self.named(port)
            if port is None:
                text = f"No port is registered as <code>{pages.escape(key)}</code> in this workspace."
                return self._answer(404, "No such preview", text, head_only, close)
        if not prefix_ok:
            text = (
                f"{pages.escape(host)} names another project: this workspace's previews are "
                f"<code>{{port}}-{pages.escape(self._prefix)}.{pages.escape(self.settings.preview_domain)}</code>."
            )
            return self._answer(404, "No such preview", text, head_only, close)
        if not 1 <= port <= 65535 or port in self.monitor.table.ignored or port == self.settings.port:
            text = f"Port {port} is ignored by this workspace and is never proxied."
            return self._answer(403, "Not previewable", text, head_only, close)
        if head.via and self.via in head.via:
            text = "This request has already been through this preview proxy: the app forwards it back here."
            return self._answer(508, "Loop detected", text, head_only, close)

        access = None
        if self.fleet_keys is not None:
            # Before anything else is believed: the signature covers X-Forwarded-*, and its
            # header never reaches the app, whoever sent it.
            access = fleet_auth.verify_head(self.fleet_keys, method, target, head)
            if access is None and not _loopback(client_ip):
                text = "Previews of this workspace are served through the fleet's gateways."
                return self._answer(403, "Not through a gateway", text, head_only, close)
        proto, forwarded_port = self.scheme(head, client_ip, port_part, access is not None)
        if b"token=" in target or b"aether_grant=" in target:
            location = _redirect_path(target, self.token, lambda value: self._redeem(host_name, value))
            if location is not None:
                status = 302 if method in (b"GET", b"HEAD") else 307
                secure = b"; Secure" if proto == b"https" else b""
                scope = path.prefix if path is not None else b"/"
                set_cookie = b"%s=%s; Path=%s; HttpOnly; SameSite=Lax%s" % (COOKIE, self.cookie_value(host_name), scope, secure)
                extra = [("Location", location.decode("latin-1")), ("Set-Cookie", set_cookie.decode())]
                return Answer(status, pages.response(status, b"", extra, close, head_only=head_only), close)

        # The app's own credentials go on; ours never do.
        authorization = head.authorization
        if authorization:
            authorization = [value for value in authorization if not credentials.bearer(value, self.token)]
        bearer = len(authorization) != len(head.authorization)
        cookie = head.cookie
        if cookie and any(COOKIE in value for value in cookie):
            cookie = [c for c in (h.without_cookie(value, COOKIE) for value in cookie) if c]
            has_cookie = credentials.has_cookie(head.cookie, COOKIE, self.cookie_value(host_name))
        else:
            has_cookie = False
        if access == b"public" and port not in self.visibility.public:
            # The gateway's view was stale: this VM holds the port private.
            text = "This port is private now. Open it again with <code>?token=</code> and the workspace token."
            extra = [("WWW-Authenticate", 'Bearer realm="aether preview"')]
            return self._answer(401, "This preview is private", text, head_only, close, extra)
        if access in (b"token", b"cookie"):
            bearer = True  # the gateway checked the credential and took it out
        if path is not None and cookie and any(DASHBOARD_COOKIE in value for value in cookie):
            cookie = [c for c in (h.without_cookie(value, DASHBOARD_COOKIE) for value in cookie) if c]
        if port not in self.visibility.public and not bearer:
            if not has_cookie and method == b"OPTIONS" and not close and self.own_preflight(head):
                pass  # the app answers its own CORS preflight; the request after it is authenticated
            elif not has_cookie:
                text = (
                    "Open it once with <code>?token=</code> and the workspace token, or send "
                    "<code>Authorization: Bearer</code> with it. The owner can make the port "
                    "public through the ports channel."
                )
                extra = [("WWW-Authenticate", 'Bearer realm="aether preview"')]
                return self._answer(401, "This preview is private", text, head_only, close, extra)
            if upgrade and not credentials.same_origin(head.origin, host):
                text = "A WebSocket authenticated by the preview cookie must come from a page of the same preview host."
                return self._answer(403, "Cross-origin WebSocket refused", text, head_only, close)

        address = self._addresses.get(port)
        if address is None and port in self.monitor.table:
            address = self._addresses[port] = upstream_address(self.monitor.table.listeners(port), self.local)
        if address is None:
            return self._answer(
                502, "Nothing is listening yet", pages.not_listening_text(port), head_only, close, refresh=pages.REFRESH_SECONDS
            )
        if not is_local(address, self.local):
            return self._answer(502, pages.NOT_LOCAL_TITLE, pages.not_local_text(port, address), head_only, close)
        if path is not None:
            target = path.upstream
            head.lines = [line for line in head.lines if line[:19].lower() != b"x-forwarded-prefix:"]
        upstream_head = head.upstream(
            method,
            target,
            host=host if self._original_host else b"localhost:%d" % port,
            client_ip=client_ip,
            forwarded_host=host,
            forwarded_port=forwarded_port,
            proto=proto,
            via=self.via,
            upgrade=upgrade,
            authorization=authorization,
            cookie=cookie,
        )
        if path is not None and path.stripped:
            upstream_head = upstream_head[:-2] + b"X-Forwarded-Prefix: " + path.prefix + b"\r\n\r\n"
        forward = Forward(port, address, upstream_head)
        if path is None and access is None and not upgrade:
            # Kept for the connection's next request (its headers set by ``decide``).
            tail = upstream_head[len(method) + 1 + len(target) :]
            forward.memo = Route(self.generation, self.monitor.table.ignored, method, [], key, target, tail)
        return forward

    def _not_a_preview(self, method: bytes, target: bytes, host: bytes, head_only: bool) -> Answer:
        """A request for neither a preview host nor a path preview. On a connection that began
        with a path preview it is the server's own (the dashboard, the API, on the same
        origin): 307 to the same URL, and the connection closes, so the browser sends it again
        (body and all) on a new connection, which the listener hands to the API. A Host that
        is no name at all is misdirected (421)."""
        if _AUTHORITY.fullmatch(host) and target.startswith(b"/"):
            # One leading slash: ``//other.example`` would send the browser to another host.
            location = b"/" + target.lstrip(b"/\\")
            extra = [("Location", location.decode("latin-1"))]
            return Answer(307, pages.response(307, b"", extra, True, head_only=head_only), True)
        text = f"This connection serves previews; {pages.escape(host)} is not one."
        return self._answer(421, "Misdirected request", text, head_only, True)

    def own_preflight(self, head: h.RequestHead) -> bool:
        """Whether the request is a CORS preflight (``Access-Control-Request-Method``) from a
        page of one of this workspace's own previews: it carries no credentials (Fetch never
        sends them on one), so the app, which decides its CORS, answers it."""
        if len(head.origin) != 1:
            return False
        scheme, sep, rest = head.origin[0].strip().partition(b"://")
        if not sep or scheme.lower() not in (b"http", b"https") or not rest or b"/" in rest:
            return False
        parsed = self.preview_host(rest)
        if parsed is None or parsed[0] is None or not parsed[1]:
            return False
        return any(line[:30].lower() == b"access-control-request-method:" for line in head.lines)
