"""The terminal channel through a real `aether serve` and real WebSocket clients: real PTYs,
a real shell, sessions that outlive their connection."""

from __future__ import annotations

import base64
import datetime
import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import termios
import time

import pytest
from support import ROOT
from support.clients import masked_text_frame, raw_upgrade, recv_json, recv_until
from support.processes import NOHUP, gone, signal_state
from support.servers import Server
from support.waiting import wait_for

WSCAT = ROOT / ".tools" / "node_modules" / ".bin" / "wscat"


@pytest.fixture
def start(workspace_server, tmp_path):
    """A server whose terminals run bash in a home of their own: login shells read no profile
    of the host's user (pyenv's rehash in root's .bashrc waits up to 60 s on a lock that a
    shell killed mid-start leaves behind)."""
    home = tmp_path / "home"
    home.mkdir()
    return lambda *args, env=None, **kw: workspace_server(
        "--shell", "/bin/bash", *args, env={"HOME": str(home), **(env or {})}, **kw
    )


class Term:
    """One WebSocket client's view of the terminal channel."""

    def __init__(self, server: Server):
        self.ws = server.connect().__enter__()  # closed by close() or when the server stops
        self.output: dict[str, bytearray] = {}
        self.replayed: dict[str, bytearray] = {}
        self.exits: dict[str, dict] = {}
        self.other: list[dict] = []

    def send(self, **message) -> None:
        self.ws.send(json.dumps({"channel": "terminal", **message}))

    def _take(self, message: dict) -> None:
        if message["channel"] != "terminal":
            return
        if message["type"] == "output":
            data = message["data"]
            raw = base64.b64decode(data) if message.get("encoding") == "base64" else data.encode()
            into = self.replayed if message.get("replay") else self.output
            into.setdefault(message["sessionId"], bytearray()).extend(raw)
        elif message["type"] == "exit":
            self.exits[message["sessionId"]] = message
        else:
            self.other.append(message)

    def reply(self, timeout: float = 5.0) -> dict:
        """The next terminal message that is not output or exit."""
        deadline = time.monotonic() + timeout
        while not self.other:
            self._take(recv_json(self.ws, max(0.01, deadline - time.monotonic())))
        return self.other.pop(0)

    def until(self, predicate, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out; output so far {dict(self.output)!r:.2000}")
            try:
                self._take(recv_json(self.ws, remaining))
            except TimeoutError:
                pass

    def sees(self, session: str, text: bytes, timeout: float = 10.0) -> None:
        self.until(lambda: text in self.output.get(session, b""), timeout)

    def create(self, **fields) -> dict:
        self.send(type="create", cols=fields.pop("cols", 80), rows=fields.pop("rows", 24), **fields)
        return self.reply()

    def listed(self) -> dict[str, dict]:
        """The sessions ``list`` describes, by id."""
        self.send(type="list")
        return {s["sessionId"]: s for s in self.reply()["sessions"]}

    def listed_until(self, predicate, timeout: float = 10.0) -> dict[str, dict]:
        """``listed()`` again until ``predicate`` holds of it."""

        def holds():
            sessions = self.listed()
            return sessions if predicate(sessions) else None

        return wait_for(holds, timeout)

    def read_all(self) -> None:
        """Everything the server sent this client before it answered a request sent now."""
        self.send(type="list", id="read_all")
        while (reply := self.reply())["type"] != "list" or reply.get("id") != "read_all":
            pass

    def close(self) -> None:
        self.ws.close()


def test_protocol_example_input_runs_in_a_real_shell(start):
    server = start()
    term = Term(server)
    created = term.create(sessionId="cli-123", id=1)
    assert created["type"] == "created" and created["id"] == 1 and created["sessionId"] == "cli-123"
    assert created["command"] == ["/bin/bash", "-l"] and created["cwd"] == "."
    (server.root / "marker.txt").write_text("x")
    # The protocol's example message (docs/protocol.md), verbatim.
    term.ws.send('{"channel": "terminal", "type": "input", "sessionId": "cli-123", "data": "ls -la\\n"}')
    term.sees("cli-123", b"marker.txt")
    term.send(type="input", sessionId="cli-123", data="echo $((6*7)) $AETHER_TERMINAL_SESSION $TERM; tty\n")
    term.sees("cli-123", b"42 cli-123 xterm-256color\r\n/dev/pts/")
    term.send(type="input", sessionId="cli-123", data="exit 3\n")
    term.until(lambda: "cli-123" in term.exits)
    assert term.exits["cli-123"] == {"channel": "terminal", "type": "exit", "sessionId": "cli-123", "code": 3}
    term.send(type="list", id=2)
    assert term.reply() == {"channel": "terminal", "type": "list", "sessions": [], "id": 2}
    term.ws.send('{"channel": "config", "type": "get"}')
    config = recv_until(term.ws, lambda m: m["channel"] == "config")["config"]
    assert config["workspaceRoot"] == str(server.root)
    assert config["terminal"] == {"maxSessions": 32, "scrollbackBytes": 262144, "idleTimeout": 0.0, "maxInputBytes": 65536}


def gate(root, name: str) -> str:
    """A FIFO in the workspace: a command that reads it (``read -r _ < NAME``) waits for
    :func:`open_gate`."""
    os.mkfifo(root / name)
    return name


def open_gate(root, name: str, timeout: float = 10.0) -> None:
    """Let the command waiting on the FIFO ``name`` go on, once it has opened it."""

    def writer():
        try:
            return os.open(root / name, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: not opened for reading yet
            return None

    fd = wait_for(writer, timeout)
    os.write(fd, b"go\n")
    os.close(fd)


def _foreground_child(parent: int, name: str) -> bool:
    """Whether a child of ``parent`` named ``name`` is its terminal's foreground process group."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
            with open(f"/proc/{pid}/comm") as comm:
                if comm.read().strip() != name:
                    continue
        except (FileNotFoundError, NotADirectoryError, ProcessLookupError):
            continue
        # after the name: state ppid pgrp session tty_nr tpgid
        if int(fields[1]) == parent and int(fields[2]) == int(fields[5]):
            return True
    return False


def test_resize_reaches_stty_and_ctrl_c_the_foreground_job(start):
    server = start()
    term = Term(server)
    created = term.create(cols=80, rows=24)
    sid, shell = created["sessionId"], created["pid"]
    assert sid.startswith("t-")
    term.send(type="input", sessionId=sid, data="stty size\n")
    term.sees(sid, b"24 80\r\n")
    term.send(type="resize", sessionId=sid, cols=132, rows=43, id="r")
    assert term.reply() == {"channel": "terminal", "type": "resized", "sessionId": sid, "cols": 132, "rows": 43, "id": "r"}
    term.send(type="input", sessionId=sid, data="stty size\n")
    term.sees(sid, b"43 132\r\n")
    # A controlling terminal: ^C interrupts the foreground job, not the shell.
    term.send(type="input", sessionId=sid, data="echo sleeping-$((0)); sleep 30; echo not-$((0))-interrupted\n")
    term.sees(sid, b"sleeping-0")  # the shell runs the line (the echo of what was typed reads $((0)))
    # A ^C before `sleep` holds the terminal goes to the shell, which waits on: `sleep` must
    # be the terminal's foreground process group first.
    wait_for(lambda: _foreground_child(shell, "sleep"))
    # The line discipline flushes pending input when it sends SIGINT, and the shell's readline
    # drops what it had read ahead: the next line goes once the ^C has been echoed.
    term.send(type="input", sessionId=sid, data="\x03")
    term.sees(sid, b"^C")
    term.send(type="input", sessionId=sid, data="echo after-$((1+1))\n")
    term.sees(sid, b"after-2")
    assert b"not-0-interrupted" not in term.output[sid]
    assert sid not in term.exits


def test_session_survives_disconnect_and_replays_on_attach(start):
    server = start()
    first = Term(server)
    first.create(sessionId="keep")
    gate(server.root, "go")
    first.send(type="input", sessionId="keep", data="read -r _ < go; echo done-$((40+2)); : > printed\n")
    first.close()

    second = Term(server)
    listed = second.listed_until(lambda sessions: sessions["keep"]["attached"] == 0)
    assert list(listed) == ["keep"]
    # "done" is printed while nobody is connected, and read by the server before the attach
    # below: it is readable once `printed` exists, and the server's loop turns at least once
    # (the list's round trip) before it takes the attach.
    open_gate(server.root, "go")
    wait_for((server.root / "printed").exists)
    assert second.listed()["keep"]["attached"] == 0
    second.send(type="attach", sessionId="keep", id=2)
    attached = second.reply()
    assert attached["type"] == "attached" and attached["id"] == 2 and attached["attached"] == 1
    second.until(lambda: b"done-42" in second.replayed.get("keep", b""))
    assert b"read -r _ < go; echo done" in second.replayed["keep"]  # the echo of what was typed before
    # Then it streams live.
    second.send(type="input", sessionId="keep", data="echo live-$((1+2))\n")
    second.sees("keep", b"live-3")


def test_two_clients_see_the_same_output_until_one_detaches(start):
    server = start()
    a, b = Term(server), Term(server)
    a.create(sessionId="shared")
    b.send(type="attach", sessionId="shared")
    assert b.reply()["attached"] == 2
    a.send(type="input", sessionId="shared", data="echo both-$((2*3))\n")
    a.sees("shared", b"both-6")
    b.sees("shared", b"both-6")
    b.send(type="detach", sessionId="shared", id=9)
    assert b.reply() == {"channel": "terminal", "type": "detached", "sessionId": "shared", "id": 9}
    b.send(type="attach", sessionId="shared")
    b.reply()
    b.send(type="attach", sessionId="shared", id=10)
    assert b.reply()["code"] == "attached"
    b.send(type="detach", sessionId="shared")
    b.reply()
    # Input from a client that is not attached is still accepted.
    b.send(type="input", sessionId="shared", data="echo only-a-$((3*3))\n")
    a.sees("shared", b"only-a-9")
    # The server sends output to every attached client at once: had b been sent it, it would
    # have come before the answer to a request b sends now.
    b.read_all()
    assert b"only-a-9" not in b.output["shared"]


def test_exit_codes_signals_and_an_end_seen_later(start):
    server = start()
    term = Term(server)
    term.create(sessionId="sig", command="kill -KILL $$")
    term.until(lambda: "sig" in term.exits)
    assert term.exits["sig"]["code"] == 137 and term.exits["sig"]["signal"] == "SIGKILL"
    term.create(sessionId="argv", command=[sys.executable, "-c", "import sys; print('argv-ok'); sys.exit(7)"])
    term.until(lambda: "argv" in term.exits)
    assert term.exits["argv"]["code"] == 7 and b"argv-ok\r\n" in term.output["argv"]

    # A session that ends while nobody is attached keeps its output and status for the next client.
    term.create(sessionId="later", command=f"read -r _ < {gate(server.root, 'later')}; echo finished; exit 5")
    term.close()
    other = Term(server)
    other.listed_until(lambda sessions: sessions["later"]["attached"] == 0)
    open_gate(server.root, "later")
    listed = other.listed_until(lambda sessions: "exit" in sessions["later"])
    assert list(listed) == ["later"] and listed["later"]["exit"] == {"code": 5}
    other.send(type="attach", sessionId="later")
    other.reply()
    other.until(lambda: "later" in other.exits)
    assert b"finished" in other.replayed["later"] and other.exits["later"]["code"] == 5
    other.send(type="list")
    assert other.reply()["sessions"] == []  # its end has been seen


def test_close_hangs_up_and_kills_what_ignores_the_hangup(start):
    server = start("--kill-grace", "0.5")
    term = Term(server)
    term.create(sessionId="hup")
    # Once the shell reads input: a hang-up while bash starts may end it with status 1 instead.
    term.send(type="input", sessionId="hup", data="echo up-$((1+1))\n")
    term.sees("hup", b"up-2")
    term.send(type="close", sessionId="hup", id=1)
    assert term.reply() == {"channel": "terminal", "type": "closing", "sessionId": "hup", "id": 1}
    term.until(lambda: "hup" in term.exits)
    assert term.exits["hup"]["code"] == 129 and term.exits["hup"]["signal"] == "SIGHUP"

    stubborn = term.create(sessionId="stubborn", command="trap '' HUP; echo ready; sleep 60")
    term.sees("stubborn", b"ready")
    started = time.monotonic()
    term.send(type="close", sessionId="stubborn")
    assert term.reply()["type"] == "closing"
    term.send(type="input", sessionId="stubborn", data="x", id=2)
    assert term.reply()["code"] == "not_found"  # hung up: it takes no more input
    term.until(lambda: "stubborn" in term.exits)
    assert 0.4 < time.monotonic() - started < 5
    assert term.exits["stubborn"]["signal"] == "SIGKILL"
    with pytest.raises(ProcessLookupError):
        os.kill(stubborn["pid"], 0)

    # A background job that escaped the hang-up (nohup) dies after the grace, with its session.
    term.create(sessionId="bg", command="nohup sleep 4242 >/dev/null 2>&1 & echo bg=$!; sleep 4343")
    term.sees("bg", b"\n")
    background = int(bytes(term.output["bg"]).split(b"bg=")[1].split()[0])
    other = Term(server)  # closed by a client that is not attached
    other.send(type="close", sessionId="bg")
    assert other.reply()["type"] == "closing"
    other.until(lambda: "bg" in other.exits)
    # SIGHUP, or SIGKILL after the grace when the hang-up came as bash forked `sleep 4343`: the
    # new child missed the signal, and bash defers its own death until that child ends.
    assert other.exits["bg"]["signal"] in ("SIGHUP", "SIGKILL")
    wait_for(lambda: not os.path.exists(f"/proc/{background}") or _zombie(background), 5)


def _zombie(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_utf8_split_across_reads_and_binary_output_arrive_intact(start):
    server = start()
    term = Term(server)
    # "é" and "😀" written a byte at a time with pauses, so reads end inside characters; then
    # bytes that are not UTF-8 at all. Output processing is off (stty raw) so bytes pass as is.
    script = (
        "import os, sys, time\n"
        "out = sys.stdout.buffer\n"
        "for b in 'é😀'.encode():\n"
        "    out.write(bytes([b])); out.flush(); time.sleep(0.05)\n"
        "out.write(b'|\\xff\\xfe\\x00binary|'); out.flush()\n"
    )
    term.create(sessionId="bytes", command=f'stty raw -echo; {sys.executable} -c "$SCRIPT"', env={"SCRIPT": script})
    term.until(lambda: "bytes" in term.exits)
    assert bytes(term.output["bytes"]) == "é😀".encode() + b"|\xff\xfe\x00binary|"
    # Binary input too: base64 in, the same bytes out.
    term.create(
        sessionId="echo",
        command=f"stty raw -echo; head -c 4 | {sys.executable} -c 'import sys; print(sys.stdin.buffer.read().hex())'",
    )
    term.send(type="input", sessionId="echo", data=base64.b64encode(b"\x00\xff\x80A").decode(), encoding="base64")
    term.until(lambda: "echo" in term.exits)
    assert b"00ff8041" in term.output["echo"]


def test_attach_while_a_character_is_unfinished_sends_each_byte_once(start):
    server = start()
    term = Term(server)
    term.create(sessionId="half", command="stty raw -echo; printf 'AB\\342\\202'; sleep 1.5; printf '\\254!'")
    term.sees("half", b"AB")
    late = Term(server)
    late.send(type="attach", sessionId="half")
    late.reply()
    late.until(lambda: "half" in late.exits)
    assert bytes(late.replayed["half"]) + bytes(late.output["half"]) == "AB€!".encode()
    term.until(lambda: "half" in term.exits)
    assert bytes(term.output["half"]) == "AB€!".encode()


def test_ended_sessions_are_bounded_and_their_ids_reusable(start):
    server = start("--terminal-max-sessions", "2")
    other = Term(server)  # never attached: it lists
    for names in (("a", "b"), ("c",)):
        term = Term(server)
        for name in names:
            command = f"read -r _ < {gate(server.root, name)}; echo {name}-ended"
            assert term.create(sessionId=name, command=command)["type"] == "created"
        term.close()
        other.listed_until(lambda sessions: all(sessions[name]["attached"] == 0 for name in names))
        for name in names:  # each ends while nobody is attached, in this order
            open_gate(server.root, name)
            other.listed_until(lambda sessions: "exit" in sessions.get(name, {}))
    # Ended, never seen: at most --terminal-max-sessions kept, the oldest dropped first.
    other.send(type="list")
    assert [s["sessionId"] for s in other.reply()["sessions"]] == ["b", "c"]
    created = other.create(sessionId="c", command=["sleep", "0"] + ["x" * 100] * 50)
    assert created["type"] == "created" and created["commandTruncated"] is True
    assert len(json.dumps(created["command"])) <= 1100


def test_invalid_unicode_is_refused_and_leaks_nothing(start):
    server = start()
    term = Term(server)
    term.create(sessionId="u")
    fds = len(os.listdir(f"/proc/{server.proc.pid}/fd"))
    frames = [
        '{"channel": "terminal", "type": "create", "cols": 80, "rows": 24, "command": ["sh", "-c", "true", "\\ud800"]}',
        '{"channel": "terminal", "type": "create", "cols": 80, "rows": 24, "cwd": "\\ud800"}',
        '{"channel": "terminal", "type": "input", "sessionId": "u", "data": "\\ud800"}',
    ]
    for frame in frames * 5:
        term.ws.send(frame)
        assert term.reply()["code"] == "bad_message"
    # No more than before: a descriptor the server held a moment for something else (a port's
    # look, a rules file read) may be gone by now.
    wait_for(lambda: len(os.listdir(f"/proc/{server.proc.pid}/fd")) <= fds, 5)


def test_bad_requests_get_clear_errors_and_change_nothing(start):
    server = start("--terminal-max-sessions", "2", "--terminal-max-input-bytes", "16")
    term = Term(server)
    term.create(sessionId="one")
    (server.root / "file").write_text("")

    def error(**message) -> dict:
        term.send(id="e", **message)
        reply = term.reply()
        assert reply["type"] == "error" and reply["id"] == "e" and reply["channel"] == "terminal", reply
        return reply

    assert error(type="create", sessionId="one", cols=80, rows=24)["code"] == "exists"
    assert error(type="create", cols=80, rows=24, cwd="../..")["code"] == "forbidden"
    assert error(type="create", cols=80, rows=24, cwd="/etc")["code"] == "forbidden"
    assert error(type="create", cols=80, rows=24, cwd="missing")["code"] == "not_found"
    assert error(type="create", cols=80, rows=24, cwd="file")["code"] == "not_a_directory"
    assert error(type="create", cols=80, rows=24, command=["no-such-command-xyz"])["code"] == "not_found"
    assert error(type="create", cols=0, rows=24)["code"] == "bad_message"
    assert error(type="input", sessionId="nope", data="x")["code"] == "not_found"
    assert error(type="input", sessionId="one", data="x" * 17)["code"] == "too_large"
    assert error(type="input", sessionId="one", data="!!", encoding="base64")["code"] == "invalid"
    assert error(type="resize", sessionId="one", cols=5000, rows=10)["code"] == "bad_message"
    assert error(type="detach", sessionId="nope")["code"] == "not_found"
    term.create(sessionId="two", cwd=".")
    limit = error(type="create", cols=80, rows=24)
    assert limit["code"] == "limit" and "at most 2" in limit["message"]
    term.send(type="list")
    assert [s["sessionId"] for s in term.reply()["sessions"]] == ["one", "two"]
    # The sessions still work.
    term.send(type="input", sessionId="one", data="echo $((5+5))\n")  # within the 16 bytes
    term.sees("one", b"\r10\r\n")


def test_idle_sessions_end_when_configured(start):
    server = start("--terminal-idle-timeout", "0.5", "--kill-grace", "1")
    term = Term(server)
    pid = term.create(sessionId="idle")["pid"]
    stubborn = term.create(sessionId="stubborn", command="trap '' HUP; sleep 60")["pid"]
    term.close()
    for ended in (pid, stubborn):
        wait_for(lambda: not os.path.exists(f"/proc/{ended}"), 10)
    other = Term(server)
    other.send(type="list")
    listed = {s["sessionId"]: s["exit"]["signal"] for s in other.reply()["sessions"]}
    assert listed == {"idle": "SIGHUP", "stubborn": "SIGKILL"}
    # One hang-up each, not one per sweep while the grace runs.
    assert sum(line.get("msg") == "terminal idle: hanging up" for line in server.log) == 2


def test_a_flood_of_output_is_delivered_whole_in_bounded_memory(start, tmp_path):
    server = start()
    big = tmp_path / "big"
    line = b"0123456789abcdefghijklmnopqrstuvwxyz\xc3\xa9\xe2\x82\xac!\n"  # multibyte chars too
    count = (20 << 20) // len(line)
    big.write_bytes(line * count)
    hwm_before = _vm_hwm(server.proc.pid)
    term = Term(server)
    term.create(sessionId="flood", command=f"stty -onlcr; cat {big}; echo END-OF-FLOOD")
    term.until(lambda: "flood" in term.exits, 120)
    out = bytes(term.output["flood"])
    assert out.endswith(b"END-OF-FLOOD\n")
    assert out[: -len(b"END-OF-FLOOD\n")] == line * count
    assert _vm_hwm(server.proc.pid) - hwm_before < 64 << 20


@pytest.mark.slow
def test_a_client_that_stops_reading_is_dropped_and_others_go_on(start, tmp_path):
    server = start("--write-timeout", "2")
    big = tmp_path / "big"
    big.write_bytes(b"x" * (64 << 20))
    stalled = raw_upgrade(server, rcvbuf=4096)  # reads nothing from here on
    create = {
        "channel": "terminal",
        "type": "create",
        "sessionId": "flood",
        "cols": 80,
        "rows": 24,
        "command": f"cat {big}; echo END",
    }
    stalled.sendall(masked_text_frame(json.dumps(create)))
    watcher = Term(server)
    wait_for(lambda: _unread(stalled) > 0)  # the flood has reached the stalled client
    hwm = _vm_hwm(server.proc.pid)
    # The output waits for the stalled client; port events reach the other client meanwhile,
    # before the write timeout drops the stalled one.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        recv_until(watcher.ws, lambda m: m["channel"] == "ports" and m["type"] == "open" and m["port"] == port)
        received = time.time()
    # After the write timeout the stalled client is dropped, and the output goes on for others.
    [dropped] = wait_for(lambda: [line for line in server.log if line.get("msg") == "dropping client"], 15)
    assert received < _log_time(dropped)
    watcher.send(type="attach", sessionId="flood")
    watcher.until(lambda: "flood" in watcher.exits, 60)
    assert watcher.exits["flood"]["code"] == 0
    assert _vm_hwm(server.proc.pid) - hwm < 64 << 20
    stalled.close()


def _unread(sock: socket.socket) -> int:
    """Bytes in ``sock``'s receive queue (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0" * 4))[0]


def _log_time(line: dict) -> float:
    """A log line's ``ts`` (UTC, to the millisecond) as ``time.time()`` counts."""
    return datetime.datetime.strptime(line["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.UTC).timestamp()


def _vm_hwm(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_shutdown_ends_every_session(start):
    server = start()
    term = Term(server)
    pids = [term.create(sessionId="a")["pid"], term.create(sessionId="b", command="trap '' HUP; sleep 60")["pid"]]
    term.send(type="input", sessionId="a", data="echo up\n")
    term.sees("a", b"up")
    assert server.stop() == 0
    for pid in pids:
        wait_for(lambda: subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0, 5)


def test_wscat_drives_a_terminal_session(start):
    server = start()
    create = {
        "channel": "terminal",
        "type": "create",
        "sessionId": "w",
        "cols": 80,
        "rows": 24,
        "command": "echo from-wscat-$((20+1))",
    }
    # wscat quits at once when its stdin ends: keep it open until wscat is done (-w 2).
    proc = subprocess.Popen(
        [str(WSCAT), "-c", server.url, "-s", f"Bearer, {server.token}", "-x", json.dumps(create), "-w", "2"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out = proc.stdout.read()
    proc.wait(10)
    proc.stdin.close()
    terminal = [m for m in map(json.loads, filter(None, out.splitlines())) if m["channel"] == "terminal"]
    assert terminal[0]["type"] == "created", out
    assert "from-wscat-21" in "".join(m.get("data", "") for m in terminal if m["type"] == "output")
    assert terminal[-1] == {"channel": "terminal", "type": "exit", "sessionId": "w", "code": 0}


#: Signals 1-31. glibc keeps its two internal real-time signals (32, 33) ignored in what
#: posix_spawn starts, and nothing can name them to reset them.
STANDARD_SIGNALS = (1 << 31) - 1


def _bit(sig: int) -> int:
    return 1 << (sig - 1)


def test_a_nohup_daemon_starts_sessions_with_default_signals(start):
    server = start("--kill-grace", "60", wrap=NOHUP)
    ignored, blocked = signal_state(server.proc.pid)
    assert ignored & _bit(signal.SIGHUP) and ignored & _bit(signal.SIGQUIT) and blocked & _bit(signal.SIGUSR2)
    term = Term(server)
    term.create(sessionId="sig", command=["grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"])
    term.until(lambda: "sig" in term.exits)
    fields = dict(line.split(":") for line in term.output["sig"].decode().split("\r\n") if line)
    assert int(fields["SigIgn"], 16) & STANDARD_SIGNALS == 0, fields
    assert int(fields["SigBlk"], 16) == 0, fields
    # The hang-up ends the shell itself: its exit does not wait for the 60 s grace's SIGKILL.
    term.create(sessionId="shell")
    term.send(type="input", sessionId="shell", data="echo up-$((1+1))\n")
    term.sees("shell", b"up-2")
    term.send(type="close", sessionId="shell")
    term.until(lambda: "shell" in term.exits, timeout=20)
    assert term.exits["shell"]["signal"] == "SIGHUP"


#: Children that leave the session and process group (``setsid``), ignore the hang-up
#: (``nohup``), and one whose parent exits at once so that init adopts it.
ESCAPES = (
    "setsid sleep 1000 & echo $! >> {file}; nohup sleep 1000 >/dev/null 2>&1 & echo $! >> {file}; "
    "sh -c 'setsid sleep 1000 & echo $! >> {file}'; echo started; sleep 1000"
)


def _escapes(term: Term, server: Server, name: str, command: str = ESCAPES, count: int = 3) -> list[int]:
    term.create(sessionId=name, command=command.format(file=f"pids-{name}"))
    term.sees(name, b"started")
    pids = [int(p) for p in (server.root / f"pids-{name}").read_text().split()]
    assert len(pids) == count and not any(map(gone, pids)), pids
    return pids


def _trees(server: Server, kind: str = "terminal") -> dict:
    [line] = [l for l in server.log if l.get("msg", "").startswith("process trees") and l.get("kind") == kind]
    return line


def _cgroup(pid: int) -> str:
    return next(l[3:] for l in open(f"/proc/{pid}/cgroup").read().splitlines() if l.startswith("0::"))


def test_close_exit_and_a_crash_end_the_whole_tree(start):
    server = start("--kill-grace", "0.5", state="kept")
    trees = _trees(server)
    assert trees["msg"] == "process trees: cgroup", f"these tests need cgroup v2 with cgroup.kill: {trees}"
    term = Term(server)
    closed = _escapes(term, server, "closed")
    assert all(_cgroup(pid).startswith("/aether/") for pid in closed)
    term.send(type="close", sessionId="closed")
    term.until(lambda: "closed" in term.exits)
    wait_for(lambda: all(map(gone, closed)), 10)

    stopped = _escapes(term, server, "stopped")
    assert server.stop() == 0
    wait_for(lambda: all(map(gone, stopped)), 10)

    server = start(state="kept")
    crashed = _escapes(Term(server), server, "crashed")
    server.proc.kill()
    server.proc.wait()
    assert not any(map(gone, crashed))  # the hang-up did not reach them
    # Another daemon of this state directory: the leftovers of one that is gone are killed,
    # the sessions of one that still runs are not.
    alive = start(state="kept")
    kept = _escapes(Term(alive), alive, "kept")
    wait_for(lambda: all(map(gone, crashed)), 10)
    start(state="kept")
    assert not any(map(gone, kept))
    assert alive.stop() == 0
    wait_for(lambda: all(map(gone, kept)), 10)


def test_without_cgroups_close_and_exit_end_the_session_and_its_children(start):
    """The fallback: the session, its process group and their descendants, found in /proc
    (and held by pidfd from the hang-up on, so a child orphaned by it is still found)."""
    server = start("--kill-grace", "0.5", env={"AETHER_CGROUPS": "off"})
    assert _trees(server)["msg"].startswith("process trees: fallback") and _trees(server)["why"] == "AETHER_CGROUPS=off"
    term = Term(server)
    command = (
        "setsid sleep 1000 & echo $! >> {file}; nohup sleep 1000 >/dev/null 2>&1 & echo $! >> {file}; echo started; sleep 1000"
    )
    closed = _escapes(term, server, "closed", command, 2)
    assert not any(_cgroup(pid).startswith("/aether/") for pid in closed)
    term.send(type="close", sessionId="closed")
    term.until(lambda: "closed" in term.exits)
    wait_for(lambda: all(map(gone, closed)), 10)
    stopped = _escapes(term, server, "stopped", command, 2)
    assert server.stop() == 0
    wait_for(lambda: all(map(gone, stopped)), 10)
