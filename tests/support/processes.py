"""Processes: `aether` and the tools the tests run as commands, stopping what the tests
started, reading /proc."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys

import pytest

from support import AETHER, ROOT


def tool(name: str) -> str:
    """The path of the command ``name`` (looked for in the sbin directories too); the test
    fails plainly when it is not installed."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    return found or pytest.fail(f"{name} is not installed (deploy/setup.sh installs it)")


#: Runs a command as ``nohup`` leaves it, and more: SIGHUP and SIGQUIT ignored, SIGUSR2 blocked.
NOHUP = (
    sys.executable,
    "-c",
    "import os, signal, sys; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
    "signal.signal(signal.SIGQUIT, signal.SIG_IGN); signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2}); "
    "os.execv(sys.argv[1], sys.argv[1:])",
)

#: ``python -c`` code for ``.format(port=N)``: listens on 127.0.0.1:N, forks a child that holds
#: the socket (for a minute), prints the child's pid, and exits once its stdin closes: a
#: daemonizing server's parent, exiting on cue.
FORKING_OWNER = """
import os, socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", {port})); s.listen()
pid = os.fork()
if pid == 0:
    time.sleep(60); os._exit(0)
print(pid, flush=True)
sys.stdin.readline()
"""


def aether(*args: str, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*AETHER, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kw)


def terminate(proc: subprocess.Popen) -> int:
    """SIGTERM, then SIGKILL after 5 s; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def stop_daemon(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM a process that is not our child (nginx's fast shutdown: after a SIGKILL its
    workers would wait out open connections), and wait for its exit through a pidfd."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        signal.pidfd_send_signal(fd, signal.SIGTERM)
        if not select.select([fd], [], [], timeout)[0]:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
            select.select([fd], [], [], timeout)
    except ProcessLookupError:
        pass
    finally:
        os.close(fd)


def proc_comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def signal_state(pid: int | str = "self") -> tuple[int, int]:
    """(ignored, blocked) signal masks of a process, from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
    return int(fields["SigIgn"], 16), int(fields["SigBlk"], 16)


def gone(pid: int) -> bool:
    """The process has exited (a zombie counts: it runs nothing and holds nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
