"""The port table alone: sockets in, port events out. No I/O."""

from __future__ import annotations

import random
import socket

from aether.ports.events import INODE, SKADDR, Listener
from aether.ports.table import PortTable


def sk(n, port, pid=100, address="127.0.0.1", family=socket.AF_INET):
    return Listener((SKADDR, n), port, family, address, pid)


def ino(n, port, pid=100, address="127.0.0.1"):
    return Listener((INODE, n), port, socket.AF_INET, address, pid, n)


def test_first_socket_opens_last_socket_closes():
    table = PortTable()
    opened = table.add(sk(1, 3000))
    assert (opened.type, opened.port, opened.pid, opened.addresses) == ("open", 3000, 100, ("127.0.0.1",))
    assert table.add(sk(2, 3000, address="::1", family=socket.AF_INET6)) is None
    assert table.remove((SKADDR, 1)) == (True, None)
    known, closed = table.remove((SKADDR, 2))
    assert known and (closed.type, closed.port) == ("close", 3000)
    assert table.remove((SKADDR, 2)) == (False, None)
    assert len(table) == 0


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


def test_sync_replaces_when_counts_differ_and_marks_port_uncertain():
    table = PortTable()
    table.add(sk(1, 3000))
    assert table.sync([ino(10, 3000), ino(11, 3000)]) == []
    assert table.is_uncertain(3000)
    assert [l.key for l in table.listeners(3000)] == [(INODE, 10), (INODE, 11)]


def test_set_ignored_closes_newly_ignored_ports():
    table = PortTable()
    table.add(sk(1, 3000))
    table.add(sk(2, 4000))
    events = table.set_ignored([3000])
    assert [(e.type, e.port) for e in events] == [("close", 3000)]
    assert table.add(sk(3, 3000)) is None


def test_random_operations_match_a_model():
    """Whatever the order of adds and removes, events are exactly the model's transitions."""
    rng = random.Random(20261123)
    for _round in range(200):
        table, model, live = PortTable(ignored=[7]), {}, {}
        for step in range(200):
            if live and rng.random() < 0.45:
                key = rng.choice(sorted(live))
                port = live.pop(key)
                known, event = table.remove((SKADDR, key))
                assert known == (port != 7)
                model[port] -= 1
                expect_close = model[port] == 0 and port != 7
                assert (event is not None) == expect_close
            else:
                key, port = step, rng.randint(1, 9)
                live[key] = port
                event = table.add(sk(key, port))
                expect_open = model.get(port, 0) == 0 and port != 7
                model[port] = model.get(port, 0) + 1
                assert (event is not None) == expect_open
            assert table.ports() == sorted(p for p, n in model.items() if n and p != 7)
        # A snapshot of the same truth changes nothing.
        truth = [ino(1000 + k, p) for k, p in live.items()]
        assert table.sync(truth) == []
