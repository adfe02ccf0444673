"""The state directory: what aether generates once and keeps (project id, token), and the
configuration a client changed through the ``config`` channel.

Files are written atomically (temporary file, then rename), 0600, in a 0700 directory; a
directory made before that rule (or by hand, or by a package) is tightened at start
(:meth:`StateDir.tighten`). A generated file found empty is an error naming it, never silently
generated again: a new token would lock out every client, a new project id move every preview
URL, and both without a word.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

#: Modes the state directory and its entries must not exceed (group and others get nothing).
DIR_MODE, FILE_MODE = 0o700, 0o600


class EmptyStateFile(OSError):
    """A generated file of the state directory is empty: refused, not generated again."""

    def __init__(self, path: Path, holds: str, lost: str):
        super().__init__(
            errno.ENODATA,
            f"the file is empty; it holds {holds}, and a new one would {lost}: restore it, or delete it to have a new one made",
            str(path),
        )


#: The ``state_dir`` setting's variable, read here rather than through the settings table so
#: that ``aether port`` finds its registry without loading the table (~3 ms of its ~55 ms).
ENV = "AETHER_STATE_DIR"


def locate(given: str | None = None) -> Path:
    """The state directory: ``given`` (``--state-dir``), ``$AETHER_STATE_DIR``, or the default.
    Creates nothing."""
    return Path(given or os.environ.get(ENV) or default_state_dir())


def default_state_dir() -> Path:
    """systemd's ``StateDirectory=`` when set; ``/var/lib/aether`` for root under systemd;
    else ``$XDG_STATE_HOME/aether`` (``~/.local/state/aether``)."""
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    if os.geteuid() == 0 and os.environ.get("INVOCATION_ID"):
        return Path("/var/lib/aether")
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "aether"


def write_atomic(path: Path, text: str, mode: int = FILE_MODE) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _tighten(fd: int, name: str, most: int, changed: list[str], failed: list[str]) -> None:
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    if mode & ~most:
        try:
            os.fchmod(fd, mode & most)
        except OSError as exc:
            failed.append(f"{name} {mode:04o}: {exc.strerror}")
        else:
            changed.append(f"{name} {mode:04o} -> {mode & most:04o}")


class StateDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    def ensure(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)

    def tighten(self) -> tuple[list[str], list[str]]:
        """The directory to 0700 at most, its files to 0600 and directories to 0700 at most:
        (what was changed, as ``"NAME 0644 -> 0600"``; what could not be, with why). Entries
        are opened beneath the directory without following a symbolic link, so a link (and
        whatever it points to) is left as it is; so is anything but a file or a directory."""
        changed: list[str] = []
        failed: list[str] = []
        try:
            dir_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return changed, failed
        try:
            _tighten(dir_fd, ".", DIR_MODE, changed, failed)
            for name in os.listdir(dir_fd):
                try:
                    kind = stat.S_IFMT(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
                    if kind not in (stat.S_IFREG, stat.S_IFDIR):
                        continue  # never opened: a FIFO would block, a device act
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY, dir_fd=dir_fd)
                except OSError:
                    continue  # gone since the listing, or swapped for a link (ELOOP)
                try:
                    kind = stat.S_IFMT(os.fstat(fd).st_mode)  # what was opened, not what was listed
                    if kind in (stat.S_IFREG, stat.S_IFDIR):
                        _tighten(fd, name, DIR_MODE if kind == stat.S_IFDIR else FILE_MODE, changed, failed)
                finally:
                    os.close(fd)
        finally:
            os.close(dir_fd)
        return changed, failed

    def _generated(self, name: str, make, holds: str, lost: str) -> str:
        path = self.path / name
        try:
            value = path.read_text().strip()
        except FileNotFoundError:
            pass
        else:
            if not value:
                raise EmptyStateFile(path, holds, lost)
            return value
        self.ensure()
        value = make()
        write_atomic(path, value + "\n")
        return value

    def project_id(self) -> str:
        """Generated once (32 hex digits), then kept."""
        import uuid  # here, not at the top: `aether port get` imports this module and must start fast

        return self._generated("project-id", lambda: uuid.uuid4().hex, "the project id", "move every preview URL")

    @property
    def token_path(self) -> Path:
        return self.path / "token"

    def token(self) -> str:
        """Generated once (URL-safe, 256 bits), kept 0600."""
        import secrets

        return self._generated("token", lambda: secrets.token_urlsafe(32), "the workspace token", "lock out every client")

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    def load_config(self) -> dict[str, Any]:
        """The config file's object, {} if there is none; ValueError naming it if unreadable."""
        try:
            text = self.config_path.read_text()
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{self.config_path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{self.config_path}: must hold a JSON object")
        return data

    def save_config(self, updates: dict[str, Any]) -> None:
        """Merge ``updates`` into the config file."""
        self.ensure()
        data = self.load_config()
        data.update(updates)
        write_atomic(self.config_path, json.dumps(data, indent=2, sort_keys=True) + "\n")
