"""The files channel's blocking operations, confinement and coalescing, without sockets."""

from __future__ import annotations

import base64
import os
import stat
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aether.files import FileError, ops
from aether.files.inotify import IN_CREATE, IN_ISDIR, Event, parse
from aether.files.paths import inside, resolve
from aether.files.watch import Coalescer
from aether.server.channels.files import list_pages

CHUNK = ops.CHUNK_BYTES


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
    reader = ops.Reader(root, path, offset, length)
    chunks = []
    try:
        while True:
            chunk = reader.next()
            chunks.append(chunk)
            if chunk["eof"]:
                break
    finally:
        reader.close()
    data = b"".join(
        c["content"].encode() if c["encoding"] == "utf-8" else base64.b64decode(c["content"]) for c in chunks
    )
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
    assert ops.write(root, "new.txt", b"hello") == ("new.txt", 5)
    path = Path(root) / "new.txt"
    assert path.read_bytes() == b"hello"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 & ~0o022
    path.chmod(0o600)
    ops.write(root, "new.txt", b"again")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_bytes() == b"again"
    # through a link inside the root: the link stays, its target changes
    ops.write(root, "link_in/f", b"through")
    assert (Path(root) / "a" / "f").read_bytes() == b"through" and (Path(root) / "link_in").is_symlink()
    os.symlink("a/f", Path(root) / "file_link")
    ops.write(root, "file_link", b"via link")
    assert (Path(root) / "file_link").is_symlink() and (Path(root) / "a" / "f").read_bytes() == b"via link"
    assert not [p for p in Path(root).rglob("*.tmp")]


def test_write_errors_and_parents(tree):
    root, _ = tree
    assert code_of(ops.write, root, "x/y/z.txt", b"1") == "not_found"
    assert ops.write(root, "x/y/z.txt", b"1", create_parents=True) == ("x/y/z.txt", 1)
    assert code_of(ops.write, root, "a", b"1") == "is_a_directory"
    assert code_of(ops.write, root, "a/f/g", b"1") == "not_a_directory"
    assert code_of(ops.decode_content, "!!!", "base64", "p") == "invalid"
    assert ops.decode_content("aGk=", "base64", "p") == b"hi"
    assert ops.decode_content("é", "utf-8", "p") == "é".encode()
    os.mkfifo(Path(root) / "fifo")
    assert code_of(ops.write, root, "fifo", b"1") == "invalid"


def test_offset_writes_go_in_place(tree):
    root, _ = tree
    assert code_of(ops.write, root, "up.bin", b"x", offset=3) == "not_found"
    ops.write(root, "up.bin", b"0123", offset=0)  # offset 0, no file: created
    ops.write(root, "up.bin", b"4567", offset=4)
    ops.write(root, "up.bin", b"ab", offset=0)  # in place, no truncation
    assert (Path(root) / "up.bin").read_bytes() == b"ab234567"
    assert code_of(ops.write, root, "up.bin", b"x", offset=9) == "invalid"


def test_read_chunks_and_encodings(tree):
    root, _ = tree
    text = "a" * (CHUNK - 1) + "é€😀" * 1000  # é starts one byte before the chunk's end
    ops.write(root, "t.txt", text.encode())
    data, chunks = read_all(root, "t.txt")
    assert data == text.encode()
    assert [c["encoding"] for c in chunks] == ["utf-8", "utf-8"]
    assert chunks[0]["length"] == CHUNK - 1 and chunks[1]["offset"] == CHUNK - 1
    assert all(c["size"] == len(data) for c in chunks) and [c["eof"] for c in chunks] == [False, True]
    blob = os.urandom(CHUNK * 2 + 10)
    ops.write(root, "r.bin", blob)
    data, chunks = read_all(root, "r.bin")
    assert data == blob and [c["encoding"] for c in chunks] == ["base64"] * 3
    # control characters would escape to ~6 bytes each: base64 keeps the message small
    ops.write(root, "c.txt", b"\x01" * CHUNK)
    data, chunks = read_all(root, "c.txt")
    assert data == b"\x01" * CHUNK and chunks[0]["encoding"] == "base64"
    # offset and length, an empty file, a range past the end
    assert read_all(root, "t.txt", 10, 5)[0] == b"aaaaa"
    ops.write(root, "empty", b"")
    assert read_all(root, "empty")[1] == [{"offset": 0, "length": 0, "size": 0, "encoding": "utf-8", "content": "", "eof": True}]
    assert read_all(root, "t.txt", 10**9)[0] == b""


def test_encode_chunk_never_splits_a_character():
    euro = "€".encode()
    for cut in (1, 2):
        data = b"x" * 10 + euro[:cut]
        assert ops.encode_chunk(data, final=False) == ("utf-8", "x" * 10, 10)
        assert ops.encode_chunk(data, final=True)[0] == "base64"
    assert ops.encode_chunk(b"\xff" + b"x" * 10, final=False)[0] == "base64"
    assert ops.json_text_bytes(b'a"\\\n\x01') == 1 + 2 + 2 + 2 + 6


def test_read_refusals(tree):
    root, _ = tree
    assert code_of(ops.Reader, root, "a") == "is_a_directory"
    os.mkfifo(Path(root) / "fifo")
    assert code_of(ops.Reader, root, "fifo") == "invalid"  # and did not wait for a writer
    big = Path(root) / "big"
    with open(big, "wb") as f:
        f.truncate(ops.MAX_READ_BYTES + 1)
    assert code_of(ops.Reader, root, "big") == "too_large"
    assert code_of(ops.Reader, root, "big", 0, ops.MAX_READ_BYTES + 1) == "too_large"
    ops.Reader(root, "big", 1).close()
    ops.Reader(root, "big", 0, ops.MAX_READ_BYTES).close()


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
    assert code_of(ops.delete, root, "a/..") == "forbidden"
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


@pytest.mark.parametrize(
    "path, follow",
    [
        ("..", True), ("../outside/secret", True), ("a/../../outside", False), ("/etc/passwd", True),
        ("/", False), ("link_out", True), ("link_out/secret", False), ("link_out/dir/x", True),
        ("a/link_secret", True), ("link_root/../outside", False),
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
                assert exc.code == "forbidden"
                continue
            if follow:
                assert inside(root, os.path.realpath(target.path))
            else:  # the name itself may be a link; what holds it is inside
                assert target.path == root or inside(root, os.path.realpath(os.path.dirname(target.path)))
            assert not target.rel.startswith("..") and not os.path.isabs(target.rel)
        try:
            if op == "write":
                ops.write(root, path, b"x", create_parents=True)
            elif op == "mkdir":
                ops.mkdir(root, path, parents=True)
            elif op == "delete":
                ops.delete(root, path, recursive=True)
            elif op == "rename_from":
                ops.rename(root, path, "renamed", overwrite=True)
            elif op == "rename_to":
                ops.rename(root, "b", path, overwrite=True)
            elif op == "read":
                ops.Reader(root, path).close()
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
    ops.write(root, "shared.bin", contents[0])
    path = Path(root) / "shared.bin"
    done = threading.Event()
    seen: list[bytes] = []
    errors: list[BaseException] = []

    def writer(content: bytes) -> None:
        try:
            for _ in range(15):
                ops.write(root, "shared.bin", content)
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
