"""The doctor's check of how terminal sessions and agent turns will be ended: a cgroup v2 each
(:mod:`aether.cgroup`), or the fallback found by a scan of /proc (:mod:`aether.pidtree`).

It asks as the daemon does at start, by making the daemon's own cgroup for the state
directory, and removes it at once, with the directories it made above it: nothing is swept or
killed, and nothing made is left.
"""

from __future__ import annotations

import os
from pathlib import Path

from aether import cgroup
from aether.doctor.checks import OK, WARN, Check
from aether.settings import sources

#: What a tree found in /proc misses (see aether.pidtree), in short.
MISSES = (
    "that misses a process that left its session and lost its parent before the hang-up (a server that "
    "daemonized itself), and what a killed daemon's sessions left"
)


def check_cgroups(state_dir: Path) -> Check:
    if sources.value("cgroups") == "off":
        mount, why = None, "AETHER_CGROUPS=off"
    else:
        mount, why = _probe(os.path.realpath(state_dir))
    if mount is not None:
        detail = f"a cgroup v2 for each terminal session and agent turn, under {mount}/aether, ended by cgroup.kill"
        return Check("cgroups", OK, detail)
    return Check("cgroups", WARN, f"process trees found in /proc, not cgroups: {why}; {MISSES}", _fix(why))


def _probe(state_dir: str) -> tuple[str | None, str]:
    """(where cgroup2 is mounted, "") where this process may make cgroup trees for
    ``state_dir``, else (None, why not). The cgroup made to find out is removed, with the
    directories it made above it."""
    try:
        found = cgroup.mount_point(Path("/proc/self/mountinfo").read_text())
    except OSError:
        found = None  # make_base says why
    above = []
    if found is not None:
        state = cgroup.state_cgroup(found[0], state_dir)
        above = [path for path in (state, os.path.dirname(state)) if not os.path.exists(path)]
    base, why, mount = cgroup.make_base(state_dir)
    for path in ([base] if base else []) + above:
        try:
            os.rmdir(path)
        except OSError:
            pass  # not made (make_base failed first), or a daemon that started meanwhile uses it
    return (mount[0] if mount else None), why


def _fix(why: str) -> str:
    see = "see docs/protocol.md#terminal-channel (process trees)"
    if why == "AETHER_CGROUPS=off":
        return f"unset AETHER_CGROUPS (or set it to auto) for a cgroup per tree; {see}"
    if "cgroup.kill" in why:
        return f"a Linux 5.14+ kernel, which has cgroup.kill; {see}"
    if "no cgroup2" in why:
        return f"mount the cgroup v2 hierarchy (mount -t cgroup2 none /sys/fs/cgroup); {see}"
    return f"run aether serve as root or, in a container, with a writable cgroup2 mount; {see}"
