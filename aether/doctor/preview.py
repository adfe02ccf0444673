"""``aether doctor --preview PORT``: why a port's preview does not work, one finding at a time,
in the order the proxy meets them: something listens; on an address the proxy reaches (this
machine's loopback or every address); speaking HTTP, not TLS or something else; and accepting
the preview's ``Host``, which dev servers check (Vite's ``server.allowedHosts``, Django's
``ALLOWED_HOSTS``). Each finding is a :class:`Check` with the setting to change.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl

from aether.doctor.checks import FAIL, OK, WARN, Check
from aether.ports import detect

TIMEOUT = 3.0
#: What a dev server answers when it refuses the Host, and the setting that allows it.
HOST_REFUSALS = (
    (b"Blocked request. This host", "Vite", "server.allowedHosts in vite.config (e.g. allowedHosts: ['{domain}'])"),
    (b"DisallowedHost", "Django", "ALLOWED_HOSTS in settings.py (e.g. ALLOWED_HOSTS = ['{domain}'])"),
    (b"Invalid HTTP_HOST header", "Django", "ALLOWED_HOSTS in settings.py (e.g. ALLOWED_HOSTS = ['{domain}'])"),
    (
        b"Invalid Host header",
        "webpack-dev-server",
        "devServer.allowedHosts in webpack.config.js (e.g. allowedHosts: ['{domain}'])",
    ),
)


def reachable(address: str) -> bool:
    """Whether the proxy, which connects over loopback, reaches a listener on ``address``."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_unspecified


def _ask(port: int, family: int, host: str, request_host: str, tls: bool) -> bytes:
    """The first bytes of the answer to ``GET /`` with ``Host: request_host``."""
    with socket.create_connection((host, port), TIMEOUT) as sock:
        sock.settimeout(TIMEOUT)
        conn = detect.client_context().wrap_socket(sock, server_hostname=None) if tls else sock
        conn.sendall(f"GET / HTTP/1.1\r\nHost: {request_host}\r\nAccept: */*\r\nConnection: close\r\n\r\n".encode())
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


def check(port: int, preview_host: str, domain: str) -> list[Check]:
    from aether.ports import procs
    from aether.ports.sockdiag import DiagSocket

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
    near = [address for address in state.addresses if reachable(address)]
    if not near:
        found.append(
            Check(
                "address",
                FAIL,
                f"bound to {', '.join(state.addresses)} only: the preview connects over loopback (127.0.0.1, ::1)",
                "bind to 127.0.0.1 or 0.0.0.0 (e.g. --host 0.0.0.0, vite --host, manage.py runserver 0.0.0.0:PORT)",
            )
        )
        return found
    found.append(Check("address", OK, f"reachable on {near[0]}"))
    host = "::1" if ":" in near[0] and near[0] != "::" else "127.0.0.1"
    try:
        plain = _ask(port, 0, host, preview_host, tls=False)
    except OSError as exc:
        found.append(Check("http", FAIL, f"connecting to {host}:{port} failed: {exc.strerror or exc}", "is the app up?"))
        return found
    kind, status = detect.classify_answer(plain)
    body = plain
    if kind != "http" or status == 400:
        try:
            answer = _ask(port, 0, host, preview_host, tls=True)
        except (OSError, ssl.SSLError):
            answer = b""
        if detect.classify_answer(answer)[0] == "http":
            kind, status, body = "https", detect.classify_answer(answer)[1], answer
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
            found.append(
                Check(
                    "host",
                    FAIL,
                    f"{app} refuses the preview's Host {preview_host} (it answered {status}: {marker.decode()}...)",
                    f"allow it: {setting.format(domain='.' + domain)}",
                )
            )
            return found
    found.append(Check("host", OK, f"answers {status} to Host {preview_host}"))
    return found
