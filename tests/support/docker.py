"""A dockerd of a test's own: its data, exec root, socket, containerd namespace, bridge and
daemon.json its own, nothing of the host's Docker touched, all of it removed afterwards.

It runs without iptables (no rules of the host's changed) and without touching
``net.ipv4.ip_forward``; containers sit on a bridge of their own, ``NET.1/24`` with ``NET`` a
/24 of 198.18.0.0/15 no interface here has yet. Its one image is made here, without a
registry: busybox (Debian's static one) imported as a root file system. A published port is
then held by ``docker-proxy`` (``userland_proxy=True``, Docker's default) or by dockerd itself.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time

import pytest

from support.ebpf import REQUIRE_EBPF
from support.netns import ip
from support.ports import PortTaken, on_a_free_port
from support.waiting import wait_for


def _debian(name: str) -> str:
    """Where Debian's package put ``name`` (merged /usr or not); not /usr/local, where a
    client of another version may lie."""
    found = shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    return found or f"/usr/bin/{name}"


DOCKERD, DOCKER, PROXY, BUSYBOX = _debian("dockerd"), _debian("docker"), _debian("docker-proxy"), _debian("busybox")
#: The image every container runs: busybox, its ``httpd`` serving ``/``.
IMAGE = "aether-test-busybox:1"
#: Seconds dockerd has to answer its socket: 0.3-1 s on a 2-vCPU VM, its containerd started too.
START_TIMEOUT = 30
#: Seconds a container has to start or stop, and dockerd to exit.
TIMEOUT = 30


def need_docker() -> None:
    """Skip where Docker cannot run here; under ``AETHER_REQUIRE_EBPF=1`` (CI, where
    deploy/setup.sh installs docker.io and busybox-static) fail instead."""
    reason = None
    missing = [path for path in (DOCKERD, DOCKER, PROXY, BUSYBOX) if not os.access(path, os.X_OK)]
    if os.geteuid() != 0:
        reason = "dockerd needs root"
    elif missing:
        reason = f"not installed: {', '.join(missing)} (deploy/setup.sh installs docker.io and busybox-static)"
    if reason:
        if REQUIRE_EBPF:
            pytest.fail(f"AETHER_REQUIRE_EBPF=1 but Docker cannot run here: {reason}")
        pytest.skip(reason)


def _free_net() -> str:
    used = ip("-o", "-4", "addr", "show").stdout
    for _ in range(64):
        n = int.from_bytes(os.urandom(2), "big") % 512
        net = f"198.{18 + n // 256}.{n % 256}"
        if f" {net}." not in used:
            return net
    raise AssertionError("no free /24 in 198.18.0.0/15")


class Dockerd:
    """``dockerd`` on ``socket``, started at once (``started`` says how long it took)."""

    def __init__(self, userland_proxy: bool = True):
        need_docker()
        began = time.monotonic()
        # Short: the socket's path must fit a sockaddr_un (108 bytes), and containerd's below it.
        self.dir = tempfile.mkdtemp(prefix="aedk-", dir="/tmp")
        self.socket = f"{self.dir}/sock"
        tag = os.urandom(4).hex()
        self.bridge = f"aedk{tag}"
        self.net = _free_net()
        self.proc: subprocess.Popen | None = None
        try:
            ip("link", "add", self.bridge, "type", "bridge")
            ip("addr", "add", f"{self.net}.1/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
            # Its own daemon.json (not /etc/docker's), and its key kept here, not in /etc/docker.
            config = f"{self.dir}/daemon.json"
            with open(config, "w") as f:
                json.dump({"deprecated-key-path": f"{self.dir}/key.json"}, f)
            self.log = open(f"{self.dir}/log", "wb")
            namespace = f"aether-test-{tag}"  # containerd's: letters and digits, single separators
            self.proc = subprocess.Popen(
                [DOCKERD, "--config-file", config, "--data-root", f"{self.dir}/data", "--exec-root", f"{self.dir}/exec"]
                + ["--pidfile", f"{self.dir}/pid", "-H", f"unix://{self.socket}", "--bridge", self.bridge]
                + ["--iptables=false", "--ip6tables=false", "--ip-forward=false", "--ip-masq=false"]
                + [f"--userland-proxy={'true' if userland_proxy else 'false'}", "--userland-proxy-path", PROXY]
                + ["--containerd-namespace", namespace, "--containerd-plugins-namespace", f"{namespace}-plugins"],
                stdout=self.log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            wait_for(self._answers, START_TIMEOUT, interval=0.02)
            self._import_image()
        except BaseException:
            self.close()
            raise
        self.started = time.monotonic() - began

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"dockerd exited ({self.proc.returncode}): {self.log_tail()}")
        try:
            return self.api("GET", "/_ping") == (200, b"OK")
        except OSError:
            return False

    def api(self, method: str, path: str) -> tuple[int, bytes]:
        """One request to the Engine API on the socket: (status, body). Only for short
        answers (no chunked bodies)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(TIMEOUT)
            s.connect(self.socket)
            s.sendall(f"{method} {path} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n".encode())
            raw = b""
            while more := s.recv(65536):
                raw += more
        head, _, body = raw.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), body

    def docker(self, *args: str, input: bytes | None = None) -> str:
        """The docker CLI against this dockerd; its stdout. AssertionError with its stderr if
        it fails; PortTaken where a port to publish was taken."""
        done = subprocess.run([DOCKER, "-H", f"unix://{self.socket}", *args], input=input, capture_output=True, timeout=TIMEOUT)
        if done.returncode != 0:
            error = done.stderr.decode(errors="replace")
            if "address already in use" in error:
                raise PortTaken(error)
            raise AssertionError(f"docker {' '.join(args)}: {error}")
        return done.stdout.decode().strip()

    def _import_image(self) -> None:
        image = io.BytesIO()
        with tarfile.open(fileobj=image, mode="w") as tar:
            tar.add(BUSYBOX, "bin/busybox")
            for applet in ("sh", "httpd"):
                link = tarfile.TarInfo(f"bin/{applet}")
                link.type, link.linkname = tarfile.SYMTYPE, "busybox"
                tar.addfile(link)
        self.docker("import", "-", IMAGE, input=image.getvalue())

    def run(self, name: str, host_ip: str = "127.0.0.1") -> tuple[int, str]:
        """A container ``name`` whose busybox httpd (port 8000 inside) is published on a free
        port of ``host_ip`` (another, should that one be taken meanwhile): (the port, the
        container's id of 64 hex digits)."""

        def start(port: int) -> tuple[int, str]:
            try:
                argv = ["--name", name, "-p", f"{host_ip}:{port}:8000", IMAGE, "/bin/httpd", "-f", "-p", "8000", "-h", "/"]
                return port, self.docker("run", "-d", *argv)
            except PortTaken:
                self.docker("rm", "-f", name)  # made, not started: the name is free again
                raise

        return on_a_free_port(start)

    def remove(self, name: str) -> None:
        """Kill container ``name`` and remove it (its published ports close)."""
        self.docker("rm", "-f", name)

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(f"{self.dir}/log", "rb") as f:
                return b"".join(f.readlines()[-lines:]).decode(errors="replace")
        except OSError:
            return ""

    def _ours(self) -> list[int]:
        """Processes whose command line names this dockerd's directory (containerd, its shims)."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if self.dir.encode() + b"/" in f.read():
                        found.append(int(entry))
            except OSError:
                continue
        return found

    def close(self) -> None:
        """Every container removed, dockerd and its containerd stopped, their mounts, the
        bridge and the directory gone."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                ids = self.docker("ps", "-aq").split()
                if ids:
                    self.docker("rm", "-f", *ids)
            except (AssertionError, subprocess.TimeoutExpired):
                pass  # dockerd is stopped below all the same
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            wait_for(lambda: not self._ours(), TIMEOUT, interval=0.05)
        except AssertionError:
            for pid in self._ours():  # a shim or containerd left behind: ours, by its arguments
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split()[4] for line in f]
        for point in sorted((m for m in mounts if m.startswith(self.dir + "/")), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)
        ip("link", "del", self.bridge, check=False)
        if getattr(self, "log", None) is not None:
            self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
