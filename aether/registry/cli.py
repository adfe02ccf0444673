"""``aether port ...``: the registry from the command line.

Each command opens the registry in the state directory (``--state-dir``, ``AETHER_STATE_DIR``,
the running server's (see ``aether.running``), or the default of ``aether serve``), does one
thing and exits: 0 done, 1 refused (one line on stderr saying why). Reads print a stable text form, or JSON with ``--json``. Imports stay lazy:
``aether port get`` runs inside shell substitutions and must start fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

APP_ENV = "AETHER_APP"
KEY_ENV = "AETHER_PORT_KEY"


def add_commands(commands) -> None:
    port = commands.add_parser("port", help="the registry of named ports").add_subparsers(dest="port_command", required=True)

    def command(name: str, help: str, json_flag: bool = True) -> argparse.ArgumentParser:
        sub = port.add_parser(name, help=help)
        # Not from the settings table, which ``aether port`` does not load (see aether.state).
        sub.add_argument("--state-dir", default=None, help="(env AETHER_STATE_DIR; default as aether serve)")
        if json_flag:
            sub.add_argument("--json", action="store_true")
        return sub

    set_ = command("set", "register KEY at PORT (or change it); also --key KEY --value PORT")
    set_.add_argument("key", nargs="?")
    set_.add_argument("port", nargs="?")
    # The spelling users of daemon-style registries type: `set --key web --value 5173`.
    set_.add_argument("--key", dest="key_option", metavar="KEY")
    set_.add_argument("--value", dest="port_option", metavar="PORT")
    set_.add_argument("--app")
    set_.add_argument("--label")
    set_.add_argument("--description")
    # Checked by the store, as every other field (a bad value is a refusal: exit 1).
    set_.add_argument("--protocol", help="https, http or tcp: what the port speaks, over what the server detects; auto clears it")
    command("get", "print KEY's port alone", json_flag=True).add_argument("key")
    command("list", "every entry, with what listens on it now")
    command("delete", "forget KEY").add_argument("key")
    run = command("run", "run a command with PORT (and PORT_<LABEL>) from the registry; options go before KEY", json_flag=False)
    run.add_argument("key")
    run.add_argument("argv", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    allocate = command("allocate", "register a contiguous block of ports for an app")
    allocate.add_argument("app")
    allocate.add_argument("--labels", required=True, help="comma-separated, e.g. api,ui,health")
    allocate.add_argument(
        "--range",
        default="apps",
        help="FIRST-LAST or a range's name: core, extensions, apps (default apps: 5570-5599) or one from config.json's port_ranges",
    )
    check = command("check", "conflicts between the registry and what listens; port run commands not listening")
    check.add_argument("--all", action="store_true", help="also every listening port with no registry entry")


def _state_dir(args) -> Path:
    from aether import running

    path, note = running.state_dir(args.state_dir)
    if note and not getattr(args, "_noted", False):
        args._noted = True
        print(f"aether: {note}", file=sys.stderr)
    return path


def _registry(args):
    from aether.registry.store import Registry

    return Registry(_state_dir(args) / "registry.db")


def main(argv: list[str]) -> int:
    """``aether port ...`` alone, parsed without the rest of the command line."""
    parser = argparse.ArgumentParser(prog="aether")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


def run(args) -> int:
    from aether.registry.store import RegistryError

    try:
        with _registry(args) as registry:
            return COMMANDS[args.port_command](registry, args)
    except _UsageError as exc:
        print(f"aether: {exc}", file=sys.stderr)
        return 2
    except RegistryError as exc:
        print(f"aether: {exc}", file=sys.stderr)
        return 1


class _UsageError(Exception):
    """A command line that does not say what to do (exit 2, as argparse's errors)."""


def _print_json(value) -> None:
    print(json.dumps(value, ensure_ascii=False))


def _set(registry, args) -> int:
    key, port = _one("key", args.key, args.key_option), _one("port", args.port, args.port_option)
    entry = registry.set(key, port, args.app, args.label, args.description, args.protocol)
    if args.json:
        _print_json(entry.to_json())
    else:
        print(f"{entry.key} {entry.port}")
    return 0


def _one(what: str, positional: str | None, option: str | None) -> str:
    if positional is not None and option is not None and positional != option:
        raise _UsageError(f"two {what}s given: {positional} and {option}")
    value = positional if positional is not None else option
    if value is None:
        flag = "--key" if what == "key" else "--value"
        raise _UsageError(f"port set needs a {what}: aether port set KEY PORT, or {flag}")
    return value


def _get(registry, args) -> int:
    entry = registry.get(args.key)
    if entry is None:
        print(f"aether: no port registered as {args.key}", file=sys.stderr)
        return 1
    _print_json(entry.to_json()) if args.json else print(entry.port)
    return 0


def _delete(registry, args) -> int:
    if not registry.delete(args.key):
        print(f"aether: no port registered as {args.key}", file=sys.stderr)
        return 1
    return 0


def live_ports() -> dict[int, dict]:
    """port -> {"pid", "process", "pids"} for every listening TCP port now."""
    from aether.ports import procs, sockdiag

    with sockdiag.DiagSocket() as diag:
        raw = diag.raw()
    return {
        state.port: {"pid": state.pid, "process": state.process, "pids": list(state.pids)} for state in procs.port_states(raw)
    }


def _list(registry, args) -> int:
    live = live_ports()
    rows = [
        entry.with_live((live[entry.port]["pid"], live[entry.port]["process"]) if entry.port in live else None)
        for entry in registry.entries()
    ]
    if args.json:
        _print_json(rows)
        return 0
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["app"] or "-", []).append(row)
    for app, members in groups.items():
        # The form of the port registry: process-name:5554, or process-name (cdp:5556,health:5557).
        if len(members) == 1 and not members[0]["label"]:
            print(f"{app}:{members[0]['port']}")
        else:
            print(f"{app} ({','.join(_pair(m['label'] or m['key'], m['port']) for m in members)})")
        for m in members:
            held = f"listening pid {m['pid']} {m['process'] or '?'}" if m["listening"] else "not listening"
            shown = f"{m['label'] or '-':<8} {m['protocol'] or '-':<5}"
            print(f"  {m['key']:<24} {m['port']:>5}  {shown} {held}  {m['description']}".rstrip())
    return 0


def _pair(name: str, port: int) -> str:
    return f"{name}:{port}"


def _env_name(label: str) -> str:
    return "PORT_" + "".join(c if c.isalnum() else "_" for c in label.upper())


def _run(registry, args) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        print("aether: port run needs a command after --", file=sys.stderr)
        return 2
    entry = registry.get(args.key)
    if entry is None:
        print(f"aether: no port registered as {args.key}", file=sys.stderr)
        return 1
    # KEY_ENV marks the command as started for ``key``: ``port check`` finds it by it.
    env = dict(os.environ, PORT=str(entry.port), **{KEY_ENV: entry.key})
    if entry.app:
        env[APP_ENV] = entry.app
        for other in registry.entries(entry.app):
            if other.label:
                env[_env_name(other.label)] = str(other.port)
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        print(f"aether: cannot run {argv[0]}: {exc.strerror}", file=sys.stderr)
        return 127


def _allocate(registry, args) -> int:
    from aether.registry import rules

    first, last = rules.parse_range(args.range, rules.ranges(_state_dir(args)))
    avoid = set(live_ports()) | rules.udp_ports() | rules.NEVER_ALLOCATED
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    entries = registry.allocate(args.app, labels, first, last, avoid)
    if args.json:
        _print_json([entry.to_json() for entry in entries])
    else:
        print(f"{args.app} ({','.join(_pair(e.label, e.port) for e in entries)})")
    return 0


def _environ(pid) -> dict[bytes, bytes]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            items = f.read().split(b"\0")
    except OSError:
        return {}
    return dict(item.split(b"=", 1) for item in items if b"=" in item)


def _app_of(pid) -> str | None:
    """The app a process was started for by ``aether port run``, if it was."""
    if pid is None:
        return None
    app = _environ(pid).get(APP_ENV.encode())
    return None if app is None else app.decode(errors="replace")


def _port_runs() -> dict[tuple[str, int], list[int]]:
    """(key, PORT) -> the pids started by ``aether port run KEY`` (and their children, which
    inherit the environment), from every process's environment this user may read."""
    found: dict[tuple[str, int], list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        env = _environ(name)
        key, port = env.get(KEY_ENV.encode()), env.get(b"PORT")
        if key is not None and port is not None and port.isdigit():
            found.setdefault((key.decode(errors="replace"), int(port)), []).append(int(name))
    return found


def conflicts(registry) -> list[dict]:
    from aether.ports import procs
    from aether.settings.table import BY_NAME

    live = live_ports()
    found = []
    for port, state in sorted(live.items()):
        names = {procs.process_name(pid) for pid in state["pids"]}
        if len(state["pids"]) > 1 and len(names) > 1:
            found.append(
                {
                    "kind": "shared",
                    "port": port,
                    "pids": state["pids"],
                    "message": f"port {port} is held by {len(state['pids'])} different programs: {', '.join(sorted(n or '?' for n in names))}",
                }
            )
    registered = {entry.port: entry for entry in registry.entries()}
    for port, entry in sorted(registered.items()):
        state = live.get(port, {})
        if state and entry.app:
            app = _app_of(state["pid"])
            if app is not None and app != entry.app:
                found.append(
                    {
                        "kind": "other_app",
                        "port": port,
                        "key": entry.key,
                        "pid": state["pid"],
                        "message": f"port {port} ({entry.key}) belongs to app {entry.app} but pid {state['pid']} runs for app {app}",
                    }
                )
    for (key, port), pids in sorted(_port_runs().items()):
        if port not in live and (port not in registered or registered[port].key == key):
            found.append(
                {
                    "kind": "not_listening",
                    "port": port,
                    "key": key,
                    "pids": sorted(pids),
                    "message": f"pid {min(pids)} was started by aether port run {key} with PORT={port}, "
                    f"but nothing listens on {port}: does it read $PORT?",
                }
            )
    for port, state in sorted(live.items()):
        if port not in registered and port not in BY_NAME["ignored_ports"].default:
            found.append(
                {
                    "kind": "unregistered",
                    "port": port,
                    "pid": state["pid"],
                    "message": f"port {port} listens ({state['process'] or 'unknown process'}) with no registry entry",
                }
            )
    return found


#: What ``port check`` reports without being asked for more; ``--all`` adds the rest.
WARNINGS = frozenset({"not_listening"})


def _check(registry, args) -> int:
    found = [item for item in conflicts(registry) if args.all or item["kind"] != "unregistered"]
    if args.json:
        _print_json(found)
    else:
        for item in found:
            print(f"{item['kind']}: {item['message']}")
    return 1 if any(item["kind"] not in WARNINGS | {"unregistered"} for item in found) else 0


COMMANDS = {"set": _set, "get": _get, "list": _list, "delete": _delete, "run": _run, "allocate": _allocate, "check": _check}
