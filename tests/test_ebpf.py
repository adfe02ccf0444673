"""What only the eBPF backend does: its two buffer kinds, loss detection, sleeping when idle, and
keeping bcc's compiler out of the daemon (a helper compiles, the daemon loads, a cache skips it)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import queue
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from support import ROOT
from support.ebpf import need_ebpf
from support.ports import free_port, kernel_listening_ports
from support.processes import aether
from support.servers import Server, Watcher

#: Listens on ``n`` ports and closes all but every ``keep``-th; prints the ports it keeps, then
#: every port it listened on, and waits for its stdin to close.
BURST = """
import socket, sys
n, keep = int(sys.argv[1]), int(sys.argv[2])
kept, every = [], []
for i in range(n):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
    every.append(s.getsockname()[1])
    if i % keep == 0:
        kept.append(s)
    else:
        s.close()
print(" ".join(str(s.getsockname()[1]) for s in kept), flush=True)
print(" ".join(map(str, every)), flush=True)
sys.stdin.readline()
"""


pytestmark = pytest.mark.ebpf


@pytest.fixture(autouse=True)
def _ebpf():
    need_ebpf()


def open_ports(messages, pid: int | None = None) -> set[int]:
    """The ports the lines leave open (opened by ``pid``, if given)."""
    state: set[int] = set()
    for msg in messages:
        if msg["type"] == "open" and pid in (None, msg["pid"]):
            state.add(msg["port"])
        elif msg["type"] == "close":
            state.discard(msg["port"])
    return state


def test_perf_buffer_path(tmp_path):
    w = Watcher("ebpf", env={"AETHER_EBPF_BUFFER": "perf"})
    try:
        assert any("perf buffer" in line.get("reason", "") for line in w.log)
        port = free_port()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"import socket,time; s=socket.socket(); s.bind(('127.0.0.1',{port})); s.listen(); time.sleep(30)",
            ]
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
    burst = subprocess.Popen([sys.executable, "-c", BURST, "3000", "97"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        kept = {int(p) for p in burst.stdout.readline().split()}
        burst_ports = {int(p) for p in burst.stdout.readline().split()}
        # The burst's ports only: the host's other listeners come and go meanwhile (and may
        # take a port the burst let go).
        assert kernel_listening_ports() & burst_ports >= kept
        mine = lambda: open_ports(w.seen, burst.pid) & burst_ports  # noqa: E731
        deadline = time.monotonic() + 20
        while mine() != kept:  # the resync after the losses
            assert time.monotonic() < deadline, f"the lines and the kernel differ on {sorted(mine() ^ kept)[:20]}"
            with contextlib.suppress(queue.Empty):
                w.next(0.1)
        assert any(line.get("msg") == "probe records lost" for line in w.log), "a 1-page buffer must overflow"
        # And they stay so: nothing about them before a port that listens after.
        with socket.socket() as after:
            after.bind(("127.0.0.1", 0))
            after.listen()
            w.expect("open", after.getsockname()[1], timeout=10)
        assert mine() == kept
    finally:
        burst.kill()
        burst.wait()
        w.stop()


def _wake_ups(pid: int) -> int:
    """Times the process's threads went to sleep (voluntary context switches): once each time
    it was woken and done. Involuntary ones are preemptions while it ran, more of them the
    busier the host (a watcher woken 24 times counted 15-30 of them beside the suite), not
    wake-ups."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        for line in status.read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches"):
                total += int(line.split()[1])
    return total


class HostRecords:
    """Every LISTEN record on the host while it is open, counted by a probe of this process's own
    (its ring is read once, at the end): other processes' listeners wake the probe's readers
    too, and are not the reader's doing."""

    def __enter__(self):
        from aether.ports.ebpf import Probe
        from aether.ports.ringbuf import RingReader

        self.probe = Probe("ring")
        self.reader = RingReader(self.probe.ring_fd, self.probe.ring_size)
        return self

    def count(self) -> int:
        return len(self.reader.drain(lambda data, offset, length: True))

    def __exit__(self, *exc):
        self.reader.close()
        self.probe.stop()


@pytest.fixture
def own_netns():
    """A network namespace of the test's own, with its loopback up: ``nsenter`` into it. Its
    ports are the idle process's alone: the host's listeners are in another namespace, and
    cost it the probe's wake-up for their record and nothing more (no owner to watch, no
    timer to let it go, no snapshot)."""
    name = f"aether-idle-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield ("nsenter", f"--net=/run/netns/{name}")
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _assert_never_woken(pid: int, seconds: float = 2.0, windows: int = 5) -> None:
    """No wake-up but one for each of the host's LISTEN records (give or take one at either end
    of the window), in one of ``windows`` windows. In a namespace of its own, a watcher beside
    other work making 3-35 records a window was woken as many times as there were records, to
    within two, in every window; with a 4 Hz timer added, 6-10 more in every window. More than
    one window, for a host's burst of listeners that exit before the watcher reads their
    namespace: a 2 ms timer each, to look again."""
    seen = []
    with HostRecords() as host:
        for _ in range(windows):
            host.count()
            before = _wake_ups(pid)
            time.sleep(seconds)
            woken = _wake_ups(pid) - before
            records = host.count()
            if woken <= 2 + records:
                return
            seen.append((woken, records))
    raise AssertionError(f"(wake-ups, host LISTEN records) in each {seconds:g} s of idling: {seen}")


@pytest.mark.slow
def test_idle_watcher_is_never_woken(own_netns):
    """No timer: with no port changing, the process does not run at all."""
    w = Watcher("ebpf", wrap=own_netns)
    try:
        _assert_never_woken(w.proc.pid)
    finally:
        w.stop()


@pytest.mark.slow
def test_idle_server_without_clients_is_never_woken(tmp_path, own_netns):
    """No keepalive timer without sessions, no polling: `aether serve` sleeps until needed."""
    server = Server("ebpf", tmp_path / "state", wrap=own_netns)
    try:
        _assert_never_woken(server.proc.pid)
    finally:
        server.stop()


# -- bcc out of the daemon ---------------------------------------------------------------------

HEAVY_LIBRARIES = ("libLLVM", "libclang", "libbcc")


def mapped_libraries(pid: int) -> set[str]:
    return {
        os.path.basename(line.split()[-1])
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
        if len(line.split()) >= 6
    }


def test_server_on_ring_buffer_maps_no_llvm(tmp_path):
    """`aether serve` on the probe holds neither LLVM nor libbcc: the helper compiled it."""
    server = Server("ebpf", tmp_path / "state")
    try:
        assert any("ring buffer" in line.get("reason", "") for line in server.log if line.get("msg") == "port monitor started")
        heavy = [lib for lib in mapped_libraries(server.proc.pid) if lib.startswith(HEAVY_LIBRARIES)]
        assert heavy == [], f"mapped into the daemon: {heavy}"
        with server.connect() as ws:
            port = free_port()
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))
                s.listen()
                deadline = time.monotonic() + 5
                while True:
                    msg = json.loads(ws.recv(timeout=max(0.01, deadline - time.monotonic())))
                    if msg.get("port") == port and msg.get("type") == "open":
                        break
    finally:
        server.stop()


def test_perf_buffer_path_keeps_bcc_in_process():
    """The old kernels' path is bcc's own: the contrast that shows the check above can fail."""
    w = Watcher("ebpf", env={"AETHER_EBPF_BUFFER": "perf"})
    try:
        assert any(lib.startswith("libbcc") for lib in mapped_libraries(w.proc.pid))
    finally:
        w.stop()


def _events_flow(probe) -> list:
    """The probe's records for one listen and close of a fresh port, read through its loop."""
    port = free_port()

    async def run():
        got = []
        probe.start(asyncio.get_running_loop(), got.extend)
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))
                s.listen()
            deadline = time.monotonic() + 5
            while sum(r.port == port for r in got) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
        finally:
            probe.stop()
        return [(r.port, r.is_listen, r.is_close) for r in got if r.port == port]

    return asyncio.run(run()), port


@pytest.fixture
def cache(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv("AETHER_CACHE_DIR", str(directory))
    return directory


def test_compiled_probe_is_cached_and_reused(cache):
    from aether.ports.ebpf import Probe

    cache.mkdir(mode=0o700)
    stale = cache / "probe-0123456789abcdef0123456789abcdef.json"
    stale.write_text(json.dumps({"kernel": "2.6.32-other", "probe": {}}))
    first = Probe("ring")
    assert first.origin == "compiled" and first.compile_seconds is not None
    assert not stale.exists(), "an entry for another kernel is removed when one is written"
    records, port = _events_flow(first)
    assert records == [(port, True, False), (port, False, True)]
    entries = list(cache.glob("probe-*.json"))
    assert entries == [first.cache_file]
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert stat.S_IMODE(entries[0].stat().st_mode) == 0o600

    again = Probe("ring")
    assert (again.origin, again.compile_seconds, again.cache_file) == ("cache", None, first.cache_file)
    records, port = _events_flow(again)
    assert records == [(port, True, False), (port, False, True)]

    other = Probe("ring", pages=64)  # other compile flags: another entry beside it
    other.stop()
    assert other.origin == "compiled" and other.cache_file != first.cache_file
    assert len(list(cache.glob("probe-*.json"))) == 2


def _rewrite(path: Path, change) -> None:
    """Change a cache entry's probe and give it a matching checksum: only the kernel can tell."""
    entry = json.loads(path.read_text())
    change(entry["probe"])
    entry["sha256"] = hashlib.sha256(json.dumps(entry["probe"], sort_keys=True).encode()).hexdigest()
    path.write_text(json.dumps(entry))


def _bad_instruction(probe: dict) -> None:
    import base64

    insns = bytearray(base64.b64decode(probe["insns"]))
    insns[0:8] = bytes([0xFF, 0, 0, 0, 0, 0, 0, 0])  # no such opcode: the verifier refuses it
    probe["insns"] = base64.b64encode(bytes(insns)).decode()


IGNORED, REFUSED = "cached probe ignored; compiling it again", "cached probe did not load; compiling it again"


@pytest.mark.parametrize(
    "damage, warning, rewritten",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:100]), IGNORED, True),
        (lambda p: p.write_text(p.read_text().replace('"insns": "', '"insns": "AAAA', 1)), IGNORED, True),
        (lambda p: _rewrite(p, lambda probe: probe.update(relocations=[])), IGNORED, True),
        (lambda p: _rewrite(p, _bad_instruction), REFUSED, True),
        (lambda p: p.chmod(0o666), IGNORED, True),  # replaced by a private one
        (lambda p: p.parent.chmod(0o777), IGNORED, False),
    ],
    ids=[
        "truncated",
        "checksum",
        "relocations",
        "refused-by-verifier",
        "file-writable-by-others",
        "directory-writable-by-others",
    ],
)
def test_damaged_cache_falls_back_to_compiling(cache, caplog, damage, warning, rewritten):
    from aether.ports.ebpf import Probe

    Probe("ring").stop()
    entry = next(cache.glob("probe-*.json"))
    damage(entry)
    with caplog.at_level("WARNING", logger="aether.ports"):
        probe = Probe("ring")
    assert probe.origin == "compiled"
    assert [r.getMessage() for r in caplog.records] == [warning]
    records, port = _events_flow(probe)
    assert records == [(port, True, False), (port, False, True)]
    again = Probe("ring")
    again.stop()
    assert again.origin == ("cache" if rewritten else "compiled")


def test_unwritable_cache_still_loads(tmp_path, monkeypatch, caplog):
    from aether.ports.ebpf import Probe

    (tmp_path / "file").write_text("")
    monkeypatch.setenv("AETHER_CACHE_DIR", str(tmp_path / "file" / "cache"))
    with caplog.at_level("INFO", logger="aether.ports"):
        probe = Probe("ring")
    assert probe.origin == "compiled"
    assert [r.getMessage() for r in caplog.records] == ["compiled probe not cached"]
    records, port = _events_flow(probe)
    assert records == [(port, True, False), (port, False, True)]


def test_compile_error_is_the_same_one_line_reason(cache, tmp_path, monkeypatch, capfd):
    from aether.ports.ebpf import Probe, ProbeUnavailable

    source = (ROOT / "bpf" / "listen_events.c").read_text()
    (tmp_path / "listen_events.c").write_text(source.replace("return 0;", "return undefined_thing;", 1))
    monkeypatch.setenv("AETHER_BPF_DIR", str(tmp_path))
    with pytest.raises(ProbeUnavailable) as raised:
        Probe("ring")
    assert str(raised.value) == "bcc could not load the probe: Failed to compile BPF module <text>"
    # bcc's diagnostics reach this process's stderr, as when it compiled in-process.
    assert "error: use of undeclared identifier 'undefined_thing'" in capfd.readouterr().err
    assert not list(cache.glob("probe-*.json"))


def test_bcc_missing_is_the_same_one_line_reason(cache, tmp_path, monkeypatch):
    from aether.ports.ebpf import Probe, ProbeUnavailable

    fake = tmp_path / "site" / "bcc"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('"""The PyPI package named bcc: nothing to do with BPF."""\n')
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    with pytest.raises(ProbeUnavailable) as raised:
        Probe("ring")
    assert str(raised.value).startswith("python module bcc not importable (cannot import name 'BPF' from 'bcc'")
    assert str(raised.value).endswith("; install python3-bpfcc (the PyPI package named bcc is unrelated)")


def test_a_cached_probe_needs_neither_bcc_nor_headers(cache, tmp_path):
    """Once compiled, a restart loads the probe where bcc cannot be imported at all."""
    Watcher("ebpf", env={"AETHER_CACHE_DIR": str(cache)}).stop()
    fake = tmp_path / "site" / "bcc"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no bcc here')\n")
    w = Watcher("ebpf", env={"AETHER_CACHE_DIR": str(cache), "PYTHONPATH": str(tmp_path / "site")})
    try:
        assert [line["origin"] for line in w.log if line.get("msg") == "probe loaded"] == ["cache"]
        port = free_port()
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
            s.listen()
            w.expect("open", port)
        w.expect("close", port)
    finally:
        w.stop()


def test_cache_key_names_what_invalidates_it():
    from aether.ports.compiled import cache_key

    base = cache_key(b"source", ["-DA=1"], b"format")
    assert cache_key(b"source", ["-DA=1"], b"format") == base
    assert (
        len(
            {
                base,
                cache_key(b"source2", ["-DA=1"], b"format"),
                cache_key(b"source", ["-DA=2"], b"format"),
                cache_key(b"source", ["-DA=1"], b"format2"),
            }
        )
        == 4
    )


@pytest.mark.parametrize("ordered", [False, True], ids=["plain", "libatomic"])
def test_ring_reader_across_the_end_of_the_ring(ordered):
    """A one-page ring read by both kinds of reader (x86's plain loads, and the acquire loads
    other machines need): records wrap round its end many times and come out whole, in order."""
    from aether.ports.ebpf import Probe, decode
    from aether.ports.ringbuf import RingReader

    probe = Probe("ring", pages=1)
    reader = RingReader(probe.ring_fd, probe.ring_size, ordered=ordered)
    assert reader.ordered is ordered and probe.ring_size == 4096
    seen, opened = [], []
    try:
        for _round in range(20):  # 20 x 10 pairs of 80-byte records through 4 KiB: 8 wraps
            for _ in range(10):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    s.listen()
                    opened.append(s.getsockname()[1])
            seen += reader.drain(lambda data, offset, length: decode(data, offset))
        lost = probe.lost
    finally:
        reader.close()
        probe.stop()
    mine = [(r.port, r.is_listen) for r in seen if r.port in set(opened)]
    if lost == 0:
        assert mine == [pair for port in opened for pair in ((port, True), (port, False))]
    else:  # the host's own listeners filled the page meanwhile: what came is still whole and in order
        assert mine == sorted(mine, key=lambda pair: (opened.index(pair[0]), not pair[1]))
        assert len(mine) > 0


def test_doctor_names_the_compiler(tmp_path):
    result = aether("doctor", "--json", "--state-dir", str(tmp_path), "--port", str(free_port()))
    probe = {check["name"]: check for check in json.loads(result.stdout)["checks"]}["probe"]
    assert probe["verdict"] == "ok", probe
    assert f"compiled by the helper `{sys.executable} -P -m aether.ports.loader` in " in probe["detail"]
