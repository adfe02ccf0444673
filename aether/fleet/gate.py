"""What a gateway does with one request, decided from its head and the route table alone (no
lookup, no I/O): forward it to the workspace's VM, signed, or answer it here. The answers are
the VM proxy's pages.

The checks run in this order, each answering on failure:

1. exactly one ``Host``, an origin-form target, a framing the proxy can pass on (400);
2. a preview host of the domain, ``{port}-{prefix}.{D}[:port]`` or ``{key}-{prefix}.{D}``
   (404 "not a preview host"), its port in its one spelling, decimal without leading zeros and
   1-65535 (404);
3. a prefix in the table (404 "no such workspace"), a key its workspace registers (404);
4. the workspace is available: not stopped, not past its deadline, not unconfirmed past its
   grace (503 "workspace unavailable", a page that reloads itself, ``Retry-After``);
5. not through this gateway before (508);
6. ``?token=`` matching the workspace's verifier: a cookie for this host and a redirect to the
   same URL without it; a private port needs ``Authorization: Bearer`` with the token or the
   cookie (401); a cookie-authenticated WebSocket upgrade needs a same-origin ``Origin`` (403);
7. the port is open (502, the self-refreshing page);
8. forward to the workspace's advertised address: ``Host`` unchanged (the VM routes by it),
   ``X-Forwarded-*`` set here (a client's believed only from ``--trusted-proxies``), every
   ``X-Aether-*`` header of the client dropped, the fleet's own credentials (token, cookie)
   taken out, and ``X-Aether-Fleet`` signing what the VM relies on.

A forwarded request's decision is kept by its connection (:class:`Route`, in the Forward's
``memo``): the next request on it with the same method and the very same header lines (its
credentials are compared as the bytes they are, never trusted for being on the same
connection), and a path for target that carries no ``token=``, goes the same way without the
checks while the table holds the same record for the workspace (a stream entry or a load that
changes it replaces the object) and neither marks it dead nor holds it unconfirmed, and, for one
a cookie admitted, until that cookie expires. Only the signature is made again, for its own
target and second. Nothing else the checks read changes while the process runs (the fleet key,
the domain, the trusted fronts).
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import time
from collections.abc import Callable
from urllib.parse import unquote_to_bytes

from aether import credentials
from aether.fleet import auth
from aether.fleet import routes as r
from aether.preview import headers as h
from aether.preview import pages
from aether.preview.gate import COOKIE as VM_COOKIE
from aether.preview.gate import Answer, Forward, host_pattern

_MAX_CACHED = 4096
_NEVER = float("inf")
#: Seconds a browser waits before asking again for an unavailable workspace: a VM that restarts
#: is back within a heartbeat or two.
RETRY_AFTER = 2


class FleetForward(Forward):
    """A :class:`Forward` to a VM (``address``:``port`` is its advertised address), with what
    the gateway's connection bookkeeping needs: the workspace, the app's port, and what admitted
    the request. One admitted as ``public`` is tagged ``(prefix, app_port)``: its tunnel closes
    when that port turns private (:meth:`aether.preview.core.Proxy.close_tunnels`). ``target``
    and ``second``: the request target and the second its signature holds, for a kept decision
    (a :class:`Route` in ``memo``)."""

    __slots__ = ("prefix", "app_port", "access", "target", "second")

    def __init__(self, port: int, address: str, head: bytes, prefix: str, app_port: int, access: bytes):
        super().__init__(port, address, head, (prefix, app_port) if access == b"public" else None)
        self.prefix, self.app_port, self.access = prefix, app_port, access
        self.target = b""
        self.second = 0


class Route:
    """What a forwarded request's decision read, kept for its connection's next requests (see
    :meth:`Gate.decide`): the request's ``method`` and ``headers`` (the list, as parsed), the
    ``workspace`` object the table held for ``prefix`` (any change of the workspace in the
    table, a port, a visibility, its liveness in the blob, its address, its token, replaces the
    object), the ``signer`` of what the signature covers besides the target and the time, the
    upstream head between the target and the signature line (``tail``), and ``until``: when the
    cookie that admitted it expires."""

    __slots__ = ("method", "headers", "workspace", "prefix", "signer", "tail", "until")

    def __init__(self, method, headers, workspace, prefix, signer: auth.Signer, tail: bytes, until: float):
        self.method, self.headers, self.workspace, self.prefix = method, headers, workspace, prefix
        self.signer, self.tail, self.until = signer, tail, until


def _without_token(target: bytes, accepts: Callable[[bytes], bool]) -> bytes | None:
    """``target`` without its ``token=T`` pairs when one of them ``accepts``, else None. Other
    pairs keep their exact encoding; leading slashes and backslashes collapse to one, so the
    result cannot be read as ``//other-host``."""
    path, sep, query = target.partition(b"?")
    if not sep:
        return None
    kept, found = [], False
    for pair in query.split(b"&"):
        name, _, value = pair.partition(b"=")
        if unquote_to_bytes(name.replace(b"+", b" ")) == b"token" and accepts(unquote_to_bytes(value.replace(b"+", b" "))):
            found = True
        else:
            kept.append(pair)
    if not found:
        return None
    path = b"/" + path.lstrip(b"/\\")
    return path + (b"?" + b"&".join(kept) if kept else b"")


def _fleet_headers(lines: list[bytes]) -> list[bytes]:
    return [line for line in lines if line[:9].lower() != b"x-aether-"]


class Gate:
    """Decides for every workspace of ``routes``; the table is read live, so a change applies
    to the next request."""

    def __init__(
        self, routes: r.Routes, keys: auth.FleetKeys, domain: str, trusted_proxies=(), clock: Callable[[], float] = time.time
    ):
        self.routes = routes
        self.keys = keys
        self.domain = domain
        self.clock = clock
        self._host = re.compile(host_pattern(domain).encode() + rb"(?::(\d{1,5}))?", re.IGNORECASE)
        self._hosts: dict[bytes, tuple | None] = {}
        self._trusted_networks = tuple(trusted_proxies)
        self._trusted: dict[str, bool] = {}
        #: Marks requests this gateway forwarded, so one that comes back is a loop.
        self.via = b"1.1 aether-gateway-" + secrets.token_hex(6).encode()

    # -- pieces -----------------------------------------------------------------------------

    def preview_host(self, host: bytes) -> tuple | None:
        """(port, or registry key, or None for a port not in its one spelling; prefix; host
        name; port part) for a preview host of the domain, else None."""
        try:
            return self._hosts[host]
        except KeyError:
            pass
        match = self._host.fullmatch(host)
        if match is None:
            parsed = None
        else:
            target, prefix, _, port_part = match.groups()
            if not target.isdigit():
                target = target.decode().lower()
            elif target[:1] == b"0" or int(target) > 65535:
                target = None
            else:
                target = int(target)
            name = host.rpartition(b":")[0] if port_part else host
            parsed = (target, prefix.lower().decode(), name.lower(), port_part or b"80")
        if len(self._hosts) >= _MAX_CACHED:
            self._hosts.clear()
        self._hosts[host] = parsed
        return parsed

    def is_preview_host(self, host: bytes) -> bool:
        """Whether ``host`` is of the preview domain: other hosts get the gateway's own
        endpoints (``/healthz``, ``/metrics``)."""
        return self.preview_host(host) is not None

    def is_trusted(self, client_ip: str) -> bool:
        known = self._trusted.get(client_ip)
        if known is None:
            try:
                address = ipaddress.ip_address(client_ip)
            except ValueError:
                known = False
            else:
                known = any(address in network for network in self._trusted_networks)
            if len(self._trusted) >= _MAX_CACHED:
                self._trusted.clear()
            self._trusted[client_ip] = known
        return known

    def _answer(self, status, title, text, head_only, close, extra=(), refresh=None) -> Answer:
        body = pages.render(status, title, text, refresh)
        return Answer(status, pages.response(status, body, extra, close, head_only=head_only), close)

    # -- the decision -----------------------------------------------------------------------

    def decide(
        self, method: bytes, target: bytes, headers: h.Headers, client_ip: str, upgrade: bool, previous: Forward | None = None
    ) -> Forward | Answer:
        """What to do with a request; ``previous``: its connection's last Forward, whose
        :class:`Route` decides it when the request has the same method and the very same header
        lines (Host, credentials, ``Via``, ``X-Forwarded-*``, framing: the raw bytes compared),
        asks for no upgrade, carries no ``token=`` in its target, and the table still holds the
        same workspace object for its prefix, neither dead nor unconfirmed, and the cookie that
        admitted it has not expired. Only the signature is made again (another target, another
        second); every other request is decided afresh."""
        if previous is not None:
            route = previous.memo
            # One line per condition on purpose: each is a reason the kept route does not hold.
            if (
                type(route) is Route
                and route.headers == headers
                and route.method == method
                and not upgrade
                and target[:1] == b"/"
                and b"token=" not in target
                and self.routes.workspaces.get(route.prefix) is route.workspace
                and route.prefix not in self.routes.dead
                and route.prefix not in self.routes.unconfirmed
            ):
                assert isinstance(previous, FleetForward)  # a Route is only ever in one
                now = self.clock()
                if now < route.until:
                    second = int(now)
                    if target == previous.target and second == previous.second:
                        return previous
                    return self._signed(route, previous.address, previous.port, previous.app_port, target, second, previous)
        head = h.RequestHead(headers)
        head_only = method == b"HEAD"
        decision = self._decide(method, target, head, client_ip, upgrade, head_only, head.has_body or upgrade)
        decision.has_body = head.has_body
        decision.chunked = head.chunked
        if type(decision) is FleetForward and type(decision.memo) is Route:
            decision.memo.headers = headers
        return decision

    def _signed(self, route: Route, address: str, port: int, app_port: int, target: bytes, second: int, framing) -> FleetForward:
        """The Forward of ``route`` for ``target``, signed at ``second``; its framing as ``framing``'s."""
        signer = route.signer
        head = route.method + b" " + target + route.tail + auth.HEADER + b": " + signer.sign(target, second) + b"\r\n\r\n"
        forward = FleetForward(port, address, head, route.prefix, app_port, signer.access)
        forward.has_body = framing.has_body
        forward.chunked = framing.chunked
        forward.target = target
        forward.second = second
        forward.memo = route
        return forward

    def _decide(self, method, target, head: h.RequestHead, client_ip, upgrade, head_only, close):
        if head.bad_framing:
            return self._answer(400, "Bad request", "Transfer-Encoding must end with chunked.", head_only, True)
        if len(head.hosts) != 1:
            return self._answer(400, "Bad request", "A request needs exactly one Host header.", head_only, close)
        host = head.hosts[0]
        if not target.startswith(b"/") and not (method == b"OPTIONS" and target == b"*"):
            return self._answer(
                400, "Bad request", "The gateway takes origin-form request targets only (a path, not a URL).", head_only, close
            )
        parsed = self.preview_host(host)
        if parsed is None:
            text = f"{pages.escape(host)} is not a preview host of <code>{pages.escape(self.domain)}</code>."
            return self._answer(404, "Not a preview host", text, head_only, close)
        wanted, prefix, host_name, port_part = parsed
        if wanted is None:
            text = f"{pages.escape(host)} is no preview: a port is written in decimal, 1-65535, without leading zeros."
            return self._answer(404, "No such preview", text, head_only, close)

        ws, port, kind = self.routes.route(prefix, wanted)
        if kind == r.UNKNOWN:
            text = f"No workspace of this fleet has the prefix <code>{pages.escape(prefix)}</code>."
            return self._answer(404, "No such workspace", text, head_only, close)
        if kind == r.NO_KEY:
            text = f"No port is registered as <code>{pages.escape(wanted)}</code> in this workspace."
            return self._answer(404, "No such preview", text, head_only, close)
        assert ws is not None and port is not None  # only UNKNOWN and NO_KEY come without them
        if kind == r.UNAVAILABLE:
            text = (
                "This workspace is stopped or not answering. This page reloads itself and shows the "
                "preview as soon as the workspace is back."
            )
            return self._answer(
                503, "Workspace unavailable", text, head_only, close, [("Retry-After", str(RETRY_AFTER))], refresh=RETRY_AFTER
            )
        if head.via and self.via in head.via:
            text = "This request has already been through this gateway: the app forwards it back here."
            return self._answer(508, "Loop detected", text, head_only, close)

        proto, forwarded_port = self._scheme(head, client_ip, port_part)
        verifier = ws.verifier
        prefix_bytes = prefix.encode()
        if b"token=" in target:
            location = _without_token(target, lambda token: auth.token_matches(self.keys, token, prefix_bytes, verifier))
            if location is not None:
                status = 302 if method in (b"GET", b"HEAD") else 307
                secure = "; Secure" if proto == b"https" else ""
                value = auth.mint_cookie(self.keys, host_name, verifier, self.clock()).decode()
                set_cookie = f"{auth.COOKIE.decode()}={value}; Path=/; Max-Age={auth.COOKIE_TTL}; HttpOnly; SameSite=Lax{secure}"
                extra = [("Location", location.decode("latin-1")), ("Set-Cookie", set_cookie)]
                return Answer(status, pages.response(status, b"", extra, close, head_only=head_only), close)

        # The app's own credentials go on; the fleet's never do.
        authorization = [value for value in head.authorization if not self._bearer(value, prefix_bytes, verifier)]
        bearer = len(authorization) != len(head.authorization)
        cookie, cookie_until, keep = head.cookie, None, True
        if cookie and any(auth.COOKIE in value or VM_COOKIE in value for value in cookie):
            cookie_until = auth.cookie_until(cookie, host_name, verifier, self.keys, self.clock())
            # One not valid now may be later (minted by a gateway whose clock is ahead): not kept.
            keep = cookie_until is not None or not any(auth.COOKIE in value for value in cookie)
            cookie = [c for c in (h.without_cookie(h.without_cookie(value, auth.COOKIE), VM_COOKIE) for value in cookie) if c]
        has_cookie = cookie_until is not None
        cross_origin = has_cookie and upgrade and not credentials.same_origin(head.origin, host)
        if bearer:
            access = b"token"
        elif has_cookie and not cross_origin:
            access = b"cookie"
        else:
            access = b"public"
        if access == b"public" and not ws.is_public(port):
            if cross_origin:
                text = "A WebSocket authenticated by the preview cookie must come from a page of the same preview host."
                return self._answer(403, "Cross-origin WebSocket refused", text, head_only, close)
            text = (
                "Open it once with <code>?token=</code> and the workspace token, or send "
                "<code>Authorization: Bearer</code> with it. The owner can make the port "
                "public through the ports channel."
            )
            return self._answer(
                401, "This preview is private", text, head_only, close, [("WWW-Authenticate", 'Bearer realm="aether preview"')]
            )
        if kind == r.CLOSED:
            return self._answer(
                502, "Nothing is listening yet", pages.not_listening_text(port), head_only, close, refresh=pages.REFRESH_SECONDS
            )

        if not self._trusted_networks or not self.is_trusted(client_ip):
            head.forwarded_for = b""  # a client's own chain is not believed
        ip = client_ip.encode()
        forwarded_for = head.forwarded_for + b", " + ip if head.forwarded_for else ip
        head.lines = _fleet_headers(head.lines)
        upstream_head = head.upstream(
            method,
            target,
            host=host,
            client_ip=client_ip,
            forwarded_host=host,
            forwarded_port=forwarded_port,
            proto=proto,
            via=self.via,
            upgrade=upgrade,
            authorization=authorization,
            cookie=cookie,
        )
        # The signature line goes last, so that a kept route signs another target or second
        # without building the head again; the headers given to ``decide`` are set there.
        until = cookie_until if access == b"cookie" and cookie_until is not None else _NEVER
        tail = upstream_head[len(method) + 1 + len(target) : -2]
        signer = auth.Signer(self.keys, access, method, host, forwarded_for, proto, forwarded_port)
        route = Route(method, [], ws, prefix, signer, tail, until)
        forward = self._signed(route, ws.host, ws.port, port, target, int(self.clock()), head)
        if upgrade or not keep:
            forward.memo = None
        return forward

    def _bearer(self, value: bytes, prefix: bytes, verifier: bytes) -> bool:
        scheme, _, given = value.strip().partition(b" ")
        return scheme.lower() == b"bearer" and auth.token_matches(self.keys, given.strip(), prefix, verifier)

    def _scheme(self, head: h.RequestHead, client_ip: str, port_part: bytes) -> tuple[bytes, bytes]:
        """(proto, port) of the browser's own connection: what a trusted front says it saw,
        else what this listener saw (plain http on the Host's port)."""
        if not head.forwarded_proto or not self._trusted_networks or not self.is_trusted(client_ip):
            return b"http", port_part
        proto = b"https" if head.forwarded_proto == b"https" else b"http"
        port = head.forwarded_port if head.forwarded_port.isdigit() else None
        if port is None:
            port = port_part if port_part != b"80" else (b"443" if proto == b"https" else b"80")
        return proto, port
