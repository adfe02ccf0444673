"""A hostile process swaps a directory the client works in for a symbolic link that leads
outside the workspace root, as fast as the kernel lets it, while real clients of a real server
run every files operation under it. Nothing outside may change, be created, be read or be
watched; every answer is a result or a clear refusal. Both of the resolver's paths: openat2,
and the walk that stands in where the kernel has none."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
from support.servers import Server

#: How long the swap loop runs against the clients.
RACE_SECONDS = 20.0
CLIENTS = 3
#: Requests a client sends before reading their replies (their order is kept per connection).
PIPELINE = 24

SWAPPER = r"""
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
a, b, seconds, noise = os.fsencode(sys.argv[1]), os.fsencode(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
AT_FDCWD, RENAME_EXCHANGE = -100, 2
swaps = 0
print("ready", flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    if libc.renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE) != 0:
        sys.exit(f"renameat2: {os.strerror(ctypes.get_errno())}")
    swaps += 1
    if swaps % 1000 == 0:
        os.utime(noise)  # an event for whatever watches the outside directory
print(swaps, flush=True)
"""

OUTSIDE_TEXT = b"OUTSIDE, must stay as it is"
MARKER = "outside-only-marker"
#: Touched outside by the swapper all along: no watch may ever tell of it.
NOISE = "noise-from-outside"
#: What a race may answer besides a result: the path led outside at that moment, or was not
#: there; or another client's operation got there first.
RACE_CODES = {"forbidden", "not_found", "exists", "not_empty"}


def fingerprint(base: Path) -> dict:
    """Every name below ``base`` (and ``base`` itself): kind, mode, owner, mtime, the sha256
    of a file's bytes, a link's target. A directory's mtime changes when anything is created
    in it or removed from it, even if it is gone again."""

    def one(path: Path) -> tuple:
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None
        target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
        return stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns, digest, target

    seen = {".": one(base)}
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if name != NOISE:
                seen[str(path.relative_to(base))] = one(path)
    return seen


def make_outside(outside: Path) -> None:
    """The names the clients use under ``race/d``, outside: each operation that lands here
    overwrites, deletes or lists something."""
    for name in ("f", "g", "victim", MARKER, "f0", "f1", "f2"):
        (outside / name).write_bytes(OUTSIDE_TEXT)
    for k in range(CLIENTS):
        (outside / f"p{k}" / "q").mkdir(parents=True)
        (outside / f"p{k}" / "keep").write_bytes(OUTSIDE_TEXT)
        (outside / f"c{k}" / "x").mkdir(parents=True)
        (outside / f"c{k}" / "x" / "y").write_bytes(OUTSIDE_TEXT)
    (outside / NOISE).write_bytes(OUTSIDE_TEXT)
    (outside / "sub").mkdir()
    (outside / "sub" / "x").write_bytes(OUTSIDE_TEXT)
    os.chmod(outside / "g", 0o600)


def round_of(k: int) -> list[dict]:
    """One client's requests for one round, every operation under ``race/d/``."""
    d = "race/d"
    return [
        {"type": "write", "path": f"{d}/f", "content": f"inside {k}"},
        {"type": "write", "path": f"{d}/g", "content": "zz", "offset": 0},
        {"type": "write", "path": f"{d}/g", "content": "y", "offset": 1},
        {"type": "write", "path": f"{d}/victim", "content": "v"},
        {"type": "stat", "path": f"{d}/f"},
        {"type": "stat", "path": f"{d}/sub/x"},
        {"type": "read", "path": f"{d}/f"},
        {"type": "read", "path": f"{d}/{MARKER}"},
        {"type": "list", "path": d},
        {"type": "list", "path": f"{d}/sub"},
        {"type": "mkdir", "path": f"{d}/m{k}"},
        {"type": "mkdir", "path": f"{d}/p{k}/q", "parents": True},
        {"type": "write", "path": f"{d}/c{k}/x/y", "content": "made", "createParents": True},
        {"type": "rename", "from": f"{d}/f", "to": f"{d}/f{k}"},
        {"type": "rename", "from": f"{d}/f{k}", "to": f"{d}/f", "overwrite": True},
        {"type": "delete", "path": f"{d}/victim"},
        {"type": "delete", "path": f"{d}/m{k}"},
        {"type": "delete", "path": f"{d}/p{k}", "recursive": True},
        {"type": "delete", "path": f"{d}/c{k}", "recursive": True},
        {"type": "delete", "path": f"{d}/sub/x"},
        {"type": "write", "path": f"{d}/sub/x", "content": "x", "createParents": True},
        {"type": "watch", "path": d, "recursive": True},
    ]


class Client(threading.Thread):
    """One connection sending rounds of requests, ``PIPELINE`` at a time, until ``stop``."""

    def __init__(self, server: Server, k: int, stop: threading.Event):
        super().__init__(daemon=True)
        self.server, self.k, self.stop = server, k, stop
        self.codes: Counter = Counter()
        self.leaks: list[dict] = []
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            with self.server.connect(max_size=None) as ws:
                self._loop(ws)
        except BaseException as exc:  # surfaced by the test
            self.failure = exc

    def _loop(self, ws) -> None:
        next_id = 0
        queue: list[dict] = []
        while not self.stop.is_set():
            if not queue:
                queue = round_of(self.k)
            batch, queue = queue[:PIPELINE], queue[PIPELINE:]
            pending = {}
            for request in batch:
                next_id += 1
                pending[next_id] = request
                ws.send(json.dumps({"channel": "files", "id": next_id, **request}))
            watches = []
            while pending:
                msg = json.loads(ws.recv(timeout=30))
                if msg.get("channel") != "files":
                    continue
                self._check(msg)
                if "id" not in msg:
                    continue  # a watch's event
                request = pending.get(msg["id"])
                if request is None:
                    continue
                if msg["type"] == "error":
                    self.codes[f"{request['type']} {msg['code']}"] += 1
                    del pending[msg["id"]]
                elif msg["type"] in ("read", "list") and not msg["eof"]:
                    continue
                else:
                    self.codes[f"{request['type']} ok"] += 1
                    del pending[msg["id"]]
                    if msg["type"] == "watch":
                        watches.append(msg["watchId"])
            for watch_id in watches:
                next_id += 1
                ws.send(json.dumps({"channel": "files", "type": "unwatch", "watchId": watch_id, "id": next_id}))
                while True:
                    msg = json.loads(ws.recv(timeout=30))
                    if msg.get("channel") == "files":
                        self._check(msg)
                    if msg.get("id") == next_id:
                        break

    def _check(self, msg: dict) -> None:
        """Whatever came from outside: its contents, or its names."""
        text = json.dumps(msg)
        if OUTSIDE_TEXT.decode() in text or NOISE in text or MARKER in text.replace(f"race/d/{MARKER}", ""):
            self.leaks.append(msg)


@pytest.mark.slow
@pytest.mark.parametrize("resolver", ["openat2", "walk"])
def test_a_directory_swapped_for_a_link_out_never_leads_outside(tmp_path, resolver):
    root = tmp_path / "root"
    outside = tmp_path / "outside-dir"
    (root / "race" / "d" / "sub").mkdir(parents=True)
    (root / "race" / "d" / "g").write_text("inside g")
    os.symlink(str(outside), root / "race" / "alt")
    outside.mkdir()
    make_outside(outside)
    before = fingerprint(outside)
    env = {"AETHER_FILES_NO_OPENAT2": "1"} if resolver == "walk" else {"AETHER_FILES_NO_OPENAT2": "0"}
    server = Server("sockdiag", tmp_path / "state", "--workspace-root", str(root), env=env)
    stop = threading.Event()
    clients = [Client(server, k, stop) for k in range(CLIENTS)]
    try:
        for client in clients:
            client.start()
        swapper = subprocess.Popen(
            [sys.executable, "-c", SWAPPER, "race/d", "race/alt", str(RACE_SECONDS), str(outside / NOISE)],
            cwd=root,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert swapper.stdout.readline().strip() == "ready"
        swaps = int(swapper.stdout.readline())
        assert swapper.wait() == 0
        stop.set()
        for client in clients:
            client.join(60)
        failures = [c.failure for c in clients if c.failure is not None]
        assert not failures, failures
    finally:
        stop.set()
        server.stop()
    codes = sum((c.codes for c in clients), Counter())
    print(f"{swaps} swaps; answers: {dict(sorted(codes.items()))}")
    assert swaps > 1000 and sum(codes.values()) > 1000
    assert fingerprint(outside) == before
    assert not [m for c in clients for m in c.leaks]
    assert not [k for k in codes if k.split()[1] not in RACE_CODES | {"ok"}], codes
    # every operation went through under the swaps some of the time
    done = {k.split()[0] for k, n in codes.items() if k.endswith(" ok")}
    assert done == {"write", "stat", "read", "list", "mkdir", "rename", "delete", "watch"}, codes
    assert not [m for m in server.log if m.get("msg") == "request failed"]
    assert [m["resolver"] for m in server.log if m.get("msg") == "files: paths resolved beneath the workspace root"] == [resolver]
    temps = [p for base in (root, outside) for p in base.rglob(".aether-write-*")]
    assert not temps
