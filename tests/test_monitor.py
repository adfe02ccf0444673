"""PortMonitor in-process: subscribers, wait_closed, ignored-port changes, living holders, and
`update` when an open port's addresses or owner change."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading

from support.ports import free_port
from support.processes import FORKING_OWNER, proc_comm
from support.waiting import until

from aether.ports.monitor import PortMonitor


def listening(port: int) -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", port))
    s.listen()
    return s


def run(backend, scenario):
    async def main():
        monitor = PortMonitor(backend=backend, interval=0.05)
        await monitor.start()
        try:
            await scenario(monitor)
        finally:
            monitor.stop()

    asyncio.run(main())


def test_subscriber_sees_open_and_close_in_order(backend):
    async def scenario(monitor):
        seen = []
        monitor.subscribe(seen.append)
        port = free_port()
        s = listening(port)
        await until(lambda: any(e.port == port for e in seen))
        assert port in [state.port for state in monitor.ports()]
        s.close()
        assert await monitor.wait_closed(port, 5)
        mine = [(e.type, e.pid, e.process) for e in seen if e.port == port]
        assert mine == [("open", os.getpid(), open("/proc/self/comm").read().strip()), ("close", None, None)]

    run(backend, scenario)


def test_wait_closed_times_out_while_open(backend):
    async def scenario(monitor):
        port = free_port()
        s = listening(port)
        await until(lambda: port in monitor.table)
        assert await monitor.wait_closed(port, 0.1) is False
        s.close()

    run(backend, scenario)


def test_changing_ignored_ports_closes_and_reopens(backend):
    async def scenario(monitor):
        seen = []
        monitor.subscribe(seen.append)
        port = free_port()
        s = listening(port)
        await until(lambda: port in monitor.table)
        monitor.set_ignored([port])
        assert [(e.type, e.port) for e in seen if e.port == port][-1] == ("close", port)
        monitor.set_ignored([])
        await until(lambda: port in monitor.table)
        assert [e.type for e in seen if e.port == port] == ["open", "close", "open"]
        s.close()

    run(backend, scenario)


def pidfd_targets() -> list[int]:
    """The pids this process holds a pidfd of (-1 for a process gone)."""
    pids = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:[pidfd]":
                continue
            with open(f"/proc/self/fdinfo/{fd}") as info:
                pids += [int(line.split()[1]) for line in info if line.startswith("Pid:")]
        except OSError:
            pass
    return pids


def test_another_address_and_its_going_are_updates(backend):
    async def scenario(monitor):
        seen = []
        monitor.subscribe(seen.append)
        port = free_port()
        v4 = listening(port)
        await until(lambda: any(e.port == port for e in seen))
        v6 = socket.socket(socket.AF_INET6)
        v6.bind(("::1", port))
        v6.listen()
        await until(lambda: [e.type for e in seen if e.port == port][-1] == "update")
        v4.close()
        await until(lambda: [e.addresses for e in seen if e.port == port][-1] == ("::1",))
        v6.close()
        assert await monitor.wait_closed(port, 5)
        name = open("/proc/self/comm").read().strip()
        mine = [(e.type, e.pid, e.process, e.addresses) for e in seen if e.port == port]
        assert mine == [
            ("open", os.getpid(), name, ("127.0.0.1",)),
            ("update", os.getpid(), name, ("127.0.0.1", "::1")),
            ("update", os.getpid(), name, ("::1",)),
            ("close", None, None, ()),
        ]

    run(backend, scenario)


def test_owner_exiting_while_a_child_holds_the_socket_is_an_update(backend):
    """A daemonizing server: listen(), fork(), the parent exits. The probe sees no transition;
    the parent's pidfd says it exited, and the port passes to the child at once."""

    async def scenario(monitor):
        seen = []
        monitor.subscribe(seen.append)
        port = free_port()
        code = FORKING_OWNER.format(port=port)
        owner = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        child = int(owner.stdout.readline())
        try:
            await until(lambda: any(e.port == port for e in seen))
            assert [(e.type, e.pid) for e in seen if e.port == port] == [("open", owner.pid)]
            await until(lambda: owner.pid in pidfd_targets())  # the owner is watched
            owner.stdin.close()  # the parent exits
            await until(lambda: [e.type for e in seen if e.port == port][-1] == "update")
            update = [e for e in seen if e.port == port][-1]
            assert (update.pid, update.process, update.addresses) == (child, proc_comm(child), ("127.0.0.1",))
            assert update.backend == "pidfd"
            assert [e.pid for e in monitor.open_events() if e.port == port] == [child]
            assert next(s for s in monitor.ports() if s.port == port).pid == child
            await until(lambda: child in pidfd_targets())  # the heir is watched now
            assert owner.pid not in pidfd_targets() and -1 not in pidfd_targets()
        finally:
            os.kill(child, 9)
            owner.kill()
            owner.wait()
        assert await monitor.wait_closed(port, 5)
        await until(lambda: child not in pidfd_targets())
        assert [e.type for e in seen if e.port == port] == ["open", "update", "close"]

    run(backend, scenario)


#: A listener held by no process: the child sends it to the test over a socketpair the test
#: never reads, then exits. The socket lives on in the message in flight, as one held by another
#: user's or another pid namespace's process would: no /proc/PID/fd links to it.
IN_FLIGHT = """
import os, socket, sys
carrier = socket.socket(fileno=int(sys.argv[1]))
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
socket.send_fds(carrier, [b"x"], [s.fileno()])
print(s.getsockname()[1], os.fstat(s.fileno()).st_ino, flush=True)
"""


def record_proc_walks(monkeypatch) -> list[tuple[int, frozenset]]:
    """Every read of all of /proc from now on: (the thread it ran on, the socket inodes it
    looked for; empty for a walk that looks for none, such as procs.younger)."""
    from aether.ports import procs

    walks = []
    looking_for: dict[int, frozenset] = {}
    real_pids, real_holders = procs._pids, procs.socket_holders

    def pids():
        walks.append((threading.get_ident(), looking_for.get(threading.get_ident(), frozenset())))
        return real_pids()

    def holders(inodes, pids=None):
        inodes = frozenset(inodes)
        looking_for[threading.get_ident()] = inodes
        try:
            return real_holders(inodes, pids)
        finally:
            looking_for.pop(threading.get_ident(), None)

    monkeypatch.setattr(procs, "_pids", pids)
    monkeypatch.setattr(procs, "socket_holders", holders)
    return walks


def test_a_port_nobody_visible_holds_is_looked_for_once_and_never_on_the_loop(backend, monkeypatch):
    """A client connecting (open_events), a resync, an owner's exit: none reads all of /proc
    on the event loop, and a socket whose holder was looked for and not found is not looked
    for again, however many clients connect and resyncs run."""
    walks = record_proc_walks(monkeypatch)

    async def scenario(monitor):
        loop_thread = threading.get_ident()

        def assert_off_the_loop():
            on_the_loop = [inodes for thread, inodes in walks if thread == loop_thread]
            assert not on_the_loop, f"{len(on_the_loop)} walks of all of /proc on the event loop"

        seen = []
        monitor.subscribe(seen.append)
        ours, theirs = socket.socketpair()
        child = subprocess.Popen(
            [sys.executable, "-c", IN_FLIGHT, str(theirs.fileno())], pass_fds=[theirs.fileno()], stdout=subprocess.PIPE, text=True
        )
        theirs.close()
        port, inode = map(int, child.stdout.readline().split())
        assert child.wait() == 0
        try:
            # ebpf: the child's port, then an update once its exit is seen; sockdiag: the
            # child's or no owner at once, as the snapshot caught it.
            await until(lambda: port in monitor.table and monitor.table.open_event(port).pid is None, timeout=10)
            assert_off_the_loop()
            await until(lambda: monitor.settled)
            assert [(e.type, e.pid) for e in seen if e.port == port][-1] in (("open", None), ("update", None))
            searched = sum(inode in inodes for _thread, inodes in walks)
            assert searched >= 1
            for _ in range(5):  # clients connecting
                assert [(e.port, e.pid, e.process) for e in monitor.open_events() if e.port == port] == [(port, None, None)]
            resyncs = monitor.stats["resyncs"]
            for _ in range(3):
                monitor.set_ignored([])  # a resync each
                await until(lambda: monitor.stats["resyncs"] > resyncs and monitor.settled)
                resyncs = monitor.stats["resyncs"]
            assert sum(inode in inodes for _thread, inodes in walks) == searched
            assert [(e.type, e.pid) for e in seen if e.port == port][-1] in (("open", None), ("update", None))
        finally:
            ours.close()  # the message in flight goes, and the listener with it
        assert await monitor.wait_closed(port, 5)
        assert_off_the_loop()

    run(backend, scenario)


def test_an_owner_dead_unnoticed_is_looked_for_off_the_loop_and_told_as_an_update(backend, monkeypatch):
    """With no pidfd to say so (more owners than are watched), a new client's snapshot names
    what the table knows, and the owner found off the loop is an update to every client."""
    from aether.ports import exits

    monkeypatch.setattr(exits, "MAX_WATCHED", 0)
    walks = record_proc_walks(monkeypatch)

    async def scenario(monitor):
        loop_thread = threading.get_ident()
        seen = []
        monitor.subscribe(seen.append)
        port = free_port()
        owner = subprocess.Popen(
            [sys.executable, "-c", FORKING_OWNER.format(port=port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        child = int(owner.stdout.readline())
        try:
            await until(lambda: [(e.type, e.pid) for e in seen if e.port == port] == [("open", owner.pid)])
            owner.stdin.close()
            owner.wait()  # unwatched: the table still names it
            assert monitor.table.open_event(port).pid == owner.pid
            snapshot = monitor.open_events()  # a client connecting
            assert not [inodes for thread, inodes in walks if thread == loop_thread], "a walk of all of /proc on the loop"
            assert [e.pid for e in snapshot if e.port == port] == [owner.pid]
            await until(lambda: [(e.type, e.pid) for e in seen if e.port == port][-1] == ("update", child))
            assert [e.pid for e in monitor.open_events() if e.port == port] == [child]
        finally:
            os.kill(child, 9)
        assert await monitor.wait_closed(port, 5)
        assert not [inodes for thread, inodes in walks if thread == loop_thread], "a walk of all of /proc on the loop"

    run(backend, scenario)


def test_exit_watch_tells_each_exit_once_with_the_start_time():
    from aether.ports import procs
    from aether.ports.exits import ExitWatch

    async def main():
        loop = asyncio.get_running_loop()
        told = []
        watch = ExitWatch(loop, told.append)
        living = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.readline()"], stdin=subprocess.PIPE)
        zombie = subprocess.Popen([sys.executable, "-c", "pass"])
        await until(lambda: procs.is_alive(zombie.pid) is False)  # exited, not reaped
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()  # reaped: its pid names nothing
        try:
            watch.track({living.pid, zombie.pid, gone.pid})
            await until(lambda: told)
            # Exited before it was watched: told at once, with no start time (it may be another's).
            assert told == [{zombie.pid: None, gone.pid: None}]
            assert living.pid in watch
            watch.track({living.pid})  # watched already: nothing new
            started = procs.start_time(living.pid)
            living.stdin.close()
            await until(lambda: len(told) == 2)
            assert told[1] == {living.pid: started}
            assert living.pid not in watch and living.pid not in pidfd_targets()
        finally:
            for proc in (living, zombie):
                proc.kill()
                proc.wait()
            watch.close()

    asyncio.run(main())


def test_younger_processes_include_a_child_and_not_init():
    from aether.ports import procs

    since = procs.start_time(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.readline()"], stdin=subprocess.PIPE)
    try:
        younger = procs.younger(since)
        assert child.pid in younger and os.getpid() in younger and 1 not in younger
    finally:
        child.stdin.close()
        child.wait()


def test_exit_watch_lets_go_of_a_process_that_owns_nothing_after_a_grace(monkeypatch):
    """Not at once (a server that listens and closes again and again keeps its pidfd), but
    soon: its exit, whenever it comes, must not wake the loop."""
    from aether.ports import exits

    monkeypatch.setattr(exits, "IDLE_GRACE", 0.2)

    async def main():
        watch = exits.ExitWatch(asyncio.get_running_loop(), lambda exited: None)
        me = os.getpid()
        try:
            watch.track({me})
            watch.track(set())  # it closed its port
            assert me in watch and me in pidfd_targets()
            watch.track({me})  # and listened again: still the one pidfd
            assert pidfd_targets().count(me) == 1
            watch.track(set())
            await until(lambda: me not in watch, timeout=2)
            assert me not in pidfd_targets()
        finally:
            watch.close()

    asyncio.run(main())


def test_a_socket_listening_again_after_its_close_was_lost_moves_to_its_new_port():
    # The probe's records, as the ring delivers them, for one kernel socket address: a listen
    # on one port, its close lost, then a listen on another (the address reused).
    from aether.ports.ebpf import TCP_CLOSE, TCP_LISTEN, ListenRecord

    async def scenario(monitor):
        seen = []
        monitor.subscribe(seen.append)
        first, second = free_port(), free_port()
        pid = os.getpid()

        def listen(port, ts):
            return ListenRecord(0xFFFF0000DEAD, pid, pid, ts, socket.AF_INET, port, TCP_CLOSE, TCP_LISTEN, "127.0.0.1", "x")

        monitor._on_records([listen(first, 1), listen(second, 2)])
        assert [(e.type, e.port) for e in seen if e.port in (first, second)] == [
            ("open", first),
            ("close", first),
            ("open", second),
        ]
        assert first not in monitor.table and second in monitor.table

    run("sockdiag", scenario)
