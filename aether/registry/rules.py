"""What allocation avoids, and the ranges it picks from (the built-in ranges)."""

from __future__ import annotations

from aether.registry.store import RegistryError

#: Ports a new block never takes: common servers' defaults, which a workspace is likely to run.
WELL_KNOWN = frozenset(
    {
        80,
        443,
        1433,
        1521,
        2375,
        2376,
        3000,
        3001,
        3306,
        4200,
        5000,
        5173,
        5432,
        5601,
        5672,
        6379,
        8000,
        8080,
        8443,
        8888,
        9000,
        9090,
        9200,
        11211,
        15672,
        27017,
    }
)
#: The WHATWG fetch standard's "bad ports": browsers refuse to load URLs on them.
BAD_PORTS = frozenset(
    {
        1,
        7,
        9,
        11,
        13,
        15,
        17,
        19,
        20,
        21,
        22,
        23,
        25,
        37,
        42,
        43,
        53,
        69,
        77,
        79,
        87,
        95,
        101,
        102,
        103,
        104,
        109,
        110,
        111,
        113,
        115,
        117,
        119,
        123,
        135,
        137,
        139,
        143,
        161,
        179,
        389,
        427,
        465,
        512,
        513,
        514,
        515,
        526,
        530,
        531,
        532,
        540,
        548,
        554,
        556,
        563,
        587,
        601,
        636,
        989,
        990,
        993,
        995,
        1719,
        1720,
        1723,
        2049,
        3659,
        4045,
        4190,
        5060,
        5061,
        6000,
        6566,
        6665,
        6666,
        6667,
        6668,
        6669,
        6679,
        6697,
        10080,
    }
)
#: The built-in ranges: name -> (first, last, purpose). ``config.json``'s ``port_ranges`` adds or
#: replaces ranges, e.g. ``{"ml": [7000, 7099, "notebooks"]}``; ``--range`` picks one by name.
RANGES = {
    "core": (5554, 5560, "core services"),
    "extensions": (5561, 5569, "reserved for extensions"),
    "apps": (5570, 5599, "user applications"),
}
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


def ranges(state_dir) -> dict[str, tuple[int, int, str]]:
    """The built-in ranges with ``config.json``'s ``port_ranges`` over them."""
    import json
    from pathlib import Path

    merged = dict(RANGES)
    try:
        configured = json.loads((Path(state_dir) / "config.json").read_text()).get("port_ranges", {})
    except FileNotFoundError:
        return merged
    except (OSError, ValueError, AttributeError) as exc:
        raise RegistryError(f"{state_dir}/config.json: unreadable port_ranges ({exc})", "unavailable") from None
    for name, value in configured.items():
        try:
            first, last, purpose = int(value[0]), int(value[1]), str(value[2] if len(value) > 2 else "")
        except (TypeError, ValueError, IndexError, KeyError):
            raise RegistryError(f"config.json port_ranges.{name}: must be [first, last, purpose]") from None
        merged[name] = (first, last, purpose)
    return merged


def parse_range(text: str, known: dict[str, tuple[int, int, str]] | None = None) -> tuple[int, int]:
    known = RANGES if known is None else known
    if text in known:
        return known[text][0], known[text][1]
    first, sep, last = text.partition("-")
    if not sep or not first.isdigit() or not last.isdigit():
        raise RegistryError(f"invalid range {text!r}: FIRST-LAST or one of {', '.join(known)}")
    return int(first), int(last)
