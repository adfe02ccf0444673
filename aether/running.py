"""Which ``aether serve`` runs here, for the commands that act on its state (``aether port``,
``aether doctor``) without being told ``--state-dir``.

A server writes ``serve-<pid>.json`` (its pid and start time, state directory, host and port,
and what its preview hosts are made of) into the runtime directory once it listens, and
removes it when it stops: ``$XDG_RUNTIME_DIR/aether``, or ``/run/aether`` for root (both
cleared at boot, never another user's). A file whose pid is gone, or is now another process
(its start time differs), is stale, and ignored; a reader removes one whose pid is not
running at all (a server killed with SIGKILL leaves its file). A reader takes the one server
running; with several it takes none and says so, as guessing would write to the wrong
registry.

Why a file rather than scanning /proc for ``aether serve``: a server's state directory comes
from its flags, environment, systemd's ``StateDirectory=`` or the default, which its command
line alone does not tell, and another user's environment is not readable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def runtime_dir() -> Path | None:
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "aether"
    if os.geteuid() == 0:
        return Path("/run/aether")
    return None


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()[19].decode()


def announce(state_dir: Path, host: str, port: int, preview: dict | None = None) -> Path | None:
    """Write this server's file; its path, or None where there is no runtime directory (or
    it cannot be written: the server runs on, the commands need ``--state-dir``). ``preview``:
    what its previews are made of (``domain``, ``prefix``, ``upstreamHost``), which its flags
    may have set and ``aether doctor --preview`` must judge."""
    base = runtime_dir()
    if base is None:
        return None
    pid = os.getpid()
    record: dict = {"pid": pid, "start": _start_time(pid), "stateDir": str(Path(state_dir).resolve()), "host": host, "port": port}
    if preview is not None:
        record["preview"] = preview
    path = base / f"serve-{pid}.json"
    try:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = base / f".serve-{pid}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    except OSError:
        return None
    return path


def withdraw(path: Path | None) -> None:
    if path is not None:
        try:
            path.unlink()
        except OSError:
            pass


def servers() -> list[dict]:
    """The servers running now, as they announced themselves."""
    base = runtime_dir()
    if base is None:
        return []
    found = []
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return []
    for name in names:
        if not (name.startswith("serve-") and name.endswith(".json")):
            continue
        try:
            record = json.loads((base / name).read_text())
            pid = int(record["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        started = _start_time(pid)
        if record.get("start") is not None and started == record["start"]:
            found.append(record)
        elif started is None and name == f"serve-{pid}.json":
            # Its server is gone (killed, so it could not remove it): remove it, or every
            # command reads one more file for each server ever killed here. Only for a pid
            # that is not running at all: no server of that pid can be writing it now.
            try:
                (base / name).unlink()
            except OSError:
                pass
    return found


def state_dir(given: str | None) -> tuple[Path, str | None]:
    """The state directory a command acts on: ``given`` (``--state-dir``), ``$AETHER_STATE_DIR``,
    the one running server's, or the default; and a note for stderr when several servers run."""
    from aether.state import ENV, locate

    if given or os.environ.get(ENV):
        return locate(given), None
    running = servers()
    if len(running) == 1:
        return Path(running[0]["stateDir"]), None
    if running:
        dirs = ", ".join(sorted({record["stateDir"] for record in running}))
        return locate(None), f"several aether servers run ({dirs}): using the default; pass --state-dir"
    return locate(None), None
