"""Path-based previews, for clients and networks without wildcard DNS: ``/proxy/{port}/...``
(the prefix taken off before the app sees the path) and ``/absproxy/{port}/...`` (the path
passed whole, for an app told its base path), on the server's own host. No I/O.

The same conventions as code-server's and jupyter-server-proxy's, with their caveat: every
path preview shares the server's origin, and an app that emits absolute paths (``/app.js``,
a redirect to ``/login``) under ``/proxy/`` sends the browser out of its prefix. Such an app
is previewed under ``/absproxy/`` with its base path set to the prefix, or on its own host.
"""

from __future__ import annotations

import dataclasses

STRIPPED = b"/proxy/"
KEPT = b"/absproxy/"
PREFIXES = (STRIPPED, KEPT)


def is_path_preview(target: bytes) -> bool:
    """Whether a request target names a path preview (checked before any other rule)."""
    return target.startswith(PREFIXES)


@dataclasses.dataclass(frozen=True, slots=True)
class PathPreview:
    """A parsed path-preview target.

    ``name``: the port or registry key as written (None when a port has leading zeros, so
    that each port has one path); ``prefix``: ``/proxy/3000`` (the cookie's path, and the
    ``X-Forwarded-Prefix`` of a stripped one); ``upstream``: the target the app gets; ``slash``:
    None, or the target with the slash after the prefix added (``/proxy/3000`` has none: a
    relative link on its page would leave the prefix, so it is redirected).
    """

    name: int | str | None
    prefix: bytes
    upstream: bytes
    stripped: bool
    slash: bytes | None = None


def parse(target: bytes) -> PathPreview | None:
    """The path preview ``target`` names, or None when it names none (a bad port segment)."""
    stripped = target.startswith(STRIPPED)
    base = STRIPPED if stripped else KEPT
    rest = target[len(base) :]
    end = len(rest)
    for stop in (b"/", b"?", b"#"):
        found = rest.find(stop)
        if 0 <= found < end:
            end = found
    segment, tail = rest[:end], rest[end:]
    if not segment or len(segment) > 63:
        return None
    if segment.isdigit():
        name: int | str | None = None if segment[0] == 48 and len(segment) > 1 else int(segment)  # b"0"
    elif all(c in b"abcdefghijklmnopqrstuvwxyz0123456789-" for c in segment.lower()):
        name = segment.decode().lower()
    else:
        return None
    prefix = base + segment
    if not tail.startswith(b"/"):
        return PathPreview(name, prefix, b"", stripped, slash=prefix + b"/" + tail)
    return PathPreview(name, prefix, tail if stripped else target, stripped)
