"""The gateway's decisions, without sockets: every request head gets a Forward to the VM that owns
the prefix (signed, with the fleet's credentials taken out) or one of the proxy's answers, in the
documented order, and a credential of one workspace opens nothing of another."""

from __future__ import annotations

import ipaddress

import httptools
from hypothesis import given, settings
from hypothesis import strategies as st

from aether.fleet import auth, blob
from aether.fleet import routes as r
from aether.fleet.gate import FleetForward, Gate, _without_token
from aether.preview import headers as h
from aether.preview.gate import Answer

KEYS = auth.FleetKeys([b"k" * 32])
NOW = 1_765_000_000.0
DOMAIN = "preview.example.com"
TOKEN_A, TOKEN_B = b"token-of-a", b"token-of-b"
HOST = b"3000-aaa111.preview.example.com"


def workspace(prefix, token, ports, address="10.0.0.5:3001", alive=True, public=(), names=None):
    return blob.encode(
        prefix=prefix,
        project=prefix + "-p",
        workspace="ws-" + prefix,
        address=address,
        epoch="0123456789abcdef",
        started=1,
        dead_after=3000,
        verifier=auth.verifier(KEYS, token, prefix),
        alive=alive,
        ports=ports,
        public=public,
        names=names or {},
    )


def make_gate(trusted=()):
    routes = r.Routes()
    state = {
        b"aaa111": workspace("aaa111", TOKEN_A, {3000: "private", 5173: "public"}, public=(8080,), names={"web": 3000}),
        b"bbb222": workspace("bbb222", TOKEN_B, {3000: "private"}, address="[fd00::7]:3001"),
        b"down01": workspace("down01", TOKEN_A, {3000: "public"}, alive=False),
    }
    routes.load(r.Snapshot(1, b"1-0", b"boot", 1000, state, {p: 10_000 for p in state}))
    networks = tuple(ipaddress.ip_network(n) for n in trusted)
    return Gate(routes, KEYS, DOMAIN, networks, clock=lambda: NOW)


def decide(gate, target=b"/", headers=None, method=b"GET", upgrade=False, client="192.0.2.10"):
    headers = [(b"Host", HOST)] if headers is None else headers
    return gate.decide(method, target, headers, client, upgrade)


def status(decision) -> int:
    return decision.status if isinstance(decision, Answer) else 0


def bearer(token):
    return (b"Authorization", b"Bearer " + token)


def host(name):
    return (b"Host", name)


def cookie_for(host_name, token=TOKEN_A, prefix="aaa111"):
    value = auth.mint_cookie(KEYS, host_name, auth.verifier(KEYS, token, prefix).encode(), NOW)
    return (b"Cookie", b"aether_fleet=" + value)


def parse_head(head: bytes):
    """(method, target, headers) of a forwarded head, as the VM's parser reads it."""
    out = {"headers": []}

    class P:
        def on_url(self, url):
            out["url"] = url

        def on_header(self, name, value):
            out["headers"].append((name, value))

    parser = httptools.HttpRequestParser(P())
    parser.feed_data(head)
    return parser.get_method(), out["url"], out["headers"]


def test_routing_answers_in_order():
    gate = make_gate()
    assert status(decide(gate, headers=[host(b"localhost:8081")])) == 404
    assert b"Not a preview host" in decide(gate, headers=[host(b"3000-aaa111.other.example.com")]).response
    assert status(decide(gate, headers=[])) == 400
    assert status(decide(gate, headers=[host(HOST), host(HOST)])) == 400
    assert status(decide(gate, b"http://10.0.0.5:3001/")) == 400
    no_such = decide(gate, headers=[host(b"3000-zzz999.preview.example.com")])
    assert status(no_such) == 404 and b"No such workspace" in no_such.response
    assert status(decide(gate, headers=[host(b"api-aaa111.preview.example.com"), bearer(TOKEN_A)])) == 404
    down = decide(gate, headers=[host(b"3000-down01.preview.example.com")])
    assert status(down) == 503 and b"Retry-After: 2\r\n" in down.response and b'http-equiv="refresh"' in down.response
    # Unavailable comes before credentials: nobody learns more about a stopped workspace.
    assert status(decide(gate, headers=[host(b"9999-down01.preview.example.com")])) == 503
    closed = decide(gate, headers=[host(b"4000-aaa111.preview.example.com"), bearer(TOKEN_A)])
    assert status(closed) == 502 and b'http-equiv="refresh"' in closed.response
    # A closed public port answers the self-refreshing 502 to anyone; a closed private one asks first.
    assert status(decide(gate, headers=[host(b"8080-aaa111.preview.example.com")])) == 502
    assert status(decide(gate, headers=[host(b"4000-aaa111.preview.example.com")])) == 401


def test_one_spelling_per_port():
    gate = make_gate()
    for name in (
        b"03000-aaa111.preview.example.com",
        b"0-aaa111.preview.example.com",
        b"65536-aaa111.preview.example.com",
        b"99999999-aaa111.preview.example.com",
    ):
        answer = decide(gate, headers=[host(name), bearer(TOKEN_A)])
        assert status(answer) == 404 and b"without leading zeros" in answer.response, name
    forward = decide(gate, headers=[host(b"3000-AAA111.Preview.Example.Com:8443"), bearer(TOKEN_A)])
    assert isinstance(forward, FleetForward)
    assert (forward.address, forward.port, forward.app_port) == ("10.0.0.5", 3001, 3000)


def test_forward_to_the_advertised_address_signed():
    gate = make_gate()
    forward = decide(gate, b"/x?y=1", headers=[host(HOST), bearer(TOKEN_A), (b"X-App", b"1")])
    assert isinstance(forward, FleetForward)
    assert (forward.address, forward.port, forward.prefix, forward.app_port, forward.access) == (
        "10.0.0.5",
        3001,
        "aaa111",
        3000,
        b"token",
    )
    method, target, headers = parse_head(forward.head)
    values = {}
    for name, value in headers:
        values.setdefault(name.lower(), []).append(value)
    assert values[b"host"] == [HOST] and values[b"x-app"] == [b"1"] and b"authorization" not in values
    assert TOKEN_A not in forward.head
    # The VM verifies exactly what it received.
    access = auth.verify(
        KEYS,
        values[b"x-aether-fleet"][0],
        method,
        values[b"host"][0],
        target,
        values[b"x-forwarded-for"][0],
        values[b"x-forwarded-proto"][0],
        values[b"x-forwarded-port"][0],
        NOW,
    )
    assert access == b"token"
    assert values[b"x-forwarded-for"] == [b"192.0.2.10"] and values[b"x-forwarded-proto"] == [b"http"]
    # IPv6 advertised addresses, and a registry key host.
    v6 = decide(gate, headers=[host(b"3000-bbb222.preview.example.com"), bearer(TOKEN_B)])
    assert (v6.address, v6.port) == ("fd00::7", 3001)
    named = decide(gate, headers=[host(b"web-aaa111.preview.example.com"), bearer(TOKEN_A)])
    assert isinstance(named, FleetForward) and named.app_port == 3000


def test_the_vm_verifies_what_a_gateway_forwarded():
    gate = make_gate(trusted=("192.0.2.0/24",))
    forward = decide(
        gate, b"/p?q=1", [host(HOST), cookie_for(HOST), (b"X-Forwarded-Proto", b"https"), (b"X-Forwarded-For", b"198.51.100.7")]
    )
    method, target, headers = parse_head(forward.head)
    head = h.RequestHead(headers)
    assert auth.verify_head(KEYS, method, target, head, NOW) == b"cookie"
    assert not any(line.lower().startswith(b"x-aether-fleet") for line in head.lines)  # never to the app
    assert auth.verify_head(KEYS, method, target, h.RequestHead(headers), NOW + auth.WINDOW + 1) is None
    assert auth.verify_head(KEYS, method, target + b"&x", h.RequestHead(headers), NOW) is None
    assert auth.verify_head(KEYS, b"POST", target, h.RequestHead(headers), NOW) is None
    twice = headers + [(b"X-Aether-Fleet", dict(headers)[b"X-Aether-Fleet"])]
    assert auth.verify_head(KEYS, method, target, h.RequestHead(twice), NOW) is None
    moved = [(n, b"3000-bbb222.preview.example.com" if n == b"Host" else v) for n, v in headers]
    assert auth.verify_head(KEYS, method, target, h.RequestHead(moved), NOW) is None  # replayed at another host
    assert auth.verify_head(KEYS, method, target, h.RequestHead([(b"Host", HOST)]), NOW) is None  # unsigned


def test_clients_cannot_steer_what_the_vm_believes():
    gate = make_gate()
    spoofed = [
        host(HOST),
        (b"X-Aether-Fleet", b"v1 t=1 a=token s=" + b"A" * 43),
        (b"x-aether-anything", b"1"),
        (b"X-Forwarded-For", b"127.0.0.1"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Port", b"443"),
    ]
    forward = decide(gate, headers=[host(b"5173-aaa111.preview.example.com"), *spoofed[1:]])
    assert isinstance(forward, FleetForward) and forward.access == b"public"
    _, _, headers = parse_head(forward.head)
    names = [name.lower() for name, _ in headers]
    assert names.count(b"x-aether-fleet") == 1 and b"x-aether-anything" not in names
    values = dict((name.lower(), value) for name, value in headers)
    assert values[b"x-forwarded-for"] == b"192.0.2.10"
    assert values[b"x-forwarded-proto"] == b"http" and values[b"x-forwarded-port"] == b"80"
    assert not values[b"x-aether-fleet"].endswith(b"A" * 43)
    # From a trusted front, its word is taken and its chain kept.
    trusted = make_gate(trusted=("192.0.2.0/24",))
    forward = decide(trusted, headers=[host(b"5173-aaa111.preview.example.com"), *spoofed[3:]])
    values = dict((name.lower(), value) for name, value in parse_head(forward.head)[2])
    assert values[b"x-forwarded-for"] == b"127.0.0.1, 192.0.2.10"
    assert values[b"x-forwarded-proto"] == b"https" and values[b"x-forwarded-port"] == b"443"


def test_private_ports_need_this_workspaces_credential():
    gate = make_gate()
    assert status(decide(gate)) == 401
    assert b"WWW-Authenticate" in decide(gate).response
    assert status(decide(gate, headers=[host(HOST), bearer(b"wrong")])) == 401
    assert status(decide(gate, headers=[host(HOST), bearer(TOKEN_B)])) == 401  # B's token on A
    assert status(decide(gate, headers=[host(HOST), cookie_for(b"3000-bbb222.preview.example.com", TOKEN_B, "bbb222")])) == 401
    assert status(decide(gate, headers=[host(HOST), cookie_for(b"5173-aaa111.preview.example.com")])) == 401  # another port
    a_cookie = cookie_for(HOST)
    assert status(decide(gate, headers=[host(b"3000-bbb222.preview.example.com"), a_cookie])) == 401  # A's on B
    forward = decide(gate, headers=[host(HOST), (b"Cookie", b"a=1; " + a_cookie[1] + b"; aether_preview=x; b=2")])
    assert isinstance(forward, FleetForward) and forward.access == b"cookie"
    assert b"Cookie: a=1; b=2\r\n" in forward.head and b"aether_fleet" not in forward.head
    assert b"aether_preview" not in forward.head
    # The app's own credentials go on.
    forward = decide(gate, headers=[host(HOST), bearer(TOKEN_A), (b"Authorization", b"Basic eA==")])
    assert b"Authorization: Basic eA==\r\n" in forward.head and TOKEN_A not in forward.head
    assert decide(gate, headers=[host(b"5173-aaa111.preview.example.com")]).access == b"public"


def test_token_in_the_query_redirects_with_a_cookie():
    gate = make_gate()
    answer = decide(gate, b"/a/b?x=1&token=" + TOKEN_A + b"&y=%20")
    assert answer.status == 302
    assert b"Location: /a/b?x=1&y=%20\r\n" in answer.response
    assert b"Set-Cookie: aether_fleet=" in answer.response and b"HttpOnly; SameSite=Lax\r\n" in answer.response
    assert b"Domain" not in answer.response and TOKEN_A not in answer.response
    value = answer.response.split(b"aether_fleet=")[1].split(b";")[0]
    assert auth.cookie_valid(KEYS, HOST, auth.verifier(KEYS, TOKEN_A, "aaa111").encode(), value, NOW)
    assert decide(gate, b"/?token=" + TOKEN_A, method=b"POST").status == 307
    assert status(decide(gate, b"/?token=" + TOKEN_B)) == 401  # B's token opens nothing of A
    # Behind a trusted TLS front the cookie is Secure.
    tls = decide(make_gate(("192.0.2.0/24",)), b"/?token=" + TOKEN_A, [host(HOST), (b"X-Forwarded-Proto", b"https")])
    assert b"SameSite=Lax; Secure\r\n" in tls.response
    # A token that is not this workspace's is the app's parameter: forwarded as it is (public port).
    forward = decide(gate, b"/?token=abc", [host(b"5173-aaa111.preview.example.com")])
    assert isinstance(forward, FleetForward) and forward.head.startswith(b"GET /?token=abc HTTP/1.1")
    assert _without_token(b"/\\\\evil.example/?token=t", lambda v: v == b"t") == b"/evil.example/"
    assert _without_token(b"/?token=t&token=u", lambda v: v == b"t") == b"/?token=u"
    assert _without_token(b"/?tokens=t", lambda v: True) is None


def test_cookie_upgrades_need_the_same_origin():
    gate = make_gate()
    cookie = cookie_for(HOST)
    ws = [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")]
    cross = decide(gate, headers=[host(HOST), cookie, (b"Origin", b"http://evil.example"), *ws], upgrade=True)
    assert status(cross) == 403 and cross.close
    same = decide(gate, headers=[host(HOST), cookie, (b"Origin", b"http://" + HOST), *ws], upgrade=True)
    assert isinstance(same, FleetForward) and same.access == b"cookie"
    assert b"Connection: Upgrade\r\nUpgrade: websocket\r\n" in same.head
    assert isinstance(decide(gate, headers=[host(HOST), bearer(TOKEN_A), *ws], upgrade=True), FleetForward)
    # On a public port a cross-origin cookie is not a credential: the VM is told "public".
    public = b"5173-aaa111.preview.example.com"
    forward = decide(gate, headers=[host(public), cookie_for(public), (b"Origin", b"http://evil.example"), *ws], upgrade=True)
    assert isinstance(forward, FleetForward) and forward.access == b"public"


def test_loops_are_refused():
    gate = make_gate()
    forward = decide(gate, headers=[host(HOST), bearer(TOKEN_A)])
    via = [value for name, value in parse_head(forward.head)[2] if name.lower() == b"via"][0]
    assert status(decide(gate, headers=[host(HOST), bearer(TOKEN_A), (b"Via", via)])) == 508


def test_visibility_follows_the_table():
    gate = make_gate()
    public = b"5173-aaa111.preview.example.com"
    assert isinstance(decide(gate, headers=[host(public)]), FleetForward)
    gate.routes.apply(b"2-0", 2, "aaa111", workspace("aaa111", TOKEN_A, {3000: "private", 5173: "private"}))
    assert status(decide(gate, headers=[host(public)])) == 401
    gate.routes.apply(b"3-0", 3, "aaa111", workspace("aaa111", TOKEN_A, {3000: "private"}, alive=False))
    assert status(decide(gate, headers=[host(public)])) == 503


header_names = st.sampled_from(
    [
        b"Host",
        b"host",
        b"Authorization",
        b"Cookie",
        b"Origin",
        b"Via",
        b"X-Forwarded-For",
        b"X-Forwarded-Proto",
        b"Transfer-Encoding",
        b"Content-Length",
        b"Connection",
        b"X-Aether-Fleet",
        b"Upgrade",
    ]
)
header_values = st.one_of(
    st.sampled_from(
        [
            HOST,
            b"3000-bbb222.preview.example.com",
            b"web-aaa111.preview.example.com",
            b"chunked",
            b"Bearer " + TOKEN_A,
            b"aether_fleet=1.x",
            b"https",
            b"upgrade",
        ]
    ),
    st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
)


@settings(max_examples=400, deadline=None)
@given(
    method=st.sampled_from([b"GET", b"POST", b"HEAD", b"OPTIONS"]),
    target=st.one_of(st.sampled_from([b"/", b"/?token=" + TOKEN_A, b"*", b"http://x/"]), st.binary(max_size=20)),
    headers=st.lists(st.tuples(header_names, header_values), max_size=6),
    upgrade=st.booleans(),
)
def test_every_head_gets_a_decision(method, target, headers, upgrade):
    decision = make_gate_cached().decide(method, target, headers, "192.0.2.10", upgrade)
    if isinstance(decision, FleetForward):
        assert (decision.address, decision.port) in (("10.0.0.5", 3001), ("fd00::7", 3001))
        assert TOKEN_A not in decision.head and TOKEN_B not in decision.head
    else:
        assert isinstance(decision, Answer) and 300 <= decision.status < 600


_cached = []


def make_gate_cached():
    if not _cached:
        _cached.append(make_gate())
    return _cached[0]


# -- kept decisions: a connection's next request ------------------------------------------------


class Clock:
    def __init__(self, now=NOW):
        self.now = now

    def __call__(self):
        return self.now


def kept_gate(clock=None):
    """make_gate's table, with a gate and a table whose clocks the test moves."""
    clock = clock or Clock()
    routes = r.Routes(clock=clock)
    state = {
        b"aaa111": workspace("aaa111", TOKEN_A, {3000: "private", 5173: "public"}, names={"web": 3000}),
        b"bbb222": workspace("bbb222", TOKEN_B, {3000: "private"}, address="[fd00::7]:3001"),
    }
    routes.load(r.Snapshot(1, b"1-0", b"boot", 1000, state, {p: 10_000 for p in state}))
    return Gate(routes, KEYS, DOMAIN, clock=clock), clock


PUBLIC = b"5173-aaa111.preview.example.com"


def then(gate, previous, target=b"/", headers=None, method=b"GET", upgrade=False):
    """The connection's next request after ``previous``, as the proxy asks for it."""
    headers = [(b"Host", HOST)] if headers is None else headers
    return gate.decide(method, target, headers, "192.0.2.10", upgrade, previous)


def signed_for(forward, target, now=NOW):
    """What the VM would say admitted ``forward`` for ``target``."""
    method, got, headers = parse_head(forward.head)
    assert got == target
    return auth.verify_head(KEYS, method, got, h.RequestHead(headers), now)


def test_a_kept_decision_signs_each_target_and_second_of_its_own():
    gate, clock = kept_gate()
    headers = [host(PUBLIC), (b"X-App", b"1")]
    first = then(gate, None, b"/a", list(headers))
    assert isinstance(first, FleetForward) and first.memo is not None
    # The same request again: the same Forward, its signature good for it.
    assert then(gate, first, b"/a", list(headers)) is first
    # Another target: its own head, signed for that target (the first's signature would not do).
    second = then(gate, first, b"/b?x=1", list(headers))
    assert second is not first and second.memo is first.memo
    assert signed_for(second, b"/b?x=1") == b"public"
    assert second.head.replace(b"/b?x=1", b"/a", 1).split(b"X-Aether-Fleet")[0] == first.head.split(b"X-Aether-Fleet")[0]
    assert then(gate, second, b"/a", list(headers)).head.startswith(b"GET /a ")
    # The next second: signed again, at that second.
    clock.now += 1
    later = then(gate, first, b"/a", list(headers))
    assert later is not first and b" t=%d " % int(clock.now) in later.head
    assert signed_for(later, b"/a", clock.now) == b"public"


def test_a_kept_decision_holds_for_the_same_method_and_header_lines_only():
    gate, _ = kept_gate()
    first = then(gate, None, headers=[host(PUBLIC)])
    posted = then(gate, first, headers=[host(PUBLIC)], method=b"POST")
    assert posted.head.startswith(b"POST / ") and signed_for(posted, b"/") == b"public"
    # Another Host on the connection: that host's decision.
    other = then(gate, first, headers=[host(b"3000-bbb222.preview.example.com")])
    assert status(other) == 401
    assert status(then(gate, first, headers=[host(b"localhost:8081")])) == 404
    moved = then(gate, first, headers=[host(b"3000-bbb222.preview.example.com"), bearer(TOKEN_B)])
    assert (moved.address, moved.prefix) == ("fd00::7", "bbb222")
    # A Via of this gateway now: the loop is seen.
    via = [value for name, value in parse_head(first.head)[2] if name.lower() == b"via"][0]
    assert status(then(gate, first, headers=[host(PUBLIC), (b"Via", via)])) == 508
    # A target that is not a path, an upgrade: decided afresh.
    assert status(then(gate, first, b"http://10.0.0.5:3001/", headers=[host(PUBLIC)])) == 400
    upgraded = then(gate, first, headers=[host(PUBLIC)], upgrade=True)
    assert b"Connection: Upgrade\r\n" in upgraded.head and upgraded.memo is None


def test_a_token_in_the_target_is_taken_after_a_kept_decision():
    gate, _ = kept_gate()
    first = then(gate, None, headers=[host(HOST), bearer(TOKEN_A)])
    answer = then(gate, first, b"/page?token=" + TOKEN_A, headers=[host(HOST), bearer(TOKEN_A)])
    assert status(answer) == 302 and b"Location: /page\r\n" in answer.response
    # Another workspace's token is the app's parameter: forwarded as it is.
    passed = then(gate, first, b"/page?token=" + TOKEN_B, headers=[host(HOST), bearer(TOKEN_A)])
    assert isinstance(passed, FleetForward) and signed_for(passed, b"/page?token=" + TOKEN_B) == b"token"


def test_a_kept_decision_follows_the_table():
    gate, _ = kept_gate()
    routes = gate.routes
    first = then(gate, None, headers=[host(PUBLIC)])
    assert then(gate, first, headers=[host(PUBLIC)]) is first
    # The port turned private (a stream entry replaces the workspace's record): 401.
    routes.apply(b"2-0", 2, "aaa111", workspace("aaa111", TOKEN_A, {3000: "private", 5173: "private"}))
    assert status(then(gate, first, headers=[host(PUBLIC)])) == 401
    routes.apply(b"3-0", 3, "aaa111", workspace("aaa111", TOKEN_A, {3000: "private", 5173: "public"}))
    first = then(gate, None, headers=[host(PUBLIC)])
    # The port closed: 502.
    routes.apply(b"4-0", 4, "aaa111", workspace("aaa111", TOKEN_A, {3000: "private"}, public=(5173,)))
    assert status(then(gate, first, headers=[host(PUBLIC)])) == 502
    routes.apply(b"5-0", 5, "aaa111", workspace("aaa111", TOKEN_A, {3000: "private", 5173: "public"}))
    first = then(gate, None, headers=[host(PUBLIC)])
    # The VM moved to another address: reached there.
    routes.apply(b"6-0", 6, "aaa111", workspace("aaa111", TOKEN_A, {3000: "private", 5173: "public"}, address="10.0.0.6:3001"))
    assert then(gate, first, headers=[host(PUBLIC)]).address == "10.0.0.6"
    first = then(gate, None, headers=[host(PUBLIC)])
    # The workspace stopped: 503.
    routes.apply(b"7-0", 7, "aaa111", workspace("aaa111", TOKEN_A, {5173: "public"}, alive=False))
    assert status(then(gate, first, headers=[host(PUBLIC)])) == 503
    routes.apply(b"8-0", 8, "aaa111", workspace("aaa111", TOKEN_A, {5173: "public"}))
    first = then(gate, None, headers=[host(PUBLIC)])
    # Gone from the fleet: 404.
    routes.apply(b"9-0", 9, "aaa111", b"")
    assert status(then(gate, first, headers=[host(PUBLIC)])) == 404


def test_a_kept_decision_ends_when_its_workspace_is_dead_or_unconfirmed_past_its_grace():
    gate, clock = kept_gate()
    routes = gate.routes
    first = then(gate, None, headers=[host(PUBLIC)])
    # Its heartbeat deadline passed (the same record, marked dead): 503; revived: forwarded.
    assert routes.expire([("aaa111", 10_000)]) == ["aaa111"]
    assert status(then(gate, first, headers=[host(PUBLIC)])) == 503
    assert routes.revive([("aaa111", 20_000)], 15_000) == ["aaa111"]
    assert then(gate, first, headers=[host(PUBLIC)]) is first
    # Redis came back empty: the same record kept, unconfirmed, served through its grace (twice
    # its 3 s deadline), then 503, though nothing but the clock moved.
    routes.load(r.Snapshot(0, b"0-0", b"other boot", 2000, {}, {}))
    assert "aaa111" in routes.unconfirmed and routes.workspaces["aaa111"] is first.memo.workspace
    assert isinstance(then(gate, first, headers=[host(PUBLIC)]), FleetForward)
    clock.now += 7
    assert status(then(gate, first, headers=[host(PUBLIC)])) == 503


def test_a_kept_credential_is_the_same_bytes_and_a_cookie_only_until_it_expires():
    gate, clock = kept_gate()
    first = then(gate, None, headers=[host(HOST), bearer(TOKEN_A)])
    assert first.access == b"token" and then(gate, first, headers=[host(HOST), bearer(TOKEN_A)]) is first
    assert status(then(gate, first, headers=[host(HOST), bearer(b"wrong")])) == 401
    assert status(then(gate, first, headers=[host(HOST), bearer(TOKEN_B)])) == 401
    assert status(then(gate, first, headers=[host(HOST)])) == 401
    assert status(then(gate, first, headers=[host(HOST), (b"Authorization", b"Bearer  " + TOKEN_A + b"x")])) == 401
    # A new token on the VM (a new verifier in its record): the old one opens nothing.
    gate.routes.apply(b"2-0", 2, "aaa111", workspace("aaa111", TOKEN_B, {3000: "private", 5173: "public"}))
    assert status(then(gate, first, headers=[host(HOST), bearer(TOKEN_A)])) == 401
    gate.routes.apply(b"3-0", 3, "aaa111", workspace("aaa111", TOKEN_A, {3000: "private", 5173: "public"}))
    # A cookie: kept while it is valid, another cookie decided afresh.
    cookie = cookie_for(HOST)
    by_cookie = then(gate, None, headers=[host(HOST), cookie])
    assert by_cookie.access == b"cookie" and then(gate, by_cookie, headers=[host(HOST), cookie]) is by_cookie
    edited = (b"Cookie", cookie[1][:-1] + (b"A" if cookie[1][-1:] != b"A" else b"B"))
    assert status(then(gate, by_cookie, headers=[host(HOST), edited])) == 401
    assert status(then(gate, by_cookie, headers=[host(HOST), (b"Cookie", b"theme=dark")])) == 401
    clock.now += auth.COOKIE_TTL - 1
    assert isinstance(then(gate, by_cookie, headers=[host(HOST), cookie]), FleetForward)
    clock.now += 1
    assert status(then(gate, by_cookie, headers=[host(HOST), cookie])) == 401  # expired


def test_a_cookie_not_valid_yet_is_not_kept_as_no_credential():
    # Minted by a gateway whose clock is ahead: further ahead than a cookie lives, so not valid
    # here now, and valid in a few seconds. Until then the request is public; then a cookie's.
    gate, clock = kept_gate()
    ahead = auth.mint_cookie(KEYS, PUBLIC, auth.verifier(KEYS, TOKEN_A, "aaa111").encode(), NOW + 5)
    headers = [host(PUBLIC), (b"Cookie", b"aether_fleet=" + ahead)]
    first = then(gate, None, headers=list(headers))
    assert first.access == b"public"
    clock.now += 5
    assert then(gate, first, headers=list(headers)).access == b"cookie"


_COOKIE_A = cookie_for(HOST)
_AHEAD = (b"Cookie", b"aether_fleet=" + auth.mint_cookie(KEYS, HOST, auth.verifier(KEYS, TOKEN_A, "aaa111").encode(), NOW + 3))
_HEADS = [
    [host(HOST)],
    [host(HOST), bearer(TOKEN_A)],
    [host(HOST), bearer(TOKEN_B)],
    [host(HOST), _COOKIE_A],
    [host(HOST), _AHEAD],
    [host(HOST), _COOKIE_A, (b"Origin", b"http://evil.example"), (b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")],
    [host(PUBLIC)],
    [host(PUBLIC), (b"Content-Length", b"3")],
    [host(b"web-aaa111.preview.example.com"), bearer(TOKEN_A)],
    [host(b"3000-bbb222.preview.example.com"), bearer(TOKEN_B)],
]
_CHANGES = [
    lambda routes, seq: None,
    lambda routes, seq: routes.apply(
        b"%d-0" % seq, seq, "aaa111", workspace("aaa111", TOKEN_A, {3000: "public", 5173: "private"})
    ),
    lambda routes, seq: routes.apply(
        b"%d-0" % seq, seq, "aaa111", workspace("aaa111", TOKEN_A, {3000: "private", 5173: "public"}, names={"web": 3000})
    ),
    lambda routes, seq: routes.apply(b"%d-0" % seq, seq, "aaa111", workspace("aaa111", TOKEN_A, {}, public=(5173,))),
    lambda routes, seq: routes.apply(b"%d-0" % seq, seq, "aaa111", workspace("aaa111", TOKEN_A, {5173: "public"}, alive=False)),
    lambda routes, seq: routes.apply(
        b"%d-0" % seq, seq, "aaa111", workspace("aaa111", TOKEN_B, {3000: "private", 5173: "public"})
    ),
    lambda routes, seq: routes.apply(b"%d-0" % seq, seq, "aaa111", b""),
    lambda routes, seq: routes.expire([("aaa111", 10**12)]),
    lambda routes, seq: routes.revive([("aaa111", 10**13)], 10**12),
    lambda routes, seq: routes.load(r.Snapshot(0, b"0-0", b"boot %d" % seq, 2000, {}, {})),
]


@settings(max_examples=500, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from([True, True, True, False]),  # the same head and method as the last request
            st.integers(0, len(_HEADS) - 1),
            st.sampled_from([b"GET", b"GET", b"POST", b"OPTIONS"]),
            st.sampled_from([b"/", b"/", b"/a", b"/a?b=1", b"/?token=" + TOKEN_A, b"*", b"http://x/"]),
            st.sampled_from([0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
            st.sampled_from([0, 0, 0, 0.4, 1, 3, 7, auth.COOKIE_TTL]),
        ),
        max_size=16,
    )
)
def test_a_kept_decision_is_the_decision_made_afresh(steps):
    # Whatever the connection sent before and whatever changed since, the next request gets
    # what a fresh decision gives it, to the byte (its signature included).
    gate, clock = kept_gate()
    previous, head, method = None, 0, b"GET"
    for same, new_head, new_method, target, change, wait in steps:
        if not same:
            head, method = new_head, new_method
        _CHANGES[change](gate.routes, gate.routes.seq + 1)
        clock.now += wait
        headers = list(_HEADS[head])
        upgrade = any(name == b"Upgrade" for name, _ in headers)
        kept = gate.decide(method, target, list(headers), "192.0.2.10", upgrade, previous)
        fresh = gate.decide(method, target, list(headers), "192.0.2.10", upgrade)
        assert type(kept) is type(fresh)
        if isinstance(fresh, Answer):
            assert (kept.status, kept.response, kept.close) == (fresh.status, fresh.response, fresh.close)
        else:
            assert (kept.address, kept.port, kept.prefix, kept.app_port, kept.access, kept.tag) == (
                fresh.address,
                fresh.port,
                fresh.prefix,
                fresh.app_port,
                fresh.access,
                fresh.tag,
            )
            assert (kept.head, kept.has_body, kept.chunked) == (fresh.head, fresh.has_body, fresh.chunked)
            previous = kept
