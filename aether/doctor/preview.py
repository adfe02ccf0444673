"""``aether doctor --preview PORT``: why a port's preview does not work, one finding at a time,
in the order the proxy meets them: something listens; on an address the proxy reaches
(loopback, a wildcard, or an address of this host's own interfaces, as the proxy chooses);
speaking HTTP, not TLS or something else; and accepting the ``Host`` the proxy sends, which dev
servers check (Vite's ``server.allowedHosts``, Django's ``ALLOWED_HOSTS``). Each finding is a
:class:`Check` with the setting to change.

The request is the proxy's own: ``Host: localhost:PORT`` (or the preview host, with
``--preview-upstream-host original``) and ``X-Forwarded-Host`` the preview host, so that the
verdict is the preview's, and the host to allow is the one the app refused.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl

from aether.doctor.checks import FAIL, OK, WARN, Check
from aether.ports import detect

TIMEOUT = 3.0
#: What a dev server answers when it refuses the Host, and the setting that allows it.
HOST_REFUSALS = (
    (b"Blocked request. This host", "Vite", "server.allowedHosts in vite.config (e.g. allowedHosts: ['{allow}'])"),
    (b"DisallowedHost", "Django", "ALLOWED_HOSTS in settings.py (e.g. ALLOWED_HOSTS = ['{allow}'])"),
    (b"Invalid HTTP_HOST header", "Django", "ALLOWED_HOSTS in settings.py (e.g. ALLOWED_HOSTS = ['{allow}'])"),
    (
        b"Invalid Host header",
        "webpack-dev-server",
        "devServer.allowedHosts in webpack.config.js (e.g. allowedHosts: ['{allow}'])",
    ),
)


def local_addresses() -> set[str]:
    """This host's addresses, as the proxy knows them (loopback's at least)."""
    from aether.preview.local import LOOPBACK, LocalAddresses

    loop = asyncio.new_event_loop()
    quiet = logging.getLogger("aether.preview")
    was = quiet.disabled
    quiet.disabled = True  # its "local addresses changed" line is the server's news, not the doctor's
    try:
        known = LocalAddresses(loop)
        try:
            known.start()
        except OSError:
            return set(LOOPBACK)
        addresses = set(known.addresses)
        known.close()
        return addresses
    finally:
        quiet.disabled = was
        loop.close()


class _Bound:
    """A listener's address, as :func:`aether.preview.gate.upstream_address` reads it."""

    def __init__(self, address: str):
        self.address = address


def _refused_name(body: bytes, sent: str) -> str:
    """The host name the app refused, as its page quotes it (Django: ``'NAME:PORT'``, Vite:
    ``("NAME")``), else the one sent; without its port."""
    quoted = re.search(rb"""(?:HTTP_HOST header|This host \(?)\s*:?\s*['"]([^'"]{1,255})['"]""", body)
    name = quoted.group(1).decode("latin-1") if quoted else sent
    if name.startswith("[") and "]:" in name:
        return name.split("]:", 1)[0] + "]"
    return name.rsplit(":", 1)[0] if name.count(":") == 1 else name


def allow_hint(refused: str, domain: str) -> str:
    """What to allow for a refused host: every preview host at once for one of the preview
    domain, else that name (``localhost``: what the proxy sends by default)."""
    name = refused.lower()
    return "." + domain if name == domain or name.endswith("." + domain) else name


def _protocol_rule(rules, port: int, pid: int | None) -> tuple[str, str] | None:
    """(protocol, where: ``FILE KEY``) when an attribute rule sets the port's protocol."""
    if rules is None:
        return None
    argv = None
    if pid:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [part.decode(errors="surrogateescape") for part in f.read(4096).split(b"\0") if part]
        except OSError:
            argv = None
    attrs = rules.resolve(port, argv)
    if attrs.protocol is None:
        return None
    origin = attrs.sources.get("protocol")
    where = f"{origin.file} {origin.key}" if origin is not None else "a port attribute rule"
    return attrs.protocol, where


def _ask(port: int, family: int, host: str, request_host: str, tls: bool, forwarded_host: str | None = None) -> bytes:
    """The first bytes of the answer to ``GET /`` with ``Host: request_host``, and the
    forwarding headers the proxy adds."""
    forwarded = forwarded_host or request_host
    head = (
        f"GET / HTTP/1.1\r\nHost: {request_host}\r\nAccept: */*\r\nX-Forwarded-For: 127.0.0.1\r\n"
        f"X-Forwarded-Host: {forwarded}\r\nX-Forwarded-Proto: http\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection((host, port), TIMEOUT) as sock:
        sock.settimeout(TIMEOUT)
        conn = detect.client_context().wrap_socket(sock, server_hostname=None) if tls else sock
        conn.sendall(head.encode())
        data = b""
        try:
            while len(data) < 65536:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return data


def check(
    port: int,
    preview_host: str,
    domain: str,
    upstream_host: str = "localhost",
    rules=None,
    entry=None,
) -> list[Check]:
    """The preview's checks for ``port``; ``upstream_host`` is the proxy's setting
    (``localhost``: the app gets ``Host: localhost:PORT``; ``original``: the preview host);
    ``rules``: the attribute rules (a :class:`~aether.attributes.rules.Ruleset`), whose
    ``protocol`` for the port the proxy follows over what the port speaks; ``entry``: the
    port's registry entry, whose ``protocol`` the proxy follows over the rules'."""
    from aether.ports import procs
    from aether.ports.sockdiag import DiagSocket
    from aether.preview.gate import upstream_address
    from aether.preview.local import is_local

    with DiagSocket() as diag:
        states = procs.port_states(diag.raw(), [port])
    if not states:
        return [
            Check(
                "listening",
                FAIL,
                f"nothing listens on port {port}",
                "start the app on it (aether port run KEY -- CMD sets $PORT)",
            )
        ]
    state = states[0]
    who = f"pid {state.pid} ({state.process})" if state.pid else "a process this user cannot see"
    found = [Check("listening", OK, f"port {port} is held by {who} on {', '.join(state.addresses)}")]
    local = local_addresses()
    bound: list = [_Bound(address) for address in state.addresses]  # duck-typed Listeners
    host = upstream_address(bound, local)
    if host is None or not is_local(host, local):
        found.append(
            Check(
                "address",
                FAIL,
                f"bound to {', '.join(state.addresses)} only, not an address of this host: the preview "
                "connects only to this host (loopback, or an address of its own interfaces)",
                "bind to 127.0.0.1 or 0.0.0.0 (e.g. --host 0.0.0.0, vite --host, manage.py runserver 0.0.0.0:PORT)",
            )
        )
        return found
    found.append(Check("address", OK, f"reachable on {host}"))
    if entry is not None and entry.protocol:
        rule: tuple[str, str] | None = (entry.protocol, f"the registry entry {entry.key}")
        fix = f"aether port set {entry.key} {port} --protocol {{speaks}} (or --protocol auto: as found)"
    else:
        rule = _protocol_rule(rules, port, state.pid)
        fix = "set that rule's protocol to {speaks}, or remove it and let aether find it"
    sent = preview_host if upstream_host == "original" else f"localhost:{port}"
    try:
        plain = _ask(port, 0, host, sent, tls=False, forwarded_host=preview_host)
    except OSError as exc:
        found.append(Check("http", FAIL, f"connecting to {host}:{port} failed: {exc.strerror or exc}", "is the app up?"))
        return found
    kind, status = detect.classify_answer(plain)
    body = plain
    if kind != "http" or status == 400:
        try:
            answer = _ask(port, 0, host, sent, tls=True, forwarded_host=preview_host)
        except (OSError, ssl.SSLError):
            answer = b""
        if detect.classify_answer(answer)[0] == "http":
            kind, status, body = "https", detect.classify_answer(answer)[1], answer
    speaks = "https" if kind == "https" else ("http" if kind == "http" else "tcp")
    if rule is not None and rule[0] != speaks:
        chosen, where = rule
        what = {"https": "HTTPS (TLS)", "http": "plain HTTP", "tcp": "no HTTP"}[speaks]
        does = {
            "https": "speaks TLS to it",
            "http": "sends it plain HTTP",
            "tcp": "shows the not-HTTP page without connecting",
        }[chosen]
        found.append(
            Check(
                "protocol",
                FAIL,
                f"{where} sets protocol {chosen}, but port {port} speaks {what}: the preview {does}",
                fix.format(speaks=speaks),
            )
        )
        return found
    if kind == "https":
        found.append(
            Check(
                "protocol",
                WARN,
                f"port {port} speaks HTTPS (TLS), not plain HTTP",
                "the preview proxies with TLS to a port detected as https; or serve plain HTTP (Vite without basic-ssl)",
            )
        )
    elif kind != "http":
        what = "a TLS record" if kind == "tls" else ("nothing" if not plain else "something that is not HTTP")
        found.append(
            Check(
                "protocol",
                FAIL,
                f"port {port} answers {what} to an HTTP request: it has no web page to preview",
                "preview the app's HTTP port instead; a database or raw TCP port is reached with its own client",
            )
        )
        return found
    else:
        found.append(Check("protocol", OK, f"speaks HTTP ({status})"))
    for marker, app, setting in HOST_REFUSALS:
        if marker in body:
            refused = _refused_name(body, sent)
            found.append(
                Check(
                    "host",
                    FAIL,
                    f"{app} refuses the preview's Host {refused} (the proxy sends Host: {sent}; it answered {status}: "
                    f"{marker.decode()}...)",
                    f"allow it: {setting.format(allow=allow_hint(refused, domain))}",
                )
            )
            return found
    found.append(Check("host", OK, f"answers {status} to Host {sent} (X-Forwarded-Host {preview_host})"))
    return found
