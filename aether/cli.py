"""The ``aether`` command line.

Results go to stdout in a stable format (``--json`` where a machine reads them); logs go to
stderr, one record per line (JSON, or logfmt with ``--log-format logfmt``). Exit status: 0 success, 1 a refused or failed operation,
2 a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import stat
import sys
from typing import TYPE_CHECKING

import ujson

from aether import __version__, log
from aether.settings import sources

if TYPE_CHECKING:
    from aether.ports.facts import PortFacts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aether", description="Workspace port monitor and server.")
    parser.add_argument("--version", action="version", version=f"aether {__version__}")
    sources.add_flags(parser, "")
    commands = parser.add_subparsers(dest="command", required=True)

    ports = commands.add_parser("ports", help="listening TCP ports").add_subparsers(dest="ports_command", required=True)

    ignore_help = {"ignored_ports": "ports never reported, comma-separated"}

    listing = ports.add_parser("list", help="the ports open now")
    listing.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    sources.add_flags(
        listing,
        "ports list",
        help={"backend": "accepted for symmetry with watch: a listing is always one sock_diag snapshot", **ignore_help},
    )

    watch = ports.add_parser("watch", help="one JSON line per port open/close, current ports first")
    watch.add_argument("--human", action="store_true", help="a table redrawn as ports come and go, for a terminal")
    watch.add_argument(
        "--plain",
        action="store_true",
        help="the monitor's events alone: no protocol, command line or attributes, no ready, no update for them",
    )
    sources.add_flags(
        watch, "ports watch", help={"sockdiag_interval": "seconds between sock_diag snapshots, the minimum", **ignore_help}
    )

    serve = commands.add_parser("serve", help="run the workspace server (WebSocket API)")
    sources.add_flags(serve, "serve")

    kill = ports.add_parser("kill", help="stop what listens on a port")
    kill.add_argument("port", type=int)
    kill.add_argument("--signal", default="TERM", help="first signal (default TERM)")
    kill.add_argument("--grace", type=float, default=5.0, help="seconds before SIGKILL (default 5)")
    kill.add_argument("--json", action="store_true")
    sources.add_flags(kill, "ports kill", help=ignore_help)

    doctor = commands.add_parser("doctor", help="will the eBPF backend run here; what to fix if not")
    doctor.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    sources.add_flags(
        doctor,
        "doctor",
        help={
            "host": "the address to test, as serve would find it",
            "port": "the port to test, as serve would find it",
            "state_dir": "the state directory to check, as serve would find it",
        },
    )
    doctor.add_argument(
        "--preview",
        type=int,
        metavar="PORT",
        help="explain why PORT's preview does not work: nothing listens, an address the proxy cannot reach, "
        "TLS or no HTTP, the app refusing the preview's Host",
    )
    doctor.add_argument(
        "--service",
        action="store_true",
        help="check what the installed aether.service runs with: /etc/aether/aether.env's "
        "settings and the state in /var/lib/aether",
    )

    from aether.registry import cli as registry_cli

    registry_cli.add_commands(commands)

    from aether.fleet import status as fleet_status  # redis itself is imported only when it runs

    fleet_status.add_commands(commands)

    from aether.settings import gateway as gateway_settings

    gateway_settings.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        log.setup(sources.value("log_level", args.log_level), sources.value("log_format", args.log_format))
        sources.check_environment()
        if args.command == "ports":  # what its flags set, from them or the environment
            values = {
                setting.name: sources.pick(setting, getattr(args, setting.name))
                for setting in sources.flags_of(f"ports {args.ports_command}")
            }
    except ValueError as exc:
        print(f"aether: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        return _serve(args)
    if args.command == "doctor":
        from aether import doctor

        return doctor.command(args)
    if args.command == "port":  # `aether port` itself starts in aether/entry.py, before this module
        from aether.registry import cli as registry_cli

        return registry_cli.run(args)
    if args.command == "fleet":
        from aether.fleet import status as fleet_status

        return fleet_status.run(args)
    if args.command == "gateway":
        from aether.server import gateway

        return gateway.run(args)
    if args.command == "ports":
        handler = {"list": _ports_list, "watch": _ports_watch, "kill": _ports_kill}[args.ports_command]
        return handler(args, values)
    return 2


def _ports_list(args, values: dict) -> int:
    # A listing is one snapshot of the kernel's truth: sock_diag answers it in a few ms, with
    # no probe to compile, whichever backend a watcher would use.
    from aether.ports import procs, sockdiag

    with sockdiag.DiagSocket() as diag:
        raw = [row for row in diag.raw() if row[1] not in values["ignored_ports"]]
    from aether.ports import listing

    # The table shows no protocol: only JSON waits for ports to answer.
    entries = _registry_entries()
    names = _names(entries)
    said = {entry.port: entry for entry in entries if entry.protocol}
    result = [
        _described(_registry_protocol(row, said), names)
        for row in listing.rows(procs.port_states(raw), _rules(), look=args.json, docker_socket=values["docker_socket"])
    ]
    if args.json:
        print(ujson.dumps(result, escape_forward_slashes=False))
        return 0
    print("\n".join(_table(result)))
    return 0


def _registry_names() -> dict[int, list[str]]:
    """port -> the registry's keys for it (see :func:`_registry_entries`)."""
    return _names(_registry_entries())


def _registry_entries() -> list:
    """The entries of the running server's registry (or the default one); none when there is
    none. Never creates a registry."""
    from aether import running

    path = running.state_dir(None)[0] / "registry.db"
    if not path.exists():
        return []
    from aether.registry.store import Registry, RegistryError

    try:
        with Registry(path) as registry:
            return registry.entries()
    except RegistryError:
        return []


def _names(entries: list) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for entry in entries:
        names.setdefault(entry.port, []).append(entry.key)
    return names


def _registry_protocol(row: dict, said: dict) -> dict:
    """``row`` with its registry entry's protocol (in ``said``, by port), over a rule's and
    the look's, as the server decides it (a person's choice is the server's alone)."""
    from aether.ports.facts import REGISTRY_FILE

    entry = said.get(row["port"])
    if entry is not None:
        row["protocol"] = entry.protocol
        row["sources"] = {**(row.get("sources") or {}), "protocol": {"file": REGISTRY_FILE, "key": entry.key}}
    return row


def _described(row: dict, names: dict[int, list[str]]) -> dict:
    """A port's JSON with its registry names and, unless the monitor gave it, its command."""
    from aether.ports import procs

    if row.get("command") is None and "hideCommand" not in (row.get("sources") or {}):
        row["command"] = procs.command_line(row.get("pid"))  # not read yet (an open's first line)
    row["names"] = names.get(row["port"], [])
    return row


def _table(rows: list[dict]) -> list[str]:
    """The human table, one line a port, the command cut to the terminal's width."""
    import shutil

    width = shutil.get_terminal_size((120, 24)).columns
    lines = [f"{'PORT':>5}  {'PID':>7}  {'PROCESS':<16}  {'NAMES':<16}  {'ADDRESSES':<22}  COMMAND"]
    for row in rows:
        pid = "-" if row.get("pid") is None else str(row["pid"])
        names = ",".join(row.get("names") or []) or "-"
        label = row.get("label")
        names = f"{names} ({label})" if label else names
        addresses = ",".join(row.get("addresses") or [])
        line = f"{row['port']:>5}  {pid:>7}  {row.get('process') or '-':<16}  {names:<16}  {addresses:<22}  "
        extra = [row["protocol"]] if row.get("protocol") else []
        if row.get("readyMs") is not None:
            # Open before the watch began: the time counts from then, not from the app's start.
            extra.append("answering" if row.get("seenAtStart") else f"ready {row['readyMs']} ms")
        box = row.get("container")  # who a Docker port is, before docker-proxy's arguments
        named = f"container: {box['name']}" + (f" ({box['image']})" if box.get("image") else "") + " " if box else ""
        command = (f"[{' '.join(extra)}] " if extra else "") + named + (row.get("command") or "-")
        room = max(10, width - len(line))
        lines.append(line + (command if len(command) <= room else command[: room - 1] + "…"))
    return lines


def _rules():
    """The attribute rules ``serve`` would read: config.json in the state directory, the
    workspace's files beneath its root (each from its variable, else its default)."""
    from pathlib import Path

    from aether.attributes.live import read_all
    from aether.state import locate

    root = sources.value("workspace_root") or Path(os.path.expanduser("~"))
    ruleset, _problems = read_all(Path(root), locate(sources.value("state_dir")) / "config.json")
    return ruleset


def _ports_watch(args, values: dict) -> int:
    from aether.ports.ebpf import ProbeUnavailable
    from aether.ports.monitor import PortMonitor

    out = sys.stdout.buffer

    async def run() -> int:
        from aether.output import Output

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # Never a blocking write: a reader that stops reading must not keep SIGTERM out.
        output = Output(loop, out.fileno(), stop.set)
        lines: list[bytes] = []

        table: dict[int, dict] = {}
        names = _registry_names() if args.human else {}
        facts: PortFacts | None = None

        def write(message: dict) -> None:
            # Lines are flushed once the current batch of events is written, before the loop
            # sleeps again: no line waits, and a burst costs one write, not one per line.
            if args.human:
                return redraw(message)
            if not lines:
                loop.call_soon(flush)
            lines.append(ujson.dumps(message, escape_forward_slashes=False).encode() + b"\n")

        def flush() -> None:
            output.write(b"".join(lines))
            lines.clear()

        def emit(event, live: bool = True) -> None:
            message = event.to_message()
            if facts is not None and event.type != "close":
                message.update(facts.fields(event.port, event.pid))
            if args.human and not live:
                message["seenAtStart"] = True  # the table's own: the lines keep the channel's fields
            write(message)
            if facts is not None and live:
                facts.seen(event)  # after the line is written: lookups never delay it

        def emit_found(event) -> None:
            assert facts is not None  # only the facts call this, once they exist
            message = event.to_message()
            message.update(facts.fields(event.port, event.pid))
            write(message)

        redraw_pending = False

        def redraw(message: dict) -> None:
            # The whole table again, once per batch of events: clear the screen, home, print.
            nonlocal redraw_pending
            if message["type"] == "close":
                table.pop(message["port"], None)
            elif message["type"] == "ready" and message["port"] in table:
                table[message["port"]]["readyMs"] = message.get("ms")
            elif message["type"] in ("open", "update"):
                row = _described({**table.get(message["port"], {}), **message}, names)
                if row.get("ready") is not None:
                    row["readyMs"] = row["ready"]
                table[message["port"]] = row
            if not redraw_pending:
                redraw_pending = True
                loop.call_soon(draw)

        def draw() -> None:
            nonlocal redraw_pending
            redraw_pending = False
            rows = [table[port] for port in sorted(table)]
            text = "\x1b[H\x1b[2J" + "\n".join(_table(rows)) + f"\n{len(rows)} open; ^C to stop\n"
            output.frame(text.encode())

        monitor = PortMonitor(
            backend=values["backend"],
            ignored=values["ignored_ports"],
            interval=values["sockdiag_interval"],
            ebpf_buffer=sources.value("ebpf_buffer"),
            ebpf_pages=sources.value("ebpf_pages"),
        )
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        try:
            await monitor.start()
        except ProbeUnavailable as exc:
            output.close()
            print(f"aether: eBPF backend unavailable: {exc}", file=sys.stderr)
            return 1
        if stat.S_ISFIFO(os.fstat(out.fileno()).st_mode):
            # A pipe's write end never polls readable; it polls in error once the reader has
            # gone, so `watch | head -1` ends even when no further event would be written.
            loop.add_reader(out.fileno(), stop.set)
        if not args.plain:
            from aether.ports.containers import Containers, socket_path
            from aether.ports.facts import PortFacts

            # Read once, as the rules are: a watch follows neither file's later changes.
            rules, entries = await asyncio.gather(
                loop.run_in_executor(None, _rules), loop.run_in_executor(None, _registry_entries)
            )
            said = {entry.port: (entry.protocol, entry.key) for entry in entries if entry.protocol}
            facts = PortFacts(
                monitor.table,
                emit_found,
                lambda port, protocol, ms: write(
                    {"channel": "ports", "type": "ready", "port": port, "protocol": protocol, "ms": ms}
                ),
                lambda: rules,
                registry=said.get,
                containers=Containers(socket_path(values["docker_socket"])),
            )
        try:
            for event in monitor.open_events():
                emit(event, live=False)  # the facts look into the ports open when they start
            monitor.subscribe(emit)
            await stop.wait()
        finally:
            if facts is not None:
                facts.close()
            monitor.stop()
            output.close()
        return 0

    code = asyncio.run(run())
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would complain again at exit about the closed pipe; point stdout elsewhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return code


def _ports_kill(args, values: dict) -> int:
    from aether.ports.kill import KillRefused, kill_port, parse_signal

    try:
        sig = parse_signal(args.signal)
        if args.grace < 0:
            raise KillRefused("invalid", "--grace must not be negative")
        result = asyncio.run(kill_port(args.port, sig, args.grace, ignored=values["ignored_ports"]))
    except KillRefused as exc:
        if args.json:
            print(ujson.dumps({"port": args.port, "error": exc.code, "message": exc.message}))
        print(f"aether: {exc.message}", file=sys.stderr)
        return 1
    if args.json:
        print(ujson.dumps(vars(result)))
    else:
        how = "SIGKILL after grace" if result.escalated else result.signal
        state = "closed" if result.closed else "still open"
        print(f"port {result.port}: {how} to {','.join(map(str, result.pids))}; {state}")
    return 0 if result.closed else 1


def loop_factory():
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _serve(args) -> int:
    from aether.server.app import serve
    from aether.settings.serve import resolve

    try:
        settings = resolve(args)
    except ValueError as exc:
        print(f"aether: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"aether: state directory: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return 1
    log.redact(settings.token)
    from aether.server import cookie

    log.redact(cookie.value(settings.token))  # the dashboard's cookie opens the ports channel
    # uvloop moves bytes ~10% faster than asyncio's own loop: it shows in the preview proxy.
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(serve(settings))
