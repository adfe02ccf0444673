#!/usr/bin/env python3
"""An aether agent backend that needs no network: it answers questions about this workspace's
ports and processes from `aether ports list` (what listens now) and `aether port list` (the
registry of named ports).

It speaks the backend protocol of docs/protocol.md ("The backend's stdio protocol"): one JSON
line in on stdin (the conversation), JSON lines out on stdout: a `tool` note per command it
runs, the answer word by word as `delta`s, then the whole answer as `message`. Standard library
only. Configure it in the state directory's config.json:

    {"agent_command": ["/path/to/aether/.venv/bin/python", "/path/to/aether/examples/workspace_agent.py"]}

It finds `aether` through $AETHER (a path, or a command line), next to the Python running it
(a venv's bin/), on PATH, or as `python -m aether`. $WORKSPACE_AGENT_DELAY sets the pause
between words (default 0.01 s), to show the streaming.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HELP = (
    "I answer questions about this workspace's ports and processes, from `aether ports list` "
    '(what listens now) and the port registry (`aether port list`). Try: "what is listening?", '
    '"what runs on port 8000?", "which ports does python3 use?" or "what is registered?".'
)
WORKSPACE_WORDS = {
    "port",
    "ports",
    "listen",
    "listens",
    "listening",
    "listener",
    "listeners",
    "process",
    "processes",
    "pid",
    "pids",
    "running",
    "runs",
    "run",
    "server",
    "servers",
    "service",
    "services",
    "open",
    "registry",
    "registered",
    "app",
    "apps",
    "workspace",
    "status",
    "key",
    "keys",
    "bound",
    "using",
    "uses",
    "use",
}
GREETINGS = {"help", "hi", "hello", "hey", "?", "usage"}


def emit(kind: str, **fields) -> None:
    print(json.dumps({"type": kind, **fields}, ensure_ascii=False), flush=True)


def aether_command() -> list[str]:
    given = os.environ.get("AETHER")
    if given:
        return shlex.split(given)
    beside = Path(sys.executable).parent / "aether"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("aether")
    return [found] if found else [sys.executable, "-m", "aether"]


def run_tools(tools: dict[str, list[str]]) -> dict:
    """Each tool's JSON output (None where it failed), the commands run at once; a `tool`
    note for each."""
    base = aether_command()
    started = time.monotonic()
    running = {}
    for name, args in tools.items():
        try:
            running[name] = subprocess.Popen([*base, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        except OSError as exc:
            emit("tool", name=name, text=f"could not run {shlex.join([*base, *args])}: {exc.strerror}")
    results = dict.fromkeys(tools)
    for name, proc in running.items():
        shown = shlex.join(tools[name])
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            emit("tool", name=name, text=f"{shown} took more than 20 s; gave up")
            continue
        if proc.returncode != 0:
            emit("tool", name=name, text=f"{shown} exited {proc.returncode}: {err.strip()[-300:]}")
            continue
        try:
            results[name] = json.loads(out)
        except ValueError:
            emit("tool", name=name, text=f"{shown} printed something that is not JSON")
            continue
        took = (time.monotonic() - started) * 1000
        count = len(results[name])
        emit("tool", name=name, text=f"ran {shown}: {count} entr{'y' if count == 1 else 'ies'} in {took:.0f} ms")
    return results


def describe(port: dict, registry: dict, server_port) -> str:
    who = port.get("process") or "an unknown process"
    pid = f" (pid {port['pid']})" if port.get("pid") else ""
    where = ", ".join(port.get("addresses") or []) or "an unknown address"
    text = f"port {port['port']}: {who}{pid}, listening on {where}"
    if port["port"] == server_port:
        text += " (the aether daemon serving this conversation)"
    entry = registry.get(port["port"])
    if entry:
        extras = [f"app {entry['app']}" if entry.get("app") else "", f"label {entry['label']}" if entry.get("label") else ""]
        extras = ", ".join(e for e in extras if e)
        text += f", registered as {entry['key']}" + (f" ({extras})" if extras else "")
        if entry.get("description"):
            text += f": {entry['description']}"
    return text + "."


def upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def answer(question: str, workspace: dict) -> str:
    words = set(re.findall(r"[a-z0-9_.-]+|\?", question.lower()))
    numbers = [int(n) for n in re.findall(r"\b(\d{1,5})\b", question) if 1 <= int(n) <= 65535]
    if not question.strip() or (words and words <= GREETINGS | {"me", "please", "can", "you", "what"}):
        return HELP
    if not (words & WORKSPACE_WORDS or numbers):
        return (
            "I can't answer that: no language model is reachable from here, and I only know this workspace's ports and processes. "
            + HELP
        )
    found = run_tools({"aether ports list": ["ports", "list", "--json"], "aether port list": ["port", "list", "--json"]})
    ports, entries = found["aether ports list"], found["aether port list"]
    if ports is None and entries is None:
        return "I could not read the ports or the registry: the tool notes above say why."
    ports, entries = ports or [], entries or []
    registry = {entry["port"]: entry for entry in entries}
    server_port = workspace.get("serverPort")
    sentences = []
    if numbers:
        listening = {p["port"]: p for p in ports}
        for number in numbers:
            if number in listening:
                sentences.append(upper_first(describe(listening[number], registry, server_port)))
            elif number in registry:
                sentences.append(f"Nothing listens on port {number} now; it is registered as {registry[number]['key']}.")
            else:
                sentences.append(f"Nothing listens on port {number} now, and the registry has no entry for it.")
        return " ".join(sentences)
    names = {(p.get("process") or "").lower() for p in ports} - {""}
    # "python3" in a question finds a process named "python", and the other way round.
    wanted = {name for name in names for word in words if len(word) >= 4 and (name.startswith(word) or word.startswith(name))}
    if wanted:
        mine = [p for p in ports if (p.get("process") or "").lower() in wanted]
        sentences.append(
            f"{', '.join(sorted(wanted))} listen{'s' if len(mine) == 1 else ''} on {len(mine)} port{'s' if len(mine) != 1 else ''}:"
        )
        sentences += [upper_first(describe(p, registry, server_port)) for p in mine]
        return " ".join(sentences)
    if words & {"registry", "registered", "key", "keys"} and entries:
        sentences.append(f"The registry has {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}:")
        for entry in entries:
            state = f"listening (pid {entry['pid']} {entry['process'] or '?'})" if entry.get("listening") else "not listening"
            sentences.append(f"{entry['key']} is port {entry['port']}, {state}.")
        return " ".join(sentences)
    if not ports:
        sentences.append("Nothing listens on a TCP port in this workspace right now.")
    else:
        sentences.append(
            f"{len(ports)} port{'s' if len(ports) != 1 else ''} listen{'s' if len(ports) == 1 else ''} in this workspace:"
        )
        sentences += [upper_first(describe(p, registry, server_port)) for p in ports]
    idle = [e for e in entries if not e.get("listening")]
    if idle:
        sentences.append("Registered but not listening: " + ", ".join(f"{e['key']} ({e['port']})" for e in idle) + ".")
    elif not entries:
        sentences.append("The port registry is empty.")
    return " ".join(sentences)


def main() -> int:
    line = sys.stdin.readline()
    try:
        turn = json.loads(line)
        question = next(m["text"] for m in reversed(turn["messages"]) if m["role"] == "user")
    except (ValueError, KeyError, TypeError, StopIteration):
        emit("error", message="workspace_agent: the turn on stdin is not what docs/protocol.md describes")
        return 0
    text = answer(question, turn.get("workspace") or {})
    try:
        delay = max(0.0, float(os.environ.get("WORKSPACE_AGENT_DELAY", "0.01")))
    except ValueError:
        delay = 0.01  # a bad setting must not cost the answer
    for word in re.findall(r"\S+\s*", text):
        emit("delta", text=word)
        time.sleep(delay)
    emit("message", text=text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
