"""What only the eBPF backend does: its two buffer kinds, loss detection, and sleeping when idle."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import Watcher, free_port, kernel_listening_ports, need_ebpf

BURST = """
import socket, sys
n, keep = int(sys.argv[1]), int(sys.argv[2])
kept = []
for i in range(n):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
    if i % keep == 0:
        kept.append(s)
    else:
        s.close()
print(" ".join(str(s.getsockname()[1]) for s in kept), flush=True)
sys.stdin.readline()
"""


@pytest.fixture(autouse=True)
def _ebpf():
    need_ebpf()


def open_ports(messages) -> set[int]:
    state: set[int] = set()
    for msg in messages:
        (state.add if msg["type"] == "open" else state.discard)(msg["port"])
    return state


def test_perf_buffer_path(tmp_path):
    w = Watcher("ebpf", env={"AETHER_EBPF_BUFFER": "perf"})
    try:
        assert any("perf buffer" in line.get("reason", "") for line in w.log)
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-c", f"import socket,time; s=socket.socket(); s.bind(('127.0.0.1',{port})); s.listen(); time.sleep(30)"]
        )
        try:
            assert w.expect("open", port)["pid"] == proc.pid
        finally:
            proc.kill()
            proc.wait()
        w.expect("close", port)
    finally:
        w.stop()


@pytest.mark.parametrize("buffer", ["ring", "perf"])
def test_lost_records_are_counted_and_resynchronised(buffer):
    """A one-page buffer overflows in a burst; the table must still end equal to the kernel's."""
    w = Watcher("ebpf", env={"AETHER_EBPF_BUFFER": buffer, "AETHER_EBPF_PAGES": "1"})
    burst = subprocess.Popen(
        [sys.executable, "-c", BURST, "3000", "97"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        kept = {int(p) for p in burst.stdout.readline().split()}
        messages = w.seen + w.drain(settle=1.0)
        assert any(line.get("msg") == "probe records lost" for line in w.log), "a 1-page buffer must overflow"
        truth = kernel_listening_ports() - {22, 2222, 3001}
        assert kept <= truth
        assert open_ports(messages) == truth
    finally:
        burst.kill()
        burst.wait()
        w.stop()


def _context_switches(pid: int) -> int:
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        for line in status.read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


def _assert_never_woken(pid: int, seconds: float = 2.0) -> None:
    time.sleep(0.5)
    before = _context_switches(pid)
    time.sleep(seconds)
    woken = _context_switches(pid) - before
    assert woken <= 1, f"{woken} wake-ups in {seconds:g} s of idling"


def test_idle_watcher_is_never_woken():
    """No timer: with no port changing, the process does not run at all."""
    w = Watcher("ebpf")
    try:
        _assert_never_woken(w.proc.pid)
    finally:
        w.stop()


def test_idle_server_without_clients_is_never_woken(tmp_path):
    """No keepalive timer without sessions, no polling: `aether serve` sleeps until needed."""
    from conftest import Server

    server = Server("ebpf", tmp_path / "state")
    try:
        _assert_never_woken(server.proc.pid)
    finally:
        server.stop()
