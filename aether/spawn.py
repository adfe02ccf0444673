"""Start a child with a clean slate: every signal at its default, none blocked, only its stdio
open, and (where given) already inside its cgroup before it runs a line of its own.

``os.posix_spawn`` does the signal part (``setsigdef``, ``setsigmask``) and is safe in a
process with threads, where ``preexec_fn`` is not. Under ``nohup aether serve`` the daemon runs
with SIGHUP ignored, and an ignored signal survives ``fork`` and ``exec``: a shell started the
way ``subprocess`` does would ignore its hang-up, and ``close`` would need the SIGKILL grace.
glibc keeps its two internal real-time signals (32 and 33) ignored in the child and no C call
can name them; every other signal is reset.

posix_spawn has no working directory or cgroup of its own, so the child first runs
:data:`ENTER`, a few lines of ``/bin/sh`` (about 1 ms): it writes ``0`` to the cgroup's
``cgroup.procs`` (moving itself: the writer is the process moved), changes directory, and
``exec``s the command, keeping its pid. Nothing the command forks can start outside the
cgroup, since the move happens before the command exists.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Mapping, Sequence

SH = "/bin/sh"

#: ``$1`` the cgroup.procs file ("" for none), ``$2`` the directory, then the argv.
ENTER = (
    'if [ -n "$1" ]; then echo 0 >"$1" || { echo "aether: cannot enter the cgroup $1" >&2; exit 126; }; fi; '
    'cd "$2" || exit 126; shift 2; exec "$@"'
)

#: Every signal whose disposition can be set: SIGKILL and SIGSTOP cannot, and glibc refuses
#: its internal ones itself (``valid_signals`` leaves them out).
RESET = frozenset(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}


class NotFound(Exception):
    """The program is not there, or not executable; ``strerror`` as an OSError would say."""

    def __init__(self, program: str, strerror: str):
        super().__init__(f"{program}: {strerror}")
        self.program, self.strerror = program, strerror


def check_program(argv0: str, cwd: str, env: Mapping[str, str]) -> None:
    """NotFound unless ``argv0`` names an executable (a bare name on the child's ``PATH``, a
    path from ``cwd``): told before the spawn, as ``exec`` in the child could only exit 127."""
    program = argv0 if "/" not in argv0 else os.path.join(cwd, argv0)
    if shutil.which(program, path=env.get("PATH", os.defpath)) is not None:
        return
    exists = "/" in argv0 and os.path.exists(program)
    raise NotFound(argv0, "Permission denied" if exists else "No such file or directory")


def inherited_fds(keep: Sequence[int]) -> list[int]:
    """Our descriptors above 2 that a child would inherit (not close-on-exec), but for ``keep``:
    Python opens everything close-on-exec, C libraries may not."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2 or fd in keep:
            continue
        try:
            if os.get_inheritable(fd):
                found.append(fd)
        except OSError:
            continue  # the listing's own descriptor, or one closed meanwhile
    return found


def spawn(
    argv: Sequence[str],
    *,
    cwd: str,
    env: Mapping[str, str],
    stdio: Sequence[int],
    cgroup_procs: str | None = None,
    new_session: bool = False,
) -> int:
    """Start ``argv`` with ``stdio`` as its fds 0, 1 and 2; its pid (the command's, once it has
    exec'd). OSError when the spawn itself fails."""
    actions: list[tuple[int, ...]] = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(stdio)]
    actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in inherited_fds(stdio)]
    return os.posix_spawn(
        SH,
        [SH, "-c", ENTER, "aether-spawn", cgroup_procs or "", os.path.abspath(cwd), *argv],
        dict(env),
        file_actions=actions,
        setsid=new_session,
        setsigmask=(),
        setsigdef=RESET,
    )


def exited(pid: int) -> int | None:
    """The child's return code once it has exited (negative: killed by that signal, as
    ``subprocess`` has it), else None; it is not reaped, so its pid stays its own."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
