"""The resolver beneath the workspace root on both of its paths: openat2(2), and the walk of
one component at a time that stands in where the kernel has none. What each must refuse, what
each must follow, and that what an operation acts on is what was resolved."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

import pytest

from aether.files import FileError, beneath, libc, ops, reading, writing
from aether.files.inotify import locate, open_top
from aether.files.paths import resolve

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> None:
    if _libc.renameat2(libc.AT_FDCWD, os.fsencode(a), libc.AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) != 0:
        raise OSError(ctypes.get_errno(), "renameat2")


@pytest.fixture(params=["openat2", "walk"])
def resolver(request, monkeypatch):
    """``openat2``: the kernel's resolution is used (its calls counted); ``walk``: openat2 is
    off, and any call of it fails the test."""
    if request.param == "walk":
        monkeypatch.setattr(beneath, "OPENAT2", False)

        def refuse(*args):
            raise AssertionError(f"openat2 called with the walk forced: {args}")

        monkeypatch.setattr(libc, "openat2", refuse)
        return None
    if not beneath.has_openat2():
        pytest.skip("this kernel has no openat2 (Linux 5.6+)")
    calls: list[tuple] = []
    real = libc.openat2

    def counted(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(libc, "openat2", counted)
    return calls


@pytest.fixture
def tree(tmp_path):
    """A root with absolute and relative links in and out, and an outside directory."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    root = Path(os.path.realpath(tmp_path / "root"))
    (root / "a").mkdir(parents=True)
    (root / "a" / "f").write_text("f")
    os.symlink(str(root / "a" / "f"), root / "a" / "abs_in")  # absolute, inside: followed
    os.symlink(str(root / "a"), root / "abs_dir")
    os.symlink(str(root), root / "abs_root")
    os.symlink("../outside", root / "rel_out")
    os.symlink(str(outside), root / "abs_out")
    os.symlink("loop", root / "loop")
    return str(root), outside


def read_text(root: str, path: str) -> str:
    reader = reading.Reader(root, path)
    try:
        return reader.next()["content"]
    finally:
        reader.close()


def code_of(fn, *args, **kw) -> str:
    with pytest.raises(FileError) as caught:
        fn(*args, **kw)
    return caught.value.code


def test_links_that_stay_inside_are_followed(tree, resolver):
    root, _ = tree
    assert read_text(root, "a/abs_in") == "f"
    assert ops.stat(root, "abs_dir/f")[1]["type"] == "file"
    assert ops.stat(root, "abs_root/abs_dir/f")[0] == "abs_root/abs_dir/f"
    assert [e["name"] for e in ops.list_dir(root, "abs_dir")[1]] == ["abs_in", "f"]
    assert writing.write(root, "abs_dir/new", b"n") == ("abs_dir/new", 1)
    assert (Path(root) / "a" / "new").read_text() == "n"
    # written through a link in the last place: the link stays, what it names changes
    assert writing.write(root, "a/abs_in", b"through") == ("a/abs_in", 7)
    assert (Path(root) / "a" / "f").read_text() == "through" and (Path(root) / "a" / "abs_in").is_symlink()
    assert ops.mkdir(root, "abs_dir/m/n", parents=True) == "abs_dir/m/n" and (Path(root) / "a" / "m" / "n").is_dir()
    # .. after a link is the parent of where the link led; the reply names where it led
    assert ops.stat(root, "abs_dir/../a/f")[0] == "a/f"
    assert ops.stat(root, "abs_root/a/../abs_dir/f")[0] == "a/f"
    assert resolve(root, "abs_dir/f").path == os.path.join(root, "a", "f")
    if resolver is not None:
        assert resolver, "openat2 was never called"


@pytest.mark.parametrize(
    "path",
    [
        "rel_out/secret",
        "abs_out/secret",
        "abs_out",
        "rel_out",
        "a/../../outside/secret",
        "../root/a/f",
        "abs_dir/../../outside",
        "abs_root/../outside/secret",
    ],
)
def test_every_way_out_is_forbidden(tree, resolver, path):
    root, outside = tree
    for fn, args in [
        (reading.Reader, ()),
        (ops.list_dir, ()),
        (writing.write, (b"pwned",)),
        (resolve, ()),
    ]:
        with pytest.raises(FileError) as caught:
            fn(root, path, *args)
        assert caught.value.code == "forbidden" and path in caught.value.message, (fn, path)
    assert code_of(writing.write, root, path + "/new", b"pwned", create_parents=True) == "forbidden"
    assert code_of(ops.mkdir, root, path + "/new", parents=True) == "forbidden"
    assert sorted(p.name for p in outside.iterdir()) == ["secret"] and (outside / "secret").read_text() == "secret"


def test_a_link_itself_is_acted_on_wherever_it_points(tree, resolver):
    root, outside = tree
    assert ops.stat(root, "abs_out")[1] | {"mtime": 0} == {
        "name": "abs_out",
        "type": "symlink",
        "size": len(str(outside)),
        "mtime": 0,
        "mode": "0777",
        "target": str(outside),
    }
    assert ops.rename(root, "abs_out", "a/moved") == ("abs_out", "a/moved")
    assert ops.delete(root, "a/moved", recursive=True) == "a/moved"
    assert (outside / "secret").read_text() == "secret"


def test_a_loop_and_a_long_chain(tree, resolver):
    root, _ = tree
    assert code_of(ops.stat, root, "loop/x") == "invalid"
    assert code_of(reading.Reader, root, "loop") == "invalid"
    r = Path(root)
    for i in range(beneath.MAX_LINKS - 1):  # 39 links, then the file: as many as the kernel takes
        os.symlink(f"c{i + 1}", r / f"c{i}")
    os.symlink("a/f", r / f"c{beneath.MAX_LINKS - 1}")
    assert read_text(root, "c0") == "f"
    os.rename(r / f"c{beneath.MAX_LINKS - 1}", r / "c_last")
    os.symlink("c_last", r / f"c{beneath.MAX_LINKS - 1}")  # one more
    assert code_of(reading.Reader, root, "c0") == "invalid"


def test_magic_links_are_never_jumped_through(resolver, tmp_path):
    """In /proc/PID, ``cwd``, ``root`` and ``fd/N`` are links the kernel would jump through
    to wherever they lead, whatever their text says: each is refused as leading outside."""
    secret = tmp_path / "secret"
    secret.write_text("secret")
    root = f"/proc/{os.getpid()}"
    fd = os.open(secret, os.O_RDONLY)
    try:
        for path in ("cwd/README.md", "root/etc/passwd", f"fd/{fd}", "exe"):
            with pytest.raises(FileError) as caught:
                reading.Reader(root, path)
            assert caught.value.code == "forbidden", path
        assert ops.stat(root, f"fd/{fd}")[1]["type"] == "symlink"  # the name itself
    finally:
        os.close(fd)


def test_what_was_resolved_is_what_is_acted_on(tree, resolver, monkeypatch):
    """The directory is swapped for a link to the outside while a write is under way: the
    temporary file is renamed into place, or removed, in the directory that was resolved."""
    root, outside = tree
    r = Path(root)
    (r / "race" / "d").mkdir(parents=True)
    os.symlink(str(outside), r / "race" / "alt")
    real_write_all = writing._write_all

    def swap_mid_write(fd, data, offset=None):
        exchange(r / "race" / "d", r / "race" / "alt")
        real_write_all(fd, data, offset)

    monkeypatch.setattr(writing, "_write_all", swap_mid_write)
    assert writing.write(root, "race/d/f", b"inside") == ("race/d/f", 6)
    # the directory that was race/d is race/alt now, and holds the file; outside is untouched
    assert (r / "race" / "alt" / "f").read_bytes() == b"inside" and (r / "race" / "d").is_symlink()
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    exchange(r / "race" / "d", r / "race" / "alt")

    def swap_and_fail(fd, data, offset=None):
        exchange(r / "race" / "d", r / "race" / "alt")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writing, "_write_all", swap_and_fail)
    assert code_of(writing.write, root, "race/d/g", b"x") == "io"
    assert not list(r.rglob(".aether-write-*")) and sorted(p.name for p in outside.iterdir()) == ["secret"]


def test_a_tree_deeper_than_the_recursion_limit_is_deleted(tree, resolver):
    root, outside = tree
    os.mkdir(Path(root) / "top")
    fd = os.open(Path(root) / "top", os.O_PATH)
    try:
        for _ in range(1500):  # 3,000 bytes of path: the kernel takes it, Python's recursion does not
            os.mkdir("d", dir_fd=fd)
            os.symlink(str(outside), "out", dir_fd=fd)
            os.mkfifo("fifo", dir_fd=fd)
            fd, up = os.open("d", os.O_PATH, dir_fd=fd), fd
            os.close(up)
    finally:
        os.close(fd)
    assert ops.delete(root, "top", recursive=True) == "top"
    assert not (Path(root) / "top").exists()
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]


def test_a_path_made_of_reported_names_follows_no_link(tree, resolver):
    root, _ = tree
    r = Path(root)
    (r / "w" / "s").mkdir(parents=True)
    os.symlink("s", r / "w" / "l")
    top = os.open(r / "w", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.close(beneath.below(top, "s", os.O_RDONLY | os.O_DIRECTORY))
        for rel in ("l", "l/..", "../a"):
            with pytest.raises(OSError):
                beneath.below(top, rel, os.O_RDONLY | os.O_DIRECTORY)
    finally:
        os.close(top)


def test_a_watch_watches_the_directory_it_resolved(tree, resolver):
    root, _ = tree
    top = locate(root, "abs_dir")
    assert top.rel == "abs_dir" and top.real == os.path.join(root, "a")
    assert top.ident == (os.stat(top.real).st_dev, os.stat(top.real).st_ino)
    assert code_of(locate, root, "abs_out") == "forbidden"
    assert code_of(locate, root, "a/f") == "not_a_directory"
    os.close(open_top(top.real, top.ident)[0])
    # another directory put at that path is not the one watched
    os.rename(top.real, os.path.join(root, "a_was"))
    os.mkdir(top.real)
    with pytest.raises(OSError) as caught:
        open_top(top.real, top.ident)
    assert caught.value.errno == errno.ENOENT


def test_a_nul_is_no_name(tree, resolver):
    root, _ = tree
    for path in ("a/f\0junk", "x\0/../a/f"):
        for fn in (ops.stat, ops.list_dir, reading.Reader, resolve):
            assert code_of(fn, root, path) == "invalid", (fn, path)
        assert code_of(writing.write, root, path, b"x") == "invalid"


def test_a_root_with_a_link_on_its_path_is_refused(tmp_path, resolver):
    (tmp_path / "real").mkdir()
    os.symlink("real", tmp_path / "alias")
    assert code_of(ops.stat, str(tmp_path / "alias"), ".") == "forbidden"
    assert ops.stat(str(tmp_path / "real"), ".")[1]["type"] == "directory"
