"""Fleet mode's Redis half against a real ``redis-server`` (each test starts its own): publishers
claim, update, heartbeat and stop; a follower loads, follows the stream, reloads on a gap and after
Redis restarts empty (keeping its routes meanwhile), and judges liveness; ``aether fleet status``
shows it all. With a Sentinel in front too."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time

import pytest
from support import AETHER, ROOT
from support.redis import RedisServer, Sentinel

from aether.fleet import auth, keys
from aether.fleet import routes as r
from aether.fleet.follower import Follower
from aether.fleet.publisher import DOWN, PUBLISHED, SUPERSEDED, Identity, PrefixTaken, Publisher

KEYS = auth.FleetKeys([b"k" * 32])


class State:
    """What a workspace server would show: open ports, public ports, registry names."""

    def __init__(self, ports=None, public=(), names=None):
        self.open = dict(ports if ports is not None else {3000: "private"})
        self.public_ports = set(public)
        self.registry = dict(names or {})

    def ports(self):
        return self.open

    def public(self):
        return self.public_ports

    def names(self):
        return self.registry


def identity(prefix="abc123", project=None, workspace="ws-1", address="127.0.0.1:3001"):
    return Identity(prefix, project or prefix + "-project", workspace, address, auth.verifier(KEYS, "tok", prefix))


async def until(predicate, timeout=5.0, what=""):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(0.005)


@pytest.fixture
def redis_server():
    server = RedisServer().start()
    yield server
    server.close()


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 60))


def kind(routes, prefix, port):
    return routes.route(prefix, port)[2]


def test_publish_follow_and_status(redis_server):
    async def scenario():
        state = State({3000: "private"}, public={8080}, names={"web": 3000})
        pub = Publisher(redis_server.url, identity(), state)
        await pub.start()
        assert pub.status == PUBLISHED and pub.claims == 1
        routes = r.Routes()
        follower = Follower(redis_server.url, routes)
        await follower.start()
        assert follower.loaded and follower.redis_up and follower.reloads["start"] == 1
        assert kind(routes, "abc123", 3000) == r.OPEN and kind(routes, "abc123", "web") == r.OPEN
        assert routes.workspaces["abc123"].is_public(8080)
        # A change is one update, seen by the follower through the stream.
        state.open[5173] = "public"
        for _ in range(100):  # a burst in one loop turn is one update
            pub.changed()
        await until(lambda: kind(routes, "abc123", 5173) == r.OPEN, what="the new port at the follower")
        assert pub.updates == 1 and follower.applied == 1 and sum(follower.lag.counts) == 1
        state.open[5173] = "private"
        pub.changed()
        await until(lambda: not routes.workspaces["abc123"].is_public(5173))
        assert follower.reloads == {"start": 1, "reconnect": 0, "gap": 0, "boot": 0, "interval": 0}
        # The status command reads the same.
        out = await asyncio.to_thread(
            subprocess.run,
            [*AETHER, "fleet", "status", "--redis", redis_server.url, "--json"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        (ws,) = doc["workspaces"]
        assert (ws["prefix"], ws["workspace"], ws["address"], ws["epoch"], ws["state"], ws["alive"]) == (
            "abc123",
            "ws-1",
            "127.0.0.1:3001",
            pub.epoch,
            "alive",
            True,
        )
        assert 0 <= ws["heartbeat_age"] < 3
        assert ws["ports"] == [
            {"port": 3000, "open": True, "visibility": "private", "names": ["web"]},
            {"port": 5173, "open": True, "visibility": "private", "names": []},
            {"port": 8080, "open": False, "visibility": "public", "names": []},
        ]
        assert doc["seq"] == pub.seq == 3 and doc["malformed"] == []
        text = await asyncio.to_thread(
            subprocess.run,
            [*AETHER, "fleet", "status", "--redis", redis_server.url],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=30,
        )
        assert text.returncode == 0
        header, row, total = text.stdout.splitlines()
        assert header.split() == ["PREFIX", "WORKSPACE", "ADDRESS", "EPOCH", "HEARTBEAT", "STATE", "PORTS"]
        assert row.startswith("abc123  ws-1") and "3000 private web, 5173 private, 8080 public closed" in row
        assert total == "1 workspaces, 1 alive"
        # A clean stop: unavailable at once, not after dead_after.
        await pub.stop()
        await until(lambda: kind(routes, "abc123", 3000) == r.UNAVAILABLE, timeout=1.0)
        await follower.stop()

    run(scenario())


def test_status_when_redis_is_unreachable(redis_server):
    redis_server.stop()
    out = subprocess.run(
        [*AETHER, "fleet", "status", "--redis", f"redis://:hunter2@127.0.0.1:{redis_server.port}/0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert out.returncode == 1 and out.stdout == ""
    (line,) = out.stderr.splitlines()
    assert line.startswith("aether: redis redis://:***@127.0.0.1:") and "unreachable" in line and "hunter2" not in line
    bad = subprocess.run([*AETHER, "fleet", "status", "--redis", "http://x"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "not a Redis URL" in bad.stderr


def test_a_gap_reloads(redis_server):
    """Entries trimmed while the follower was away (its loop blocked) are a gap: a full load."""

    async def scenario():
        state = State({3000: "private"})
        pub = Publisher(redis_server.url, identity(), state)
        await pub.start()
        routes = r.Routes()
        follower = Follower(redis_server.url, routes)
        await follower.start()
        sync = redis_server.client()
        # The event loop (the follower's) is blocked through all of this.
        for port in range(4000, 4020):
            state.open[port] = "public"
            sync.eval(keys.UPDATE, len(keys.CHANGE_KEYS), *keys.CHANGE_KEYS, "abc123", pub.epoch, pub.blob(), 1000)
        sync.xtrim(keys.CHANGES, maxlen=1, approximate=False)
        await until(lambda: follower.reloads["gap"] == 1, what="a reload for the gap")
        await until(lambda: kind(routes, "abc123", 4019) == r.OPEN)
        assert routes.seq == int(sync.get(keys.SEQ))
        # Following goes on from the reload's position.
        state.open[5000] = "public"
        pub.changed()
        await until(lambda: kind(routes, "abc123", 5000) == r.OPEN)
        assert follower.reloads["gap"] == 1
        await pub.stop()
        await follower.stop()

    run(scenario())


def test_redis_restarted_empty(redis_server):
    """Redis SIGKILLed and started again empty: the follower keeps serving what it held (down,
    then unconfirmed), the publisher claims again, and the routes are confirmed."""

    async def scenario():
        state = State({3000: "public"})
        pub = Publisher(redis_server.url, identity(), state, heartbeat=0.2, dead_after=1.0)
        await pub.start()
        other = Publisher(redis_server.url, identity("def456"), State({8000: "public"}), heartbeat=0.2, dead_after=1.0)
        await other.start()
        routes = r.Routes()
        follower = Follower(redis_server.url, routes, quiet=2.0)
        await follower.start()
        boot = routes.boot
        seen = set()
        sampler = asyncio.ensure_future(always_open(routes, "abc123", 3000, seen))
        redis_server.kill()
        await until(lambda: not follower.redis_up, what="the follower to see Redis down")
        assert follower.health()["status"] == "degraded" and "since" in follower.health()
        await until(lambda: pub.status == DOWN)
        # Meanwhile every route stands.
        assert kind(routes, "abc123", 3000) == r.OPEN and kind(routes, "def456", 8000) == r.OPEN
        state.open[5173] = "public"
        pub.changed()  # a change while Redis is down is published on reconnecting
        await other.stop()  # a VM that leaves while Redis is away: its record is gone with Redis
        redis_server.start()
        await until(lambda: follower.redis_up and follower.merges == 1, timeout=10, what="a merged reload")
        assert routes.boot != boot
        await until(lambda: kind(routes, "abc123", 5173) == r.OPEN, timeout=5, what="the publisher's new claim")
        assert "abc123" not in routes.unconfirmed and pub.status == PUBLISHED
        sampler.cancel()
        assert seen == {r.OPEN}
        # The one that never claims again is unavailable after its grace (2 x dead_after), not at once.
        assert "def456" in routes.unconfirmed
        await until(lambda: kind(routes, "def456", 8000) == r.UNAVAILABLE, timeout=5)
        assert follower.health()["status"] == "ok"
        assert follower.reloads["reconnect"] + follower.reloads["boot"] >= 1
        await pub.stop()
        await follower.stop()

    run(scenario())


PUBLISHER_PROCESS = """
import asyncio, sys
from aether.fleet import auth
from aether.fleet.publisher import Identity, Publisher
class State:
    def ports(self): return {3000: "public"}
    def public(self): return ()
    def names(self): return {}
async def main():
    keys = auth.FleetKeys([b"k" * 32])
    pub = Publisher(sys.argv[1], Identity("vm0001", "vm0001-project", "ws", "127.0.0.1:3001",
                    auth.verifier(keys, "t", "vm0001")), State(), heartbeat=0.2, dead_after=1.0)
    await pub.start()
    print("published", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def spawn_publisher(url):
    """A publisher in a process of its own (a VM's aether, as far as Redis can tell), once published."""
    proc = subprocess.Popen([sys.executable, "-c", PUBLISHER_PROCESS, url], stdout=subprocess.PIPE, cwd=ROOT)
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = os.read(proc.stdout.fileno(), 100) if ready else b""
    if line.strip() != b"published":
        proc.kill()
        proc.wait()
        raise AssertionError(f"the publisher process did not start: {line!r}")
    return proc


def test_liveness_of_a_killed_vm(redis_server):
    """A publisher process SIGKILLed stops heartbeating: dead at the follower once its deadline
    passes (by the liveness checks: no entry says so); a new start of it revives the workspace."""

    async def scenario():
        routes = r.Routes()
        follower = Follower(redis_server.url, routes, liveness_interval=0.05)
        await follower.start()
        procs = [await asyncio.to_thread(spawn_publisher, redis_server.url)]
        try:
            await until(lambda: kind(routes, "vm0001", 3000) == r.OPEN)
            # Alive while it heartbeats, over several deadlines.
            sync = redis_server.client()
            first = sync.zscore(keys.ALIVE, "vm0001")
            await until(lambda: sync.zscore(keys.ALIVE, "vm0001") > first + 1000, what="deadlines moving on")
            assert kind(routes, "vm0001", 3000) == r.OPEN
            seq = routes.seq
            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait()
            await until(lambda: kind(routes, "vm0001", 3000) == r.UNAVAILABLE, timeout=3, what="dead after dead_after")
            assert routes.seq == seq and "vm0001" in routes.dead
            procs.append(await asyncio.to_thread(spawn_publisher, redis_server.url))
            await until(lambda: kind(routes, "vm0001", 3000) == r.OPEN, what="revived by the new claim")
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
        await follower.stop()

    run(scenario())


def test_a_paused_vm_is_dead_then_back(redis_server):
    """A VM paused past its deadline (SIGSTOP) is dead; its first heartbeat after says it is back
    through the stream (no reload). A deadline that moves ahead without an entry revives too."""

    async def scenario():
        routes = r.Routes()
        follower = Follower(redis_server.url, routes, liveness_interval=0.05)
        await follower.start()
        proc = await asyncio.to_thread(spawn_publisher, redis_server.url)
        try:
            await until(lambda: kind(routes, "vm0001", 3000) == r.OPEN)
            seq = routes.seq
            proc.send_signal(signal.SIGSTOP)
            await until(lambda: kind(routes, "vm0001", 3000) == r.UNAVAILABLE, what="dead while paused")
            proc.send_signal(signal.SIGCONT)
            await until(lambda: kind(routes, "vm0001", 3000) == r.OPEN, what="back with its next heartbeat")
            assert routes.seq == seq + 1 and sum(follower.reloads.values()) == 1
            # The backstop: a deadline ahead again, with no entry, is found by the checks.
            proc.send_signal(signal.SIGSTOP)
            await until(lambda: kind(routes, "vm0001", 3000) == r.UNAVAILABLE, what="dead while paused")
            sync = redis_server.client()
            sync.zadd(keys.ALIVE, {"vm0001": (time.time() + 60) * 1000})
            await until(lambda: kind(routes, "vm0001", 3000) == r.OPEN, what="revived by its deadline")
            assert routes.seq == seq + 1
        finally:
            proc.kill()
            proc.wait()
        await follower.stop()

    run(scenario())


async def always_open(routes, prefix, port, seen):
    """What a request to an open port would have found, sampled every millisecond."""
    while True:
        seen.add(kind(routes, prefix, port))
        await asyncio.sleep(0.001)


def test_a_redis_stall_kills_nobody(redis_server):
    """Redis paused longer than the deadlines: nobody could heartbeat, so nobody is judged."""

    async def scenario():
        pub = Publisher(redis_server.url, identity(), State({3000: "public"}), heartbeat=0.2, dead_after=1.0)
        await pub.start()
        routes = r.Routes()
        follower = Follower(redis_server.url, routes, liveness_interval=0.05, quiet=2.0)
        await follower.start()
        await until(lambda: follower.checks >= 3, what="a few liveness checks")
        seen = set()
        sampler = asyncio.ensure_future(always_open(routes, "abc123", 3000, seen))
        redis_server.proc.send_signal(signal.SIGSTOP)
        await asyncio.sleep(1.5)  # the fault itself lasts this long; nothing is awaited by it
        redis_server.proc.send_signal(signal.SIGCONT)
        await until(lambda: follower.stalls >= 1, what="the stall noticed")
        await until(lambda: pub.heartbeats >= 3)
        sampler.cancel()
        assert seen == {r.OPEN}
        await pub.stop()
        await follower.stop()

    run(scenario())


def test_redis_restarted_with_its_data():
    """Redis SIGKILLed and restarted with its data (AOF): deadlines passed meanwhile say nothing
    (no VM could heartbeat), so the reload judges none of them."""
    server = RedisServer(extra=("--appendonly", "yes", "--appendfsync", "always")).start()
    try:

        async def scenario():
            routes = r.Routes()
            follower = Follower(server.url, routes, liveness_interval=0.05, quiet=3.0)
            await follower.start()
            proc = await asyncio.to_thread(spawn_publisher, server.url)
            try:
                await until(lambda: kind(routes, "vm0001", 3000) == r.OPEN)
                seen = set()
                sampler = asyncio.ensure_future(always_open(routes, "vm0001", 3000, seen))
                server.kill()
                await until(lambda: not follower.redis_up)
                proc.send_signal(signal.SIGSTOP)  # so it cannot claim before the gateway reloads
                await asyncio.sleep(1.2)  # the outage lasts longer than the VM's deadline
                await asyncio.to_thread(server.start)
                await until(lambda: follower.redis_up and follower.reloads["reconnect"] >= 1, timeout=10)
                proc.send_signal(signal.SIGCONT)
                await until(lambda: routes.seq >= 2, what="the VM's claim after reconnecting")
                sampler.cancel()
                assert seen == {r.OPEN} and follower.merges == 0
            finally:
                proc.kill()
                proc.wait()
            await follower.stop()

        run(scenario())
    finally:
        server.close()


def test_prefix_collision_and_supersession(redis_server, caplog):
    async def scenario():
        first = Publisher(redis_server.url, identity(project="project-one"), State(), heartbeat=0.1, dead_after=1.0)
        await first.start()
        intruder = Publisher(redis_server.url, identity(project="project-two", workspace="ws-2"), State())
        with pytest.raises(PrefixTaken, match="prefix abc123 belongs to workspace ws-1, which is alive"):
            await intruder.start()
        # A new start of the same project takes over; the old one stops publishing at its next heartbeat.
        routes = r.Routes()
        follower = Follower(redis_server.url, routes)
        await follower.start()
        second = Publisher(redis_server.url, identity(project="project-one", address="127.0.0.1:4001"), State())
        await second.start()
        await until(lambda: first.status == SUPERSEDED, what="the old start superseded")
        assert "superseded" in caplog.text
        first.changed()
        await asyncio.sleep(0)  # nothing would run it: its loop has ended
        await until(lambda: routes.workspaces["abc123"].epoch == second.epoch)
        assert routes.workspaces["abc123"].address == "127.0.0.1:4001"
        # A stopped workspace frees the prefix for another project at once.
        await second.stop()
        await intruder.start()
        await until(lambda: routes.workspaces["abc123"].project == "project-two")
        await intruder.stop()
        await first.stop()
        await follower.stop()

    caplog.set_level(logging.INFO, "aether.fleet")
    run(scenario())


def test_redis_down_at_start_then_up(redis_server):
    """Neither side needs Redis to start: they serve what they have and catch up."""
    redis_server.stop()

    async def scenario():
        pub = Publisher(redis_server.url, identity(), State({3000: "public"}))
        await pub.start(timeout=0.5)
        assert pub.status == DOWN
        routes = r.Routes()
        follower = Follower(redis_server.url, routes)
        await follower.start(timeout=0.3)
        assert not follower.loaded and follower.health()["status"] == "starting"
        await asyncio.to_thread(redis_server.start)
        await until(lambda: kind(routes, "abc123", 3000) == r.OPEN, timeout=10)
        assert pub.status == PUBLISHED and follower.redis_up
        await pub.stop()
        await follower.stop()

    run(scenario())


def test_malformed_blobs_are_skipped(redis_server, caplog):
    async def scenario():
        sync = redis_server.client()
        sync.hset(keys.STATE, "bad001", b'{"v":1,"prefix":"bad001"}')
        pub = Publisher(redis_server.url, identity(), State())
        await pub.start()
        routes = r.Routes()
        follower = Follower(redis_server.url, routes)
        await follower.start()
        assert set(routes.workspaces) == {"abc123"}
        # One in the stream too, written as a script would.
        seq = sync.incr(keys.SEQ)
        sync.xadd(keys.CHANGES, {"seq": seq, "prefix": "bad002", "state": b"\xff garbage"})
        seq = sync.incr(keys.SEQ)
        sync.xadd(keys.CHANGES, {"seq": seq, "prefix": "abc123", "state": b""})
        await until(lambda: "abc123" not in routes.workspaces)
        assert follower.reloads["gap"] == 0 and "bad002" not in routes.workspaces
        out = await asyncio.to_thread(
            subprocess.run,
            [*AETHER, "fleet", "status", "--redis", redis_server.url, "--json"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=30,
        )
        assert out.returncode == 0 and json.loads(out.stdout)["malformed"] == ["bad001"]
        assert "malformed" in out.stderr
        await pub.stop()
        await follower.stop()

    caplog.set_level(logging.INFO, "aether.fleet")
    run(scenario())
    assert caplog.text.count("blob is malformed") >= 2


def test_reaping_forgets_long_dead_workspaces(redis_server):
    async def scenario():
        pub = Publisher(redis_server.url, identity(), State())
        await pub.start()
        await pub.stop()
        routes = r.Routes()
        follower = Follower(redis_server.url, routes, retain=0.0)
        await follower.start()
        assert "abc123" in routes.workspaces
        assert await follower.reap() == 1
        await until(lambda: "abc123" not in routes.workspaces)
        assert redis_server.client().hlen(keys.STATE) == 0 and follower.reloads["gap"] == 0
        await follower.stop()

    run(scenario())


def test_through_a_sentinel(redis_server):
    sentinel = Sentinel(redis_server).start()
    try:

        async def scenario():
            state = State({3000: "private"})
            pub = Publisher(sentinel.url, identity(), state)
            await pub.start()
            assert pub.status == PUBLISHED
            routes = r.Routes()
            follower = Follower(sentinel.url, routes)
            await follower.start()
            assert kind(routes, "abc123", 3000) == r.OPEN
            state.open[4000] = "public"
            pub.changed()
            await until(lambda: kind(routes, "abc123", 4000) == r.OPEN)
            await pub.stop()
            await follower.stop()

        run(scenario())
        out = subprocess.run(
            [*AETHER, "fleet", "status", "--redis", sentinel.url, "--json"], capture_output=True, text=True, cwd=ROOT, timeout=30
        )
        assert out.returncode == 0 and json.loads(out.stdout)["workspaces"][0]["state"] == "stopped"
    finally:
        sentinel.close()


def test_redis_is_not_imported_without_fleet_mode():
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, aether.cli; aether.cli.build_parser(); "
            "import aether.fleet.gate, aether.fleet.routes; print('redis' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ},
    )
    assert out.stdout.strip() == "False", out.stderr


def test_an_identity_no_gateway_would_route_is_refused_at_once():
    with pytest.raises(ValueError, match="prefix"):
        Identity("ABC", "p", "w", "127.0.0.1:3001", "v" * 43)
    with pytest.raises(ValueError, match="HOST:PORT"):
        Identity("abc123", "p", "w", "127.0.0.1", "v" * 43)
    with pytest.raises(ValueError, match="verifier"):
        Publisher("redis://127.0.0.1:1/0", Identity("abc123", "p", "w", "127.0.0.1:3001", "short"), State())
    with pytest.raises(ValueError, match="names"):
        Publisher("redis://127.0.0.1:1/0", identity(), State(names={"8000": 8000}))
    with pytest.raises(ValueError, match="not a Redis URL"):
        Publisher("http://127.0.0.1/", identity(), State())


def test_redis_urls():
    from aether.fleet import connection

    assert connection.describe("redis://:hunter2@h:6379/0") == "redis://:***@h:6379/0"
    assert connection.describe("rediss://user:p%40ss@h:6380/1") == "rediss://user:***@h:6380/1"
    assert connection.describe("redis://h:6379/0") == "redis://h:6379/0"
    assert (
        connection.describe("redis+sentinel://:pw@a:1,b:2/m/0?sentinel_password=x")
        == "redis+sentinel://:***@a:1,b:2/m/0?sentinel_password=***"
    )
    parts = connection.parse_sentinel("redis+sentinel://u:pw@a:1,[::1]:2,c/mymaster/3?sentinel_password=s")
    assert parts == {
        "sentinels": [("a", 1), ("::1", 2), ("c", 26379)],
        "service": "mymaster",
        "db": 3,
        "username": "u",
        "password": "pw",
        "sentinel_password": "s",
        "ssl": False,
    }
    assert connection.parse_sentinel("rediss+sentinel://a/m")["ssl"] is True
    for bad in ("redis+sentinel://a:1", "redis+sentinel:///m", "redis+sentinel://a:x/m", "redis+sentinel://a/m/x"):
        with pytest.raises(ValueError):
            connection.check(bad)
    for good in ("redis://h:1/0", "rediss://h", "unix:///run/redis.sock?db=2"):
        assert connection.check(good) == good
