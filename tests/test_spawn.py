"""Starting children clean (aether.spawn) and ending their trees whole (aether.cgroup), in
this process: real children, the real cgroup2 mount."""

from __future__ import annotations

import os
import signal

import pytest
from support.processes import gone
from support.waiting import wait_for

from aether import cgroup, pidtree, spawn


def _run(argv, tree=None, cwd="/", new_session=False) -> tuple[int, bytes]:
    read, write = os.pipe()
    try:
        pid = spawn.spawn(
            argv,
            cwd=cwd,
            env={"PATH": os.defpath},
            stdio=(write, write, write),
            cgroup_procs=tree.procs if tree else None,
            new_session=new_session,
        )
    finally:
        os.close(write)
    with os.fdopen(read, "rb") as out:
        data = out.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), data


def test_a_child_gets_default_signals_its_stdio_and_nothing_else():
    leaked = os.open("/dev/null", os.O_RDONLY)
    os.set_inheritable(leaked, True)  # as a C library might leave one
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
    try:
        code, status = _run(["grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"])
        _, fds = _run(["sh", "-c", "ls /proc/$$/fd; pwd"], cwd="/tmp")
    finally:
        signal.signal(signal.SIGHUP, old)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR2})
        os.close(leaked)
    fields = dict(line.split(":") for line in status.decode().splitlines())
    assert code == 0
    assert int(fields["SigIgn"], 16) & ((1 << 31) - 1) == 0 and int(fields["SigBlk"], 16) == 0, fields
    *listed, cwd = fds.decode().split()
    assert sorted(map(int, listed)) == [0, 1, 2]  # not ``leaked``
    assert cwd == "/tmp"


def test_a_missing_program_is_told_before_the_spawn(tmp_path):
    with pytest.raises(spawn.NotFound) as missing:
        spawn.check_program("no-such-program-here", str(tmp_path), {"PATH": str(tmp_path)})
    assert missing.value.strerror == "No such file or directory"
    (tmp_path / "script").write_text("echo hi\n")  # not executable
    with pytest.raises(spawn.NotFound) as denied:
        spawn.check_program("./script", str(tmp_path), {})
    assert denied.value.strerror == "Permission denied"
    spawn.check_program("sh", str(tmp_path), {"PATH": os.defpath})


def test_mount_point_of_hybrid_unified_and_none():
    hybrid = (
        "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
        "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
    )
    assert cgroup.mount_point(hybrid) == ("/sys/fs/cgroup/unified", "/")
    assert cgroup.mount_point("29 23 0:26 /sub /sys/fs/my\\040cgroup rw - cgroup2 cgroup2 rw\n") == ("/sys/fs/my cgroup", "/sub")
    assert cgroup.mount_point(hybrid.splitlines()[0]) is None


def test_members_are_the_session_the_group_and_their_descendants():
    table = {
        100: (1, 100, 100),  # the leader
        101: (100, 100, 100),  # its child
        102: (101, 102, 102),  # a grandchild that left with setsid: a descendant still
        103: (1, 100, 100),  # orphaned, still in the session
        104: (103, 104, 104),  # its setsid child
        105: (1, 105, 105),  # orphaned and left: not found
        200: (1, 200, 200),  # someone else
    }
    assert pidtree.members(table, 100) == {100, 101, 102, 103, 104}


def _require(trees: cgroup.Trees) -> None:
    assert trees.cgroups, f"these tests need cgroup v2 with cgroup.kill: {trees.why}"


def test_a_cgroup_tree_holds_what_escapes_and_ends_it(tmp_path):
    trees = cgroup.Trees(str(tmp_path), "test")
    _require(trees)
    tree = trees.new()
    code, out = _run(["sh", "-c", "setsid sleep 1000 >/dev/null 2>&1 & echo $!; cat /proc/self/cgroup"], tree, new_session=True)
    orphan, cgroup_line = out.decode().split()[0], out.decode().split()[-1]
    assert code == 0 and cgroup_line == f"0::{tree.name}"
    assert tree.pids() == [int(orphan)] and not gone(int(orphan))  # its parent has exited
    tree.signal(signal.SIGTERM)
    wait_for(lambda: gone(int(orphan)), 5)
    assert tree.remove(2.0) and not os.path.exists(tree.path)
    trees.close()


def test_leftovers_of_an_ended_tree_run_on_until_close(tmp_path):
    trees = cgroup.Trees(str(tmp_path), "test")
    _require(trees)
    tree = trees.new()
    _run(["sh", "-c", "nohup sleep 1000 >/dev/null 2>&1 &"], tree)
    [member] = tree.pids()
    trees.done(tree)  # the leader is done; what it left lives on, in its cgroup
    assert not gone(member) and os.path.isdir(tree.path)
    trees.close()
    assert gone(member) and not os.path.exists(trees.base)


def test_a_daemon_that_is_gone_has_its_leftovers_killed_and_one_that_runs_does_not(tmp_path):
    trees = cgroup.Trees(str(tmp_path), "test")
    _require(trees)
    state = os.path.dirname(trees.base)
    # Another daemon of this state directory that still runs: this test's parent process.
    parent = os.getppid()
    running = os.path.join(state, f"{parent}.{cgroup.start_time(parent)}")
    dead = os.path.join(state, f"{(1 << 22) + 1}.0")  # above any pid_max: that daemon is gone
    # Of another state directory, a daemon that is gone: its processes are that directory's
    # next daemon's to end; its empty cgroups go.
    elsewhere = os.path.join(os.path.dirname(state), "0" * 16, f"{(1 << 22) + 1}.0")
    empty = os.path.join(os.path.dirname(state), "1" * 16, f"{(1 << 22) + 1}.0", "agent-1")
    os.makedirs(empty)
    left = {}
    for instance in (running, dead, elsewhere):
        os.makedirs(os.path.join(instance, "terminal-1"))
        _run(["sh", "-c", "setsid sleep 1000 >/dev/null 2>&1 &"], cgroup.CgroupTree(os.path.join(instance, "terminal-1")))
        [left[instance]] = cgroup.CgroupTree(os.path.join(instance, "terminal-1")).pids()
    try:
        cgroup.Trees(str(tmp_path), "test")
        wait_for(lambda: gone(left[dead]), 5)
        assert not os.path.exists(dead)
        assert not gone(left[running]) and os.path.isdir(running)
        assert not gone(left[elsewhere]) and os.path.isdir(elsewhere)
        assert not os.path.exists(os.path.dirname(os.path.dirname(empty)))
    finally:
        for instance in (running, elsewhere):
            cgroup.CgroupTree(instance).kill()
            wait_for(lambda: gone(left[instance]), 5)
            cgroup.CgroupTree(os.path.dirname(instance)).remove(2.0)
        trees.close()


def test_off_falls_back_to_scanning(tmp_path):
    trees = cgroup.Trees(str(tmp_path), "test", mode="off")
    assert not trees.cgroups and trees.why == "AETHER_CGROUPS=off"
    tree = trees.new()
    assert isinstance(tree, pidtree.ScanTree) and tree.procs is None
