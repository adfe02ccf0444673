"""Defaults and their overrides from the environment (``AETHER_*``)."""

from __future__ import annotations

import os
from typing import Iterable

#: Seed 000: SSH, internal SSH, and aether's own port.
DEFAULT_IGNORED_PORTS = (22, 2222, 3001)
DEFAULT_BACKEND = "auto"
DEFAULT_SOCKDIAG_INTERVAL = 0.25


def parse_ports(text: str) -> tuple[int, ...]:
    """``"22, 2222,3001"`` -> ``(22, 2222, 3001)``; ValueError naming the bad item."""
    ports = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if not item.isdigit() or not 1 <= int(item) <= 65535:
            raise ValueError(f"not a port number (1-65535): {item!r}")
        ports.append(int(item))
    return tuple(sorted(set(ports)))


def ignored_ports(override: str | None = None) -> tuple[int, ...]:
    text = override if override is not None else os.environ.get("AETHER_IGNORED_PORTS")
    return DEFAULT_IGNORED_PORTS if text is None else parse_ports(text)


def backend(override: str | None = None) -> str:
    return override or os.environ.get("AETHER_BACKEND") or DEFAULT_BACKEND


def sockdiag_interval(override: float | None = None) -> float:
    if override is not None:
        return override
    return float(os.environ.get("AETHER_SOCKDIAG_INTERVAL", DEFAULT_SOCKDIAG_INTERVAL))


def ebpf_buffer() -> str:
    """``auto`` (ring buffer on 5.8+), ``ring`` or ``perf``: tests force each."""
    return os.environ.get("AETHER_EBPF_BUFFER", "auto")


def ebpf_pages() -> int | None:
    """Buffer size in pages (ring: total; perf: per CPU); None for the default (64)."""
    text = os.environ.get("AETHER_EBPF_PAGES")
    return int(text) if text else None


def format_ports(ports: Iterable[int]) -> str:
    return ",".join(str(port) for port in sorted(ports))
