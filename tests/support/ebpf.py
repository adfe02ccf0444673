"""Whether the eBPF probe can load here. Tests that need it skip only where it truly cannot,
and fail instead when AETHER_REQUIRE_EBPF=1 (as .ci/run sets).

Every test that loads the probe is marked ``ebpf`` (``-m "not ebpf"`` leaves them out): the
helpers that load it note it here, and the suite fails a test that did without the marker.
"""

from __future__ import annotations

import functools
import os

import pytest

REQUIRE_EBPF = os.environ.get("AETHER_REQUIRE_EBPF") == "1"

#: Whether the running test loaded the probe (through :func:`need_ebpf` or a helper that
#: starts a backend on it); reset before each test.
used = False


@functools.lru_cache(maxsize=1)
def ebpf_unavailable() -> str | None:
    """Why the probe cannot load here, or None. Loads it once for real to be sure."""
    from aether.ports.ebpf import Probe, ProbeUnavailable

    try:
        Probe().stop()
    except ProbeUnavailable as exc:
        return str(exc)
    return None


def need_ebpf() -> None:
    global used
    used = True
    reason = ebpf_unavailable()
    if reason:
        if REQUIRE_EBPF:
            pytest.fail(f"AETHER_REQUIRE_EBPF=1 but the probe cannot load: {reason}")
        pytest.skip(f"eBPF unavailable: {reason}")


def note_backend(backend: str) -> None:
    """A backend is about to start: ``ebpf``, or ``auto`` where the probe loads, uses it."""
    global used
    if backend == "ebpf" or (backend == "auto" and ebpf_unavailable() is None):
        used = True
