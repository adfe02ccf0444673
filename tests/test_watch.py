"""`aether ports watch` against real listeners, on both backends."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest
from support import ROOT
from support.ports import free_port, kernel_listening_ports
from support.processes import aether, proc_comm

# A listener that signals readiness by listening, then waits for a line on stdin or a signal.
HOLD = """
import socket, sys, time
fam = socket.AF_INET6 if {v6} else socket.AF_INET
s = socket.socket(fam)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
{opts}
s.bind(({addr!r}, {port}))
s.listen()
sys.stdin.readline()
"""


def hold(listeners, port, addr="127.0.0.1", v6=False, opts=""):
    code = HOLD.format(port=port, addr=addr, v6=v6, opts=opts)
    return listeners.python(code, port, stdin=subprocess.PIPE)


def test_ports_already_open_come_first(listeners, watch):
    server = listeners.http_server()
    port = server.port
    w = watch()
    msg = w.expect("open", port)
    assert msg == {
        "channel": "ports",
        "type": "open",
        "port": port,
        "pid": server.pid,
        "process": proc_comm(server.pid),
        "addresses": ["127.0.0.1"],
    }


def test_http_server_open_then_close(listeners, watch):
    w = watch()
    server = listeners.http_server()
    port = server.port
    msg = w.expect("open", port)
    assert msg["pid"] == server.pid and msg["process"] == proc_comm(server.pid)
    server.terminate()
    assert w.expect("close", port) == {"channel": "ports", "type": "close", "port": port}


def test_node_server(listeners, watch):
    w = watch()
    node = listeners.node()
    port = node.port
    msg = w.expect("open", port)
    assert (msg["pid"], msg["process"]) == (node.pid, "node")
    node.kill()
    w.expect("close", port)


def test_nginx_ipv4_and_ipv6_are_one_port(listeners, watch):
    w = watch()
    nginx = listeners.nginx()
    port = nginx.port
    msg = w.expect("open", port)
    assert (msg["pid"], msg["process"]) == (nginx.pid, "nginx")
    if msg["addresses"] == ["127.0.0.1"]:  # the IPv6 socket came after the probe's first record
        msg = w.expect("update", port)
    assert (msg["pid"], msg["addresses"]) == (nginx.pid, ["127.0.0.1", "::1"])
    w.quiet(port, 0.3)  # the workers add nothing
    nginx.send_signal(signal.SIGQUIT)
    while (msg := w.next())["port"] != port or msg["type"] == "update":
        pass  # one socket closing before the other is an update; then the port closes, once
    assert msg["type"] == "close"
    w.quiet(port, 0.3)


def test_daemonized_nginx_ends_with_the_master_and_both_families(listeners, watch):
    """nginx's default mode: the process started listens, forks the master and exits. The lines
    end with the master's pid and both addresses, however the probe's records fell."""
    w = watch()
    master, port = listeners.nginx(daemon=True)
    msg = w.expect("open", port)
    while (msg["pid"], msg["addresses"]) != (master, ["127.0.0.1", "::1"]):
        msg = w.expect("update", port)
    assert msg["process"] == "nginx"
    w.quiet(port, 0.3)  # settled: the workers add nothing


def test_listener_made_in_a_named_thread_reports_the_process(listeners, watch):
    w = watch()
    port = free_port()
    code = f"""
import socket, sys, threading
def make():
    global s
    s = socket.socket(); s.bind(("127.0.0.1", {port})); s.listen()
t = threading.Thread(target=make, name="lsnr-worker"); t.start(); t.join()
sys.stdin.readline()
"""
    proc = listeners.python(code, port, stdin=subprocess.PIPE)
    msg = w.expect("open", port)
    assert msg["pid"] == proc.pid
    assert msg["process"] == proc_comm(proc.pid) != "lsnr-worker"


@pytest.mark.parametrize("how", ["sigkill", "exit_without_close"])
def test_listener_dying_closes_the_port(listeners, watch, how):
    w = watch()
    port = free_port()
    if how == "sigkill":
        proc = hold(listeners, port)
        w.expect("open", port)
        proc.kill()
    else:
        code = f"""
import os, socket, sys
s = socket.socket(); s.bind(("127.0.0.1", {port})); s.listen()
sys.stdin.readline(); os._exit(0)
"""
        proc = listeners.python(code, port, stdin=subprocess.PIPE)
        w.expect("open", port)
        proc.stdin.write(b"\n")
        proc.stdin.flush()
    w.expect("close", port)


def test_socket_inherited_by_a_child_closes_when_the_child_closes_it(listeners, watch):
    w = watch()
    port = free_port()
    code = f"""
import os, socket, subprocess, sys
s = socket.socket(); s.bind(("127.0.0.1", {port})); s.listen()
child = subprocess.Popen([sys.executable, "-c",
    "import os, sys; sys.stdin.readline(); os.close({{fd}}); print('closed', flush=True); sys.stdin.readline()".format(fd=s.fileno())],
    pass_fds=[s.fileno()], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
s.close()
print(child.pid, flush=True)
sys.stdin.readline()
child.stdin.write(b"\\n"); child.stdin.flush()
print(child.stdout.readline().decode().strip(), flush=True)
sys.stdin.readline()
child.stdin.write(b"\\n"); child.stdin.flush(); child.wait()
"""
    parent = listeners.python(code, port, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    child_pid = int(parent.stdout.readline())
    w.expect("open", port)
    w.quiet(port, 0.3)  # the parent closed its copy: the child still holds the socket
    listed = json.loads(aether("ports", "list", "--json").stdout)
    assert [row["pids"] for row in listed if row["port"] == port] == [[child_pid]]
    parent.stdin.write(b"\n")
    parent.stdin.flush()
    assert parent.stdout.readline().strip() == b"closed"
    w.expect("close", port)


def test_shared_socket_stays_open_while_a_holder_lives(listeners, watch, backend):
    port = free_port()
    code = f"""
import os, socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", {port})); s.listen()
pid = os.fork()
if pid == 0:
    sys.stdin.readline(); os._exit(0)
print(pid, flush=True)
time.sleep(60)
"""
    owner = listeners.python(code, port, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    child_pid = int(owner.stdout.readline())
    w = watch()
    assert w.expect("open", port)["pid"] == owner.pid
    owner.kill()
    owner.wait()
    msg = w.expect("update", port)  # the port stays open, with a new owner
    assert (msg["pid"], msg["process"], msg["addresses"]) == (child_pid, proc_comm(child_pid), ["127.0.0.1"])
    w.quiet(port, 0.4)
    listed = json.loads(aether("ports", "list", "--json").stdout)
    row = next(row for row in listed if row["port"] == port)
    assert row["pid"] == child_pid, "the listing names a living holder, not the dead owner"
    owner.stdin.write(b"\n")  # the child shares the parent's stdin
    owner.stdin.flush()
    w.expect("close", port)


def test_reuseport_group_is_one_port(listeners, watch):
    w = watch()
    port = free_port()
    opts = "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)"
    first = hold(listeners, port, opts=opts)
    assert w.expect("open", port)["pid"] == first.pid
    second = hold(listeners, port, opts=opts)
    w.quiet(port, 0.3)  # the first owner still speaks for the port
    first.kill()
    assert w.expect("update", port)["pid"] == second.pid  # the port goes on, the second's now
    w.quiet(port, 0.3)
    second.kill()
    w.expect("close", port)


def test_ipv6_only_listener(listeners, watch):
    w = watch()
    port = free_port(socket.AF_INET6)
    proc = hold(listeners, port, addr="::1", v6=True)
    msg = w.expect("open", port)
    assert msg["addresses"] == ["::1"] and msg["pid"] == proc.pid
    proc.kill()
    w.expect("close", port)


def test_listen_without_bind_reports_the_assigned_port(listeners, watch):
    w = watch()
    code = """
import socket, sys
s = socket.socket(); s.listen()
print(s.getsockname()[1], flush=True)
sys.stdin.readline()
"""
    proc = listeners.python(code, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    port = int(proc.stdout.readline())
    assert w.expect("open", port)["pid"] == proc.pid
    proc.kill()
    w.expect("close", port)


@pytest.mark.parametrize("default", [False, True], ids=["--ignore", "default-2222"])
def test_ignored_ports_never_produce_events(listeners, watch, default):
    if default:
        ignored = 2222  # in the default set (22, 2222, 3001)
        if ignored in kernel_listening_ports():
            pytest.skip("port 2222 is in use on the host")
        w = watch()
    else:
        ignored = free_port()
        w = watch("--ignore", f"22,{ignored}")
    control = free_port()
    a = hold(listeners, ignored)
    b = hold(listeners, control)
    w.expect("open", control)
    a.kill()
    a.wait()  # gone before b goes: a line for it would come before b's close
    b.kill()
    w.expect("close", control)
    # And before the open of a port that listens after that: with snapshots, the one with b's
    # close may hold a's too, in either order.
    w.expect("open", listeners.http_server().port)
    assert all(msg["port"] != ignored for msg in w.seen)


@pytest.fixture
def netns():
    if os.geteuid() != 0:
        pytest.skip("creating a network namespace needs root")
    name = f"aether-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


def test_listener_in_another_network_namespace_is_not_a_port(listeners, watch, netns):
    w = watch()
    port, control = free_port(), free_port()
    code = HOLD.format(port=port, addr="127.0.0.1", v6=False, opts="").replace(
        "s.listen()\n", "s.listen()\nprint('listening', flush=True)\n"
    )
    inside = listeners.spawn(
        ["ip", "netns", "exec", netns, sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert inside.stdout.readline() == b"listening\n"
    outside = hold(listeners, control)
    w.expect("open", control)
    inside.kill()
    outside.kill()
    w.expect("close", control)
    assert all(msg["port"] != port for msg in w.seen)


def test_sigterm_stops_watch_cleanly(watch):
    w = watch()
    started = time.monotonic()
    assert w.stop() == 0
    assert time.monotonic() - started < 2


def test_accepted_connections_are_not_closes(listeners, watch, backend):
    """Each accepted connection's socket is cloned from the listener (LISTEN -> SYN_RECV)."""
    before = listeners.http_server().port  # known from the start-up snapshot
    w = watch()
    w.expect("open", before)
    after = listeners.http_server().port  # known from the probe
    w.expect("open", after)
    for port in (before, after):
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", port)) as conn:
                conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
                conn.recv(1)
    w.quiet(before, 0.3)
    w.quiet(after, 0.1)
    if backend == "ebpf":
        # Other processes' ports may come and go meanwhile: only resyncs that name no port or
        # one of these count.
        resyncs = [
            line
            for line in w.log
            if line.get("msg") == "resync"
            and line.get("reason") != "start-up"
            and (not line.get("ports") or {before, after} & set(line["ports"]))
        ]
        assert resyncs == [], "connections must not trigger resynchronisation"


def test_watch_exits_when_its_reader_goes_away(listeners, backend):
    """`aether ports watch | head -1`: the pipe closes, watch ends quietly."""
    listeners.http_server()  # something to print
    result = subprocess.run(
        f"{sys.executable} -m aether ports watch --backend {backend} | head -n 1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=20,
        cwd=ROOT,
    )
    assert result.returncode == 0
    assert json.loads(result.stdout)["type"] == "open"
    assert "Traceback" not in result.stderr and "Exception" not in result.stderr
