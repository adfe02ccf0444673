"""Process trees that end whole: a cgroup v2 for each terminal session and agent turn.

A process that calls ``setsid`` or double-forks leaves its session and process group, and one
whose parent exits is reparented to init: a kill by session id or a walk of parent links
misses it. A cgroup does not: every process forked inside one stays inside, and writing ``1``
to its ``cgroup.kill`` (Linux 5.14+) SIGKILLs them all at once, in the kernel.

Layout, under the cgroup2 mount (found in /proc/self/mountinfo: ``/sys/fs/cgroup``, or
``/sys/fs/cgroup/unified`` on a hybrid system)::

    aether/<state>/<daemon>/terminal-<n>
    aether/<state>/<daemon>/agent-<n>

``<state>`` is 16 hex digits of the SHA-256 of the state directory's real path, and
``<daemon>`` is ``<pid>.<start time>`` of the daemon that made it. At start a daemon kills
and removes every ``<daemon>`` beside its own whose daemon is gone (the leftovers of a crash);
one whose daemon still runs is never touched, so two daemons never end each other's sessions.
Of other state directories it removes only the empty cgroups of daemons that are gone.

Where cgroup v2, ``cgroup.kill`` or the right to write there is missing (not root, a
container), or ``AETHER_CGROUPS=off``, a tree is what a scan of /proc finds
(:class:`aether.pidtree.ScanTree`), which misses some: see there.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import select
import signal
import time

from aether.pidtree import ScanTree, pidfd_of, signal_pidfds
from aether.settings import sources

log = logging.getLogger("aether.cgroup")

#: How long removing a killed cgroup waits for its processes to be gone (they go within
#: milliseconds of SIGKILL; a process in uninterruptible sleep can take longer).
EMPTY_TIMEOUT = 2.0


def mount_point(mountinfo: str) -> tuple[str, str] | None:
    """``(where, root)`` of the first cgroup2 mount in the text of /proc/self/mountinfo:
    where it is mounted, and which cgroup is its root (``/`` unless a sub-cgroup is mounted).
    None if there is none."""
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        if line.split(" - ", 1)[1].split()[0] == "cgroup2":
            return _unescape(fields[4]), _unescape(fields[3])
    return None


def _unescape(path: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): with the
    pid, it names one process for as long as the machine is up."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()[19].decode()


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


class CgroupTree:
    """One cgroup: ``procs`` is the file the spawned child writes itself into. The same calls
    as :class:`aether.pidtree.ScanTree`, which stands in where there are no cgroups."""

    def __init__(self, path: str, mount: tuple[str, str] = ("/", "/")):
        self.path = path
        #: The path as /proc/PID/cgroup shows it, for a member.
        self.name = os.path.join(mount[1], os.path.relpath(path, mount[0]))
        self.procs = os.path.join(path, "cgroup.procs")
        self.leader: int | None = None

    def started(self, pid: int) -> None:
        self.leader = pid

    def hold(self) -> None:
        """Nothing to hold: the cgroup keeps every member, orphans included."""

    def pids(self) -> list[int]:
        """Its processes, and those of cgroups below it (a process in it may make some)."""
        found = []
        for directory, _subdirs, _files in os.walk(self.path):
            try:
                found += [int(line) for line in _read(os.path.join(directory, "cgroup.procs")).split()]
            except OSError:
                continue
        return found

    def signal(self, sig: int) -> None:
        """``sig`` to every process in the cgroup: SIGKILL by ``cgroup.kill`` (the kernel's,
        at once, sub-cgroups included); another signal through a pidfd of each member, opened
        before checking that it is in this cgroup still, so that a pid that exited and was
        reused elsewhere is never signalled."""
        if sig == signal.SIGKILL:
            try:
                _write(os.path.join(self.path, "cgroup.kill"), "1")
            except FileNotFoundError:
                pass  # removed: nothing was left in it
            return
        for pid in self.pids():
            pidfd = pidfd_of(pid)
            if pidfd is None:
                continue
            try:
                if self._holds(pid):
                    signal_pidfds([pidfd], sig)
            finally:
                os.close(pidfd)

    def _holds(self, pid: int) -> bool:
        try:
            cgroup = next(line[3:] for line in _read(f"/proc/{pid}/cgroup").splitlines() if line.startswith("0::"))
        except (OSError, StopIteration):
            return False
        return cgroup == self.name or cgroup.startswith(self.name + "/")

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def remove(self, wait: float = 0.0) -> bool:
        """Remove the cgroup (and any a process in it made below it) once empty, waiting up to
        ``wait`` seconds for that; False if it still has processes."""
        if wait > 0 and not wait_empty(self.path, wait):
            return False
        return _rmdir_tree(self.path)

    def release(self) -> None:
        """Done with it (what is left runs on, inside it, until killed)."""


Tree = CgroupTree | ScanTree


def wait_empty(path: str, timeout: float) -> bool:
    """Wait until the cgroup at ``path`` has no process (its ``cgroup.events`` says
    ``populated 0``; the kernel wakes poll() on each change)."""
    try:
        fd = os.open(os.path.join(path, "cgroup.events"), os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI)
        deadline = time.monotonic() + timeout
        while True:
            if b"populated 0" in os.pread(fd, 4096, 0):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            poller.poll(remaining * 1000)
    finally:
        os.close(fd)


def _daemon_runs(name: str) -> bool:
    """Whether the daemon a ``<pid>.<start time>`` cgroup is named after still runs."""
    pid, _, started = name.partition(".")
    return pid.isdigit() and start_time(int(pid)) == started


def _rmdir_tree(path: str) -> bool:
    """rmdir the cgroup and those below it, deepest first; False while any has processes."""
    try:
        entries = [entry.path for entry in os.scandir(path) if entry.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return True
    if not all([_rmdir_tree(sub) for sub in entries]):
        return False
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno in (errno.EBUSY, errno.ENOTEMPTY):
            return False
        raise
    return True


def _kill_and_remove(path: str) -> bool:
    """SIGKILL everything at and below ``path`` (``cgroup.kill`` takes the subtree), wait for
    it to be gone, and remove the cgroups."""
    try:
        _write(os.path.join(path, "cgroup.kill"), "1")
    except FileNotFoundError:
        return True
    return wait_empty(path, EMPTY_TIMEOUT) and _rmdir_tree(path)


def state_cgroup(mount: str, state_dir: str) -> str:
    """``<mount>/aether/<state>``: where the daemons of ``state_dir`` (a real path) make theirs."""
    return os.path.join(mount, "aether", hashlib.sha256(state_dir.encode()).hexdigest()[:16])


def make_base(state_dir: str) -> tuple[str | None, str, tuple[str, str] | None]:
    """Make this process's cgroup for the trees of ``state_dir`` (a real path),
    ``<mount>/aether/<state>/<pid>.<start>``: ``(its path, "", the cgroup2 mount's (where,
    root))``, or, where this process may not have cgroup trees, ``(None, why, None)`` with
    nothing made left behind."""
    try:
        found = mount_point(_read("/proc/self/mountinfo"))
        own = next((line[3:] for line in _read("/proc/self/cgroup").splitlines() if line.startswith("0::")), None)
    except OSError as exc:
        return None, f"cannot read /proc/self: {exc.strerror}", None
    if found is None or own is None:
        return None, "no cgroup2 file system is mounted", None
    mount, root = found
    base = os.path.join(state_cgroup(mount, state_dir), f"{os.getpid()}.{start_time(os.getpid())}")
    for _ in range(2):
        try:
            os.makedirs(base, exist_ok=True)
            break
        except FileNotFoundError:
            continue  # another daemon's start removed the empty <state> between our mkdirs
        except OSError as exc:
            return None, f"cannot make {base}: {exc.strerror}", None
    else:
        return None, f"cannot make {base}: it kept being removed", None
    if not os.path.exists(os.path.join(base, "cgroup.kill")):
        os.rmdir(base)
        return None, "the kernel has no cgroup.kill (Linux 5.14+)", None
    # Moving a process takes write access to cgroup.procs of the target and of the common
    # ancestor of the cgroup it leaves (the daemon's) and the one it enters.
    common = os.path.commonpath([os.path.join(mount, os.path.relpath(own, root)), base])
    for procs in (os.path.join(base, "cgroup.procs"), os.path.join(common, "cgroup.procs")):
        if not os.access(procs, os.W_OK):
            os.rmdir(base)
            return None, f"may not write {procs}", None
    return base, "", found


class Trees:
    """The process trees of one kind (``terminal``, ``agent``) that one daemon starts."""

    def __init__(self, state_dir: str, kind: str, mode: str | None = None):
        self.kind = kind
        self._count = 0
        #: Every tree made and not yet removed; those whose leader is done may still have
        #: processes (a terminal's ``nohup`` job), which run on until :meth:`close`.
        self._trees: dict[Tree, bool] = {}
        self.base: str | None = None
        self.mount = ("/", "/")
        self.why = ""
        if (mode or sources.value("cgroups")) == "off":
            self.why = "AETHER_CGROUPS=off"
        else:
            self.base, self.why = self._setup(os.path.realpath(state_dir))
        if self.base is None:
            log.info("process trees: fallback (session, process group and descendants)", extra={"kind": kind, "why": self.why})
        else:
            log.info("process trees: cgroup", extra={"kind": kind, "cgroup": self.base})

    @property
    def cgroups(self) -> bool:
        return self.base is not None

    def _setup(self, state_dir: str) -> tuple[str | None, str]:
        base, why, found = make_base(state_dir)
        if base is None or found is None:
            return None, why
        self.mount = found
        self._sweep(os.path.dirname(base), os.path.basename(base))
        return base, ""

    def _sweep(self, state: str, me: str) -> None:
        """Kill and remove what daemons of this state directory that are gone left behind; of
        other state directories', remove the empty cgroups only (rmdir refuses one with a
        process in it: what another state directory's daemon left is its next start's)."""
        for directory in os.scandir(os.path.dirname(state)):
            if not directory.is_dir(follow_symlinks=False):
                continue
            try:
                entries = [e for e in os.scandir(directory.path) if e.is_dir(follow_symlinks=False)]
            except FileNotFoundError:
                continue  # another daemon's start removed it meanwhile
            for entry in entries:
                if entry.name == me or _daemon_runs(entry.name):
                    continue
                try:
                    if directory.path != state:
                        _rmdir_tree(entry.path)
                        continue
                    left = len(CgroupTree(entry.path).pids())
                    removed = _kill_and_remove(entry.path)
                except OSError as exc:
                    log.warning("cannot clear what a stopped daemon left", extra={"cgroup": entry.path, "error": exc.strerror})
                    continue
                log.warning(
                    "killed what a stopped daemon left", extra={"cgroup": entry.path, "processes": left, "removed": removed}
                )
            if directory.path != state:
                try:
                    os.rmdir(directory.path)
                except OSError:
                    pass  # a daemon's cgroups are still there

    def new(self) -> Tree:
        """A tree for the next child, before it is spawned."""
        if self.base is None:
            tree: Tree = ScanTree()
        else:
            for done in [t for t, ended in self._trees.items() if ended and t.remove()]:
                del self._trees[done]
            self._count += 1
            path = os.path.join(self.base, f"{self.kind}-{self._count}")
            try:
                os.makedirs(path, exist_ok=True)  # makedirs: another kind's close may have removed the base
                tree = CgroupTree(path, self.mount)
            except OSError as exc:
                log.warning("cannot make a cgroup; this tree falls back", extra={"cgroup": path, "error": exc.strerror})
                tree = ScanTree()
        self._trees[tree] = False
        return tree

    def done(self, tree: Tree) -> None:
        """The tree's leader is done (or never started): its cgroup goes if empty, else stays
        until :meth:`close` (or a later :meth:`new` finds it empty)."""
        tree.release()
        if tree.remove():
            self._trees.pop(tree, None)
        elif tree in self._trees:
            self._trees[tree] = True

    def close(self) -> None:
        """At daemon exit: SIGKILL every tree of this kind, ended ones' leftovers included,
        and remove their cgroups (and the daemon's, once no kind uses it)."""
        trees = list(self._trees)
        for tree in trees:
            tree.kill()
        for tree in trees:
            tree.remove(EMPTY_TIMEOUT)
            tree.release()
        self._trees.clear()
        if self.base is not None:
            for path in (self.base, os.path.dirname(self.base)):
                try:
                    os.rmdir(path)
                except OSError:
                    break  # another kind's, or another daemon's, still there
