"""The state directory: what aether generates once and keeps (project id, token), and the
configuration a client changed through the ``config`` channel.

Files are written atomically (temporary file, then rename); the token file is 0600.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def default_state_dir() -> Path:
    """systemd's ``StateDirectory=`` when set; ``/var/lib/aether`` for root under systemd;
    else ``$XDG_STATE_HOME/aether`` (``~/.local/state/aether``)."""
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    if os.geteuid() == 0 and os.environ.get("INVOCATION_ID"):
        return Path("/var/lib/aether")
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "aether"


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
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


class StateDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    def ensure(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _generated(self, name: str, make, mode: int = 0o644) -> str:
        path = self.path / name
        try:
            value = path.read_text().strip()
            if value:
                return value
        except FileNotFoundError:
            pass
        self.ensure()
        value = make()
        write_atomic(path, value + "\n", mode)
        return value

    def project_id(self) -> str:
        """Generated once (32 hex digits), then kept."""
        import uuid  # here, not at the top: `aether port get` imports this module and must start fast

        return self._generated("project-id", lambda: uuid.uuid4().hex)

    @property
    def token_path(self) -> Path:
        return self.path / "token"

    def token(self) -> str:
        """Generated once (URL-safe, 256 bits), kept 0600."""
        import secrets

        return self._generated("token", lambda: secrets.token_urlsafe(32), 0o600)

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
