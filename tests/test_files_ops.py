"""The files channel's blocking operations, confinement and coalescing, without sockets."""

from __future__ import annotations

import asyncio
import base64
import os
import stat
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aether.files import FileError, beneath, ops, reading, writing
from aether.files.coalescer import Coalescer
from aether.files.dirs import Directories
from aether.files.inotify import IN_CREATE, IN_ISDIR, IN_MOVED_FROM, IN_MOVED_TO, Event, Instance, parse
from aether.files.paths import inside, resolve
from aether.files.watch import WatchTree
from aether.server.channels.files import list_pages

CHUNK = reading.CHUNK_BYTES


@pytest.fixture(autouse=True, params=["openat2", "walk"])
def resolver(request, monkeypatch):
    """Every test here runs on both of the resolver's paths: openat2, and the walk of one
    component at a time that stands in where the kernel has none (see ``beneath``)."""
    if request.param == "walk":
        monkeypatch.setattr(beneath, "OPENAT2", False)
    elif not beneath.has_openat2():
        pytest.skip("this kernel has no openat2 (Linux 5.6+)")
    return request.param


def make_tree(base: Path) -> tuple[str, Path]:
    """A root with files, a directory, and links in and out; an outside directory beside it."""
    outside = base / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "secret").write_text("secret")
    root = base / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "f").write_text("f")
    (root / "b").mkdir()
    os.symlink("a", root / "link_in")
    os.symlink(str(outside), root / "link_out")
    os.symlink("../../outside/secret", root / "a" / "link_secret")
    os.symlink(".", root / "link_root")
    return os.path.realpath(root), outside


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path)


def snapshot(base: Path, skip: str = "root") -> dict:
    """Everything outside the root: names, kinds, contents, link targets, modes."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(base):
        if Path(dirpath) == base:
            dirnames[:] = [d for d in dirnames if d != skip]
            filenames = [f for f in filenames if f != skip]
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st_ = path.lstat()
            content = path.read_bytes() if stat.S_ISREG(st_.st_mode) else None
            target = os.readlink(path) if path.is_symlink() else None
            seen[str(path.relative_to(base))] = (stat.S_IFMT(st_.st_mode), st_.st_mode & 0o7777, content, target)
    return seen


def code_of(fn, *args, **kw) -> str:
    with pytest.raises(FileError) as caught:
        fn(*args, **kw)
    return caught.value.code


def read_all(root: str, path: str, offset: int = 0, length=None) -> tuple[bytes, list[dict]]:
    reader = reading.Reader(root, path, offset, length)
    chunks = []
    try:
        while True:
            chunk = reader.next()
            chunks.append(chunk)
            if chunk["eof"]:
                break
    finally:
        reader.close()
    data = b"".join(c["content"].encode() if c["encoding"] == "utf-8" else base64.b64decode(c["content"]) for c in chunks)
    return data, chunks


# -- round trips ------------------------------------------------------------------------


def test_list_and_stat(tree):
    root, _ = tree
    rel, entries = ops.list_dir(root, ".")
    assert rel == "."
    assert [e["name"] for e in entries] == ["a", "b", "link_in", "link_out", "link_root"]
    by_name = {e["name"]: e for e in entries}
    assert by_name["a"]["type"] == "directory"
    assert by_name["link_out"]["type"] == "symlink" and by_name["link_out"]["target"].endswith("outside")
    assert by_name["link_in"]["target"] == "a"
    f = ops.list_dir(root, "a")[1][0]
    assert f["name"] == "f" and f["type"] == "file" and f["size"] == 1 and f["mode"] == "0644"
    assert abs(f["mtime"] - os.stat(Path(root) / "a" / "f").st_mtime * 1000) < 2
    assert ops.stat(root, "a/f") == ("a/f", f)
    assert ops.stat(root, ".")[1]["type"] == "directory"
    # stat is of the link itself, even one that leads outside
    assert ops.stat(root, "link_out")[1]["type"] == "symlink"
    assert ops.list_dir(root, "link_in/")[0] == "link_in"
    assert ops.list_dir(root, str(Path(root) / "a"))[0] == "a"
    assert code_of(ops.list_dir, root, "a/f") == "not_a_directory"
    assert code_of(ops.list_dir, root, "nope") == "not_found"
    assert code_of(ops.stat, root, "nope") == "not_found"


def test_write_replace_keeps_mode_and_links(tree):
    root, _ = tree
    assert writing.write(root, "new.txt", b"hello") == ("new.txt", 5)
    path = Path(root) / "new.txt"
    assert path.read_bytes() == b"hello"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 & ~0o022
    path.chmod(0o600)
    writing.write(root, "new.txt", b"again")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_bytes() == b"again"
    # through a link inside the root: the link stays, its target changes
    writing.write(root, "link_in/f", b"through")
    assert (Path(root) / "a" / "f").read_bytes() == b"through" and (Path(root) / "link_in").is_symlink()
    os.symlink("a/f", Path(root) / "file_link")
    writing.write(root, "file_link", b"via link")
    assert (Path(root) / "file_link").is_symlink() and (Path(root) / "a" / "f").read_bytes() == b"via link"
    assert not [p for p in Path(root).rglob("*.tmp")]


def test_write_errors_and_parents(tree):
    root, _ = tree
    assert code_of(writing.write, root, "x/y/z.txt", b"1") == "not_found"
    assert writing.write(root, "x/y/z.txt", b"1", create_parents=True) == ("x/y/z.txt", 1)
    assert code_of(writing.write, root, "a", b"1") == "is_a_directory"
    assert code_of(writing.write, root, "a/f/g", b"1") == "not_a_directory"
    assert code_of(writing.decode_content, "!!!", "base64", "p") == "invalid"
    assert writing.decode_content("aGk=", "base64", "p") == b"hi"
    assert writing.decode_content("é", "utf-8", "p") == "é".encode()
    os.mkfifo(Path(root) / "fifo")
    assert code_of(writing.write, root, "fifo", b"1") == "invalid"


def test_offset_writes_go_in_place(tree):
    root, _ = tree
    assert code_of(writing.write, root, "up.bin", b"x", offset=3) == "not_found"
    writing.write(root, "up.bin", b"0123", offset=0)  # offset 0, no file: created
    writing.write(root, "up.bin", b"4567", offset=4)
    writing.write(root, "up.bin", b"ab", offset=0)  # in place, no truncation
    assert (Path(root) / "up.bin").read_bytes() == b"ab234567"
    assert code_of(writing.write, root, "up.bin", b"x", offset=9) == "invalid"


def test_hard_links_are_not_written_in_place(tree):
    """A hard link in the root to a file outside it: reading it cannot be told apart, but an
    in-place write would change the file outside; an atomic one replaces the name only."""
    root, outside = tree
    os.link(outside / "secret", Path(root) / "hl")
    assert read_all(root, "hl")[0] == b"secret"
    assert code_of(writing.write, root, "hl", b"PWNED", offset=0) == "forbidden"
    assert writing.write(root, "hl", b"mine") == ("hl", 4)
    assert (outside / "secret").read_text() == "secret" and (Path(root) / "hl").read_text() == "mine"
    assert writing.write(root, "hl", b"!", offset=4) == ("hl", 1)  # its own file now


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another owner needs root")
def test_an_atomic_write_keeps_owner_and_setgid(tree):
    root, _ = tree
    path = Path(root) / "tool"
    path.write_bytes(b"old")
    os.chown(path, 4321, 4321)
    path.chmod(0o2755)  # chown clears setuid and setgid: the mode must be set after it
    writing.write(root, "tool", b"new")
    st_ = path.stat()
    assert (st_.st_uid, st_.st_gid, stat.S_IMODE(st_.st_mode)) == (4321, 4321, 0o2755)


def test_a_loop_of_links_is_invalid(tree):
    root, _ = tree
    os.symlink("loop", Path(root) / "loop")
    assert code_of(reading.Reader, root, "loop") == "invalid"
    assert code_of(writing.write, root, "loop", b"x") == "invalid"
    assert code_of(ops.list_dir, root, "loop/x") == "invalid"


def test_a_listing_is_capped_and_sorted_in_runs(tree, monkeypatch):
    root, _ = tree
    d = Path(root) / "many"
    d.mkdir()
    names = [f"n{i:03d}" for i in range(40)]
    for name in reversed(names):
        (d / name).touch()
    monkeypatch.setattr(ops, "_SORT_RUN", 7)
    assert [e["name"] for e in ops.list_dir(root, "many")[1]] == names
    monkeypatch.setattr(ops, "MAX_LIST_ENTRIES", 40)
    assert len(ops.list_dir(root, "many")[1]) == 40
    (d / "one-more").touch()
    with pytest.raises(FileError) as caught:
        ops.list_dir(root, "many")
    assert caught.value.code == "too_large" and "40" in caught.value.message


def test_read_chunks_and_encodings(tree):
    root, _ = tree
    text = "a" * (CHUNK - 1) + "é€😀" * 1000  # é starts one byte before the chunk's end
    writing.write(root, "t.txt", text.encode())
    data, chunks = read_all(root, "t.txt")
    assert data == text.encode()
    assert [c["encoding"] for c in chunks] == ["utf-8", "utf-8"]
    assert chunks[0]["length"] == CHUNK - 1 and chunks[1]["offset"] == CHUNK - 1
    assert all(c["size"] == len(data) for c in chunks) and [c["eof"] for c in chunks] == [False, True]
    blob = os.urandom(CHUNK * 2 + 10)
    writing.write(root, "r.bin", blob)
    data, chunks = read_all(root, "r.bin")
    assert data == blob and [c["encoding"] for c in chunks] == ["base64"] * 3
    # control characters would escape to ~6 bytes each: base64 keeps the message small
    writing.write(root, "c.txt", b"\x01" * CHUNK)
    data, chunks = read_all(root, "c.txt")
    assert data == b"\x01" * CHUNK and chunks[0]["encoding"] == "base64"
    # offset and length, an empty file, a range past the end
    assert read_all(root, "t.txt", 10, 5)[0] == b"aaaaa"
    writing.write(root, "empty", b"")
    assert read_all(root, "empty")[1] == [{"offset": 0, "length": 0, "size": 0, "encoding": "utf-8", "content": "", "eof": True}]
    assert read_all(root, "t.txt", 10**9)[0] == b""


def test_encode_chunk_never_splits_a_character():
    euro = "€".encode()
    for cut in (1, 2):
        data = b"x" * 10 + euro[:cut]
        assert reading.encode_chunk(data, final=False) == ("utf-8", "x" * 10, 10)
        assert reading.encode_chunk(data, final=True)[0] == "base64"
    assert reading.encode_chunk(b"\xff" + b"x" * 10, final=False)[0] == "base64"
    assert reading.json_text_bytes(b'a"\\\n\x01') == 1 + 2 + 2 + 2 + 6


def test_read_refusals(tree):
    root, _ = tree
    assert code_of(reading.Reader, root, "a") == "is_a_directory"
    os.mkfifo(Path(root) / "fifo")
    assert code_of(reading.Reader, root, "fifo") == "invalid"  # and did not wait for a writer
    big = Path(root) / "big"
    with open(big, "wb") as f:
        f.truncate(reading.MAX_READ_BYTES + 1)
    assert code_of(reading.Reader, root, "big") == "too_large"
    assert code_of(reading.Reader, root, "big", 0, reading.MAX_READ_BYTES + 1) == "too_large"
    reading.Reader(root, "big", 1).close()
    reading.Reader(root, "big", 0, reading.MAX_READ_BYTES).close()


def test_mkdir_delete_rename(tree):
    root, outside = tree
    r = Path(root)
    assert ops.mkdir(root, "n") == "n"
    assert code_of(ops.mkdir, root, "n") == "exists"
    assert code_of(ops.mkdir, root, "p/q") == "not_found"
    assert ops.mkdir(root, "p/q", parents=True) == "p/q"
    assert code_of(ops.mkdir, root, "link_in") == "exists"
    assert code_of(ops.delete, root, "p") == "not_empty"
    assert ops.delete(root, "p", recursive=True) == "p" and not (r / "p").exists()
    assert code_of(ops.delete, root, ".") == "forbidden"
    assert code_of(ops.delete, root, "a/..") == "invalid"
    assert code_of(ops.delete, root, "nope") == "not_found"
    # a link is deleted itself, never what it points to
    assert ops.delete(root, "link_out") == "link_out"
    assert (outside / "secret").read_text() == "secret"
    assert ops.delete(root, "link_in", recursive=True) == "link_in" and (r / "a" / "f").exists()
    assert ops.rename(root, "a/f", "b/g") == ("a/f", "b/g")
    assert (r / "b" / "g").read_text() == "f"
    (r / "b" / "h").write_text("h")
    assert code_of(ops.rename, root, "b/g", "b/h") == "exists"
    assert ops.rename(root, "b/g", "b/h", overwrite=True) == ("b/g", "b/h")
    assert (r / "b" / "h").read_text() == "f"
    assert code_of(ops.rename, root, "nope", "x") == "not_found"
    assert code_of(ops.rename, root, ".", "x") == "forbidden"
    assert code_of(ops.rename, root, "b", "link_root") == "exists"
    assert code_of(ops.rename, root, "b", "b/inner") == "invalid"
    assert code_of(ops.rename, root, "b", "missing/b") == "not_found"
    ops.mkdir(root, "full")
    (r / "full" / "x").write_text("x")
    assert code_of(ops.rename, root, "b", "full", overwrite=True) == "not_empty"
    assert code_of(ops.rename, root, "b/h", "full", overwrite=True) == "is_a_directory"
    assert code_of(ops.rename, root, "full", "b/h", overwrite=True) == "not_a_directory"
    # renaming a link moves the link
    assert ops.rename(root, "a/link_secret", "moved_link") == ("a/link_secret", "moved_link")
    assert os.readlink(r / "moved_link") == "../../outside/secret"


def test_paths_in_replies_are_normalised(tree):
    root, _ = tree
    assert resolve(root, "./a//f").rel == "a/f"
    assert resolve(root, root).rel == "."
    assert resolve(root, root + "/a/").rel == "a"
    assert resolve(root, "a/../b").rel == "b"
    # ".." after a link means what the kernel makes of it: link_in/.. is the root's parent of a
    assert resolve(root, "link_in/../b").rel == "b"
    assert resolve(root, "link_in/f").rel == "link_in/f"
    assert resolve(root, "link_in/f").path == os.path.join(root, "a", "f")
    assert resolve(root, "link_root/link_root/a").rel == "link_root/link_root/a"


def test_the_name_itself_must_be_a_name(tree):
    """``link/.`` resolved with the link followed would act on the link's target while the
    reply named the link: the operations on a name refuse it."""
    root, _ = tree
    r = Path(root)
    for fn in (ops.stat, ops.delete, ops.mkdir):
        for path in ("link_in/.", "a/.", "a/..", "link_root/."):
            assert code_of(fn, root, path) == "invalid", (fn, path)
    assert code_of(ops.rename, root, "link_in/.", "moved") == "invalid"
    assert code_of(ops.rename, root, "b", "a/.") == "invalid"
    assert sorted(os.listdir(r / "a")) == ["f", "link_secret"] and (r / "link_in").is_symlink()
    assert ops.stat(root, ".")[0] == "." and ops.stat(root, root + "/.")[0] == "."
    assert ops.list_dir(root, "link_in/.")[0] == "link_in"  # followed where content is read


def test_a_trailing_slash_names_a_directory(tree):
    root, _ = tree
    assert code_of(ops.stat, root, "a/f/") == "not_a_directory"
    assert code_of(ops.delete, root, "a/f/") == "not_a_directory"
    assert code_of(ops.delete, root, "link_in/") == "not_a_directory"  # a link, not a directory
    assert code_of(ops.rename, root, "a/f/", "g") == "not_a_directory"
    assert code_of(reading.Reader, root, "a/f/") == "not_a_directory"
    assert code_of(writing.write, root, "a/f/", b"x") == "not_a_directory"
    assert code_of(writing.write, root, "new/", b"x") == "invalid"
    assert (Path(root) / "a" / "f").read_text() == "f" and not (Path(root) / "new").exists()
    assert ops.stat(root, "a/")[1]["type"] == "directory"
    assert ops.mkdir(root, "made/") == "made" and ops.delete(root, "made/") == "made"
    assert ops.list_dir(root, "link_in/")[0] == "link_in"


@pytest.mark.parametrize(
    "path, follow",
    [
        ("..", True),
        ("../outside/secret", True),
        ("a/../../outside", False),
        ("/etc/passwd", True),
        ("/", False),
        ("link_out", True),
        ("link_out/secret", False),
        ("link_out/dir/x", True),
        ("a/link_secret", True),
        ("link_root/../outside", False),
    ],
)
def test_escapes_are_forbidden(tree, path, follow):
    root, _ = tree
    with pytest.raises(FileError) as caught:
        resolve(root, path, follow)
    assert caught.value.code == "forbidden" and caught.value.path == path and path in caught.value.message


def test_lone_surrogates_are_invalid_names(tree):
    root, _ = tree
    assert code_of(resolve, root, "a/\ud800") == "invalid"
    # undecodable bytes round trip as surrogate escapes
    (Path(root).joinpath(os.fsdecode(b"bad\xff"))).write_text("x")
    names = [e["name"] for e in ops.list_dir(root, ".")[1]]
    assert "bad\udcff" in names
    assert ops.stat(root, "bad\udcff")[1]["size"] == 1


SEGMENTS = ["..", ".", "a", "b", "f", "link_out", "link_in", "link_root", "link_secret", "dir", "", "new"]
PREFIXES = ["", "/", "/etc/", "{root}/", "{outside}/", "{base}/"]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prefix=st.sampled_from(PREFIXES),
    segments=st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=6),
    op=st.sampled_from(["write", "mkdir", "delete", "rename_from", "rename_to", "read", "list", "stat"]),
)
def test_no_path_escapes_the_root(prefix, segments, op):
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        root, outside = make_tree(base)
        path = prefix.format(root=root, outside=outside, base=base) + "/".join(segments)
        if not path:
            return
        before = snapshot(base)
        for follow in (True, False):
            try:
                target = resolve(root, path, follow)
            except FileError as exc:
                if exc.code == "invalid":  # not a name: only where the name itself is acted on
                    assert not follow and path.rstrip("/").rsplit("/", 1)[-1] in (".", "..")
                elif exc.code == "not_a_directory":  # ends in / on a file, or goes through one
                    assert path.endswith("/") or "f/" in path
                else:  # not_found: as the kernel resolves it, a directory on the way is missing
                    assert exc.code in ("forbidden", "not_found")
                continue
            if follow:
                assert inside(root, os.path.realpath(target.path))
            else:  # the name itself may be a link; what holds it is inside
                assert target.path == root or inside(root, os.path.realpath(os.path.dirname(target.path)))
            assert not target.rel.startswith("..") and not os.path.isabs(target.rel)
        try:
            if op == "write":
                writing.write(root, path, b"x", create_parents=True)
            elif op == "mkdir":
                ops.mkdir(root, path, parents=True)
            elif op == "delete":
                ops.delete(root, path, recursive=True)
            elif op == "rename_from":
                ops.rename(root, path, "renamed", overwrite=True)
            elif op == "rename_to":
                ops.rename(root, "b", path, overwrite=True)
            elif op == "read":
                reading.Reader(root, path).close()
            elif op == "list":
                ops.list_dir(root, path)
            else:
                ops.stat(root, path)
        except FileError:
            pass
        assert snapshot(base) == before


def test_concurrent_atomic_writes_are_never_torn(tree):
    root, _ = tree
    contents = [os.urandom(1 << 20) for _ in range(4)]
    writing.write(root, "shared.bin", contents[0])
    path = Path(root) / "shared.bin"
    done = threading.Event()
    seen: list[bytes] = []
    errors: list[BaseException] = []

    def writer(content: bytes) -> None:
        try:
            for _ in range(15):
                writing.write(root, "shared.bin", content)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    def reader() -> None:
        while not done.is_set():
            seen.append(path.read_bytes())

    threads = [threading.Thread(target=writer, args=(c,)) for c in contents]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    assert not errors
    assert seen and all(s in contents for s in seen)
    assert path.read_bytes() in contents
    assert [p.name for p in Path(root).iterdir() if p.name.endswith(".tmp")] == []


# -- list pages, inotify parsing, coalescing -------------------------------------------


def test_list_pages_stay_under_the_budget():
    entries = [{"name": "n" * 200, "type": "file", "size": 1, "mtime": 1, "mode": "0644"} for _ in range(3000)]
    runs = list_pages(entries)
    assert len(runs) > 1 and sum(map(len, runs)) == 3000
    import ujson

    assert all(len(ujson.dumps(run)) < 1_000_000 for run in runs)
    assert list_pages([]) == [[]]


def test_parse_inotify_events():
    import struct

    raw = struct.pack("=iIII", 1, IN_CREATE, 0, 16) + b"name\0".ljust(16, b"\0")
    raw += struct.pack("=iIII", 2, IN_CREATE | IN_ISDIR, 7, 0)
    assert parse(raw) == [Event(1, IN_CREATE, 0, b"name"), Event(2, IN_CREATE | IN_ISDIR, 7, b"")]


def drain(c: Coalescer):
    return c.take()


def test_coalescing_rules():
    c = Coalescer()
    c.add("created", "a", "file")
    c.add("modified", "a", "file")
    c.add("modified", "b", "file")
    c.add("deleted", "b", "file")
    c.add("created", "tmp", "file")
    c.add("deleted", "tmp", "file")
    c.add("modified", "m", "file")
    c.add("modified", "m", "file")
    assert drain(c) == [("created", "a", "file", None), ("deleted", "b", "file", None), ("modified", "m", "file", None)]
    # deleted and made again: modified; as another kind of thing: created
    c.add("deleted", "x", "file")
    c.add("created", "x", "file")
    c.add("deleted", "y", "file")
    c.add("created", "y", "directory")
    assert drain(c) == [("modified", "x", "file", None), ("created", "y", "directory", None)]
    # an editor's save: temp file created, written, renamed over the file
    c.add("created", ".f.swp", "file")
    c.add("modified", ".f.swp", "file")
    c.add("moved", "f", "file", ".f.swp")
    assert drain(c) == [("created", "f", "file", None)]
    # a chain of moves is one; moved back is modified
    c.add("moved", "b", "file", "a")
    c.add("moved", "c", "file", "b")
    c.add("moved", "x", "file", "w")
    c.add("moved", "w", "file", "x")
    assert drain(c) == [("moved", "c", "file", "a"), ("modified", "w", "file", None)]
    # moved then deleted: both names are gone
    c.add("moved", "q", "file", "p")
    c.add("deleted", "q", "file")
    assert drain(c) == [("deleted", "q", "file", None), ("deleted", "p", "file", None)]


def test_moving_a_directory_carries_its_events():
    c = Coalescer()
    c.add("modified", "d/x", "file")
    c.add("moved", "d/z", "file", "d/y")
    c.add("created", "d/new", "file")
    c.add("moved", "e", "directory", "d")
    assert drain(c) == [
        ("moved", "e", "directory", "d"),
        ("modified", "e/x", "file", None),
        ("moved", "e/z", "file", "e/y"),
        ("created", "e/new", "file", None),
    ]
    # a directory made and moved in one window: created where it ended, children after it
    c.add("created", "t", "directory")
    c.add("created", "t/f", "file")
    c.add("moved", "u", "directory", "t")
    assert drain(c) == [("created", "u", "directory", None), ("created", "u/f", "file", None)]


def test_too_many_paths_is_an_overflow():
    c = Coalescer(limit=10)
    for i in range(11):
        c.add("created", f"f{i}", "file")
    c.add("created", "more", "file")
    assert c and drain(c) is None
    c.add("created", "after", "file")
    assert drain(c) == [("created", "after", "file", None)]


def test_a_moved_directory_carries_a_bounded_amount():
    """Each directory move looks through the window's paths: past a budget the window is an
    overflow, so one directory moved back and forth next to many changes stays cheap."""
    c = Coalescer(limit=100, work=1000)
    for i in range(50):
        c.add("modified", f"f{i}", "file")
    for n in range(19):  # 51 paths pending, 51 looked at a move
        c.add("moved", *(("y", "directory", "x") if n % 2 == 0 else ("x", "directory", "y")))
    assert not c.overflowed
    c.add("moved", "x", "directory", "y")
    assert c.overflowed and drain(c) is None


# -- the directories of a watch ----------------------------------------------------------


def test_directories_are_a_tree_of_descriptors():
    d = Directories()
    d.add(1, None, "")
    d.add(2, 1, "src")
    d.add(3, 2, "lib")
    d.add(4, 3, "deep")
    assert [d.path(wd) for wd in (1, 2, 3, 4)] == ["", "src", "src/lib", "src/lib/deep"]
    assert d.is_top(1) and not d.is_top(2) and d.child(2, "lib") == 3
    d.move(2, "lib", 1, "moved")  # one node changes; below it follows
    assert d.path(4) == "moved/deep" and d.child(2, "lib") is None and d.child(1, "moved") == 3
    d.add(5, 1, "moved")  # another directory took the name: the old one has no path
    assert d.path(3) is None and d.path(4) is None and d.path(5) == "moved"
    d.add(3, 5, "back")
    assert d.path(4) == "moved/back/deep"
    assert sorted(d.remove(5)) == [3, 4, 5] and sorted(d) == [1, 2] and d.path(3) is None
    d.discard(2)
    assert d.path(2) is None and list(d) == [1]


class FakeInstance:
    max_dirs = 10_000

    def __init__(self):
        self.released: list[int] = []

    def release(self, tree, wds):
        self.released.extend(wds)

    def remove(self, tree):
        pass


def test_renames_in_a_large_watch_touch_one_node():
    """9,000 directories watched, one of them (with 100 below it) renamed 20,000 times: each
    rename changes one node, where rewriting every path below the tree took seconds."""

    async def run() -> tuple[float, list, list]:
        instance = FakeInstance()
        sent: list = []
        tree = WatchTree(instance, "/nowhere", ".", True, sent.extend, lambda resume: False, lambda t: None)
        tree.dirs.add(1, None, "")
        wd = 2
        for i in range(90):
            tree.dirs.add(wd, 1, f"d{i}")
            parent, wd = wd, wd + 1
            for j in range(100):
                tree.dirs.add(wd, parent, f"e{j}")
                wd += 1
        started = time.monotonic()
        for cookie in range(1, 20_001):
            a, b = ("d0", "spun") if cookie % 2 else ("spun", "d0")
            tree.on_event(Event(1, IN_MOVED_FROM | IN_ISDIR, cookie, a.encode()))
            tree.on_event(Event(1, IN_MOVED_TO | IN_ISDIR, cookie, b.encode()))
        elapsed = time.monotonic() - started
        tree.on_event(Event(2 + 1 + 5, IN_CREATE, 0, b"new.txt"))  # in d0/e5
        tree.end_batch()
        tree.close()
        return elapsed, sent, instance.released

    elapsed, sent, released = asyncio.run(run())
    assert elapsed < 1.0
    assert sent[0] == {"type": "modified", "path": "d0", "kind": "directory"}  # moved back: modified
    assert {"type": "created", "path": "d0/e5/new.txt", "kind": "file"} in sent
    assert released == []


def test_watches_set_up_at_once_hold_the_server_limit(tmp_path):
    """Four recursive watches started together: each scan counts what the one before added,
    where all four saw the whole budget and together passed it."""
    for t in "abcd":
        for i in range(30):
            (tmp_path / t / f"d{i}").mkdir(parents=True)

    async def run() -> tuple[list, int]:
        loop = asyncio.get_running_loop()
        instance = Instance(lambda fn, *args: loop.run_in_executor(None, fn, *args), max_dirs=70)
        trees = [WatchTree(instance, str(tmp_path / t), t, True, lambda m: None, lambda r: False, lambda t: None) for t in "abcd"]
        results = await asyncio.gather(*(tree.start(tree.base) for tree in trees), return_exceptions=True)
        watched = len(instance.users)
        instance.close()
        return results, watched

    results, watched = asyncio.run(run())
    assert [r is None for r in results].count(True) == 2  # 31 each: a third would pass 70
    assert all(r.code == "too_large" for r in results if r is not None)
    assert watched == 62
