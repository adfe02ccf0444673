"""A real `aether serve` driven for ``FUZZ_SECONDS`` with random messages on every channel,
valid and not (strategies built from ``protocol.SCHEMAS``, then mutated, plus garbage text,
binary frames, deep nesting and broken WebSocket framing), from a token client, a dashboard
cookie client and throwaway raw connections; beside them a second client times ``config get``
round trips (p50 and p99 printed, nothing asserted about time), beside the same measured on
the idle server just before, as a baseline from the same run and machine load.

What must hold: no answer anywhere is ``internal``; the server logs no error and no
traceback (at any level: Tornado logs some at debug); the tree outside the workspace root is
untouched; the server still answers at the end and exits 0.

What must not happen, whatever the fuzzing finds: anything harmful to the host. Every frame
is parsed here first, with the server's own parser, and not sent if the server would act on it
beyond the test's own things: a terminal runs ``cat``, ``true`` or a ``sleep`` (the "shell" is a
script that runs ``cat``, so a command string runs nothing), with a few harmless variables; a
path lands inside the test's directory; an agent prompt is one of the scripted backend's
harmless modes; ``ports kill`` names a port of a listener this test started (once), or one it
holds bound without listening, so nothing can listen there.
"""

from __future__ import annotations

import base64
import collections
import http.client
import json
import os
import random
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from support import ROOT
from support.clients import raw_upgrade, recv_until
from support.servers import Server
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from aether import protocol

#: Seconds of fuzzing: a few in the suite. The hostile run that found the faults this guards
#: against ran ~1,000 messages a second; so does this.
FUZZ_SECONDS = float(os.environ.get("AETHER_FUZZ_SECONDS", "5"))  # longer by hand: AETHER_FUZZ_SECONDS=120
RATE = 1000
#: Frames hypothesis draws before the clock starts: it draws ~1 ms a frame, too slow to feed
#: 1,000 a second, and it would take the CPU the server is being timed on. While fuzzing,
#: the frames go out in turn and then again, with fresh ids, live ports and watch ids, or
#: mutated (``random``, seeded: the seed is printed).
CORPUS = int(300 * FUZZ_SECONDS)
#: Seconds of the idle baseline: ~200 round trips, one every ~5 ms.
IDLE_SECONDS = 1.0
BATCH = 25
SCRIPTED = ROOT / "tests" / "agents" / "scripted.py"

pytestmark = pytest.mark.slow

SAFE_ARGV = (("cat",), ("true",), ("sleep", "0.2"))
SAFE_ENV = ("AETHER_FUZZ", "LANG", "TERM", "COLUMNS")
#: The scripted backend's modes that end at once and start nothing (see tests/agents/scripted.py).
SAFE_PROMPTS = ("count", "crash", "garbage", "silent", "error", "stream 3 0.01", "hello there")
UNSAFE_PROMPTS = {"hang", "flood", "chatter", "longline", "stream"}


class Guard:
    """What the test may let the server act on (see the module docstring); shared by the
    sending threads."""

    def __init__(self, allowed: Path, root: Path):
        self.allowed = str(allowed)
        self.root = str(root)
        self.lock = threading.Lock()
        self.killable: list[int] = []  # ports of our listeners not yet sent a kill
        self.reserved: list[int] = []  # ports we hold bound, never listening
        self.killed = 0

    def path_ok(self, path: str) -> bool:
        target = os.path.normpath(path if os.path.isabs(path) else os.path.join(self.root, path))
        return target == self.allowed or target.startswith(self.allowed + os.sep)

    def may_send(self, frame) -> bool:
        try:
            message = protocol.parse(frame)
        except protocol.ProtocolError:
            return True  # the server refuses it just the same
        body = message.body
        if any(isinstance(body.get(field), str) and not self.path_ok(body[field]) for field in ("path", "cwd", "from", "to")):
            return False
        kind = (message.channel, message.type)
        if kind == ("ports", "kill"):
            with self.lock:
                if body["port"] in self.reserved:
                    return True
                if body["port"] in self.killable:
                    self.killable.remove(body["port"])  # one kill per listener: it may be gone after
                    self.killed += 1
                    return True
            return False
        if kind == ("terminal", "create"):
            command = body.get("command")
            if isinstance(command, list) and tuple(command) not in SAFE_ARGV:
                return False
            return all(name in SAFE_ENV for name in body.get("env") or {})
        if kind == ("agent", "prompt"):
            return body["text"] in SAFE_PROMPTS or body["text"].split()[0] not in UNSAFE_PROMPTS
        return True


# -- strategies --------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=10,
)
SESSIONS = ["s1", "s2", "s3", "fz-a"]
CONVERSATIONS = ["c1", "c2"]
watch_ids: list[str] = ["w-none"]  # filled with what the server answers
NAMES = ["a", "a/b", "a/b/c.txt", "d", "d/e.txt", "f.bin", ".", "nested/x/y", "a/../d", "é ü", "\udcff"]


def _paths(outside: Path) -> st.SearchStrategy:
    return _mostly(
        st.sampled_from(NAMES + ["..", "../..", "../../outside/kept.txt", str(outside), str(outside / "kept.txt"), "a/../../.."]),
        st.text(st.sampled_from("ab./"), min_size=1, max_size=8),
    )


def _mostly(usual: st.SearchStrategy, other: st.SearchStrategy) -> st.SearchStrategy:
    """``usual`` eight times in ten (``a | b`` would draw ``a`` nearly always)."""
    return st.sampled_from(range(10)).flatmap(lambda n: other if n >= 8 else usual)


def _often(valid: st.SearchStrategy, invalid: st.SearchStrategy = json_values) -> st.SearchStrategy:
    """``valid`` nine times in ten, or more: hypothesis leans to the first of its choices."""
    return st.sampled_from(range(10)).flatmap(lambda n: invalid if n == 9 else valid)


def _field_values(guard: Guard, outside: Path) -> dict[str, st.SearchStrategy]:
    def pick(pool_of):
        return st.builds(lambda i: (pool_of() or [1])[i % len(pool_of() or [1])], st.integers(0, 100))

    ours = pick(lambda: guard.killable + guard.reserved)
    ports = st.sampled_from(range(10)).flatmap(
        lambda n: ours if n < 5 else st.integers(1024, 65535) if n < 9 else st.sampled_from([0, -1, 65536, 70000])
    )
    text = st.text(max_size=40)
    b64 = st.binary(max_size=40).map(lambda raw: base64.b64encode(raw).decode())
    return {
        "port": ports,
        "visibility": st.sampled_from(["private", "public", "secret"]),
        "protocol": st.sampled_from(["https", "http", "tcp", "auto", "ftp"]),
        "config": st.fixed_dictionaries(
            {}, optional={"ignoredPorts": st.lists(st.integers(-1, 70000), max_size=6), "workspaceId": text, "x": json_values}
        ),
        "sessionId": _mostly(st.sampled_from(SESSIONS), st.from_regex(r"[A-Za-z0-9._:-]{1,70}", fullmatch=True)),
        "cols": st.integers(1, 300) | st.sampled_from([0, 1000, 1001]),
        "rows": st.integers(1, 300) | st.sampled_from([0, 1000, 1001]),
        "cwd": _paths(outside),
        "command": _mostly(
            st.sampled_from([list(argv) for argv in SAFE_ARGV]), st.sampled_from(["cat", "true", "echo hi", "", [], [""]])
        ),
        "env": st.dictionaries(st.sampled_from(SAFE_ENV), text, max_size=3),
        "data": _mostly(text, b64),
        "encoding": st.sampled_from(["utf-8", "base64", "latin-1"]),
        "path": _paths(outside),
        "from": _paths(outside),
        "to": _paths(outside),
        "offset": st.integers(0, 1 << 20) | st.sampled_from([-1, (1 << 53) - 1, 1 << 53]),
        "length": st.integers(0, 1 << 20) | st.sampled_from([-1, 64 << 20, (64 << 20) + 1]),
        "content": _mostly(text, b64 | st.just("x" * 5000)),
        "createParents": st.booleans(),
        "parents": st.booleans(),
        "recursive": st.booleans(),
        "overwrite": st.booleans(),
        "watchId": pick(lambda: watch_ids) | text,
        "text": _mostly(st.sampled_from(SAFE_PROMPTS), text),
        "conversationId": _mostly(st.sampled_from(CONVERSATIONS), st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True)),
    }


_ABSENT = object()


def messages(guard: Guard, outside: Path) -> st.SearchStrategy:
    """One message object of a (channel, type) of ``protocol.SCHEMAS``: each field valid nine
    times in ten, an optional one present eight in ten, now and then required ones missing, an
    unknown field, or an ``id`` of any JSON type."""
    values = _field_values(guard, outside)
    kinds = []
    # Hypothesis leans to the first branch of a choice: a cheap one, and kill (mostly withheld:
    # it may name only our ports) last.
    order = sorted(protocol.SCHEMAS, key=lambda key: (key != ("terminal", "input"), key[0] == "ports"))
    for channel, kind in order:
        schema = protocol.SCHEMAS[(channel, kind)]
        fields = {name.rstrip("?"): _often(values[name.rstrip("?")]) for name in schema}
        required = {name: fields[name] for name in (n for n in schema if not n.endswith("?"))}
        optional = {name.rstrip("?"): fields[name.rstrip("?")] for name in schema if name.endswith("?")}
        head = {"channel": st.just(channel), "type": st.just(kind)}
        # Optional fields present eight times in ten (fixed_dictionaries' own optional keys are
        # mostly left out), the client's id or an unknown field now and then.
        present = {name: _mostly(value, st.just(_ABSENT)) for name, value in optional.items()}
        whole = st.fixed_dictionaries({**head, **required, **present}, optional={"id": json_values, "zz": json_values}).map(
            lambda message: {name: value for name, value in message.items() if value is not _ABSENT}
        )
        sparse = st.fixed_dictionaries(head, optional={**required, **optional})
        kinds.append(_often(whole, sparse))
    return st.one_of(kinds)


def _mutate(frame: str, how: int, at: int, char: str) -> str:
    i = at % (len(frame) + 1)
    if how == 0:
        return frame[:i] + char + frame[i + 1 :]
    if how == 1:
        return frame[:i]
    if how == 2:
        return frame[:i] + char + frame[i:]
    if how == 3:
        return frame[:i] + frame[i + 7 :]
    return frame[:i] + frame[i:] * 2


def frames(guard: Guard, outside: Path) -> st.SearchStrategy:
    """A message object (sent as JSON, with an ``id`` of ours when it has none) nearly always;
    else a frame: a message mutated, garbage text, a binary frame, JSON that is no object,
    nesting deeper than allowed or than JSON readers take, lone surrogates, huge numbers."""
    objects = messages(guard, outside)
    mutated = st.builds(
        _mutate,
        objects.map(json.dumps),
        st.integers(0, 4),
        st.integers(0, 400),
        st.sampled_from(list('"{}[]:,\\0a\x00') + ["\ud800", "é"]),
    )
    deep = st.builds(
        lambda n, kind: (
            '{"channel": "config", "type": "set", "config": {"ignoredPorts": %s}}' % ("[" * n + "]" * n)
            if kind
            else "[" * n + "]" * n
        ),
        st.sampled_from([31, 33, 1000, 1024, 1025, 5000]),
        st.booleans(),
    )
    odd = st.sampled_from(
        [
            '{"channel": "ports", "type": "kill", "port": 1e400}',
            '{"channel": "ports", "type": "kill", "port": NaN, "id": NaN}',
            '{"channel": "terminal", "type": "input", "sessionId": "s1", "data": "\\ud800"}',
            '{"channel": "config", "type": "get", "id": 1e300}',
            '{"channel": "config", "type": "get", "id": ' + "9" * 5000 + "}",
            '{"channel": "files", "type": "list", "path": "\\u0000"}',
            '{"channel": "files", "type": "read", "path": "a/b/c.txt", "offset": 1, "length": 1e3}',
            "null",
            "[]",
            '""',
            "{}",
            "",
        ]
    )
    raw = st.one_of(mutated, deep, odd, st.text(max_size=60), st.binary(max_size=60), json_values.map(json.dumps))
    return st.sampled_from(range(10)).flatmap(lambda n: raw if n >= 8 else objects)


# -- the clients -------------------------------------------------------------------------------


class Client:
    """A WebSocket client that sends what it is given and reads everything in a thread,
    reconnecting when the server drops it (a slow reader may be dropped: that is allowed)."""

    def __init__(self, open_ws, name: str, bad: list):
        self.open_ws, self.name, self.bad = open_ws, name, bad
        self.sent: dict[int, str] = {}
        self.received = self.reconnects = 0
        self.closes: list[str] = []
        self.kinds: collections.Counter = collections.Counter()  # (channel, type, code) answered
        self.ws = None
        self._reader = None
        self._connect()

    def _connect(self) -> None:
        self.ws = self.open_ws().__enter__()  # left by close(), or when the server stops
        self._reader = threading.Thread(target=self._read, args=(self.ws,), daemon=True)
        self._reader.start()

    def _read(self, ws) -> None:
        try:
            for raw in ws:
                self.received += 1
                try:
                    message = json.loads(raw)
                except ValueError:
                    self.bad.append((self.name, "not JSON", raw[:200]))
                    continue
                self.kinds[(message.get("channel"), message.get("type"), message.get("code"))] += 1
                error = message.get("error")
                if message.get("code") == "internal" or (isinstance(error, dict) and error.get("code") == "internal"):
                    self.bad.append((self.name, message, self.sent.get(message.get("id"))))
                if message.get("watchId") and message.get("type") == "watch" and len(watch_ids) < 64:
                    watch_ids.append(message["watchId"])
        except ConnectionClosed:
            pass

    def send(self, frame) -> None:
        try:
            self.ws.send(frame)
        except ConnectionClosed as exc:
            self.closes.append(str(exc))  # the server may drop a client (see docs/protocol.md): say why
            self.reconnects += 1
            self._connect()

    def close(self) -> None:
        self.ws.close()
        self._reader.join(5)


def _reserve_port() -> tuple[int, list[socket.socket]]:
    """A port held bound (not listening) on every address of both families."""
    while True:
        v4 = socket.socket()
        v4.bind(("0.0.0.0", 0))
        port = v4.getsockname()[1]
        v6 = socket.socket(socket.AF_INET6)
        v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            v6.bind(("::", port))
        except OSError:
            v4.close()
            v6.close()
            continue
        return port, [v4, v6]


#: The second client, in a process of its own so that the fuzzing threads' share of the GIL is
#: not what it measures: ``config get`` round trips, one every 5 ms, until its stdin closes;
#: then the times, sorted, in ms, as one JSON line.
TIMER = """
import json, sys, threading, time
from websockets.sync.client import connect
url, token = sys.argv[1:3]
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
times = []
with connect(url, subprotocols=["Bearer", token]) as ws:
    print("ready", flush=True)
    n = 0
    while not done.is_set():
        n += 1
        started = time.perf_counter()
        ws.send(json.dumps({"channel": "config", "type": "get", "id": n}))
        while json.loads(ws.recv(timeout=10)).get("id") != n:
            pass
        times.append((time.perf_counter() - started) * 1000)
        done.wait(0.005)
print(json.dumps(sorted(times)), flush=True)
"""

LISTENER = (
    "import socket, time\n"
    "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
    "print(s.getsockname()[1], flush=True); time.sleep(600)\n"
)


def _snapshot(tree: Path) -> dict:
    return {
        str(p.relative_to(tree)): (stat.S_IMODE(p.lstat().st_mode), p.read_bytes() if p.is_file() else None)
        for p in sorted(tree.rglob("*"))
    } | {".": stat.S_IMODE(tree.stat().st_mode)}


def _random_frame(rng: random.Random) -> bytes:
    """One WebSocket frame from a client that gets the framing wrong now and then: any opcode,
    FIN and reserved bits, unmasked, a length that lies or takes more bytes than it needs, a
    close frame with any code and reason, a payload that is not UTF-8."""
    opcode = rng.choice([0x1, 0x1, 0x0, 0x2, 0x8, 0x8, 0x8, 0x9, 0xA, 0x3, 0xB, 0xF])
    first = opcode | (0x80 if rng.random() < 0.85 else 0) | (rng.choice([0x10, 0x20, 0x40]) if rng.random() < 0.05 else 0)
    payload = rng.choice(
        [
            lambda: b'{"channel": "config", "type": "get", "id": "raw"}',
            lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40))),
            lambda: rng.randrange(0, 5200).to_bytes(2, "big") + bytes(rng.randrange(256) for _ in range(rng.randrange(0, 8))),
            lambda: rng.choice([1000, 1001, 3000, 4999]).to_bytes(2, "big") + "bye é".encode(),
            lambda: '{"x": "\ud800é"}'.encode("utf-8", "surrogatepass"),
        ]
    )()
    masked = rng.random() < 0.95
    n = len(payload) + (rng.randrange(1, 10) if rng.random() < 0.03 else 0)  # sometimes more than is sent
    form = rng.choice([0, 0, 0, 1, 2]) if n < 126 else rng.choice([1, 2])
    length = (
        bytes([n | (0x80 if masked else 0)])
        if form == 0
        else bytes([126 | (0x80 if masked else 0)]) + n.to_bytes(2, "big")
        if form == 1
        else bytes([127 | (0x80 if masked else 0)]) + n.to_bytes(8, "big")
    )
    if not masked:
        return bytes([first]) + length + payload
    mask = bytes(rng.randrange(256) for _ in range(4))
    return bytes([first]) + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _raw_garbage(server: Server, rng: random.Random) -> None:
    """One throwaway connection of random frames; or, now and then, of 4 EiB announced."""
    try:
        sock = raw_upgrade(server)
    except (OSError, AssertionError):
        return
    with sock:
        try:
            if rng.random() < 0.05:
                sock.sendall(b"\x81\xff" + (1 << 62).to_bytes(8, "big") + os.urandom(4) + os.urandom(1024))
            else:
                sock.sendall(b"".join(_random_frame(rng) for _ in range(rng.randrange(1, 6))))
            sock.settimeout(0.05)  # what the server does with a frame it keeps shows in its log
            while sock.recv(65536):
                pass
        except OSError:
            pass


def _dashboard_cookie(server: Server) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", f"/?token={server.token}")
    reply = conn.getresponse()
    reply.read()
    return reply.headers["Set-Cookie"].split(";")[0]


def test_random_messages_on_every_channel_never_break_the_server(tmp_path):
    allowed = tmp_path / "x"
    root = allowed / "y" / "root"
    outside = allowed / "outside"
    for directory in (root / "a" / "b", root / "d", outside / "sub"):
        directory.mkdir(parents=True)
    (root / "a" / "b" / "c.txt").write_text("hello\n")
    (root / "d" / "e.txt").write_text("e\n")
    (outside / "kept.txt").write_text("must stay\n")
    (outside / "sub" / "deeper.txt").write_text("this too\n")
    before = _snapshot(outside)
    shell = tmp_path / "safe-shell"
    shell.write_text("#!/bin/sh\nexec cat\n")  # `shell -l`, `shell -c ANYTHING`: cat
    shell.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()

    server = Server(
        "sockdiag",
        tmp_path / "state",
        "--workspace-root",
        str(root),
        "--shell",
        str(shell),
        "--agent-command",
        f"{sys.executable} {SCRIPTED}",
        "--agent-timeout",
        "2",
        "--max-message-bytes",
        str(64 << 10),
        env={"HOME": str(home), "AETHER_SOCKDIAG_INTERVAL": "0.05"},
    )
    guard = Guard(allowed, root)
    held: list[socket.socket] = []
    listeners: list[subprocess.Popen] = []
    processes = listeners  # everything started here, killed at the end

    def listen() -> None:
        proc = subprocess.Popen([sys.executable, "-S", "-c", LISTENER], stdout=subprocess.PIPE, text=True)
        listeners.append(proc)
        port = int(proc.stdout.readline())  # listening from now on, and ours
        with guard.lock:
            guard.killable.append(port)

    for _ in range(2):
        port, sockets = _reserve_port()
        held += sockets
        guard.reserved.append(port)
    for _ in range(3):
        listen()

    bad: list = []
    stop = threading.Event()

    def keep_listeners() -> None:
        # Killed listeners replaced, one at a time (a Python start costs ~30 ms of CPU).
        while not stop.is_set():
            with guard.lock:
                short = len(guard.killable) < 3
            if short:
                listen()
            stop.wait(0.1)

    def break_framing() -> None:
        rng = random.Random(seed + 1)
        while not stop.is_set():
            _raw_garbage(server, rng)
            stop.wait(0.01)

    cookie = _dashboard_cookie(server)
    origin = f"http://127.0.0.1:{server.port}"
    seed = random.randrange(1 << 32)
    try:
        fuzz = Client(server.connect, "token", bad)
        dashboard = Client(lambda: connect(server.url, additional_headers={"Cookie": cookie, "Origin": origin}), "cookie", bad)
        corpus: list = []

        @settings(
            max_examples=CORPUS // BATCH,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(st.lists(frames(guard, outside), min_size=BATCH, max_size=BATCH))
        def draw(batch) -> None:
            corpus.extend(batch)

        draw()

        def start_timer() -> subprocess.Popen:
            timer = subprocess.Popen(
                [sys.executable, "-c", TIMER, server.url, server.token],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
            processes.append(timer)
            assert timer.stdout.readline() == "ready\n"
            return timer

        def stop_timer(timer: subprocess.Popen) -> list[float]:
            timer.stdin.close()
            times = json.loads(timer.stdout.readline())
            assert timer.wait(10) == 0
            return times

        idle = start_timer()
        time.sleep(IDLE_SECONDS)  # the baseline: nothing else talks to the server meanwhile
        idle_latencies = stop_timer(idle)
        timer = start_timer()
        rng = random.Random(seed)
        helpers = [threading.Thread(target=target, daemon=True) for target in (break_framing, keep_listeners)]
        for helper in helpers:
            helper.start()
        totals = {"sent": 0, "withheld": 0}
        deadline = time.monotonic() + FUZZ_SECONDS
        for n in range(int(FUZZ_SECONDS * RATE)):
            if time.monotonic() > deadline:
                break
            item = corpus[n] if n < len(corpus) else rng.choice(corpus)
            if isinstance(item, dict):
                item = {**item, "id": n} if "id" not in item or n >= len(corpus) else dict(item)
                if item.get("type") == "kill" and guard.killable and rng.random() < 0.2:
                    item["port"] = rng.choice(guard.killable)
                elif "watchId" in item and rng.random() < 0.5:
                    item["watchId"] = rng.choice(watch_ids)
                frame = json.dumps(item)
                if n >= len(corpus) and rng.random() < 0.3:
                    frame = _mutate(frame, rng.randrange(5), rng.randrange(400), rng.choice('"{}[]:,\\0a\x00é'))
            else:
                frame = item
            if isinstance(frame, str):
                # A lone surrogate cannot go in a text frame (the client refuses to send it):
                # frames that are not UTF-8 are the framing thread's.
                frame = frame.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
            client = dashboard if n % 10 == 0 else fuzz
            if not guard.may_send(frame):
                totals["withheld"] += 1
                continue
            if isinstance(item, dict) and isinstance(item.get("id"), int):
                client.sent[item["id"]] = frame
            client.send(frame)
            totals["sent"] += 1
            time.sleep(max(0.0, deadline - FUZZ_SECONDS + (n + 1) / RATE - time.monotonic()))
        latencies = stop_timer(timer)
        stop.set()
        for helper in helpers:
            helper.join(15)
        # The server still answers, on a new connection, and what the fuzzing did left no error.
        with server.connect() as ws:
            ws.send('{"channel": "config", "type": "get", "id": "end"}')
            assert recv_until(ws, lambda m: m.get("id") == "end", timeout=10)["type"] == "config"
        fuzz.close()
        dashboard.close()
    finally:
        stop.set()
        code = server.stop()
        for proc in listeners:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for sock in held:
            sock.close()

    def percentiles(times: list[float]) -> str:
        return f"over {len(times)}: p50 {times[len(times) // 2]:.2f} ms, p99 {times[int(len(times) * 0.99)]:.2f} ms"

    print(
        f"\nfuzz (seed {seed}): {totals['sent']} frames sent in {FUZZ_SECONDS:g} s ({totals['withheld']} withheld as unsafe), "
        f"{fuzz.received + dashboard.received} received, {fuzz.reconnects + dashboard.reconnects} reconnects, "
        f"{guard.killed} kills of our listeners; config get round trip {percentiles(latencies)} "
        f"(idle just before, {percentiles(idle_latencies)}); closes: {sorted(set(fuzz.closes + dashboard.closes))[:5]}"
    )
    kinds = fuzz.kinds + dashboard.kinds
    print(
        "answered:",
        ", ".join(f"{c}.{t}{'/' + str(code) if code is not None else ''} {n}" for (c, t, code), n in kinds.most_common()),
    )
    assert not bad, bad[:5]
    errors = [line for line in server.log if line.get("level") in ("error", "critical")]
    # Whole lines, tracebacks included: pytest's repr of a list would cut them off.
    assert not errors, "\n".join(json.dumps(line) for line in errors[:5])
    stderr = "".join(server.raw_stderr)
    assert "Traceback" not in stderr, stderr[stderr.index("Traceback") - 2000 :][:6000]
    assert code == 0
    assert _snapshot(outside) == before
    assert totals["sent"] > FUZZ_SECONDS * RATE / 2
