"""aether.ports.who on real processes (command lines cut, not UTF-8, rewritten titles,
zombies, reused pids, another user's working directory), and aether.ports.containers: a real
process whose command line is docker-proxy's, and a real HTTP server on a Unix socket
answering the Docker Engine API's documented ``/containers/json``. The suite runs without a
Docker engine (its client is installed, not dockerd), so that server stands in for dockerd."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from support import ROOT
from support.ports import free_port
from support.processes import terminate
from support.waiting import until, wait_for

from aether.ports import containers, procs
from aether.ports.containers import Container, Containers, ProxyTarget, is_docker, proxy_target, publishers
from aether.ports.who import MARKER, MAX_ARGS, MAX_BYTES, parse_cmdline, who

PY = sys.executable
LISTEN = "import socket, sys, time; s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); time.sleep(600)"


def spawn(argv, **kw) -> subprocess.Popen:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kw)
    # Popen returns once exec has closed the child's descriptors, a moment before the kernel
    # sets up the new command line (empty until then; before exec, this process's).
    mine = who(os.getpid()).argv
    wait_for(lambda: (w := who(proc.pid)) is not None and w.argv not in (None, mine), 10)
    return proc


@pytest.fixture
def procs_started():
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        terminate(proc)


# -- who -----------------------------------------------------------------------------------


def test_four_pythons_are_four_programs(procs_started, tmp_path):
    """Same process name, told apart by command and working directory."""
    rows = []
    for name in ("site", "shop", "api", "docs"):
        cwd = tmp_path / name
        cwd.mkdir()
        port = free_port()
        before = time.time()
        proc = spawn([PY, "-c", LISTEN, str(port)], cwd=cwd)
        after = time.time()
        procs_started.append(proc)
        rows.append((proc, cwd, port, before, after))
    seen = set()
    for proc, cwd, port, before, after in rows:
        found = who(proc.pid)
        assert found.argv == (PY, "-c", LISTEN, str(port)) and not found.truncated
        assert found.command == f"{PY} -c {LISTEN} {port}"
        assert found.cwd == str(cwd)
        # The kernel's start time, to its 10 ms tick, falls within the spawn.
        assert before * 1000 - 20 <= found.started_ms <= after * 1000 + 20
        assert found.started_ticks == procs.start_time(proc.pid)
        assert found.to_json() == {"command": found.command, "cwd": str(cwd), "started": found.started_ms}
        seen.add((found.command, found.cwd))
    assert len(seen) == 4


def test_arguments_not_utf8_are_escaped_as_file_names_are(procs_started, tmp_path):
    proc = spawn([PY.encode(), b"-c", b"import time; time.sleep(600)", b"caf\xc3\xa9", b"", b"\xff\xfe"])
    procs_started.append(proc)
    found = who(proc.pid)
    assert found.argv[3:] == ("café", "", "\udcff\udcfe")
    assert found.argv[3].encode("utf-8", "surrogateescape") == b"caf\xc3\xa9"
    # As the server writes a frame: the escaped bytes become JSON's \udcXX.
    frame = json.dumps(found.command, ensure_ascii=False).encode("utf-8", "backslashreplace")
    assert frame.endswith(b'\\udcff\\udcfe"')


def test_long_command_lines_are_cut_with_a_marker(procs_started):
    many = [str(i) for i in range(500)]
    proc = spawn([PY, "-c", "import time; time.sleep(600)", *many])
    procs_started.append(proc)
    found = who(proc.pid)
    assert found.truncated and len(found.argv) == MAX_ARGS
    assert found.command.endswith(" " + MARKER)

    # One long argument of two-byte characters, cut at an odd byte: no half character.
    proc = spawn([PY, "-c", "import time; time.sleep(600)", "x" + "é" * 2000])
    procs_started.append(proc)
    found = who(proc.pid)
    cut = found.argv[-1]
    assert found.truncated and set(cut[1:]) == {"é"}
    assert len(" ".join(found.argv).encode()) <= MAX_BYTES


def test_rewritten_title(procs_started, tmp_path):
    """nginx's master sets its title over its arguments: ``nginx: master process ...``."""
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin") or pytest.fail("nginx is not installed")
    port = free_port()
    conf = tmp_path / "nginx.conf"
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temps = " ".join(f"{kind}_temp_path {tmp_path}/{kind};" for kind in kinds)
    conf.write_text(
        f"daemon off; master_process on; worker_processes 1; user root; pid {tmp_path}/nginx.pid;\n"
        f"error_log stderr error; events {{ worker_connections 16; }}\n"
        f"http {{ access_log off; {temps} server {{ listen 127.0.0.1:{port}; return 200; }} }}\n"
    )
    proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(tmp_path)], stdin=subprocess.DEVNULL)
    procs_started.append(proc)
    found = wait_for(lambda: (w := who(proc.pid)) and w.argv and w.argv[0].startswith("nginx: master") and w, 10)
    assert found.argv == (f"nginx: master process {nginx} -c {conf} -p {tmp_path}",)
    assert not found.truncated


def test_gone_zombie_and_reused_pids():
    proc = subprocess.Popen([PY, "-c", "pass"])
    wait_for(lambda: (w := who(proc.pid)) is not None and w.argv is None, 10)  # exited, not reaped: a zombie
    zombie = who(proc.pid)
    assert zombie.argv is None and zombie.command is None and zombie.started_ms is not None
    proc.wait()
    assert who(proc.pid) is None  # reaped: gone
    assert who(None) is None and who(0) is None and who(-1) is None

    me = who(os.getpid())
    assert who(os.getpid(), started=me.started_ticks) == me
    # The same pid with another start time is another process: not this one.
    assert who(os.getpid(), started=me.started_ticks + 1) is None


def test_another_users_process_unprivileged(procs_started, tmp_path):
    """As user nobody: the command of root's process is readable (as for ps); its working
    directory is not (that takes the right to ptrace it), and that is None, not an error."""
    setpriv = shutil.which("setpriv") or pytest.fail("setpriv is not installed (util-linux)")
    target = spawn([PY, "-c", "import time; time.sleep(600)"], cwd=tmp_path)
    procs_started.append(target)
    code = (
        f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from aether.ports.who import who; "
        f"w = who({target.pid}); print(json.dumps([w.argv, w.cwd, w.started_ticks]))"
    )
    for python in (PY, "/usr/bin/python3"):
        result = subprocess.run(
            [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c", code],
            capture_output=True,
            text=True,
            cwd="/",
            timeout=30,
        )
        if result.returncode == 0:
            break
    else:
        pytest.fail(f"no Python that user nobody can run: {result.stderr}")
    argv, cwd, ticks = json.loads(result.stdout)
    assert argv == [PY, "-c", "import time; time.sleep(600)"]
    assert cwd is None
    assert ticks == procs.start_time(target.pid)


@pytest.mark.parametrize(
    "raw, expected",
    [
        (b"", (None, False)),
        (b"a\0b\0", (("a", "b"), False)),
        (b"a\0\0b\0", (("a", "", "b"), False)),
        (b"title with spaces\0\0\0\0\0", (("title with spaces",), False)),
        (b"abc", (("abc",), False)),  # a title without its NUL
    ],
)
def test_parse_cmdline(raw, expected):
    assert parse_cmdline(raw) == expected


def test_parse_cmdline_bounds():
    assert parse_cmdline(b"x\0" * 10, max_args=3) == (("x", "x", "x"), True)
    argv, cut = parse_cmdline("aé".encode() * 10, max_bytes=8)  # cut inside the third é
    assert (argv, cut) == (("aéaé" + "a",), True)
    argv, cut = parse_cmdline(b"\xff" * 20, max_bytes=8)  # invalid bytes are not a cut character
    assert (argv, cut) == (("\udcff" * 8,), True)


# -- docker-proxy --------------------------------------------------------------------------


def docker_proxy(tmp_path: Path, args: list[str]) -> subprocess.Popen:
    """A real process named docker-proxy, run as dockerd runs it, that listens on -host-port:
    a script of that name (the kernel names a process after its script) run by this Python."""
    script = tmp_path / "docker-proxy"
    script.write_text(
        f"#!{PY}\n"
        "import socket, sys, time\n"
        "port = int(sys.argv[sys.argv.index('-host-port') + 1])\n"
        "s = socket.socket(); s.bind(('127.0.0.1', port)); s.listen(); time.sleep(600)\n"
    )
    script.chmod(0o755)
    return subprocess.Popen([str(script), *args], stdin=subprocess.DEVNULL)


def test_docker_proxy_command_line(procs_started, tmp_path):
    port = free_port()
    args = [
        "-proto",
        "tcp",
        "-host-ip",
        "127.0.0.1",
        "-host-port",
        str(port),
        "-container-ip",
        "172.17.0.5",
        "-container-port",
        "80",
        "-use-listen-fd",
    ]
    proc = docker_proxy(tmp_path, args)
    procs_started.append(proc)
    found = wait_for(lambda: (w := who(proc.pid)) and w.argv and "-host-port" in w.argv and w, 10)
    assert procs.process_name(proc.pid) == "docker-proxy"
    assert is_docker(procs.process_name(proc.pid), found.argv)
    assert proxy_target(found.argv) == ProxyTarget("tcp", "127.0.0.1", port, "172.17.0.5", 80)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            [
                "/usr/bin/docker-proxy",
                "-proto",
                "tcp",
                "-host-ip",
                "0.0.0.0",
                "-host-port",
                "8080",
                "-container-ip",
                "172.17.0.2",
                "-container-port",
                "80",
            ],
            ProxyTarget("tcp", "0.0.0.0", 8080, "172.17.0.2", 80),
        ),
        (
            ["docker-proxy", "--host-port=8443", "-container-ip=172.18.0.3", "--container-port", "443"],
            ProxyTarget("tcp", None, 8443, "172.18.0.3", 443),
        ),
        (["docker-proxy", "-host-port", "99999", "-container-port", "x"], None),  # no container address at all
        (
            ["docker-proxy", "-host-port", "99999", "-container-ip", "::1", "-container-port", "x"],
            ProxyTarget("tcp", None, None, "::1", None),
        ),
        (["dockerd", "-H", "fd://"], None),
        (["docker-proxy", "-container-ip"], None),  # a flag without its value
    ],
)
def test_proxy_target(argv, expected):
    assert proxy_target(argv) == expected


def test_is_docker():
    assert is_docker("docker-proxy") and is_docker("dockerd")
    assert is_docker("python3", ["/usr/bin/docker-proxy", "-proto", "tcp"])
    assert not is_docker("python3", ["python3", "docker-proxy"]) and not is_docker(None) and not is_docker("docker")


# -- dockerd's answer ----------------------------------------------------------------------

#: The example answer to ``GET /containers/json`` in the Docker Engine API reference (v1.24,
#: docs.docker.com/engine/api/v1.24/, "List containers"), Mounts left out.
DOCUMENTED = json.loads("""
[{"Id": "8dfafdbc3a40", "Names": ["/boring_feynman"], "Image": "ubuntu:latest",
  "ImageID": "d74508fb6632491cea586a1fd7d748dfc5274cd6fdfedee309ecdcbc2bf5cb82", "Command": "echo 1",
  "Created": 1367854155, "State": "exited", "Status": "Exit 0",
  "Ports": [{"PrivatePort": 2222, "PublicPort": 3333, "Type": "tcp"}],
  "Labels": {"com.example.vendor": "Acme", "com.example.license": "GPL", "com.example.version": "1.0"},
  "SizeRw": 12288, "SizeRootFs": 0, "HostConfig": {"NetworkMode": "default"},
  "NetworkSettings": {"Networks": {"bridge": {"IPAMConfig": null, "Links": null, "Aliases": null,
    "NetworkID": "7ea29fc1412292a2d7bba362f9253545fecdfa8ce9a6e37dd10ba8bee7129812",
    "EndpointID": "2cdc4edb1ded3631c81f57966563e5c8525b81121bb3706a9a9a3ae102711f3f", "Gateway": "172.17.0.1",
    "IPAddress": "172.17.0.2", "IPPrefixLen": 16, "IPv6Gateway": "", "GlobalIPv6Address": "",
    "GlobalIPv6PrefixLen": 0, "MacAddress": "02:42:ac:11:00:02"}}}},
 {"Id": "9cd87474be90", "Names": ["/coolName"], "Image": "ubuntu:latest",
  "ImageID": "d74508fb6632491cea586a1fd7d748dfc5274cd6fdfedee309ecdcbc2bf5cb82", "Command": "echo 222222",
  "Created": 1367854155, "State": "exited", "Status": "Exit 0", "Ports": [], "Labels": {}, "SizeRw": 12288,
  "SizeRootFs": 0, "HostConfig": {"NetworkMode": "default"},
  "NetworkSettings": {"Networks": {"bridge": {"IPAMConfig": null, "Links": null, "Aliases": null,
    "NetworkID": "7ea29fc1412292a2d7bba362f9253545fecdfa8ce9a6e37dd10ba8bee7129812",
    "EndpointID": "88eaed7b37b38c2a3f0c4bc796494fdf51b270c2d22656412a2ca5d559a64d7a", "Gateway": "172.17.0.1",
    "IPAddress": "172.17.0.8", "IPPrefixLen": 16, "IPv6Gateway": "", "GlobalIPv6Address": "",
    "GlobalIPv6PrefixLen": 0, "MacAddress": "02:42:ac:11:00:08"}}}},
 {"Id": "3176a2479c92", "Names": ["/sleepy_dog"], "Image": "ubuntu:latest",
  "ImageID": "d74508fb6632491cea586a1fd7d748dfc5274cd6fdfedee309ecdcbc2bf5cb82", "Command": "echo 3333333333333333",
  "Created": 1367854154, "State": "exited", "Status": "Exit 0", "Ports": [], "Labels": {}, "SizeRw": 12288,
  "SizeRootFs": 0, "HostConfig": {"NetworkMode": "default"},
  "NetworkSettings": {"Networks": {"bridge": {"IPAMConfig": null, "Links": null, "Aliases": null,
    "NetworkID": "7ea29fc1412292a2d7bba362f9253545fecdfa8ce9a6e37dd10ba8bee7129812",
    "EndpointID": "8b27c041c30326d59cd6e6f510d4f8d1d570a228466f956edf7815508f78e30d", "Gateway": "172.17.0.1",
    "IPAddress": "172.17.0.6", "IPPrefixLen": 16, "IPv6Gateway": "", "GlobalIPv6Address": "",
    "GlobalIPv6PrefixLen": 0, "MacAddress": "02:42:ac:11:00:06"}}}},
 {"Id": "4cb07b47f9fb", "Names": ["/running_cat"], "Image": "ubuntu:latest",
  "ImageID": "d74508fb6632491cea586a1fd7d748dfc5274cd6fdfedee309ecdcbc2bf5cb82",
  "Command": "echo 444444444444444444444444444444444", "Created": 1367854152, "State": "exited", "Status": "Exit 0",
  "Ports": [], "Labels": {}, "SizeRw": 12288, "SizeRootFs": 0, "HostConfig": {"NetworkMode": "default"},
  "NetworkSettings": {"Networks": {"bridge": {"IPAMConfig": null, "Links": null, "Aliases": null,
    "NetworkID": "7ea29fc1412292a2d7bba362f9253545fecdfa8ce9a6e37dd10ba8bee7129812",
    "EndpointID": "d91c7b2f0644403d7ef3095985ea0e2370325cd2332ff3a3225c4247328e66e9", "Gateway": "172.17.0.1",
    "IPAddress": "172.17.0.5", "IPPrefixLen": 16, "IPv6Gateway": "", "GlobalIPv6Address": "",
    "GlobalIPv6PrefixLen": 0, "MacAddress": "02:42:ac:11:00:05"}}}}]
""")


def publishing(port: int) -> list:
    """The documented answer with boring_feynman publishing ``port`` on 127.0.0.1, and
    running_cat the same port on 127.0.0.2 (the IP field of newer API versions)."""
    listing = copy.deepcopy(DOCUMENTED)
    listing[0]["Ports"] = [{"IP": "127.0.0.1", "PrivatePort": 2222, "PublicPort": port, "Type": "tcp"}]
    listing[3]["Ports"] = [
        {"IP": "127.0.0.2", "PrivatePort": 80, "PublicPort": port, "Type": "tcp"},
        {"IP": "127.0.0.2", "PrivatePort": 53, "PublicPort": port + 1, "Type": "udp"},
    ]
    return listing


class FakeDockerd:
    """An HTTP/1.1 server on a Unix socket, in a thread, answering ``/containers/json`` as
    dockerd does (chunked, as Go's server sends a body it did not measure, unless told to
    send a Content-Length), or as told: a status, garbage, or nothing at all."""

    def __init__(self, path: Path, listing: list):
        self.path = str(path)
        self.listing = listing
        self.requests: list[str] = []
        self.mode = "chunked"
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def address_string(self):
                return "docker.sock"

            def log_message(self, *args):
                pass

            def do_GET(self):
                fake.requests.append(self.path)
                body = json.dumps(fake.listing).encode()
                if fake.mode == "hang":
                    time.sleep(3)
                    return
                if fake.mode == "garbage":
                    self.wfile.write(b"not http at all\r\n\r\n")
                    self.close_connection = True
                    return
                self.send_response(500 if fake.mode == "500" else 200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Api-Version", "1.47")
                if fake.mode == "chunked":
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(0, len(body), 700):
                        piece = body[i : i + 700]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        self.server = Server(self.path, Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def dockerd(tmp_path):
    port = free_port()
    fake = FakeDockerd(tmp_path / "docker.sock", publishing(port))
    fake.port = port
    yield fake
    fake.close()


def test_container_named_from_dockerd(dockerd):
    async def main():
        names = Containers(dockerd.path)
        first = await names.publisher(dockerd.port)
        by_target = await names.publisher(dockerd.port, ProxyTarget("tcp", "127.0.0.2", dockerd.port, "172.17.0.5", 80))
        none = await names.publisher(dockerd.port + 1)  # published over UDP only
        return first, by_target, none

    first, by_target, none = asyncio.run(asyncio.wait_for(main(), 30))
    assert first == Container("8dfafdbc3a40", "boring_feynman", "ubuntu:latest")
    assert first.label == "boring_feynman (ubuntu:latest)"
    assert by_target.name == "running_cat"
    assert none is None
    assert dockerd.requests == ["/containers/json"]  # one answer served the three


def test_content_length_answer_and_cache_expiry(dockerd):
    dockerd.mode = "length"

    async def main():
        names = Containers(dockerd.path, ttl=0.2)
        many = await asyncio.gather(*(names.publisher(dockerd.port) for _ in range(20)))
        assert len(dockerd.requests) == 1  # twenty lookups at once, one request
        await asyncio.sleep(0.3)
        again = await names.publisher(dockerd.port)
        return many, again

    many, again = asyncio.run(asyncio.wait_for(main(), 30))
    assert {c.name for c in many} == {"boring_feynman"} and again.name == "boring_feynman"
    assert len(dockerd.requests) == 2


def test_port_opened_after_an_answer_is_asked_anew(dockerd):
    """One answer serves the ports that opened before it was asked for, not one opened after:
    that port's container may be in no answer yet."""
    later = free_port()

    async def main():
        names = Containers(dockerd.path)
        before = time.monotonic()
        first = await names.publisher(dockerd.port, since=before)
        again = await names.publisher(dockerd.port, since=before)  # the same answer serves it
        assert len(dockerd.requests) == 1
        dockerd.listing = publishing(dockerd.port) + [
            {"Id": "f" * 64, "Names": ["/late"], "Image": "nginx:1", "Ports": [{"PublicPort": later, "Type": "tcp"}]}
        ]
        opened = time.monotonic()
        found = await names.publisher(later, since=opened)
        return first, again, found

    first, again, found = asyncio.run(asyncio.wait_for(main(), 30))
    assert first.name == again.name == "boring_feynman"
    assert found == Container("f" * 64, "late", "nginx:1")
    assert len(dockerd.requests) == 2


def test_container_listed_after_its_port_opened_is_awaited(dockerd):
    """dockerd opens a container's ports before it lists the container: asked again until it
    does, each time anew; not at all once the port is no longer wanted."""
    dockerd.listing = []

    async def main():
        names = Containers(dockerd.path)

        async def listed_later():
            await until(lambda: len(dockerd.requests) >= 2, timeout=10)
            dockerd.listing = publishing(dockerd.port)

        later = asyncio.ensure_future(listed_later())
        found = await names.awaited(dockerd.port, None, time.monotonic())
        await later
        asked = len(dockerd.requests)
        gone = await names.awaited(dockerd.port + 2, None, time.monotonic(), wanted=lambda: False)
        return found, asked, gone

    found, asked, gone = asyncio.run(asyncio.wait_for(main(), 30))
    assert found is not None and found.name == "boring_feynman"
    assert asked >= 2  # one (or more) that did not name it, then one that did
    assert gone is None and len(dockerd.requests) == asked + 1  # one ask, then given up


def test_a_port_no_container_publishes_is_given_up_on(dockerd):
    """dockerd may hold a port no container publishes (its API on TCP, swarm's 2377): asked
    for until RETRY_FOR after the port opened, then no more."""
    dockerd.listing = []

    async def main():
        names = Containers(dockerd.path)
        opened = time.monotonic() - (containers.RETRY_FOR - 0.5)  # opened just under RETRY_FOR ago
        return await names.awaited(dockerd.port, None, opened)

    assert asyncio.run(asyncio.wait_for(main(), 20)) is None
    assert 1 <= len(dockerd.requests) <= 4  # 0.1, 0.2 and 0.4 s apart, then past RETRY_FOR


def test_no_socket_nothing_awaited(tmp_path):
    async def main():
        names = Containers(str(tmp_path / "absent.sock"))
        return await names.awaited(8080, None, time.monotonic()), names.requests

    assert asyncio.run(asyncio.wait_for(main(), 30)) == (None, 0)


def test_socket_path_from_setting_docker_host_or_default():
    assert containers.socket_path("/run/user/1000/docker.sock", {"DOCKER_HOST": "unix:///x.sock"}) == "/run/user/1000/docker.sock"
    assert containers.socket_path(None, {"DOCKER_HOST": "unix:///run/user/1000/docker.sock"}) == "/run/user/1000/docker.sock"
    # Another kind of DOCKER_HOST names a daemon that holds no port here.
    for host in ("tcp://10.0.0.5:2375", "ssh://me@box", "unix://", ""):
        assert containers.socket_path(None, {"DOCKER_HOST": host}) == containers.SOCKET
    assert containers.socket_path(None, {}) == "/var/run/docker.sock"


@pytest.mark.parametrize("mode", ["500", "garbage", "hang"])
def test_dockerd_failing_names_nothing(dockerd, mode):
    dockerd.mode = mode

    async def main():
        return await Containers(dockerd.path, timeout=0.5).publisher(dockerd.port)

    assert asyncio.run(asyncio.wait_for(main(), 30)) is None
    assert dockerd.requests == ["/containers/json"]


def test_no_socket_nothing_happens(tmp_path):
    async def main():
        names = Containers(str(tmp_path / "absent.sock"))
        return await names.publisher(8080), names.requests

    assert asyncio.run(main()) == (None, 0)


def test_socket_nobody_answers(tmp_path):
    path = tmp_path / "dead.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))  # bound, never listening: connections are refused
    try:
        assert asyncio.run(Containers(str(path)).publisher(8080)) is None
    finally:
        dead.close()


def test_publishers_pass_over_what_is_not_documented():
    weird = [
        None,
        3,
        {"Ports": "x"},
        {"Ports": [{"PublicPort": "80"}]},
        {"Ports": [None, {"PublicPort": 80}], "Names": [7], "Id": "0123456789abcdef", "Image": None, "NetworkSettings": []},
    ]
    assert publishers(weird, 80) == [Container("0123456789abcdef", "0123456789ab", "")]
    assert publishers({"message": "page not found"}, 80) == []
    assert publishers(None, 80) == []


@pytest.mark.parametrize(
    "raw, expected",
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]", (200, b"[]")),
        (b"HTTP/1.0 200 OK\r\n\r\n[1]", (200, b"[1]")),  # delimited by the close
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n[\r\n1;x=y\r\n]\r\n0\r\n\r\n", (200, b"[]")),
        (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", (404, b"")),
    ],
)
def test_parse_answer(raw, expected):
    assert containers.parse_answer(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"HTTP/1.1 200 OK\r\n",
        b"SSH-2.0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n[]",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n[]",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_parse_answer_refuses(raw):
    with pytest.raises(containers.AnswerError):
        containers.parse_answer(raw)


# -- the pure parts, fuzzed ----------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                ["Id", "Names", "Image", "Ports", "PublicPort", "Type", "NetworkSettings", "Networks", "IPAddress", "x"]
            ),
            inner,
            max_size=4,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.integers(1, 80), st.integers(1, 1500))
def test_parse_cmdline_any_bytes(raw, max_args, max_bytes):
    argv, cut = parse_cmdline(raw, max_args, max_bytes)
    if argv is None:  # nothing but NULs, and perhaps the start of a character that was cut
        kept = raw[:max_bytes].strip(b"\0")
        assert not kept or (cut and len(kept) <= 3)
        return
    assert len(argv) <= max_args
    encoded = b"\0".join(arg.encode("utf-8", "surrogateescape") for arg in argv)
    assert len(encoded) <= max_bytes
    if not cut:
        assert encoded == raw.rstrip(b"\0")
    else:
        assert raw.startswith(encoded)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "-proto",
                "-host-ip",
                "-host-port",
                "-container-ip",
                "-container-port",
                "--host-port=1",
                "-container-port=80",
                "80",
                "0",
                "70000",
                "x",
                "-",
                "--",
                "",
            ]
        )
        | st.text(max_size=6),
        max_size=12,
    )
)
def test_proxy_target_any_argv(argv):
    target = proxy_target(argv)
    if target is not None:
        assert target.container_ip is not None or target.container_port is not None
        for port in (target.host_port, target.container_port):
            assert port is None or 0 < port < 65536


@settings(max_examples=300, deadline=None)
@given(_json, st.integers(0, 70000))
def test_publishers_any_json(listing, port):
    for found in publishers(listing, port, ProxyTarget("tcp", None, port, "172.17.0.2", 80)):
        assert isinstance(found, Container) and len(found.name) <= containers.MAX_NAME


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_parse_answer_any_bytes(raw):
    try:
        status, body = containers.parse_answer(raw)
    except containers.AnswerError:
        return
    assert 0 <= status and isinstance(body, bytes)
