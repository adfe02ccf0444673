"""A real ``redis-server`` (and a Sentinel watching it) on a free loopback port, in a directory of
its own, persisting nothing: each test starts its own and stops it afterwards. On a port of its
own choosing, a first start that finds the port taken meanwhile is tried again on another
(see ``support.ports``)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from support.ports import ATTEMPTS, free_port, held_sockets, listening_inodes

SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def _listens(proc: subprocess.Popen, port: int) -> bool:
    """``proc`` itself listens on ``port`` (another process may, on a port taken meanwhile)."""
    return bool(listening_inodes(port) & held_sockets(proc.pid))


def _taken(log: Path) -> bool:
    return log.exists() and "Address already in use" in log.read_text(errors="replace")


def ping(port: int, timeout: float = 0.5) -> bool:
    """Whether a Redis (or a Sentinel) answers PING on ``port``, without a client library."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _terminate(proc: subprocess.Popen | None) -> None:
    """SIGTERM, then SIGKILL after 5 s."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class RedisServer:
    """``redis-server`` on 127.0.0.1:``port``: ``kill()`` is SIGKILL, ``start()`` again comes
    back empty on the same port (nothing is saved)."""

    def __init__(self, port: int | None = None, extra: tuple[str, ...] = ()):
        self.port = port or free_port()
        self._choose = port is None  # until a start succeeds: then restarts keep the port
        self.extra = extra
        self.dir = Path(tempfile.mkdtemp(prefix="aether-redis-"))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        for attempt in range(ATTEMPTS):
            if self._start(timeout):
                self._choose = False
                return self
            if not (self._choose and _taken(self.dir / "redis.log")) or attempt == ATTEMPTS - 1:
                break
            (self.dir / "redis.log").unlink()
            self.port = free_port()
        log = (self.dir / "redis.log").read_text(errors="replace")[-2000:] if (self.dir / "redis.log").exists() else ""
        raise RuntimeError(f"redis-server did not start on {self.port}: {log}")

    def _start(self, timeout: float) -> bool:
        cmd = [
            SERVER,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
            "--logfile",
            str(self.dir / "redis.log"),
            *self.extra,
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not (_listens(self.proc, self.port) and ping(self.port)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                return False
            time.sleep(0.01)
        return True

    def kill(self) -> None:
        """SIGKILL, as a crash: clients see their connections reset."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        _terminate(self.proc)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def client(self):
        import redis

        return redis.Redis(port=self.port, host="127.0.0.1", socket_timeout=5)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class Sentinel:
    """``redis-server --sentinel`` on a free port, watching ``master`` as ``name``."""

    def __init__(self, master: RedisServer, name: str = "aether-test"):
        self.port = free_port()
        self._attempts = 1
        self.name = name
        self.master = master
        self.dir = Path(tempfile.mkdtemp(prefix="aether-sentinel-"))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.name}/0"

    def start(self, timeout: float = 10.0) -> Sentinel:
        conf = self.dir / "sentinel.conf"  # Sentinel rewrites its config: it must be writable
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\nprotected-mode no\n"
            f"logfile {self.dir / 'sentinel.log'}\n"
            f"sentinel monitor {self.name} 127.0.0.1 {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {self.name} 1000\n"
        )
        self.proc = subprocess.Popen([SERVER, str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not (_listens(self.proc, self.port) and self._knows_master()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                taken = _taken(self.dir / "sentinel.log")
                _terminate(self.proc)
                if taken and self._attempts < ATTEMPTS:  # a port of its own choosing, taken meanwhile
                    self._attempts += 1
                    self.port = free_port()
                    (self.dir / "sentinel.log").unlink()
                    return self.start(timeout)
                self.close()
                raise RuntimeError(f"sentinel did not start on {self.port}")
            time.sleep(0.02)
        return self

    def _knows_master(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                name = self.name.encode()
                s.sendall(b"*3\r\n$8\r\nSENTINEL\r\n$23\r\nget-master-addr-by-name\r\n$%d\r\n%s\r\n" % (len(name), name))
                return str(self.master.port).encode() in s.recv(256)
        except OSError:
            return False

    def close(self) -> None:
        _terminate(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)
