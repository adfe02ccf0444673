"""This process's Linux capabilities, read from ``/proc/self/status`` (no libcap needed).

What each capability buys aether, found by running the daemon as ``nobody`` with ambient
capabilities (see README, "aether doctor"):

- loading the probe: CAP_BPF and CAP_PERFMON (5.8+; CAP_SYS_ADMIN covers both, and is the
  only way before 5.8), and reading the tracepoint's format under tracefs, which is mode 0700:
  CAP_DAC_READ_SEARCH (or CAP_DAC_OVERRIDE);
- naming the process behind another user's socket (``/proc/<pid>/fd``, ``ns/net``):
  CAP_SYS_PTRACE, with CAP_DAC_READ_SEARCH;
- stopping another user's process: CAP_KILL.
"""

from __future__ import annotations

from collections.abc import Iterable

CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
CAP_KILL = 5
CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39

NAMES = {
    CAP_DAC_OVERRIDE: "CAP_DAC_OVERRIDE",
    CAP_DAC_READ_SEARCH: "CAP_DAC_READ_SEARCH",
    CAP_KILL: "CAP_KILL",
    CAP_SYS_PTRACE: "CAP_SYS_PTRACE",
    CAP_SYS_ADMIN: "CAP_SYS_ADMIN",
    CAP_PERFMON: "CAP_PERFMON",
    CAP_BPF: "CAP_BPF",
}

#: The set a dedicated non-root user needs for everything aether does (systemd's
#: AmbientCapabilities=): the probe, other users' pids, and killing their processes.
DAEMON = (CAP_BPF, CAP_PERFMON, CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE, CAP_KILL)


def effective(status_path: str = "/proc/self/status") -> int:
    """The effective set as a bit mask (bit N is capability N); 0 where unreadable."""
    try:
        with open(status_path) as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def has(cap: int, mask: int | None = None) -> bool:
    return bool((effective() if mask is None else mask) >> cap & 1)


def names(caps: Iterable[int]) -> list[str]:
    return [NAMES.get(cap, f"cap {cap}") for cap in caps]


def missing_for_probe(mask: int | None = None) -> list[int]:
    """Capabilities lacking to load a BPF program and attach it to a tracepoint: CAP_BPF and
    CAP_PERFMON, unless CAP_SYS_ADMIN stands in for both (bpf_capable, perfmon_capable).
    Reading tracefs is checked apart: its permissions vary with how it was mounted."""
    mask = effective() if mask is None else mask
    if has(CAP_SYS_ADMIN, mask):
        return []
    return [cap for cap in (CAP_BPF, CAP_PERFMON) if not has(cap, mask)]
