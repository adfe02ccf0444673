"""What allocation avoids, and the ranges it picks from (seed 002)."""

from __future__ import annotations

from aether.registry.store import RegistryError

#: Ports a new block never takes: common servers' defaults, which a workspace is likely to run.
WELL_KNOWN = frozenset({80, 443, 1433, 1521, 2375, 2376, 3000, 3001, 3306, 4200, 5000, 5173, 5432, 5601, 5672,
                        6379, 8000, 8080, 8443, 8888, 9000, 9090, 9200, 11211, 15672, 27017})
#: The WHATWG fetch standard's "bad ports": browsers refuse to load URLs on them.
BAD_PORTS = frozenset({1, 7, 9, 11, 13, 15, 17, 19, 20, 21, 22, 23, 25, 37, 42, 43, 53, 69, 77, 79, 87, 95, 101,
                       102, 103, 104, 109, 110, 111, 113, 115, 117, 119, 123, 135, 137, 139, 143, 161, 179, 389,
                       427, 465, 512, 513, 514, 515, 526, 530, 531, 532, 540, 548, 554, 556, 563, 587, 601, 636,
                       989, 990, 993, 995, 1719, 1720, 1723, 2049, 3659, 4045, 4190, 5060, 5061, 6000, 6566,
                       6665, 6666, 6667, 6668, 6669, 6679, 6697, 10080})
#: Seed 002's ranges; ``--range`` picks another.
RANGES = {"core": (5554, 5560), "extensions": (5561, 5569), "apps": (5570, 5599)}
NEVER_ALLOCATED = WELL_KNOWN | BAD_PORTS


def udp_ports() -> set[int]:
    ports = set()
    for name in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    ports.add(int(line.split()[1].rsplit(":", 1)[1], 16))
        except OSError:
            continue
    return ports


def parse_range(text: str) -> tuple[int, int]:
    if text in RANGES:
        return RANGES[text]
    first, sep, last = text.partition("-")
    if not sep or not first.isdigit() or not last.isdigit():
        raise RegistryError(f"invalid range {text!r}: FIRST-LAST or one of {', '.join(RANGES)}")
    return int(first), int(last)
