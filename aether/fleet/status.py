"""``aether fleet status``: the fleet's workspaces as Redis holds them, read in one transaction.

A table for people, ``--json`` for machines: each workspace's prefix, workspace id, advertised
address, epoch, last heartbeat (as an age), whether it is alive, and its ports with visibility
and registry names. Exit 0; 1 with one line on stderr when Redis cannot be read.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import ujson

log = logging.getLogger("aether.fleet")


def add_commands(commands) -> None:
    from aether.settings import sources

    fleet = commands.add_parser("fleet", help="fleet mode: the workspaces published in Redis").add_subparsers(
        dest="fleet_command", required=True
    )
    status = fleet.add_parser("status", help="every workspace of the fleet, its address, liveness and ports")
    sources.add_flags(status, "fleet status")
    status.add_argument("--json", action="store_true", help="one JSON object instead of a table")


async def read(url: str) -> dict:
    """The fleet as :func:`report` shows it."""
    from aether.fleet import connection, keys

    client = connection.client(url, socket_timeout=5.0, connect_timeout=2.0)
    try:
        pipe = client.pipeline(transaction=True)
        pipe.hgetall(keys.STATE)
        pipe.zrange(keys.ALIVE, 0, -1, withscores=True)
        pipe.time()
        pipe.get(keys.SEQ)
        pipe.get(keys.BOOT)
        state, alive, (seconds, micros), seq, boot = await pipe.execute()
    finally:
        await client.aclose()
    return report(state, dict(alive), seconds * 1000 + micros // 1000, seq, boot)


def report(state: dict, deadlines: dict, now_ms: int, seq, boot) -> dict:
    """Pure: the JSON document of ``aether fleet status --json``."""
    from aether.fleet.blob import BlobError, decode

    workspaces, malformed = [], []
    for raw_prefix in sorted(state):
        prefix = raw_prefix.decode("utf-8", "replace")
        try:
            ws = decode(state[raw_prefix], prefix)
        except BlobError as exc:
            log.warning("fleet workspace skipped: its blob is malformed", extra={"prefix": prefix[:64], "reason": str(exc)})
            malformed.append(prefix)
            continue
        deadline = deadlines.get(raw_prefix)
        if not ws.alive:
            liveness = "stopped"
        elif deadline is not None and deadline > now_ms:
            liveness = "alive"
        else:
            liveness = "dead"
        names: dict[int, list[str]] = {}
        for key, port in sorted(ws.names.items()):
            names.setdefault(port, []).append(key)
        ports = [
            {"port": port, "open": True, "visibility": "public" if public else "private", "names": names.get(port, [])}
            for port, public in sorted(ws.open.items())
        ]
        ports += [
            {"port": port, "open": False, "visibility": "public", "names": names.get(port, [])}
            for port in sorted(ws.closed_public)
        ]
        heartbeat = None
        if ws.alive and deadline is not None:
            heartbeat = round(max(0.0, now_ms - (deadline - ws.dead_after)) / 1000, 3)
        workspaces.append(
            {
                "prefix": ws.prefix,
                "project": ws.project,
                "workspace": ws.workspace,
                "address": ws.address,
                "epoch": ws.epoch,
                "started": ws.started,
                "heartbeat_age": heartbeat,
                "alive": liveness == "alive",
                "state": liveness,
                "ports": ports,
                "names": {key: port for key, port in sorted(ws.names.items())},
            }
        )
    return {
        "workspaces": workspaces,
        "malformed": malformed,
        "seq": int(seq or 0),
        "boot": boot.decode() if boot else None,
        "time": now_ms,
    }


def table(doc: dict) -> str:
    rows = [("PREFIX", "WORKSPACE", "ADDRESS", "EPOCH", "HEARTBEAT", "STATE", "PORTS")]
    for ws in doc["workspaces"]:
        age = "-" if ws["heartbeat_age"] is None else f"{ws['heartbeat_age']:.1f}s ago"
        ports = (
            ", ".join(
                f"{p['port']} {p['visibility']}" + ("" if p["open"] else " closed") + "".join(f" {n}" for n in p["names"])
                for p in ws["ports"]
            )
            or "-"
        )
        rows.append((ws["prefix"], ws["workspace"], ws["address"], ws["epoch"], age, ws["state"], ports))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in rows]
    alive = sum(ws["alive"] for ws in doc["workspaces"])
    lines.append(
        f"{len(doc['workspaces'])} workspaces, {alive} alive"
        + (f", {len(doc['malformed'])} malformed" if doc["malformed"] else "")
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from aether.fleet import connection
    from aether.settings import sources

    url = sources.value("fleet_redis", args.fleet_redis, "fleet status")
    if not url:
        print("aether: fleet status needs --redis URL (or AETHER_FLEET_REDIS)", file=sys.stderr)
        return 2
    try:
        connection.check(url)
    except ValueError as exc:
        print(f"aether: {exc}", file=sys.stderr)
        return 2
    try:
        doc = asyncio.run(read(url))
    except Exception as exc:  # noqa: BLE001 - one line, whatever the client raised
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"aether: redis {connection.describe(url)} unreachable: {reason}", file=sys.stderr)
        return 1
    print(ujson.dumps(doc, escape_forward_slashes=False) if args.json else table(doc))
    return 0
