"""The preview proxy's decisions and head rewriting, without sockets: every request head gets
a Forward or an Answer, never an exception, and nothing but a local listener is ever a target."""

from __future__ import annotations

import socket
import struct
import types

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aether.ports.events import Listener
from aether.ports.table import PortTable
from aether.preview import headers as h
from aether.preview import local as netlink
from aether.preview.gate import Answer, Forward, Gate, _redirect_path, upstream_address
from aether.preview.local import LOOPBACK
from aether.preview.visibility import Visibility
from aether.server.listener import first_host

TOKEN = "s3cret-token"
HOST = b"3000-abc123.preview.localhost:3001"


def make_gate(
    public=(), ignored=(22, 2222, 3001), listeners=(("127.0.0.1", 3000),), local=LOOPBACK, named=lambda key: None
) -> Gate:
    table = PortTable(ignored)
    for i, (address, port) in enumerate(listeners):
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        table.add(Listener(("sk", i), port, family, address))
    settings = types.SimpleNamespace(
        token=TOKEN,
        project_prefix="abc123",
        preview_domain="preview.localhost",
        preview_upstream_host="localhost",
        port=3001,
        trusted_proxies=(),
    )
    return Gate(settings, types.SimpleNamespace(table=table), Visibility(public), named, local)


def decide(gate, target=b"/", headers=None, method=b"GET", upgrade=False):
    headers = [(b"Host", HOST)] if headers is None else headers
    return gate.decide(method, target, headers, "127.0.0.1", upgrade)


def status(decision) -> int:
    return decision.status if isinstance(decision, Answer) else 0


BEARER = (b"Authorization", b"Bearer " + TOKEN.encode())


def test_routing_decisions():
    gate = make_gate()
    assert status(decide(gate, headers=[(b"Host", b"3000-zzz999.preview.localhost:3001"), BEARER])) == 404
    assert status(decide(gate, headers=[(b"Host", b"22-abc123.preview.localhost"), BEARER])) == 403
    assert status(decide(gate, headers=[(b"Host", b"3001-abc123.preview.localhost"), BEARER])) == 403
    assert status(decide(gate, headers=[(b"Host", b"4000-abc123.preview.localhost"), BEARER])) == 502
    # The server's own host on a preview connection: sent again on a new connection (307).
    assert status(decide(gate, headers=[(b"Host", b"localhost:3001"), BEARER])) == 307
    assert status(decide(gate, headers=[(b"Host", b"<script>"), BEARER])) == 421
    assert status(decide(gate, headers=[BEARER])) == 400
    assert status(decide(gate, headers=[(b"Host", HOST), (b"Host", HOST), BEARER])) == 400
    assert status(decide(gate, b"http://127.0.0.1:22/", [(b"Host", HOST), BEARER])) == 400
    forward = decide(gate, headers=[(b"Host", b"3000-ABC123.Preview.Localhost:3001"), BEARER])
    assert isinstance(forward, Forward) and (forward.address, forward.port) == ("127.0.0.1", 3000)


def test_a_port_has_one_spelling():
    gate = make_gate(listeners=(("127.0.0.1", 20100), ("127.0.0.1", 3000)), named={"web": 20100, "0web": 3000}.get)

    def to(name):
        return decide(gate, headers=[(b"Host", name + b"-abc123.preview.localhost:3001"), BEARER])

    for spelling in (b"020100", b"0020100", b"00", b"03000"):
        answer = to(spelling)
        assert status(answer) == 404, spelling
        assert b"without leading zeros" in answer.response
    assert (to(b"20100").address, to(b"20100").port) == ("127.0.0.1", 20100)
    assert status(to(b"0")) == 403  # port 0's one spelling, and never previewable
    # Registry keys are never all digits, so a leading zero in one is just a letter of it.
    assert to(b"web").port == 20100 and to(b"0web").port == 3000
    assert gate.preview_host(b"020100-abc123.preview.localhost")[0] is None


def test_only_addresses_of_this_host_are_upstreams():
    local = {*LOOPBACK, "10.0.2.15", "fd00::2"}
    for address in ("10.9.9.9", "fd00::99", "::ffff:10.9.9.9"):
        answer = decide(make_gate(listeners=((address, 3000),), local=local), headers=[(b"Host", HOST), BEARER])
        assert status(answer) == 502, address
        shown = address.removeprefix("::ffff:").encode()
        assert b"Port 3000 listens on " + shown + b", which is not an address of this workspace" in answer.response
        assert b"refresh" not in answer.response  # it will not start working by itself
    for address in ("10.0.2.15", "fd00::2", "127.0.0.2", "::ffff:10.0.2.15"):
        forward = decide(make_gate(listeners=((address, 3000),), local=local), headers=[(b"Host", HOST), BEARER])
        assert forward.address == address.removeprefix("::ffff:"), address
    # A local listener is chosen over a foreign one, whatever the order.
    gate = make_gate(listeners=(("10.9.9.9", 3000), ("10.0.2.15", 3000)), local=local)
    assert decide(gate, headers=[(b"Host", HOST), BEARER]).address == "10.0.2.15"
    # An address that goes away is refused from the next request on; one that arrives is used.
    live = set(local)
    gate = make_gate(listeners=(("10.0.2.15", 3000),), local=live)
    assert isinstance(decide(gate, headers=[(b"Host", HOST), BEARER]), Forward)
    live.discard("10.0.2.15")
    assert status(decide(gate, headers=[(b"Host", HOST), BEARER])) == 502
    live.add("10.0.2.15")
    gate.forget_all()
    assert isinstance(decide(gate, headers=[(b"Host", HOST), BEARER]), Forward)


def rtnl(kind, family, address, index=3, flags=0, local=None, flags32=None):
    """One RTM_NEWADDR/RTM_DELADDR message as the kernel sends it."""
    attrs = b""
    for attr, value in ((netlink.IFA_ADDRESS, address), (netlink.IFA_LOCAL, local)):
        if value is not None:
            raw = socket.inet_pton(family, value)
            attrs += struct.pack("=HH", 4 + len(raw), attr) + raw
    if flags32 is not None:
        attrs += struct.pack("=HHI", 8, netlink.IFA_FLAGS, flags32)
    body = struct.pack("=BBBBI", family, 24, flags, 0, index) + attrs
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body


def test_netlink_address_messages():
    new, gone = netlink.RTM_NEWADDR, netlink.RTM_DELADDR
    data = (
        rtnl(new, socket.AF_INET, "10.0.2.15")
        + rtnl(new, socket.AF_INET, "10.8.0.1", local="10.8.0.2")  # point-to-point: ours is IFA_LOCAL
        + rtnl(new, socket.AF_INET6, "fd00::2", flags32=netlink.IFA_F_TENTATIVE)  # still in DAD
        + rtnl(new, socket.AF_INET6, "fd00::3", flags=netlink.IFA_F_DADFAILED)
        + rtnl(gone, socket.AF_INET6, "fe80::1", index=7)
        + struct.pack("=IHHII", 16, 3, 2, 1, 0)  # NLMSG_DONE
    )
    assert netlink.parse(data) == [
        (new, (True, 3, "10.0.2.15")),
        (new, (True, 3, "10.8.0.2")),
        (new, (False, 3, "fd00::2")),
        (new, (False, 3, "fd00::3")),
        (gone, (False, 7, "fe80::1")),
        (3, None),
    ]
    with pytest.raises(OSError):
        netlink.parse(rtnl(new, socket.AF_INET, "10.0.2.15")[:-2])
    with pytest.raises(OSError):
        netlink.parse(struct.pack("=IHHIIi", 20, 2, 0, 1, 0, -1))  # NLMSG_ERROR, EPERM


def test_private_public_and_credentials():
    gate = make_gate()
    assert status(decide(gate)) == 401
    assert status(decide(gate, headers=[(b"Host", HOST), (b"Authorization", b"Bearer wrong")])) == 401
    assert status(decide(make_gate(public=[3000]))) == 0
    forward = decide(gate, headers=[(b"Host", HOST), (b"authorization", b"bearer " + TOKEN.encode())])
    assert isinstance(forward, Forward) and TOKEN.encode() not in forward.head
    cookie = b"aether_preview=" + gate.cookie_value(b"3000-abc123.preview.localhost")
    forward = decide(
        gate, headers=[(b"Host", HOST), (b"Cookie", b"a=1; " + cookie + b"; b=2"), (b"Authorization", b"Basic eA==")]
    )
    assert b"Cookie: a=1; b=2\r\n" in forward.head and b"Authorization: Basic eA==\r\n" in forward.head
    assert cookie not in forward.head
    # Another preview host's cookie opens nothing here.
    other = b"aether_preview=" + gate.cookie_value(b"4000-abc123.preview.localhost")
    assert status(decide(gate, headers=[(b"Host", HOST), (b"Cookie", other)])) == 401


def test_cookie_upgrades_need_the_same_origin():
    gate = make_gate()
    cookie = (b"Cookie", b"aether_preview=" + gate.cookie_value(b"3000-abc123.preview.localhost"))
    ws = [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")]
    cross = decide(gate, headers=[(b"Host", HOST), cookie, (b"Origin", b"http://evil.example"), *ws], upgrade=True)
    assert status(cross) == 403 and cross.close
    assert status(decide(gate, headers=[(b"Host", HOST), cookie, *ws], upgrade=True)) == 403
    same = decide(gate, headers=[(b"Host", HOST), cookie, (b"Origin", b"http://" + HOST), *ws], upgrade=True)
    assert isinstance(same, Forward)
    assert b"Connection: Upgrade\r\nUpgrade: websocket\r\n" in same.head
    # Bearer-authenticated upgrades (not a browser's ambient credential) need no Origin.
    assert isinstance(decide(gate, headers=[(b"Host", HOST), BEARER, *ws], upgrade=True), Forward)


def test_token_in_the_query_redirects_with_a_cookie():
    gate = make_gate()
    answer = decide(gate, b"/a/b?x=1&token=" + TOKEN.encode() + b"&y=%20")
    assert answer.status == 302
    assert b"Location: /a/b?x=1&y=%20\r\n" in answer.response
    assert b"HttpOnly" in answer.response and TOKEN.encode() not in answer.response.split(b"Location")[1]
    assert decide(gate, b"/?token=" + TOKEN.encode(), method=b"POST").status == 307
    assert status(decide(gate, b"/?token=other")) == 401
    assert _redirect_path(b"/\\\\evil.example/?token=" + TOKEN.encode(), TOKEN.encode()) == b"/evil.example/"
    assert _redirect_path(b"/?token=" + TOKEN.encode() + b"x", TOKEN.encode()) is None


def test_upstream_address_prefers_loopback():
    def addr(*addresses):
        return upstream_address([Listener(i, 1, socket.AF_INET, a) for i, a in enumerate(addresses)])

    assert addr("0.0.0.0") == "127.0.0.1"
    assert addr("::") == "::1"
    assert addr("10.0.2.15") == "10.0.2.15"
    assert addr("10.0.2.15", "::1") == "::1"
    assert addr("::ffff:127.0.0.1") == "127.0.0.1"
    assert addr() is None


def test_request_head_rewriting():
    head = h.RequestHead(
        [
            (b"Host", HOST),
            (b"Connection", b"keep-alive, X-Hop"),
            (b"X-Hop", b"1"),
            (b"TE", b"trailers"),
            (b"X-Forwarded-For", b"10.0.0.1"),
            (b"X-Forwarded-Host", b"evil"),
            (b"Via", b"1.0 edge"),
            (b"Transfer-Encoding", b"chunked"),
            (b"X-App", b"kept"),
        ]
    )
    assert head.chunked and head.has_body
    out = head.upstream(
        b"POST",
        b"/p",
        host=b"localhost:3000",
        client_ip="127.0.0.1",
        forwarded_host=HOST,
        forwarded_port=b"3001",
        proto=b"http",
        via=b"1.1 aether-x",
        upgrade=False,
    )
    lines = out.split(b"\r\n")
    assert lines[0] == b"POST /p HTTP/1.1" and lines[1] == b"Host: localhost:3000" and out.endswith(b"\r\n\r\n")
    assert b"X-App: kept" in lines and b"Transfer-Encoding: chunked" in lines
    assert b"X-Forwarded-For: 10.0.0.1, 127.0.0.1" in lines and b"X-Forwarded-Host: " + HOST in lines
    assert b"Via: 1.0 edge, 1.1 aether-x" in lines
    for gone in (b"X-Hop", b"TE", b"Connection", b"evil"):
        assert not any(line.startswith(gone) or line.endswith(gone) for line in lines), gone


def test_response_head_rewriting():
    raw = (
        b"HTTP/1.0 200 OK\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nConnection: keep-alive, X-Secret\r\n"
        b"X-Secret: 1\r\nKeep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\nX-Kept: 1"
    )
    head = h.ResponseHead(raw)
    assert head.chunked and not head.has_length
    out = head.for_client(chunked=True, close=True)
    assert out == (
        b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nX-Kept: 1\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    upgrade = h.ResponseHead(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Protocol: hmr"
    )
    assert upgrade.for_client(upgrade=True).endswith(
        b"Sec-WebSocket-Protocol: hmr\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )


def test_first_host_classifies_without_consuming():
    assert first_host(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n") == (True, b"a")
    assert first_host(b"GET / HTTP/1.1\r\nX: 1\r\nhOsT:  b.c:1 \r\n") == (True, b"b.c:1")
    assert first_host(b"GET / HTTP/1.1\r\nX: 1\r\n\r\n") == (True, None)
    assert first_host(b"GET / HTTP/1.1\r\nHo") == (False, None)
    assert first_host(b"GET / HT") == (False, None)
    assert first_host(b"\x16\x03\x01\x02\x00") == (True, None)  # a TLS hello goes to the API side
    assert first_host(b"GET / SPDY/3\r\n") == (True, None)


# -- fuzzing: raw bytes through httptools into the gate -------------------------------------

header_names = st.sampled_from(
    [
        b"Host",
        b"Authorization",
        b"Cookie",
        b"Origin",
        b"Via",
        b"Connection",
        b"Upgrade",
        b"Transfer-Encoding",
        b"Content-Length",
        b"X-Forwarded-For",
        b"X-A",
    ]
)
header_values = st.sampled_from(
    [
        HOST,
        b"Bearer " + TOKEN.encode(),
        b"aether_preview=x",
        b"http://" + HOST,
        b"",
        b"keep-alive, X-A",
        b"websocket",
        b"chunked",
        b"0",
        b"3000-abc123.preview.localhost@evil",
    ]
) | st.binary(max_size=20)
targets = st.sampled_from(
    [b"/", b"/?token=" + TOKEN.encode(), b"//x?token=" + TOKEN.encode(), b"http://x/", b"*", b"/%2e%2e/"]
    + [b"/proxy/3000/", b"/proxy/22/", b"/absproxy/3000/x?token=" + TOKEN.encode(), b"/proxy/3000", b"/proxy//"]
) | st.binary(min_size=1, max_size=20)


class Collect:
    def __init__(self):
        self.url, self.headers, self.done = b"", [], False

    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        self.headers.append((name, value))

    def on_headers_complete(self):
        self.done = True


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from([b"GET", b"POST", b"HEAD", b"OPTIONS", b"CONNECT"]),
    targets,
    st.lists(st.tuples(header_names, header_values), max_size=8),
)
def test_fuzzed_heads_never_raise_and_only_target_the_local_listener(method, target, headers):
    raw = method + b" " + target + b" HTTP/1.1\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in headers) + b"\r\n"
    collect = Collect()
    parser = httptools.HttpRequestParser(collect)
    try:
        parser.feed_data(raw)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError:
        return  # the proxy answers 400 before the gate
    if not collect.done:
        return
    decision = make_gate().decide(parser.get_method(), collect.url, collect.headers, "127.0.0.1", parser.should_upgrade())
    if isinstance(decision, Forward):
        assert (decision.address, decision.port) == ("127.0.0.1", 3000)
        first, _, rest = decision.head.partition(b"\r\n")
        assert TOKEN.encode() not in first  # not in the target
        assert b"authorization: bearer " + TOKEN.lower().encode() not in rest.lower()
        assert decision.head.count(b"\r\n\r\n") == 1 and decision.head.endswith(b"\r\n\r\n")
    else:
        assert decision.response.startswith(b"HTTP/1.1 %d " % decision.status)
        assert b"<script" not in decision.response.lower()


def fleet_gate(public=()) -> Gate:
    from aether.fleet import auth

    gate = make_gate(public)
    gate.fleet_keys = auth.FleetKeys([b"f" * 32])
    return gate


def signed_headers(gate, access=b"token", when=None, host=HOST, target=b"/", xff=b"10.9.0.1", proto=b"https", port=b"443"):
    from aether.fleet import auth

    signature = auth.sign(gate.fleet_keys, access, b"GET", host, target, xff, proto, port, when)
    return [
        (b"Host", host),
        (b"X-Forwarded-For", xff),
        (b"X-Forwarded-Proto", proto),
        (b"X-Forwarded-Port", port),
        (b"X-Aether-Fleet", signature),
    ]


def test_fleet_mode_takes_only_loopback_or_signed_requests():
    import time

    gate = fleet_gate()
    remote = "10.0.0.9"  # a gateway's address
    # Unsigned from another host: 403 even with the token.
    answer = gate.decide(b"GET", b"/", [(b"Host", HOST), BEARER], remote, False)
    assert status(answer) == 403 and b"gateways" in answer.response
    # From this host's loopback: as without a fleet.
    assert isinstance(gate.decide(b"GET", b"/", [(b"Host", HOST), BEARER], "127.0.0.1", False), Forward)
    assert status(gate.decide(b"GET", b"/", [(b"Host", HOST)], "::1", False)) == 401
    # Signed: what the gateway admitted is believed, and so are its X-Forwarded-*.
    forward = gate.decide(b"GET", b"/", signed_headers(gate), remote, False)
    assert isinstance(forward, Forward)
    assert b"x-aether-fleet" not in forward.head.lower()
    assert b"X-Forwarded-Proto: https" in forward.head and b"X-Forwarded-For: 10.9.0.1, 10.0.0.9" in forward.head
    assert isinstance(gate.decide(b"GET", b"/", signed_headers(gate, b"cookie"), remote, False), Forward)
    # Admitted as public by a gateway whose view was stale: this VM holds the port private.
    assert status(gate.decide(b"GET", b"/", signed_headers(gate, b"public"), remote, False)) == 401
    assert isinstance(fleet_gate(public={3000}).decide(b"GET", b"/", signed_headers(gate, b"public"), remote, False), Forward)
    # Not this request's signature, too old, too new, under another key, or twice: 403.
    assert status(gate.decide(b"GET", b"/other", signed_headers(gate), remote, False)) == 403
    assert status(gate.decide(b"GET", b"/", signed_headers(gate, when=time.time() - 61), remote, False)) == 403
    assert status(gate.decide(b"GET", b"/", signed_headers(gate, when=time.time() + 61), remote, False)) == 403
    forged = signed_headers(gate)
    forged[1] = (b"X-Forwarded-For", b"6.6.6.6")
    assert status(gate.decide(b"GET", b"/", forged, remote, False)) == 403
    twice = signed_headers(gate)
    assert status(gate.decide(b"GET", b"/", [*twice, twice[-1]], remote, False)) == 403
    other = fleet_gate()
    from aether.fleet import auth

    other.fleet_keys = auth.FleetKeys([b"o" * 32])
    assert status(other.decide(b"GET", b"/", signed_headers(gate), remote, False)) == 403


def test_without_fleet_mode_a_client_cannot_claim_a_gateway_signature():
    gate = make_gate()
    headers = [(b"Host", HOST), (b"X-Forwarded-Proto", b"https"), (b"X-Aether-Fleet", b"v1 t=1 a=token s=" + b"x" * 43)]
    assert status(gate.decide(b"GET", b"/", headers, "10.0.0.9", False)) == 401


# -- path previews and preflights -----------------------------------------------------------

SERVER_HOST = (b"Host", b"127.0.0.1:3001")


def test_path_preview_targets():
    from aether.preview import paths

    stripped = paths.parse(b"/proxy/3000/a/b?c=1")
    assert (stripped.name, stripped.prefix, stripped.upstream, stripped.stripped) == (3000, b"/proxy/3000", b"/a/b?c=1", True)
    kept = paths.parse(b"/absproxy/3000/a?c")
    assert (kept.name, kept.upstream, kept.stripped) == (3000, b"/absproxy/3000/a?c", False)
    assert paths.parse(b"/proxy/3000").slash == b"/proxy/3000/"
    assert paths.parse(b"/proxy/3000?x=1").slash == b"/proxy/3000/?x=1"
    assert paths.parse(b"/proxy/03000/").name is None
    assert paths.parse(b"/proxy/Web-App/").name == "web-app"
    for bad in (b"/proxy//", b"/proxy/", b"/proxy/30%30/", b"/proxy/a.b/", b"/proxy/" + b"9" * 64 + b"/"):
        assert paths.parse(bad) is None, bad


def test_path_previews_decide_like_host_previews():
    gate = make_gate(named=lambda key: 3000 if key == "web" else None)
    forward = decide(gate, b"/proxy/3000/x?y=1", [SERVER_HOST, BEARER])
    assert isinstance(forward, Forward) and forward.port == 3000
    assert forward.head.startswith(b"GET /x?y=1 HTTP/1.1\r\nHost: localhost:3000\r\n")
    assert b"\r\nX-Forwarded-Prefix: /proxy/3000\r\n\r\n" in forward.head and TOKEN.encode() not in forward.head
    # A client's own X-Forwarded-Prefix never reaches the app.
    spoofed = decide(gate, b"/proxy/3000/", [SERVER_HOST, BEARER, (b"X-Forwarded-Prefix", b"/evil")])
    assert b"/evil" not in spoofed.head
    kept = decide(gate, b"/absproxy/3000/x", [SERVER_HOST, BEARER])
    assert kept.head.startswith(b"GET /absproxy/3000/x HTTP/1.1\r\n") and b"X-Forwarded-Prefix" not in kept.head
    assert decide(gate, b"/proxy/web/", [SERVER_HOST, BEARER]).port == 3000
    assert status(decide(gate, b"/proxy/3000/", [SERVER_HOST])) == 401
    assert status(decide(make_gate(public=[3000]), b"/proxy/3000/", [SERVER_HOST])) == 0
    assert status(decide(gate, b"/proxy/22/", [SERVER_HOST, BEARER])) == 403
    assert status(decide(gate, b"/proxy/3001/", [SERVER_HOST, BEARER])) == 403  # the server's own port
    assert status(decide(gate, b"/proxy/4000/", [SERVER_HOST, BEARER])) == 502
    assert status(decide(gate, b"/proxy/03000/", [SERVER_HOST, BEARER])) == 404
    assert status(decide(gate, b"/proxy/nokey/", [SERVER_HOST, BEARER])) == 404
    assert status(decide(gate, b"/proxy/3000", [SERVER_HOST, BEARER])) == 308
    # The dashboard's cookie (same host) never reaches the app; the app's own cookies do.
    dashboard = (b"Cookie", b"a=1; aether_dashboard=abc; b=2")
    assert b"Cookie: a=1; b=2\r\n" in decide(gate, b"/proxy/3000/", [SERVER_HOST, BEARER, dashboard]).head
    # The Host's port, for X-Forwarded-Port: none in a bracketed IPv6 address.
    assert b"X-Forwarded-Port: 80\r\n" in decide(gate, b"/proxy/3000/", [(b"Host", b"[::1]"), BEARER]).head
    assert b"X-Forwarded-Port: 3001\r\n" in decide(gate, b"/proxy/3000/", [(b"Host", b"[::1]:3001"), BEARER]).head
    # The server's own paths on a path-preview connection go back out, never off-site.
    back = decide(gate, b"//evil.example/x", [SERVER_HOST, BEARER])
    assert status(back) == 307 and b"Location: /evil.example/x\r\n" in back.response and back.close


def test_path_preview_cookie_is_scoped_to_its_prefix():
    gate = make_gate(listeners=(("127.0.0.1", 3000), ("127.0.0.1", 4000)))
    answer = decide(gate, b"/proxy/3000/a?token=" + TOKEN.encode(), [SERVER_HOST])
    assert answer.status == 302 and b"Location: /proxy/3000/a\r\n" in answer.response
    cookie = answer.response.split(b"Set-Cookie: ")[1].split(b"\r\n")[0]
    assert b"; Path=/proxy/3000; HttpOnly; SameSite=Lax" in cookie
    pair = (b"Cookie", cookie.split(b";")[0])
    forward = decide(gate, b"/proxy/3000/a", [SERVER_HOST, pair])
    assert isinstance(forward, Forward) and b"aether_preview" not in forward.head
    # Not the host preview's cookie, and not another port's path.
    assert status(decide(gate, b"/proxy/4000/a", [SERVER_HOST, pair])) == 401
    assert status(decide(gate, headers=[(b"Host", HOST), pair])) == 401
    host_cookie = (b"Cookie", b"aether_preview=" + gate.cookie_value(b"3000-abc123.preview.localhost"))
    assert status(decide(gate, b"/proxy/3000/", [SERVER_HOST, host_cookie])) == 401


def test_preflights_from_own_previews_reach_the_private_app():
    gate = make_gate()
    own = (b"Origin", b"http://4000-abc123.preview.localhost:3001")
    asks = (b"Access-Control-Request-Method", b"PUT")
    preflight = decide(gate, b"/api", [(b"Host", HOST), own, asks], method=b"OPTIONS")
    assert isinstance(preflight, Forward) and b"Origin: http://4000-abc123" in preflight.head
    assert isinstance(
        decide(gate, b"/api", [(b"Host", HOST), (b"Origin", b"https://web-abc123.preview.localhost"), asks], method=b"OPTIONS"),
        Forward,
    )
    for origin in (
        b"http://evil.example",
        b"http://4000-zzz999.preview.localhost:3001",
        b"null",
        b"http://04000-abc123.preview.localhost",
    ):
        assert status(decide(gate, b"/api", [(b"Host", HOST), (b"Origin", origin), asks], method=b"OPTIONS")) == 401, origin
    # Not a preflight: no Access-Control-Request-Method, another method, a body, two Origins.
    assert status(decide(gate, b"/api", [(b"Host", HOST), own], method=b"OPTIONS")) == 401
    assert status(decide(gate, b"/api", [(b"Host", HOST), own, asks], method=b"PUT")) == 401
    body = (b"Content-Length", b"5")
    assert status(decide(gate, b"/api", [(b"Host", HOST), own, asks, body], method=b"OPTIONS")) == 401
    assert status(decide(gate, b"/api", [(b"Host", HOST), own, own, asks], method=b"OPTIONS")) == 401
