"""The dashboard over HTTP and WebSocket, without a browser: the cookie it signs in with, the
page it serves (never the token), the WebSocket's same-origin rule for that cookie, the
``/open/{port}`` grants for private previews, and the protocol additions the page uses.
(The page itself, driven by Chromium, is ``test_dashboard_browser``.)"""

from __future__ import annotations

import http.client
import json
import re
import time
from urllib.parse import urlsplit

import pytest
from support.clients import recv_until
from support.ports import free_port
from support.servers import Server, module_server
from support.waiting import wait_for
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from aether.preview import grant

PROJECT = "d45b0a4d"


server = module_server("sockdiag", "--project-id", PROJECT)


def get(server: Server, target: str, headers: dict | None = None, host: str | None = None):
    """(status, headers as a message, body) of one GET to the server's listener."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", target, headers={"Host": host or f"127.0.0.1:{server.port}", **(headers or {})})
    reply = conn.getresponse()
    body = reply.read()
    conn.close()
    return reply.status, reply.headers, body


def sign_in(server: Server, headers: dict | None = None) -> str:
    """The ``Cookie`` header value that ``/?token=`` sets."""
    status, head, _ = get(server, f"/?token={server.token}", headers)
    assert status == 303, status
    return head["Set-Cookie"].split(";")[0]


def test_token_is_traded_for_a_cookie_and_leaves_the_url(server):
    status, head, body = get(server, f"/?token={server.token}")
    assert status == 303 and head["Location"] == "/" and body == b""
    set_cookie = head.get_all("Set-Cookie")
    assert len(set_cookie) == 1
    attributes = [part.strip() for part in set_cookie[0].split(";")]
    name, _, value = attributes[0].partition("=")
    assert name == "aether_dashboard" and re.fullmatch(r"[0-9a-f]{64}", value)
    assert server.token not in value
    # Lax, not Strict: a link from another site (a chat, a web IDE) to /?token= must land signed
    # in, and Strict cookies are not sent on the redirect of a cross-site navigation.
    assert set(attributes[1:]) == {"Path=/", "HttpOnly", "SameSite=Lax"}  # no Domain, no Secure over http
    assert head["Cache-Control"] == "no-store"

    status, head, page = get(server, "/", {"Cookie": f"other=1; {attributes[0]}"})
    assert status == 200 and head["Content-Type"].startswith("text/html")
    assert b'data-workspace="ws-test"' in page
    assert server.token.encode() not in page
    assert "script-src 'self'" in head["Content-Security-Policy"] and "frame-ancestors 'none'" in head["Content-Security-Policy"]
    assert head["X-Frame-Options"] == "DENY"


def test_the_cookie_is_secure_behind_a_tls_front(server):
    status, head, _ = get(server, f"/?token={server.token}", {"X-Forwarded-Proto": "https"})
    assert status == 303 and "; Secure" in head["Set-Cookie"]


@pytest.mark.parametrize(
    "target, headers",
    [
        ("/?token=wrong", {}),
        ("/?token=", {}),
        ("/", {}),
        ("/", {"Cookie": "aether_dashboard=" + "0" * 64}),
        ("/", {"Authorization": "Bearer {token}"}),  # a browser page is opened by cookie only
        ("/?token={token}&token=wrong", {}),
    ],
)
def test_refused_without_the_token_or_cookie(server, target, headers):
    headers = {k: v.format(token=server.token) for k, v in headers.items()}
    status, head, body = get(server, target.format(token=server.token), headers)
    assert status == 401
    assert head.get("Set-Cookie") is None
    assert b"/?token=" in body and b"ws-test" not in body  # says how to open it, not what is inside
    assert server.token.encode() not in body


def test_the_page_escapes_the_workspace_id(tmp_path):
    srv = Server("sockdiag", tmp_path / "state", "--workspace-id", "a\"<b>&'x")
    try:
        _, _, page = get(srv, "/", {"Cookie": sign_in(srv)})
        assert b"<b>" not in page and b'a"<' not in page
        assert b'data-workspace="a&quot;&lt;b&gt;&amp;&#x27;x"' in page
        assert srv.banner[6] == f"  dashboard:     http://127.0.0.1:{srv.port}/?token={srv.token}"
    finally:
        srv.stop()


def test_assets_are_static_and_write_no_html(server):
    status, head, script = get(server, "/dashboard/dashboard.js")
    assert status == 200 and head["Content-Type"].startswith("text/javascript")
    assert b"innerHTML" not in script and b"insertAdjacentHTML" not in script and b"document.write" not in script
    status, head, _ = get(server, "/dashboard/dashboard.css")
    assert status == 200 and head["Content-Type"].startswith("text/css")
    assert get(server, "/dashboard/index.html")[0] == 404
    assert get(server, "/dashboard/../setup.cfg")[0] == 404
    assert get(server, "/dashboard/session")[0] == 401
    status, _, body = get(server, "/dashboard/session", {"Cookie": sign_in(server)})
    assert status == 200 and json.loads(body)["wsPath"] == "/workspaces/ws-test/ws"


# -- the WebSocket --------------------------------------------------------------------------


def ws_status(server: Server, headers: dict, origin: str | None = None, path: str = "/workspaces/ws-test/ws") -> int:
    """101 if the upgrade is accepted (the ports snapshot arrives), else the refusal's status."""
    try:
        with connect(f"ws://127.0.0.1:{server.port}{path}", additional_headers=headers, origin=origin) as ws:
            ws.send(json.dumps({"channel": "config", "type": "get", "id": 1}))
            assert recv_until(ws, lambda m: m.get("id") == 1)["config"]["workspaceId"] == "ws-test"
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


def test_websocket_takes_the_cookie_from_its_own_origin_only(server):
    cookie = sign_in(server)
    own = f"http://127.0.0.1:{server.port}"
    assert ws_status(server, {"Cookie": cookie}, own) == 101
    assert ws_status(server, {"Cookie": cookie}, f"https://127.0.0.1:{server.port}") == 101
    # Cross-site WebSocket hijacking: another site's page, the browser attaching the cookie.
    assert ws_status(server, {"Cookie": cookie}, "http://evil.example") == 403
    assert ws_status(server, {"Cookie": cookie}, f"http://127.0.0.1:{server.port}.evil.example") == 403
    assert ws_status(server, {"Cookie": cookie}, f"http://{PROJECT[:6]}.preview.localhost:{server.port}") == 403
    assert ws_status(server, {"Cookie": cookie}, "null") == 403
    assert ws_status(server, {"Cookie": cookie}) == 403  # every browser sends an Origin
    assert ws_status(server, {"Cookie": cookie, "Origin": own + ", " + own}) == 403
    # X-Forwarded-Host is not a second chance: only Host is compared.
    assert ws_status(server, {"Cookie": cookie, "X-Forwarded-Host": "evil.example"}, "http://evil.example") == 403
    # A wrong cookie, or none, is no credential at all.
    assert ws_status(server, {"Cookie": "aether_dashboard=" + "0" * 64}, own) == 401
    assert ws_status(server, {"Cookie": "aether_preview=" + "0" * 64}, own) == 401
    assert ws_status(server, {}, own) == 401
    # Without credentials, which workspaces exist is not told.
    assert ws_status(server, {"Cookie": cookie}, own, "/workspaces/other/ws") == 404
    assert ws_status(server, {"Cookie": "aether_dashboard=x"}, own, "/workspaces/other/ws") == 401


def test_the_cookie_opens_only_what_the_page_uses(server):
    """Browsers send a host's cookies to every port of it, so a dev server beside aether on the
    same host gets the dashboard cookie and could replay it with a forged Origin: it must not
    open a shell, files, the agent or config set."""
    cookie = sign_in(server)
    own = f"http://127.0.0.1:{server.port}"
    with connect(f"ws://127.0.0.1:{server.port}/workspaces/ws-test/ws", additional_headers={"Cookie": cookie}, origin=own) as ws:
        refused = [
            {"channel": "terminal", "type": "create", "cols": 80, "rows": 24, "command": "touch /tmp/x"},
            {"channel": "terminal", "type": "list"},
            {"channel": "files", "type": "read", "path": "/etc/hostname"},
            {"channel": "agent", "type": "list"},
            {"channel": "config", "type": "set", "config": {"ignoredPorts": [22]}},
        ]
        for n, message in enumerate(refused):
            ws.send(json.dumps({**message, "id": n}))
            answer = recv_until(ws, lambda m: m.get("id") == n)
            assert (answer["type"], answer["code"], answer["channel"]) == ("error", "forbidden", message["channel"]), answer
            assert "token" in answer["message"]
        ws.send(json.dumps({"channel": "config", "type": "get", "id": "g"}))
        assert recv_until(ws, lambda m: m.get("id") == "g")["config"]["ignoredPorts"] == [22, 2222, 3001]
        ws.send(json.dumps({"channel": "ports", "type": "kill", "port": 1, "id": "k"}))
        assert recv_until(ws, lambda m: m.get("id") == "k")["code"] != "forbidden"
    with server.connect() as ws:  # the token still opens everything
        ws.send(json.dumps({"channel": "terminal", "type": "list", "id": 1}))
        assert recv_until(ws, lambda m: m.get("id") == 1)["type"] == "list"


def test_token_auth_is_unchanged_and_judged_before_the_cookie(server):
    cookie = sign_in(server)
    # A token works from any origin, as before.
    assert ws_status(server, {}, "http://evil.example", f"/workspaces/ws-test/ws?token={server.token}") == 101
    # A wrong token is refused even beside a good cookie: the token given is the one judged.
    assert ws_status(server, {"Cookie": cookie}, f"http://127.0.0.1:{server.port}", "/workspaces/ws-test/ws?token=wrong") == 401


# -- /open/{port} ----------------------------------------------------------------------------


def preview_get(server: Server, location: str, headers: dict | None = None):
    url = urlsplit(location)
    target = url.path + (f"?{url.query}" if url.query else "")
    return get(server, target, headers, host=url.netloc)


def test_open_redirects_to_a_private_preview_with_a_grant(server, listeners):
    port = listeners.http_server().port
    cookie = sign_in(server)
    assert get(server, f"/open/{port}")[0] == 401  # no cookie
    assert get(server, f"/open/{port}", {"Cookie": "aether_dashboard=nope"})[0] == 401
    assert get(server, "/open/70000", {"Cookie": cookie})[0] == 404
    assert get(server, "/open/0", {"Cookie": cookie})[0] == 404

    status, head, _ = get(server, f"/open/{port}", {"Cookie": cookie})
    assert status == 303
    location = head["Location"]
    preview = f"http://{port}-{PROJECT[:6]}.preview.localhost:{server.port}/"
    assert location.startswith(preview + "?aether_grant=") and server.token not in location
    wait_for(lambda: preview_get(server, preview, {"Authorization": f"Bearer {server.token}"})[0] == 200, 5)
    # The gate trades the grant for its own cookie and redirects to the URL without it.
    status, head, _ = preview_get(server, location)
    assert status == 302 and head["Location"] == "/"
    preview_cookie = head["Set-Cookie"].split(";")[0]
    assert preview_cookie.startswith("aether_preview=")
    assert preview_get(server, preview, {"Cookie": preview_cookie})[0] == 200
    assert preview_get(server, preview)[0] == 401
    # Single use: the same grant again (from the history, a log) opens nothing.
    assert preview_get(server, location)[0] == 401
    # Nor does the same grant spelt another way (a leading zero on its expiry).
    assert preview_get(server, location.replace("aether_grant=", "aether_grant=0"))[0] == 401

    # The grant opens that host only, not another port's.
    other = location.replace(f"{port}-", f"{port + 1}-", 1)
    assert preview_get(server, other)[0] == 401
    # A forged or tampered grant is no grant.
    assert preview_get(server, location[:-1] + ("0" if location[-1] != "0" else "1"))[0] == 401


def test_open_links_a_public_preview_directly(server, listeners):
    port = free_port()
    cookie = sign_in(server)
    with server.connect() as ws:
        ws.send(json.dumps({"channel": "ports", "type": "visibility", "port": port, "visibility": "public", "id": "v"}))
        recv_until(ws, lambda m: m.get("id") == "v")
        status, head, _ = get(server, f"/open/{port}", {"Cookie": cookie})
        assert status == 303 and head["Location"] == f"http://{port}-{PROJECT[:6]}.preview.localhost:{server.port}/"
        ws.send(json.dumps({"channel": "ports", "type": "visibility", "port": port, "visibility": "private", "id": "p"}))
        recv_until(ws, lambda m: m.get("id") == "p")


def test_grants_expire_and_are_bound_to_their_host():
    token, host = b"tok", b"3000-abc123.preview.localhost"
    now = 1_800_000_000
    value = grant.mint(token, host, now)
    assert grant.valid(token, host, value, now)
    assert grant.valid(token, b"3000-ABC123.Preview.Localhost", value, now)
    assert grant.valid(token, host, value, now + grant.TTL_SECONDS)
    assert not grant.valid(token, host, value, now + grant.TTL_SECONDS + 1)
    assert not grant.valid(token, b"3001-abc123.preview.localhost", value, now)
    assert not grant.valid(b"other", host, value, now)
    expiry, nonce, mac = value.split(b".")
    assert not grant.valid(token, host, b"%d.%s.%s" % (int(expiry) + 1, nonce, mac), now)
    assert not grant.valid(token, host, b"%s.%s.%s" % (expiry, nonce[:-1] + (b"0" if nonce[-1:] != b"0" else b"1"), mac), now)
    far = grant.mint(token, host, now + 3600)  # minted for a later time: an expiry too far ahead
    assert not grant.valid(token, host, far, now)
    for bad in (
        b"",
        b".",
        b"x.y",
        b"-1.%s.%s" % (nonce, mac),
        b"99999999999999.%s.%s" % (nonce, mac),
        expiry,
        b"%s.%s" % (expiry, mac),
        b"0%s.%s.%s" % (expiry, nonce, mac),
        b"%s.%s.%s" % (expiry, nonce.upper(), mac),
        b"%s.%s.%s" % (expiry, nonce, mac.upper()),
    ):
        assert not grant.valid(token, host, bad, now)


def test_grants_of_one_second_differ_and_each_is_good_once():
    token, host = b"tok", b"3000-abc123.preview.localhost"
    now = 1_800_000_000
    first, second = grant.mint(token, host, now), grant.mint(token, host, now)
    assert first != second and first.split(b".")[0] == second.split(b".")[0]
    used: dict[bytes, int] = {}
    assert grant.redeem(used, token, host, first, now) and grant.redeem(used, token, host, second, now)
    assert not grant.redeem(used, token, host, first, now) and not grant.redeem(used, token, host, second, now)
    assert not grant.redeem(used, token, b"3001-abc123.preview.localhost", grant.mint(token, host, now), now)


def test_the_used_grants_are_bounded_and_never_forget_a_live_one():
    token, host, now = b"tok", b"3000-abc123.preview.localhost", 1_800_000_000
    used: dict[bytes, int] = {}
    early = [grant.mint(token, host, now) for _ in range(3)]
    assert all(grant.redeem(used, token, host, value, now, limit=4) for value in early)
    late = grant.mint(token, host, now + 30)
    assert grant.redeem(used, token, host, late, now + 30, limit=4)
    # Full of live grants: a new one opens nothing, and no used one is forgotten.
    assert not grant.redeem(used, token, host, grant.mint(token, host, now + 30), now + 30, limit=4)
    assert not any(grant.redeem(used, token, host, value, now + 30, limit=4) for value in [*early, late])
    # Once the early ones have expired, their room is taken back.
    later = now + grant.TTL_SECONDS + 1
    assert grant.redeem(used, token, host, grant.mint(token, host, later), later, limit=4)
    assert len(used) == 2 and not grant.redeem(used, token, host, late, later, limit=4)


def test_two_browsers_opening_a_preview_in_the_same_second_both_get_in_once(server, listeners):
    port = listeners.http_server().port
    cookie = sign_in(server)
    preview = f"http://{port}-{PROJECT[:6]}.preview.localhost:{server.port}/"
    wait_for(lambda: preview_get(server, preview, {"Authorization": f"Bearer {server.token}"})[0] == 200, 5)

    def two_in_one_second():
        first, second = (get(server, f"/open/{port}", {"Cookie": cookie})[1]["Location"] for _ in range(2))

        def expiry(location):
            return location.partition("aether_grant=")[2].partition(".")[0]

        return (first, second) if expiry(first) == expiry(second) else None

    first, second = wait_for(two_in_one_second, 10)
    assert first != second
    for location in (first, second):
        status, head, _ = preview_get(server, location)
        assert status == 302 and head["Set-Cookie"].startswith("aether_preview=")
    for location in (first, second):
        assert preview_get(server, location)[0] == 401


# -- what the page reads from the protocol -----------------------------------------------------


def test_open_messages_say_since_when(tmp_path, listeners):
    before = listeners.http_server().port
    started = time.time() * 1000
    srv = Server("sockdiag", tmp_path / "state")
    try:
        with srv.connect() as ws:
            first = recv_until(ws, lambda m: m.get("port") == before)
            assert first["seenAtStart"] is True and started - 1 <= first["opened"] <= time.time() * 1000 + 1
            t0 = time.time() * 1000
            later = listeners.http_server().port
            opened = recv_until(ws, lambda m: m.get("port") == later and m["type"] == "open")
            assert opened["seenAtStart"] is False and t0 - 1 <= opened["opened"] <= time.time() * 1000 + 1
        with srv.connect() as ws:  # a later client gets the same times in its snapshot
            again = recv_until(ws, lambda m: m.get("port") == later)
            assert (again["opened"], again["seenAtStart"]) == (opened["opened"], False)
    finally:
        srv.stop()


def test_config_registry_request_answers_the_whole_registry(server):
    with server.connect() as ws:
        ws.send(json.dumps({"channel": "config", "type": "registry", "id": "r1"}))
        empty = recv_until(ws, lambda m: m.get("id") == "r1")
        assert empty == {"channel": "config", "type": "registry", "ports": [], "id": "r1"}
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        body = json.dumps({"port": 5590, "app": "shop", "label": "api"})
        conn.request("PUT", "/api/ports/web", body, {"Authorization": f"Bearer {server.token}"})
        reply = conn.getresponse()
        assert reply.status == 200, reply.read()
        reply.read()
        ws.send(json.dumps({"channel": "config", "type": "registry", "id": "r2"}))
        entries = recv_until(ws, lambda m: m.get("id") == "r2")["ports"]
        assert [(e["key"], e["port"], e["app"], e["label"]) for e in entries] == [("web", 5590, "shop", "api")]
        conn.request("DELETE", "/api/ports/web", headers={"Authorization": f"Bearer {server.token}"})
        assert conn.getresponse().status == 204
