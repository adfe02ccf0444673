"""Defaults and their overrides from the environment (``AETHER_*``)."""

from __future__ import annotations

import os

#: Seed 000: SSH, internal SSH, and aether's own port.
DEFAULT_IGNORED_PORTS = (22, 2222, 3001)
DEFAULT_BACKEND = "auto"
DEFAULT_SOCKDIAG_INTERVAL = 0.25
#: Variables no process the daemon starts (terminals, agent backends) may inherit.
PRIVATE_ENV = ("AETHER_TOKEN",)


def child_environment() -> dict[str, str]:
    """The daemon's environment, as a child it starts gets it: without :data:`PRIVATE_ENV`."""
    return {k: v for k, v in os.environ.items() if k not in PRIVATE_ENV}


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
    try:
        return DEFAULT_IGNORED_PORTS if text is None else parse_ports(text)
    except ValueError as exc:
        source = "--ignore" if override is not None else "AETHER_IGNORED_PORTS"
        raise ValueError(f"{source}: {exc}") from None


def backend(override: str | None = None) -> str:
    return override or os.environ.get("AETHER_BACKEND") or DEFAULT_BACKEND


def sockdiag_interval(override: float | None = None) -> float:
    if override is not None:
        return override
    return _positive_float("AETHER_SOCKDIAG_INTERVAL", DEFAULT_SOCKDIAG_INTERVAL)


def ebpf_buffer() -> str:
    """``auto`` (ring buffer on 5.8+), ``ring`` or ``perf``: tests force each."""
    value = os.environ.get("AETHER_EBPF_BUFFER", "auto")
    if value not in ("auto", "ring", "perf"):
        raise ValueError(f"AETHER_EBPF_BUFFER must be auto, ring or perf, not {value!r}")
    return value


def ebpf_pages() -> int | None:
    """Buffer size in pages (ring: total; perf: per CPU), a power of two; None: the default."""
    text = os.environ.get("AETHER_EBPF_PAGES")
    if not text:
        return None
    if not text.isdigit() or int(text) < 1 or int(text) & (int(text) - 1):
        raise ValueError(f"AETHER_EBPF_PAGES must be a power of two, not {text!r}")
    return int(text)


def cgroups() -> str:
    """``auto`` (a cgroup per terminal session and agent turn where the kernel allows) or
    ``off`` (the fallback, which tests force)."""
    value = os.environ.get("AETHER_CGROUPS", "auto")
    if value not in ("auto", "off"):
        raise ValueError(f"AETHER_CGROUPS must be auto or off, not {value!r}")
    return value


def validate() -> None:
    """Raise ValueError, naming the variable, for any malformed AETHER_* setting."""
    if backend() not in ("auto", "ebpf", "sockdiag"):
        raise ValueError(f"AETHER_BACKEND must be auto, ebpf or sockdiag, not {backend()!r}")
    cgroups()
    sockdiag_interval()
    ebpf_buffer()
    ebpf_pages()


def _positive_float(name: str, default: float) -> float:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds, not {text!r}")
    return value
