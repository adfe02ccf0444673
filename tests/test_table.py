"""The port table alone: sockets in, port events out. No I/O."""

from __future__ import annotations

import dataclasses
import random
import socket

from aether.ports.events import INODE, SKADDR, Listener
from aether.ports.table import PortTable


def sk(n, port, pid=100, address="127.0.0.1", family=socket.AF_INET):
    return Listener((SKADDR, n), port, family, address, pid)


def ino(n, port, pid=100, address="127.0.0.1"):
    return Listener((INODE, n), port, socket.AF_INET, address, pid, n)


def state(event):
    return (event.type, event.port, event.pid, event.addresses)


def test_first_socket_opens_last_socket_closes():
    table = PortTable()
    opened = table.add(sk(1, 3000))
    assert state(opened) == ("open", 3000, 100, ("127.0.0.1",))
    assert table.add(sk(2, 3000)) is None  # a second socket on the same address: same state
    assert table.remove((SKADDR, 2)) == (True, None)
    known, closed = table.remove((SKADDR, 1))
    assert known and (closed.type, closed.port) == ("close", 3000)
    assert table.remove((SKADDR, 1)) == (False, None)
    assert len(table) == 0


def test_another_address_on_an_open_port_is_an_update_and_so_is_its_going():
    """nginx's `listen 80; listen [::]:80`: the port opens once, then its state grows."""
    table = PortTable()
    assert state(table.add(sk(1, 3000))) == ("open", 3000, 100, ("127.0.0.1",))
    updated = table.add(sk(2, 3000, address="::1", family=socket.AF_INET6))
    assert state(updated) == ("update", 3000, 100, ("127.0.0.1", "::1"))
    assert table.open_event(3000).addresses == ("127.0.0.1", "::1")
    known, shrunk = table.remove((SKADDR, 1))
    assert known and state(shrunk) == ("update", 3000, 100, ("::1",))
    assert table.remove((SKADDR, 2))[1].type == "close"


def test_the_first_socket_going_hands_the_port_to_the_next_owner():
    table = PortTable()
    table.add(sk(1, 3000, pid=100))
    assert table.add(sk(2, 3000, pid=200)) is None  # an SO_REUSEPORT group: the first owner speaks
    assert state(table.remove((SKADDR, 1))[1]) == ("update", 3000, 200, ("127.0.0.1",))


def test_set_pids_gives_sockets_new_owners():
    table = PortTable()
    table.add(sk(1, 3000, pid=100))
    table.add(sk(2, 3000, pid=100, address="::1", family=socket.AF_INET6))
    table.add(sk(3, 4000, pid=100))
    assert table.pids() == {100} and table.ports_of([100]) == {3000, 4000}
    assert table.set_pids(3000, {(SKADDR, 1): 100}) is None  # no change, no event
    event = table.set_pids(3000, {(SKADDR, 1): 101, (SKADDR, 2): 101})
    assert state(event) == ("update", 3000, 101, ("127.0.0.1", "::1"))
    assert table.pids() == {100, 101} and table.ports_of([100]) == {4000} and table.ports_of([101]) == {3000}
    assert table.set_pids(5000, {(SKADDR, 9): 1}) is None  # not open: nothing
    table.remove((SKADDR, 3))
    assert table.pids() == {101}


def test_sync_opens_a_new_port_with_all_its_addresses():
    table = PortTable()
    events = table.sync([ino(10, 3000), ino(11, 3000, address="::1")])
    assert [state(e) for e in events] == [("open", 3000, 100, ("127.0.0.1", "::1"))]


def test_sync_tells_a_new_owner_and_a_changed_address_set():
    table = PortTable()
    table.sync([ino(10, 3000, pid=100)])
    assert table.sync([ino(10, 3000, pid=100)]) == []
    assert [state(e) for e in table.sync([ino(10, 3000, pid=200)])] == [("update", 3000, 200, ("127.0.0.1",))]
    assert table.pids() == {200}
    events = table.sync([ino(10, 3000, pid=200), ino(11, 3000, pid=200, address="::1")])
    assert [state(e) for e in events] == [("update", 3000, 200, ("127.0.0.1", "::1"))]
    assert [state(e) for e in table.sync([ino(11, 3000, pid=200, address="::1")])] == [("update", 3000, 200, ("::1",))]


def test_duplicate_add_and_ignored_ports_change_nothing():
    table = PortTable(ignored=[22])
    assert table.add(sk(1, 22)) is None and 22 not in table
    assert table.add(sk(2, 8000)) is not None
    assert table.add(sk(2, 8000)) is None
    assert len(table.listeners(8000)) == 1


def test_sync_opens_and_closes_by_port():
    table = PortTable()
    table.add(sk(1, 3000))
    table.add(sk(2, 4000))
    events = table.sync([ino(10, 4000), ino(11, 5000)])
    assert [(e.type, e.port) for e in events] == [("close", 3000), ("open", 5000)]
    assert table.ports() == [4000, 5000]


def test_sync_keeps_probe_keys_when_counts_agree():
    table = PortTable()
    table.add(sk(1, 3000))
    assert table.sync([ino(10, 3000)]) == []
    assert not table.is_uncertain(3000)
    assert table.remove((SKADDR, 1))[1].type == "close"


def test_sync_keeps_the_first_socket_first():
    """A snapshot's order is the kernel's hash order: a socket joining must not make another
    one the port's first, and so its owner."""
    table = PortTable()
    table.sync([ino(10, 3000, pid=100)])
    assert table.sync([ino(11, 3000, pid=200), ino(10, 3000, pid=100)]) == []
    assert table.open_event(3000).pid == 100


def test_sync_keeps_probe_keys_when_counts_agree_even_if_owners_differ():
    """The probe's record names the process that called listen(); a snapshot's owner rule can
    name another. Without a lost record the probe's view stands, and says nothing new."""
    table = PortTable()
    table.add(sk(1, 3000, pid=100))
    assert table.sync([ino(10, 3000, pid=99)]) == []
    assert table.open_event(3000).pid == 100


def test_sync_replaces_when_counts_differ_and_marks_port_uncertain():
    table = PortTable()
    table.add(sk(1, 3000))
    assert table.sync([ino(10, 3000), ino(11, 3000)]) == []  # same owner, same address: same state
    assert table.is_uncertain(3000)
    assert [l.key for l in table.listeners(3000)] == [(INODE, 10), (INODE, 11)]


def test_keeps_says_when_a_snapshots_owners_cannot_change_a_port():
    """What the monitor asks before it looks for owners: whether sync keeps the port as it is
    whoever owns the snapshot's sockets."""

    def table():
        table = PortTable()
        table.add(sk(1, 3000, pid=100))  # the probe's
        table.sync([ino(9, 3000, pid=100), ino(10, 4000, pid=100)])  # and a snapshot's
        return table

    for port, sockets, trust, kept in [
        (3000, 1, True, True),  # the probe's socket stands against one of the snapshot's
        (3000, 1, False, False),  # records were lost: the snapshot's replaces it
        (3000, 2, True, False),  # counts differ: the snapshot's replace it
        (4000, 1, True, False),  # a snapshot's own socket: its owner decides
        (5000, 1, True, False),  # not open: the snapshot opens it
    ]:
        assert table().keeps(port, sockets, trust) is kept, (port, sockets, trust)
        others = [ino(9, 3000, pid=100)] * (port != 3000) + [ino(10, 4000, pid=100)] * (port != 4000)
        changed = table()
        events = changed.sync([ino(20 + n, port, pid=999) for n in range(sockets)] + others, trust_probe=trust)
        assert (not events) is kept, (port, sockets, trust, events)


def test_set_ignored_closes_newly_ignored_ports():
    table = PortTable()
    table.add(sk(1, 3000))
    table.add(sk(2, 4000))
    events = table.set_ignored([3000])
    assert [(e.type, e.port) for e in events] == [("close", 3000)]
    assert table.add(sk(3, 3000)) is None


def test_random_operations_match_a_model():
    """Whatever the order of adds, removes, new owners and snapshots, the events are exactly
    the model's transitions: ``open`` and ``close`` at the first and last socket, ``update``
    exactly when an open port's (owner, addresses) changed, each with the model's state."""
    rng = random.Random(20261123)
    addresses = [("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6), ("10.0.0.2", socket.AF_INET)]

    def model_state(live, port):
        group = [listener for listener in live.values() if listener.port == port]
        return (group[0].pid, tuple(sorted({listener.address for listener in group}))) if group else None

    for _round in range(200):
        table, live = PortTable(ignored=[7]), {}  # live: key -> Listener, in insertion order
        for step in range(200):
            roll = rng.random()
            if live and roll < 0.35:
                key = rng.choice(sorted(live))
                port = live[key].port
                before = model_state(live, port)
                del live[key]
                known, event = table.remove((SKADDR, key))
                assert known == (port != 7)
                changes = {port: (before, model_state(live, port))}
                events = [event] if event else []
            elif live and roll < 0.45:
                port = live[rng.choice(sorted(live))].port
                pid = rng.choice([100, 200, 300])
                keys = [key for key, listener in live.items() if listener.port == port and rng.random() < 0.5]
                before = model_state(live, port)
                for key in keys:
                    live[key] = dataclasses.replace(live[key], pid=pid)
                event = table.set_pids(port, {(SKADDR, key): pid for key in keys})
                changes = {port: (before, model_state(live, port))}
                events = [event] if event else []
            else:
                port = rng.randint(1, 9)
                address, family = rng.choice(addresses)
                listener = sk(step, port, pid=rng.choice([100, 200]), address=address, family=family)
                before = model_state(live, port)
                live[step] = listener
                event = table.add(listener)
                changes = {port: (before, model_state(live, port))}
                events = [event] if event else []
            for port, (before, after) in changes.items():
                if port == 7:
                    expected = None
                elif before is None:
                    expected = ("open", port, *after)
                elif after is None:
                    expected = ("close", port, None, ())
                elif before != after:
                    expected = ("update", port, *after)
                else:
                    expected = None
                got = [state(e) for e in events if e.port == port]
                assert got == ([expected] if expected else []), (step, before, after)
            assert table.ports() == sorted({l.port for l in live.values()} - {7})
            assert table.pids() == {l.pid for l in live.values() if l.port != 7}
        # A snapshot of the same truth says nothing: the sockets agree in count and owners.
        truth = [dataclasses.replace(l, key=(INODE, 1000 + k), inode=1000 + k) for k, l in live.items()]
        assert table.sync(truth) == []
        # Taken as the truth (records were lost), it replaces the sockets, still in silence.
        assert table.sync(truth, trust_probe=False) == []
        assert all(table.is_uncertain(port) for port in table.ports())
