"""Certificates made here by openssl, for TLS upstreams and fronts (EC keys: fast)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from support.processes import tool

#: openssl's arguments for a new EC key, unencrypted.
EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def self_signed(directory: Path, name: str = "localhost", alt_names: tuple[str, ...] = (), stem: str = "") -> tuple[str, str]:
    """A self-signed certificate for ``name`` (and DNS ``alt_names``) valid two days, written
    into ``directory`` as ``{stem}cert.pem`` and ``{stem}key.pem``; (certificate, key) paths."""
    cert, key = directory / f"{stem}cert.pem", directory / f"{stem}key.pem"
    extra = ["-addext", "subjectAltName=" + ",".join(f"DNS:{n}" for n in alt_names)] if alt_names else []
    subprocess.run(
        [tool("openssl"), "req", "-x509", *EC_KEY, "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}"]
        + extra,
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)
