"""The ``files`` channel through a real `aether serve` and the real websockets client."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.servers import Server

from aether.files.watch import WINDOW_SECONDS

CHUNK = 256 << 10


@pytest.fixture
def root(tmp_path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


@pytest.fixture
def server(tmp_path, root):
    server = Server("sockdiag", tmp_path / "state", "--workspace-root", str(root))
    yield server
    server.stop()


class Files:
    """A connection speaking the files channel: requests by id, events kept aside."""

    def __init__(self, ws):
        self.ws = ws
        self.ids = 0
        self.events: list[dict] = []
        self.replies: dict[int, list[dict]] = {}
        self.sizes: list[int] = []

    def _next(self, timeout: float) -> dict:
        while True:
            raw = self.ws.recv(timeout=timeout)
            msg = json.loads(raw)
            if msg["channel"] != "files":
                continue
            self.sizes.append(len(raw.encode()))
            if "id" in msg:
                self.replies.setdefault(msg["id"], []).append(msg)
            else:
                self.events.append(msg)
            return msg

    def send(self, type_: str, **fields) -> int:
        self.ids += 1
        self.ws.send(json.dumps({"channel": "files", "type": type_, "id": self.ids, **fields}))
        return self.ids

    def reply(self, id_: int, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while not self.replies.get(id_):
            self._next(max(0.01, deadline - time.monotonic()))
        return self.replies[id_].pop(0)

    def request(self, type_: str, **fields) -> dict:
        return self.reply(self.send(type_, **fields))

    def ok(self, type_: str, **fields) -> dict:
        msg = self.request(type_, **fields)
        assert msg["type"] == type_, msg
        return msg

    def error(self, type_: str, code: str, **fields) -> dict:
        id_ = self.send(type_, **fields)
        msg = self.reply(id_)
        assert msg["type"] == "error" and msg["code"] == code, msg
        assert msg["channel"] == "files" and msg["id"] == id_
        if "path" in fields:
            assert msg["path"] == fields["path"] and fields["path"] in msg["message"]
        return msg

    def read(self, path: str, **fields) -> tuple[bytes, list[dict]]:
        id_ = self.send("read", path=path, **fields)
        chunks = [self.reply(id_)]
        while chunks[-1]["type"] == "read" and not chunks[-1]["eof"]:
            chunks.append(self.reply(id_))
        assert chunks[-1]["type"] == "read", chunks[-1]
        data = b"".join(c["content"].encode() if c["encoding"] == "utf-8" else base64.b64decode(c["content"]) for c in chunks)
        return data, chunks

    def collect(self, seconds: float) -> list[dict]:
        """The events that arrive within ``seconds``, and any kept from before."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                self._next(remaining)
            except TimeoutError:
                break
        events, self.events = self.events, []
        return events

    def wait_for(self, predicate, timeout: float = 5.0) -> list[dict]:
        """Events until one matches; all of them."""
        seen: list[dict] = []
        deadline = time.monotonic() + timeout
        while True:
            while self.events:
                seen.append(self.events.pop(0))
                if predicate(seen[-1]):
                    return seen
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no matching event; saw {seen}"
            try:
                self._next(remaining)
            except TimeoutError:
                pass


def shell(script: str, cwd: Path) -> None:
    subprocess.run(["sh", "-c", script], cwd=cwd, check=True)


def brief(events: list[dict]) -> list[tuple]:
    return [(e["type"], e["path"], e["kind"], e.get("from")) for e in events]


def test_list_stat_mkdir_rename_delete(server, root):
    (root / "z.txt").write_text("zz")
    os.symlink("z.txt", root / "link")
    with server.connect() as ws:
        f = Files(ws)
        assert f.ok("mkdir", path="d")["path"] == "d"
        assert f.ok("mkdir", path=str(root / "p/q"), parents=True)["path"] == "p/q"
        f.error("mkdir", "exists", path="d")
        listing = f.ok("list", path=".")
        assert listing["path"] == "." and listing["eof"] is True and listing["total"] == 4
        assert [(e["name"], e["type"]) for e in listing["entries"]] == [
            ("d", "directory"),
            ("link", "symlink"),
            ("p", "directory"),
            ("z.txt", "file"),
        ]
        assert listing["entries"][1]["target"] == "z.txt"
        stat = f.ok("stat", path="./z.txt")
        assert stat["path"] == "z.txt"
        assert {k: stat["stat"][k] for k in ("name", "type", "size", "mode")} == {
            "name": "z.txt",
            "type": "file",
            "size": 2,
            "mode": "0644",
        }
        assert isinstance(stat["stat"]["mtime"], int)
        assert f.ok("rename", **{"from": "z.txt", "to": "d/y.txt"}) | {"id": 0} == {
            "channel": "files",
            "type": "rename",
            "from": "z.txt",
            "to": "d/y.txt",
            "id": 0,
        }
        f.error("rename", "exists", **{"from": "p", "to": "d"})
        f.error("list", "not_a_directory", path="d/y.txt")
        f.error("delete", "not_empty", path="d")
        assert f.ok("delete", path="d", recursive=True)["path"] == "d"
        assert f.ok("delete", path="link")["path"] == "link"
        f.error("delete", "forbidden", path=".")
        f.error("stat", "not_found", path="d")
    assert sorted(p.name for p in root.iterdir()) == ["p"]


def test_text_and_binary_round_trips(server, root):
    text = "x" * (CHUNK - 2) + "€é😀" * 2000 + "\n"  # € straddles the first chunk's end
    blob = os.urandom(CHUNK + 12345)
    with server.connect() as ws:
        f = Files(ws)
        assert f.ok("write", path="t.txt", content=text)["size"] == len(text.encode())
        assert f.ok("write", path="b.bin", content=base64.b64encode(blob).decode(), encoding="base64")["size"] == len(blob)
        data, chunks = f.read("t.txt")
        assert data.decode() == text and (root / "t.txt").read_text() == text
        assert [c["encoding"] for c in chunks] == ["utf-8", "utf-8"]
        assert chunks[1]["offset"] == chunks[0]["length"] == CHUNK - 2
        data, chunks = f.read("b.bin")
        assert data == blob and [c["encoding"] for c in chunks] == ["base64", "base64"]
        assert [(c["offset"], c["size"], c["eof"]) for c in chunks] == [(0, len(blob), False), (CHUNK, len(blob), True)]
        assert f.read("t.txt", offset=CHUNK - 2, length=3)[0] == "€".encode()
        assert max(f.sizes) < 1 << 20


def test_a_name_that_is_not_utf8_round_trips_through_json(server, root):
    (root / os.fsdecode(b"caf\xe9.txt")).write_bytes(b"latin-1 name")
    with server.connect() as ws:
        f = Files(ws)
        [entry] = f.ok("list", path=".")["entries"]
        assert entry["name"] == "caf\udce9.txt"  # sent as the JSON escape \udce9
        assert f.read(entry["name"])[0] == b"latin-1 name"
        assert f.request("read", path="\ud800")["code"] == "bad_message"  # no file has this name


def test_large_file_in_chunks_both_ways(server, root):
    blob = os.urandom(5_000_000)
    piece = 512 << 10
    with server.connect() as ws:
        f = Files(ws)
        first = base64.b64encode(blob[:piece]).decode()
        f.ok("write", path="big.bin", content=first, encoding="base64")
        for offset in range(piece, len(blob), piece):
            part = base64.b64encode(blob[offset : offset + piece]).decode()
            assert f.ok("write", path="big.bin", content=part, encoding="base64", offset=offset)["size"] == len(
                blob[offset : offset + piece]
            )
        assert (root / "big.bin").read_bytes() == blob
        data, chunks = f.read("big.bin")
        assert data == blob and len(chunks) == -(-len(blob) // CHUNK)
        parts = [f.read("big.bin", offset=o, length=2_000_000)[0] for o in range(0, len(blob), 2_000_000)]
        assert b"".join(parts) == blob
        assert max(f.sizes) < 1 << 20


def test_a_read_waits_for_a_slow_client(server, root):
    """20 MB to a client that reads nothing for a while: without flow control the server
    would queue it all and drop the client at its 4 MiB cap."""
    blob = os.urandom(20 << 20)
    (root / "huge.bin").write_bytes(blob)
    with server.connect(max_queue=16) as ws:  # websockets reads no more behind 16 unread frames
        f = Files(ws)
        id_ = f.send("read", path="huge.bin")
        # Nothing to wait for: the server holds still. Without flow control it queued the
        # file and dropped the client 0.2-0.3 s after the request (measured), within this.
        time.sleep(0.5)
        chunks = [f.reply(id_)]
        while not chunks[-1]["eof"]:
            chunks.append(f.reply(id_))
        assert b"".join(base64.b64decode(c["content"]) for c in chunks) == blob
    assert not [line for line in server.log if line.get("msg") == "dropping client"]


def test_many_reads_at_once_wait_for_a_slow_client(server, root):
    """20 reads sent together to a client that pauses: every chunk waits its turn, where each
    read sent its first chunk at once and together they passed the 4 MiB the server holds."""
    blobs = [os.urandom(1 << 20) for _ in range(20)]
    for i, blob in enumerate(blobs):
        (root / f"b{i}").write_bytes(blob)
    with server.connect(max_size=None, max_queue=16) as ws:
        f = Files(ws)
        ids = [f.send("read", path=f"b{i}") for i in range(len(blobs))]
        time.sleep(0.5)  # as above: nothing happens, where it would be a drop within this
        for id_, blob in zip(ids, blobs):
            chunks = [f.reply(id_)]
            while chunks[-1]["type"] == "read" and not chunks[-1]["eof"]:
                chunks.append(f.reply(id_))
            assert b"".join(base64.b64decode(c["content"]) for c in chunks) == blob
    assert not [line for line in server.log if line.get("msg") == "dropping client"]


def test_directory_renames_in_a_large_watch(server, root):
    """Another process renames directories inside a recursive watch of 2,000 thousands times,
    one move with 100 directories in it: other requests are answered meanwhile, and after it
    every directory is watched where it is."""
    for i in range(19):
        for j in range(100):
            (root / f"d{i}" / f"e{j}").mkdir(parents=True)
    (root / "spin").mkdir()
    dirs = 19 * 101 + 2
    storm = """
import os
for k in range(10000):
    os.rename("spin", "spun"); os.rename("spun", "spin")
    if k % 10 == 0:
        os.rename("d0", "d1/x"); os.rename("d1/x", "d0")
"""
    with server.connect() as ws, server.connect() as other:
        f = Files(ws)
        f.ok("watch", path=".", recursive=True)
        proc = subprocess.Popen([sys.executable, "-c", storm], cwd=root)
        worst = 0.0
        while proc.poll() is None:
            started = time.monotonic()
            other.send(json.dumps({"channel": "config", "type": "get", "id": 1}))
            while json.loads(other.recv(timeout=10))["channel"] != "config":
                pass
            worst = max(worst, time.monotonic() - started)
        assert proc.wait() == 0
        f.collect(0.3)
        (root / "d0" / "e5" / "new.txt").write_text("x")
        assert f.wait_for(lambda e: e["path"] == "d0/e5/new.txt")[-1]["type"] == "created"
        held = sum(_files_watches(server).values())
        assert held == dirs
    assert worst < 0.5, worst  # a rename rewrote every path below the tree: seconds


def test_errors_carry_id_path_and_cause(server, root):
    (root / "d").mkdir()
    os.mkfifo(root / "fifo")
    with open(root / "sparse", "wb") as fh:
        fh.truncate((64 << 20) + 1)
    with server.connect() as ws:
        f = Files(ws)
        f.error("read", "is_a_directory", path="d")
        f.error("read", "invalid", path="fifo")
        assert "offset" in f.error("read", "too_large", path="sparse")["message"]
        f.error("read", "too_large", path="sparse", length=(64 << 20) + 1)
        assert f.read("sparse", offset=64 << 20)[0] == b"\0"
        f.error("read", "not_found", path="nope.txt")
        f.error("write", "not_found", path="x/y.txt", content="1")
        assert f.ok("write", path="x/y.txt", content="1", createParents=True)["path"] == "x/y.txt"
        f.error("write", "invalid", path="b.bin", content="not base64!", encoding="base64")
        f.error("write", "is_a_directory", path="d", content="1")
        f.error("write", "not_found", path="new.bin", content="1", offset=5)
        f.error("unwatch", "not_found", watchId="w9")
        f.error("watch", "not_a_directory", path="x/y.txt")
        bad = f.request("read", path=5)
        assert bad["code"] == "bad_message" and bad["id"] == f.ids


def test_escapes_are_forbidden_and_touch_nothing(server, root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    os.symlink(str(outside), root / "link_out")
    (root / "a.txt").write_text("a")
    before = sorted((p.name, p.read_bytes()) for p in outside.iterdir())
    with server.connect() as ws:
        f = Files(ws)
        for type_, fields in [
            ("read", {"path": "../outside/secret"}),
            ("read", {"path": "/etc/passwd"}),
            ("read", {"path": "link_out/secret"}),
            ("list", {"path": "link_out"}),
            ("list", {"path": ".."}),
            ("write", {"path": "link_out/secret", "content": "pwned"}),
            ("write", {"path": "../outside/new", "content": "pwned"}),
            ("write", {"path": "link_out/new", "content": "pwned", "createParents": True}),
            ("mkdir", {"path": "link_out/dir"}),
            ("delete", {"path": "link_out/secret"}),
            ("delete", {"path": str(outside / "secret")}),
            ("watch", {"path": "link_out"}),
        ]:
            f.error(type_, "forbidden", **fields)
        f.error("rename", "forbidden", **{"from": "a.txt", "to": "link_out/a.txt"})
        f.error("rename", "forbidden", **{"from": "link_out/secret", "to": "stolen"})
        # the link itself is the workspace's to remove; what it points at stays
        assert f.ok("stat", path="link_out")["stat"]["type"] == "symlink"
        f.ok("delete", path="link_out", recursive=True)
    assert sorted((p.name, p.read_bytes()) for p in outside.iterdir()) == before
    assert sorted(p.name for p in root.iterdir()) == ["a.txt"]


def test_watch_sees_another_process(server, root):
    (root / "old.txt").write_text("old")
    with server.connect() as ws:
        f = Files(ws)
        watch = f.ok("watch", path=".")
        assert watch["watchId"] == "w1" and watch["path"] == "." and watch["recursive"] is False
        step = 0.15  # longer than a coalescing window: each step is told apart
        subprocess.run(
            [
                sys.executable,
                "-c",
                f"""
import os, time
open("new.txt", "w").write("1"); time.sleep({step})
open("new.txt", "a").write("2"); time.sleep({step})
os.rename("new.txt", "renamed.txt"); time.sleep({step})
os.unlink("old.txt"); time.sleep({step})
os.mkdir("dir")
""",
            ],
            cwd=root,
            check=True,
        )
        events = f.wait_for(lambda e: e["path"] == "dir")
        assert all(e["watchId"] == "w1" and e["channel"] == "files" for e in events)
        # The first write can come a read after the file's creation, and so a window later
        # (as documented): a repeated modified is one.
        told = brief(events)
        assert [e for i, e in enumerate(told) if i == 0 or e != told[i - 1]] == [
            ("created", "new.txt", "file", None),
            ("modified", "new.txt", "file", None),
            ("moved", "renamed.txt", "file", "new.txt"),
            ("deleted", "old.txt", "file", None),
            ("created", "dir", "directory", None),
        ]


def test_recursive_watch_and_moves_in_and_out(server, root, tmp_path):
    (root / "src").mkdir()
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "inner").mkdir(parents=True)
    with server.connect() as ws:
        f = Files(ws)
        assert f.ok("watch", path="src", recursive=True)["path"] == "src"
        shell("mkdir -p new/deep && echo hi > new/deep/file.txt", root / "src")
        events = f.wait_for(lambda e: e["path"] == "src/new/deep/file.txt")
        assert ("created", "src/new", "directory", None) in brief(events)
        f.collect(0.2)
        shell("echo more >> new/deep/file.txt", root / "src")
        assert brief(f.wait_for(lambda e: True)) == [("modified", "src/new/deep/file.txt", "file", None)]
        quick = f"""
import os
os.rename("new/deep", {str(root / "moved_out")!r}); os.rename({str(elsewhere)!r}, "in")
"""
        subprocess.run([sys.executable, "-c", quick], cwd=root / "src", check=True)
        events = f.wait_for(lambda e: e["path"] == "src/in")
        assert brief(events) == [("deleted", "src/new/deep", "directory", None), ("created", "src/in", "directory", None)]
        # the directory that moved in is watched; the one that left is not
        shell(f"touch in/inner/x && touch {root}/moved_out/file.txt", root / "src")
        assert brief(f.wait_for(lambda e: True)) == [("created", "src/in/inner/x", "file", None)]
        quick = """
import os
os.rename("in", "again"); os.rename("again", "renamed"); open("renamed/inner/y", "w").close()
"""
        subprocess.run([sys.executable, "-c", quick], cwd=root / "src", check=True)
        events = f.wait_for(lambda e: e["path"] == "src/renamed/inner/y")
        assert brief(events) == [
            ("moved", "src/renamed", "directory", "src/in"),
            ("created", "src/renamed/inner/y", "file", None),
        ]
        shell("rm -r src", root)
        assert brief(f.wait_for(lambda e: e["path"] == "src"))[-1] == ("deleted", "src", "directory", None)
        # the watch ended with its directory
        f.error("unwatch", "not_found", watchId="w1")


@pytest.mark.slow
def test_a_save_storm_is_a_few_events(server, root):
    with server.connect() as ws:
        f = Files(ws)
        f.ok("watch", path=".", recursive=True)
        started = time.monotonic()
        storm = """
import time
for n in range(2000):
    with open("storm.txt", "w") as fh:
        fh.write(str(n))
    time.sleep(0.0004)
"""
        subprocess.run([sys.executable, "-c", storm], cwd=root, check=True)
        elapsed = time.monotonic() - started
        events = f.collect(0.5)
    # At most one per window while the storm lasted (2,000 writes: 1 to 2.5 s, more under
    # load), and the last one after it.
    assert 1 <= len(events) <= elapsed / WINDOW_SECONDS + 2, (len(events), elapsed)
    assert events[0]["type"] == "created" and {e["path"] for e in events} == {"storm.txt"}


def test_thousands_of_files_at_once_overflow(server, root):
    for i in range(5000):
        (root / f"f{i}").touch()
    with server.connect() as ws:
        f = Files(ws)
        f.ok("watch", path=".")
        # utime is a few microseconds a file: thousands of paths fall in one window
        subprocess.run([sys.executable, "-c", "import os; [os.utime(f'f{i}') for i in range(5000)]"], cwd=root, check=True)
        events = f.wait_for(lambda e: e["type"] == "overflow", 10)
    assert events[-1] == {"type": "overflow", "watchId": "w1", "channel": "files"}
    assert len(events) < 2000


def test_unwatch_stops_events_and_shutdown_is_clean(server, root):
    with server.connect() as ws:
        f = Files(ws)
        f.ok("watch", path=".")
        shell("touch one", root)
        assert brief(f.wait_for(lambda e: True)) == [("created", "one", "file", None)]
        assert f.ok("unwatch", watchId="w1")["watchId"] == "w1"
        shell("touch two", root)
        # Nothing to wait for: an event of w1's would be sent within a coalescing window
        # (WINDOW_SECONDS, 50 ms) of inotify's, and its first one at once. Another watch's
        # event is no sign: each watch gathers its own window.
        assert f.collect(0.3) == []
        assert f.ok("watch", path=".", recursive=True)["watchId"] == "w2"
        f.send("read", path="one")
        # shutting down with a watch and a read under way is clean
        assert server.stop() == 0
    assert not [line for line in server.raw_stderr if "Traceback" in line]
    assert not [line for line in server.log if line.get("level") == "error"]


def _files_watches(server) -> dict[str, int]:
    """The files channel's inotify instances in the server, and the watches each holds. The
    server's other instance, the port attributes' (aether.attributes.live), is told apart by
    its watch of the state directory, which the files channel never watches."""
    pid = server.proc.pid
    state = f"ino:{os.stat(server.state_dir).st_ino:x} "
    found = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:inotify":
                continue
            info = open(f"/proc/{pid}/fdinfo/{fd}").read()
        except FileNotFoundError:
            continue
        if state not in info:
            found[fd] = info.count("inotify wd:")
    return found


def test_watches_end_with_the_connection(server, root):
    with server.connect() as ws:
        f = Files(ws)
        f.ok("watch", path=".", recursive=True)
    shell("mkdir made_while_away && echo x > made_while_away/f", root)
    with server.connect() as ws:
        f = Files(ws)
        f.error("unwatch", "not_found", watchId="w1")
        assert f.events == []  # nothing replayed (the protocol says so): it would have come before the reply
        assert [e["name"] for e in f.ok("list", path=".")["entries"]] == ["made_while_away"]
        assert f.read("made_while_away/f")[0] == b"x\n"
    # with no watch left, the inotify instance is closed
    assert _files_watches(server) == {}
