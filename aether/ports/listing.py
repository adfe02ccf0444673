"""``aether ports list``'s rows: each open port's state (:func:`aether.ports.procs.port_states`)
with the fields a ``ports`` ``open`` carries beside it: command line and working directory,
container, protocol and attributes (see :mod:`aether.ports.facts`).

A listing is one look, not a watch: each port is looked at, all at a time, for at most
:data:`LOOK_SECONDS`; a port that has not answered by then (a dev server still compiling) is
listed with ``protocol`` null. A port that hangs up on every look is looked at again, with
the watch's backoff, until it is ``tcp`` (PostgreSQL: three looks, about 0.4 s).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from aether.attributes.rules import EMPTY, Ruleset
from aether.ports.containers import Containers, is_docker, proxy_target, socket_path
from aether.ports.detect import FIRST_RETRY, HANGUPS, TCP, Detector
from aether.ports.events import PortState
from aether.ports.facts import probe_host
from aether.ports.who import who

#: Seconds the whole listing waits for ports to answer. An answering server does so in
#: milliseconds (a look that finds HTTP takes the banner wait, 50 ms, and a round trip; one
#: that finds TLS a handshake more: bench/detect.py); this bounds the listing for ports that
#: do not answer.
LOOK_SECONDS = 1.0
#: Seconds a port that hangs up on a look has for its next one (each is answered at once: a
#: few milliseconds on an idle machine).
HANGUP_SECONDS = 5.0


async def _protocol(detector: Detector, host: str, port: int) -> str | None:
    """What ``port`` speaks, as far as :data:`LOOK_SECONDS` of looks tell; a port that hangs
    up on them (PostgreSQL) is looked at again, as the watch does, until it is ``tcp``: that
    takes :data:`~aether.ports.detect.HANGUPS` looks, and is allowed :data:`HANGUP_SECONDS`
    (the machine may be busy), since each look is answered at once."""
    loop = asyncio.get_running_loop()
    end = loop.time() + LOOK_SECONDS
    delay, hangups = FIRST_RETRY, 0
    while True:
        try:
            look = await asyncio.wait_for(detector.look(host, port, LOOK_SECONDS), max(0.0, end - loop.time()))
        except TimeoutError:
            return None
        if look.protocol is not None:
            return look.protocol
        if look.reason != "hangup":
            return None
        hangups += 1
        if hangups >= HANGUPS:
            return TCP
        end = max(end, loop.time() + HANGUP_SECONDS)
        await asyncio.sleep(delay)
        delay *= 2


def rows(states: Sequence[PortState], rules: Ruleset = EMPTY, look: bool = True, docker_socket: str | None = None) -> list[dict]:
    """The JSON rows of ``states``: what :meth:`PortState.to_json` gives, and ``command``,
    ``cwd``, ``started``, ``container``, ``protocol``, ``label``, ``onOpen`` and ``sources``;
    containers asked of dockerd on ``docker_socket`` (see :func:`.containers.socket_path`)."""
    return asyncio.run(_rows(states, rules, look, socket_path(docker_socket)))


async def _rows(states: Sequence[PortState], rules: Ruleset, look: bool, docker_socket: str) -> list[dict]:
    found = {state.port: who(state.pid) for state in states}
    detector = Detector()
    containers = Containers(docker_socket)

    async def protocol(state: PortState) -> str | None:
        if not look:
            return None
        return await _protocol(detector, probe_host(state.addresses), state.port)

    async def container(state: PortState):
        holder = found[state.port]
        if holder is None or not is_docker(state.process, holder.argv):
            return None
        return await containers.publisher(state.port, proxy_target(holder.argv or ()))

    protocols = await asyncio.gather(*(protocol(state) for state in states))
    boxes = await asyncio.gather(*(container(state) for state in states))
    out = []
    for state, detected, box in zip(states, protocols, boxes, strict=True):
        holder = found[state.port]
        attrs = rules.resolve(state.port, holder.argv if holder is not None else None)
        row = state.to_json()
        row.update(
            {
                "protocol": attrs.protocol or detected,
                "command": attrs.shown_command(holder.command) if holder is not None else None,
                "cwd": holder.cwd if holder is not None else None,
                "started": holder.started_ms if holder is not None else None,
                "container": box.to_json() if box is not None else None,
                "label": attrs.label,
                "onOpen": attrs.on_open,
                "visibility": attrs.visibility,
                "sources": attrs.as_dict().get("sources", {}),
            }
        )
        out.append(row)
    return out
