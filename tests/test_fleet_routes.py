"""The workspace blob and the gateway's route table, without Redis: decoding refuses what a gateway
cannot route (never raising anything else), loads swap whole, entries apply in sequence only,
liveness marks and revives, and a Redis that lost its data is merged with a grace."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aether.fleet import blob
from aether.fleet import routes as r

VERIFIER = "V" * 43


def make_blob(
    prefix="abc123", ports=None, public=(), names=None, alive=True, epoch="0123456789abcdef", address="10.0.0.5:3001", **extra
) -> bytes:
    ports = {3000: "private", 5173: "public"} if ports is None else ports
    raw = blob.encode(
        prefix=prefix,
        project=prefix + "-project",
        workspace="ws-" + prefix,
        address=address,
        epoch=epoch,
        started=1,
        dead_after=3000,
        verifier=VERIFIER,
        alive=alive,
        ports=ports,
        public=public,
        names={"web": 3000} if names is None else names,
    )
    if extra:
        doc = json.loads(raw)
        doc.update(extra)
        raw = json.dumps(doc).encode()
    return raw


def test_blob_round_trip():
    raw = make_blob(public=(5173, 8080))
    assert len(raw) < 400
    ws = blob.decode(raw, "abc123")
    assert (ws.host, ws.port, ws.alive, ws.names) == ("10.0.0.5", 3001, True, {"web": 3000})
    assert ws.open == {3000: False, 5173: True} and ws.closed_public == {8080}
    assert ws.is_public(5173) and ws.is_public(8080) and not ws.is_public(3000) and not ws.is_public(9999)
    assert blob.decode(make_blob(address="[fd00::5]:3001")).host == "fd00::5"
    assert blob.decode(make_blob(address="vm-7.internal:3001")).host == "vm-7.internal"
    assert blob.decode(make_blob(protocol="http")).prefix == "abc123"  # unknown fields are ignored


@pytest.mark.parametrize(
    "change, words",
    [
        ({"v": 2}, "version"),
        ({"prefix": "ABC"}, "prefix"),
        ({"epoch": "xyz"}, "epoch"),
        ({"verifier": "short"}, "verifier"),
        ({"address": "10.0.0.5"}, "address"),
        ({"address": "10.0.0.5:0"}, "address"),
        ({"address": "[nope]:1"}, "address"),
        ({"address": "a b:1"}, "address"),
        ({"ports": {"03000": {"visibility": "public"}}}, "ports"),
        ({"ports": {"70000": {"visibility": "public"}}}, "ports"),
        ({"ports": {"3000": {"visibility": "secret"}}}, "visibility"),
        ({"ports": []}, "ports"),
        ({"names": {"3000": 3000}}, "names"),
        ({"names": {"web": 0}}, "names"),
        ({"names": {"Web": 3000}}, "names"),
        ({"closed_public": [True]}, "closed_public"),
        ({"alive": 1}, "alive"),
        ({"dead_after": 0}, "dead_after"),
        ({"project": ""}, "project"),
        ({"workspace": "x" * 300}, "workspace"),
    ],
)
def test_blob_refusals(change, words):
    doc = json.loads(make_blob())
    doc.update(change)
    with pytest.raises(blob.BlobError, match=words):
        blob.decode(json.dumps(doc).encode())


def test_blob_must_say_its_own_prefix():
    with pytest.raises(blob.BlobError, match="stored under"):
        blob.decode(make_blob(prefix="abc123"), "zzz999")
    for raw in (b"", b"[]", b"{", b"\xff", b"null", b'{"v":1}'):
        with pytest.raises(blob.BlobError):
            blob.decode(raw)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 70000) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    field=st.sampled_from(
        [
            "v",
            "prefix",
            "project",
            "address",
            "epoch",
            "started",
            "dead_after",
            "verifier",
            "alive",
            "ports",
            "closed_public",
            "names",
        ]
    ),
    value=json_values,
)
def test_a_wrong_field_is_a_blob_error_never_a_crash(field, value):
    doc = json.loads(make_blob())
    doc[field] = value
    try:
        ws = blob.decode(json.dumps(doc).encode())
    except blob.BlobError:
        return
    assert isinstance(ws.open, dict) and all(1 <= p <= 65535 for p in ws.open)


# -- the table ------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def snapshot(state, seq=1, deadlines=None, boot=b"boot-1", now_ms=1000):
    deadlines = {prefix: now_ms + 3000 for prefix in state} if deadlines is None else deadlines
    return r.Snapshot(
        seq,
        b"%d-0" % now_ms,
        boot,
        now_ms,
        {p.encode(): raw for p, raw in state.items()},
        {p.encode(): d for p, d in deadlines.items()},
    )


def test_route_lookups():
    routes = r.Routes()
    routes.load(snapshot({"abc123": make_blob(), "stop01": make_blob("stop01", alive=False)}))
    ws, port, kind = routes.route("abc123", 3000)
    assert (ws.prefix, port, kind) == ("abc123", 3000, r.OPEN)
    assert routes.route("abc123", "web")[1:] == (3000, r.OPEN)
    assert routes.route("abc123", 4000)[1:] == (4000, r.CLOSED)
    assert routes.route("abc123", "api")[2] == r.NO_KEY
    assert routes.route("zzz999", 3000)[2] == r.UNKNOWN
    assert routes.route("stop01", 3000)[2] == r.UNAVAILABLE
    assert routes.counts() == (2, 4, 1)


def test_loads_swap_whole_skip_malformed_and_reuse_unchanged():
    changes = []
    routes = r.Routes(on_change=lambda prefix, old, new: changes.append((prefix, old is not None, new is not None)))
    routes.load(snapshot({"abc123": make_blob(), "bad001": b'{"v":1,"prefix":"bad001"}', "def456": make_blob("def456")}))
    assert set(routes.workspaces) == {"abc123", "def456"}
    assert sorted(changes) == [("abc123", False, True), ("def456", False, True)]
    kept = routes.workspaces["abc123"]
    changes.clear()
    routes.load(snapshot({"abc123": make_blob(), "ghi789": make_blob("ghi789")}, seq=7))
    assert routes.workspaces["abc123"] is kept  # same bytes: not decoded again
    assert sorted(changes) == [("def456", True, False), ("ghi789", False, True)]
    assert routes.seq == 7 and routes.route("def456", 3000)[2] == r.UNKNOWN


def test_entries_apply_in_sequence_only():
    routes = r.Routes()
    routes.load(snapshot({"abc123": make_blob()}, seq=5))
    assert routes.apply(b"2000-0", 7, "abc123", make_blob(ports={})) == r.GAP
    assert routes.route("abc123", 3000)[2] == r.OPEN  # a gap changes nothing
    assert routes.apply(b"2000-0", 5, "abc123", make_blob(ports={})) == r.GAP  # nor does a replay
    assert routes.apply(b"2000-0", 6, "abc123", make_blob(ports={})) == r.APPLIED
    assert routes.route("abc123", 3000)[2] == r.CLOSED and routes.position == b"2000-0"
    assert routes.apply(b"2001-0", 7, "abc123", b"") == r.APPLIED  # removed
    assert routes.route("abc123", 3000)[2] == r.UNKNOWN
    # A malformed blob is not routed (fail closed), and the sequence goes on.
    assert routes.apply(b"2002-0", 8, "new001", b"{nonsense") == r.APPLIED
    assert "new001" not in routes.workspaces and routes.seq == 8


def test_became_private():
    old = blob.decode(make_blob(public=(8080,)))
    assert r.became_private(old, blob.decode(make_blob(ports={3000: "private", 5173: "private"}))) == {5173, 8080}
    assert r.became_private(old, blob.decode(make_blob(public=(8080,)))) == frozenset()
    assert r.became_private(old, None) == {5173, 8080}
    assert r.became_private(old, blob.decode(make_blob(epoch="fedcba9876543210", public=(8080,)))) == {5173, 8080}
    assert r.became_private(None, old) == frozenset()


def test_liveness_marks_and_revives():
    routes = r.Routes()
    died: list[str] = []
    routes.on_dead = died.append  # the gateway ends what waits on a dead VM
    routes.load(
        snapshot({"abc123": make_blob(), "late01": make_blob("late01")}, deadlines={"abc123": 4000, "late01": 500}, now_ms=1000)
    )
    assert routes.route("late01", 3000)[2] == r.UNAVAILABLE  # judged at the load: deadline passed
    assert routes.route("abc123", 3000)[2] == r.OPEN
    assert died == ["late01"]
    assert routes.expire([("abc123", 4000.0)]) == ["abc123"]
    assert routes.route("abc123", 3000)[2] == r.UNAVAILABLE
    assert died == ["late01", "abc123"]
    assert routes.expire([("abc123", 4000.0)]) == [] and len(died) == 2  # once
    assert set(routes.to_revive(10)) == {"abc123", "late01"}
    assert routes.revive([("abc123", 6000.0), ("late01", None)], now_ms=5000) == ["abc123"]
    assert routes.route("abc123", 3000)[2] == r.OPEN and "late01" in routes.dead
    # An entry written after the deadline that a check reports means its VM is alive.
    routes.apply(b"7000-0", 2, "abc123", make_blob())
    assert routes.expire([("abc123", 6500.0)]) == []
    # An entry revives a dead one.
    routes.apply(b"7001-0", 3, "late01", make_blob("late01"))
    assert routes.route("late01", 3000)[2] == r.OPEN


def test_revival_batches_rotate():
    routes = r.Routes()
    state = {f"p{i:05d}": make_blob(f"p{i:05d}") for i in range(10)}
    routes.load(snapshot(state, deadlines={}))
    assert len(routes.dead) == 10
    seen = set()
    for _ in range(4):
        batch = routes.to_revive(3)
        assert len(batch) == 3
        seen.update(batch)
    assert seen == set(state)


def test_redis_that_lost_its_data_is_merged_with_a_grace():
    clock = Clock()
    routes = r.Routes(clock=clock)
    routes.load(snapshot({"abc123": make_blob(), "def456": make_blob("def456")}, boot=b"one"))
    # Redis came back empty with a new boot id: nothing is dropped, both are unconfirmed.
    assert routes.load(snapshot({}, seq=0, boot=b"two"))
    assert routes.route("abc123", 3000)[2] == r.OPEN and set(routes.unconfirmed) == {"abc123", "def456"}
    # A reload inside the grace (same new boot) keeps them too; one VM has claimed again.
    clock.now += 2
    assert not routes.load(snapshot({"abc123": make_blob()}, seq=1, boot=b"two"))
    assert "abc123" not in routes.unconfirmed and routes.route("def456", 3000)[2] == r.OPEN
    # The other never comes back: after twice its dead_after (6 s) it is unavailable, then gone.
    clock.now += 4.5
    assert routes.route("def456", 3000)[2] == r.UNAVAILABLE
    routes.load(snapshot({"abc123": make_blob()}, seq=1, boot=b"two"))
    assert routes.route("def456", 3000)[2] == r.UNKNOWN
    # Unconfirmed workspaces are not judged by deadlines (Redis has none for them).
    routes.load(snapshot({}, seq=0, boot=b"three"))
    assert routes.expire([("abc123", 1e15)]) == [] and routes.route("abc123", 3000)[2] == r.OPEN
    # The same boot but an empty Redis while the table is not: lost too.
    routes2 = r.Routes(clock=clock)
    routes2.load(snapshot({"abc123": make_blob()}, boot=b"same"))
    assert routes2.load(snapshot({}, seq=0, boot=b"same"))


def test_a_load_without_judging_keeps_dead_marks():
    routes = r.Routes()
    routes.load(snapshot({"abc123": make_blob(), "def456": make_blob("def456")}, deadlines={"abc123": 5000, "def456": 10}))
    assert routes.dead == {"def456"}
    # After Redis was away every deadline is past; not judged, nothing new is dead.
    routes.load(
        snapshot(
            {"abc123": make_blob(), "def456": make_blob("def456"), "new001": make_blob("new001")},
            deadlines={"abc123": 5000, "def456": 10, "new001": 99999},
            now_ms=9000,
        ),
        judge=False,
    )
    assert routes.dead == {"def456"}
