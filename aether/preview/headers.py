"""Rewriting HTTP/1.1 heads between the browser and the upstream, both ways. No I/O.

Header names and values arrive as the bytes ``httptools`` hands over and leave as the bytes
of a head. Hop-by-hop headers (RFC 9110 7.6.1: the fixed list and every name listed in
``Connection``) never cross; framing is re-declared by the proxy on each side.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
#: Request headers the proxy sets itself: a client must not steer them.
_SET_BY_PROXY = frozenset(
    {b"host", b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto", b"x-forwarded-port", b"forwarded"}
)


def without_cookie(value: bytes, name: bytes) -> bytes:
    """A ``Cookie`` header value with the pairs named ``name`` taken out."""
    kept = [pair for pair in value.split(b";") if pair.strip().partition(b"=")[0] != name]
    return b";".join(kept).strip()


class RequestHead:
    """What the proxy needs from a request's headers, gathered in one pass.

    ``lines`` are the headers that may go upstream as they are; the ones the proxy reads or
    sets itself (Host, credentials, ``Via``, ``X-Forwarded-*``, framing and hop-by-hop) are
    kept apart.
    """

    __slots__ = (
        "lines",
        "hosts",
        "authorization",
        "cookie",
        "origin",
        "via",
        "forwarded_for",
        "forwarded_proto",
        "forwarded_port",
        "chunked",
        "has_body",
        "tokens",
        "upgrade",
        "bad_framing",
    )

    def __init__(self, headers: Headers):
        lines = []
        self.hosts: list[bytes] = []
        self.authorization: list[bytes] = []
        self.cookie: list[bytes] = []
        self.origin: list[bytes] = []
        self.upgrade: list[bytes] = []
        self.via = self.forwarded_for = self.forwarded_proto = self.forwarded_port = b""
        self.chunked = self.has_body = self.bad_framing = False
        self.tokens: set[bytes] | None = None
        for name, value in headers:
            lower = name.lower()
            if lower not in _READ_REQUEST:
                lines.append(name + b": " + value)
            elif lower == b"host":
                self.hosts.append(value)
            elif lower == b"authorization":
                self.authorization.append(value)
            elif lower == b"cookie":
                self.cookie.append(value)
            elif lower == b"origin":
                self.origin.append(value)
                lines.append(name + b": " + value)
            elif lower == b"content-length":
                self.has_body = self.has_body or value.strip() != b"0"
                lines.append(name + b": " + value)
            elif lower == b"transfer-encoding":
                self.chunked = self.has_body = True
                # Only chunked, last, frames a request (RFC 9112 6.3); anything else is refused.
                self.bad_framing = self.bad_framing or value.rpartition(b",")[2].strip().lower() != b"chunked"
            elif lower == b"connection":
                self.tokens = (self.tokens or set()) | {t.strip().lower() for t in value.split(b",")}
            elif lower == b"upgrade":
                self.upgrade.append(value)
            elif lower == b"via":
                self.via = value if not self.via else self.via + b", " + value
            elif lower == b"x-forwarded-for":
                value = value.strip()
                self.forwarded_for = value if not self.forwarded_for else self.forwarded_for + b", " + value
            elif lower == b"x-forwarded-proto":
                # The first hop's word (nearest the browser); believed only from a trusted front.
                self.forwarded_proto = self.forwarded_proto or value.split(b",")[0].strip().lower()
            elif lower == b"x-forwarded-port":
                self.forwarded_port = self.forwarded_port or value.split(b",")[0].strip()
        if self.tokens:
            listed = self.tokens - _NEVER_LISTED
            if listed:
                lines = [line for line in lines if line.partition(b":")[0].lower() not in listed]
        self.lines = lines

    def upstream(
        self,
        method: bytes,
        target: bytes,
        *,
        host: bytes,
        client_ip: str,
        forwarded_host: bytes,
        forwarded_port: bytes,
        proto: bytes,
        via: bytes,
        upgrade: bool,
        authorization: Iterable[bytes] = (),
        cookie: Iterable[bytes] = (),
    ) -> bytes:
        """The head sent upstream, with the given credentials (the app's own) put back."""
        # One join of a few parts: this runs for every request (a part per header line, or a
        # generator per credential, cost ~2 us more per request).
        ip = client_ip.encode()
        parts = [method + b" " + target + b" HTTP/1.1\r\nHost: " + host]
        if self.lines:
            parts.append(b"\r\n".join(self.lines))
        if authorization:
            parts += [b"Authorization: " + value for value in authorization]
        if cookie:
            parts += [b"Cookie: " + value for value in cookie]
        parts.append(
            b"X-Forwarded-For: %s\r\nX-Forwarded-Host: %s\r\nX-Forwarded-Proto: %s\r\nX-Forwarded-Port: %s\r\nVia: %s"
            % (
                self.forwarded_for + b", " + ip if self.forwarded_for else ip,
                forwarded_host,
                proto,
                forwarded_port,
                self.via + b", " + via if self.via else via,
            )
        )
        if self.chunked:
            parts.append(b"Transfer-Encoding: chunked")
        if upgrade:
            parts.append(b"Connection: Upgrade")
            parts += [b"Upgrade: " + value for value in self.upgrade]
        parts.append(b"\r\n")
        return b"\r\n".join(parts)


#: Names a ``Connection`` header may not remove: the framing, and what the proxy checks.
_NEVER_LISTED = frozenset({b"close", b"keep-alive", b"upgrade", b"content-length", b"origin", b""})
#: Request headers read (and some re-set) by the proxy rather than copied as they are.
_READ_REQUEST = HOP_BY_HOP | _SET_BY_PROXY | {b"authorization", b"cookie", b"origin", b"content-length", b"via"}


_HOP_LINE = re.compile(
    rb"\r\n(connection|keep-alive|proxy-connection|te|trailer|transfer-encoding|upgrade"
    rb"|proxy-authenticate|proxy-authorization)[ \t]*:[ \t]*([^\r\n]*)",
    re.IGNORECASE,
)


class ResponseHead:
    """An upstream response head (as received, without its final blank line), read with a
    few scans of the whole head: the response side is the hot path of every request."""

    __slots__ = ("status_line", "block", "hops", "chunked", "has_length")

    #: ``chunked``: the body is chunked (the last transfer coding); ``has_length``: it is
    #: delimited by Content-Length. Neither: it ends when the app closes the connection.

    def __init__(self, raw: bytes):
        status_line, _, block = raw.partition(b"\r\n")
        if status_line[:9] != b"HTTP/1.1 ":
            status_line = b"HTTP/1.1 " + status_line.partition(b" ")[2]
        self.status_line = status_line
        self.block = block = b"\r\n" + block if block else b""
        self.hops = hops = _HOP_LINE.findall(block)
        codings = [value for name, value in hops if name.lower() == b"transfer-encoding"] if hops else []
        self.chunked = bool(codings) and codings[-1].rpartition(b",")[2].strip().lower() == b"chunked"
        self.has_length = not codings and b"\r\ncontent-length:" in block.lower()

    def for_client(self, *, chunked: bool = False, close: bool = False, upgrade: bool = False) -> bytes:
        """The head for the browser: hop-by-hop headers out, the proxy's framing in."""
        block = self.block
        if self.hops:
            block = _HOP_LINE.sub(b"", block)
            for name, value in self.hops:
                if name.lower() == b"connection" and value.strip().lower() not in _NEVER_LISTED:
                    block = _without_listed(block, value)
        out = self.status_line + block
        if upgrade:
            out += b"\r\nConnection: Upgrade"
            for name, value in self.hops:
                if name.lower() == b"upgrade":
                    out += b"\r\nUpgrade: " + value
        else:
            if chunked:
                out += b"\r\nTransfer-Encoding: chunked"
            if close:
                out += b"\r\nConnection: close"
        return out + b"\r\n\r\n"


def _without_listed(block: bytes, connection: bytes) -> bytes:
    """``block`` less the headers a ``Connection`` value names (RFC 9110 7.6.1)."""
    listed = {t.strip().lower() for t in connection.split(b",")} - _NEVER_LISTED
    if not listed:
        return block
    lines = block.split(b"\r\n")
    return b"\r\n".join(line for line in lines if line.partition(b":")[0].strip().lower() not in listed)


def chunk(data: bytes) -> bytes:
    """``data`` as one chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
