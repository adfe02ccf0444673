"""The doctor's checks: each a small function returning a :class:`Check`, its verdict (``ok``,
``warn`` or ``fail``), what it found, and, when not ok, one concrete fix.

They change nothing: no state directory or token is created, the port is bound without
listening, and the probe is loaded only to be unloaded at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import gzip
import os
import platform
import pwd
import re
import socket
import stat
import tempfile
import time
from pathlib import Path

from aether import caps
from aether.ports.ebpf import find_tracepoint_format, kernel_version
from aether.settings import sources

OK, WARN, FAIL = "ok", "warn", "fail"
UNIT = "deploy/aether.service"


@dataclasses.dataclass
class Check:
    name: str
    verdict: str
    detail: str
    fix: str | None = None

    def __post_init__(self):
        if self.verdict == OK:
            self.fix = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _user_name() -> str:
    """This process's user name, or its uid where it has none."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _user() -> str:
    return f"uid {os.geteuid()} ({_user_name()})"


def check_privileges() -> Check:
    mask = caps.effective()
    dac = caps.has(caps.CAP_DAC_READ_SEARCH, mask) or caps.has(caps.CAP_DAC_OVERRIDE, mask)
    old_kernel = (kernel_version() or (99, 0)) < (5, 8)
    for_probe = caps.missing_for_probe(mask)
    if old_kernel and for_probe:
        for_probe = [caps.CAP_SYS_ADMIN]  # before 5.8 there is no CAP_BPF or CAP_PERFMON
    if not dac and find_tracepoint_format()[1]:
        for_probe.append(caps.CAP_DAC_READ_SEARCH)
    # Other users' sockets: their /proc/<pid>/fd and ns/net need both; their processes, CAP_KILL.
    others = [cap for cap in (caps.CAP_SYS_PTRACE, caps.CAP_KILL) if not caps.has(cap, mask)]
    if not dac and caps.CAP_DAC_READ_SEARCH not in for_probe:
        others.insert(0, caps.CAP_DAC_READ_SEARCH)
    who = "root" if os.geteuid() == 0 else _user()
    if not for_probe and not others:
        return Check("privileges", OK, f"{who}, with every capability aether uses")
    wanted = "CAP_SYS_ADMIN" if old_kernel else "CAP_BPF CAP_PERFMON CAP_DAC_READ_SEARCH"
    fix = (
        f"run as root, or grant {wanted} CAP_SYS_PTRACE CAP_KILL: AmbientCapabilities= in the unit ({UNIT}), "
        f"or setpriv --inh-caps=... --ambient-caps=... for a try"
    )
    lacking = []
    if for_probe:
        lacking.append(f"lacks {', '.join(caps.names(for_probe))} (to load the probe)")
    if others:
        lacking.append(f"lacks {', '.join(caps.names(others))} (other users' pids, and stopping their processes)")
    return Check("privileges", FAIL if for_probe else WARN, f"{who} {'; '.join(lacking)}", fix)


def check_kernel() -> Check:
    release = platform.release()
    version = kernel_version(release)
    if version is None:
        return Check("kernel", WARN, f"{release}: version not recognised", "none needed if the probe loads")
    if version < (4, 16):
        return Check(
            "kernel",
            FAIL,
            f"{release}: older than 4.16, which added sock:inet_sock_set_state",
            "a 4.16+ kernel; aether serve uses sock_diag here",
        )
    if version < (5, 8):
        return Check(
            "kernel",
            WARN,
            f"{release}: before 5.8, so perf buffers instead of a ring buffer, and no CAP_BPF",
            "none needed as root; a non-root daemon needs CAP_SYS_ADMIN, or a 5.8+ kernel",
        )
    return Check("kernel", OK, f"{release} (ring buffer, CAP_BPF and CAP_PERFMON)")


def check_btf() -> Check:
    path = Path("/sys/kernel/btf/vmlinux")
    if path.exists():
        return Check("btf", OK, f"{path} present (not needed: the probe reads only tracepoint arguments)")
    return Check(
        "btf",
        WARN,
        f"{path} missing: not needed by the probe, which reads only tracepoint arguments",
        "none for aether; CO-RE tools want a kernel built with CONFIG_DEBUG_INFO_BTF=y",
    )


def check_tracepoint() -> Check:
    found, denied = find_tracepoint_format()
    if found:
        return Check("tracepoint", OK, f"sock:inet_sock_set_state at {found.parent}")
    if denied:
        return Check(
            "tracepoint",
            FAIL,
            f"{denied} is not readable by {_user()}",
            "grant CAP_DAC_READ_SEARCH: tracefs is root's, mode 0700 (see privileges)",
        )
    return Check(
        "tracepoint",
        FAIL,
        "sock:inet_sock_set_state not found under tracefs",
        "mount -t tracefs nodev /sys/kernel/tracing (deploy/setup.sh does), or a 4.16+ kernel",
    )


def _kernel_config() -> tuple[str | None, str | None]:
    """(the kernel's build configuration, where it came from), or (None, None)."""
    boot = Path(f"/boot/config-{platform.release()}")
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            return f.read(), "/proc/config.gz"
    except OSError:
        pass
    try:
        return boot.read_text(), str(boot)
    except OSError:
        return None, None


def check_kprobes() -> Check:
    text, source = _kernel_config()
    if text is not None:
        found = "CONFIG_KPROBES=y" in text
        state = "enabled" if found else "not enabled"
        return Check("kprobes", OK, f"not needed: the probe uses a tracepoint (kprobes {state} in {source})")
    for path in ("/sys/kernel/tracing/kprobe_events", "/sys/kernel/debug/kprobes"):
        if os.path.exists(path):
            return Check("kprobes", OK, f"not needed: the probe uses a tracepoint ({path} present)")
    return Check("kprobes", OK, "not needed: the probe uses a tracepoint")


def check_bcc() -> Check:
    fix = "apt-get install python3-bpfcc bpfcc-tools; bash deploy/setup.sh exposes Debian's bcc to the venv"
    try:
        import bcc
    except Exception as exc:  # ImportError, or OSError when libbcc.so is missing
        return Check("bcc", FAIL, f"python module bcc not importable: {exc}", fix)
    where = os.path.dirname(getattr(bcc, "__file__", None) or "?")
    if not hasattr(bcc, "BPF"):
        return Check("bcc", FAIL, f"{where} is the PyPI package named bcc, unrelated to BPF", f"pip uninstall bcc; {fix}")
    real = os.path.realpath(where)
    origin = ""
    if real.startswith("/usr/lib/python3/dist-packages/"):
        origin = " (Debian's python3-bpfcc" + (", linked into the venv)" if real != where else ")")
    return Check("bcc", OK, f"{getattr(bcc, '__version__', '?')} from {real}{origin}")


def check_headers() -> Check:
    release = platform.release()
    build = Path(f"/lib/modules/{release}/build")
    if not build.exists():
        return Check(
            "headers",
            FAIL,
            f"{build} missing: bcc has no kernel headers to compile the probe with",
            "bash deploy/setup.sh links Debian's headers (apt-get install linux-headers-amd64)",
        )
    if not build.is_symlink():
        return Check("headers", OK, f"{build}")
    target = os.readlink(build)
    note = ""
    if release not in target and os.path.basename(target).startswith("linux-headers-"):
        note = " (Debian's generic headers, linked by deploy/setup.sh: enough for a probe that reads only tracepoint arguments)"
    return Check("headers", OK, f"{build} -> {target}{note}")


def _compile_error(text: str) -> str:
    """The first line of bcc's diagnostics that says what went wrong, and how many there were."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if " error: " in line]
    first = (
        errors[0]
        if errors
        else next((line for line in lines if re.search(r"error|fail|not permitted|denied|privilege", line, re.I)), "")
    )
    first = re.sub(r"^/virtual/", "", first)
    if len(first) > 160:
        first = first[:157] + "..."
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return f"{first}{more}"


def _load_and_unload() -> tuple[str | None, str]:
    """Compile the probe as a first start on this kernel would (the cache neither read nor
    written), load it, attach its buffers to a loop, detach and unload it, as the monitor
    does: (why it failed or None, what bcc printed meanwhile, or on success how it went)."""
    from aether.ports.ebpf import Probe, ProbeUnavailable
    from aether.ports.loader import describe

    # bcc prints compiler diagnostics on fd 2 itself, in this process or in the helper, which
    # inherits it: keep them for the detail, off the terminal.
    with tempfile.TemporaryFile() as captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            probe = Probe(sources.value("ebpf_buffer"), sources.value("ebpf_pages"), cache=False)
            loop = asyncio.new_event_loop()
            try:
                probe.start(loop, lambda batch: None)
            except Exception as exc:  # the monitor's own words for whatever libbpf raised
                return f"could not attach the probe's buffers: {exc}", ""
            finally:
                probe.stop()
                loop.close()
        except ProbeUnavailable as exc:
            error = str(exc).replace(" <text>", "")
        else:
            if probe.compile_seconds is None:
                how = "compiled by bcc in this process"
            else:
                how = f"compiled by the helper `{describe()}` in {probe.compile_seconds:.2f} s"
                assert probe.cache_file is not None  # named before the helper compiles
                cached = "cached" if os.path.exists(probe.cache_file) else "to be cached"
                how += f"; {cached} at {probe.cache_file} for restarts"
            return None, f"{probe.buffer} buffer of {probe.pages} pages, {how}"
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        return error, captured.read().decode("utf-8", "replace")


def check_probe() -> Check:
    """The real thing, after the environment checks the monitor makes first."""
    from aether.ports.ebpf import ProbeUnavailable, check_environment

    try:
        check_environment()
    except ProbeUnavailable as exc:
        return Check("probe", FAIL, f"not loaded: {exc}", "fix the failed checks above")
    started = time.monotonic()
    error, output = _load_and_unload()
    took = time.monotonic() - started
    if error is None:
        return Check("probe", OK, f"loaded, attached and unloaded in {took:.2f} s ({output})")
    if output.strip():
        error = f"{error}: {_compile_error(output)}"
    return Check(
        "probe",
        FAIL,
        f"{error} (after {took:.2f} s)",
        "bcc's whole output: aether ports watch --backend ebpf; bpf/listen_events.c is the probe",
    )


def check_sockdiag() -> Check:
    from aether.ports.sockdiag import DiagSocket

    started = time.monotonic()
    try:
        with DiagSocket() as diag:
            raw = diag.raw()
    except OSError as exc:
        return Check(
            "sock_diag",
            FAIL,
            f"NETLINK_SOCK_DIAG dump failed: {exc}",
            "a kernel with CONFIG_INET_DIAG and CONFIG_INET_TCP_DIAG (modprobe tcp_diag)",
        )
    ports = len({row[1] for row in raw})
    took = (time.monotonic() - started) * 1000
    sockets = f"{len(raw)} listening socket{'' if len(raw) == 1 else 's'}"
    return Check("sock_diag", OK, f"{sockets} on {ports} port{'' if ports == 1 else 's'}, dumped in {took:.1f} ms")


def check_state_dir(path: Path, config_error: str | None = None) -> Check:
    """Writable, or creatable: a file made and removed in it, or in its nearest existing parent.
    ``config_error`` is why its config.json could not be read, if it could not."""
    fix = "--state-dir / AETHER_STATE_DIR naming a directory this user may create, or StateDirectory=aether in the unit"
    path = Path(os.path.abspath(path))
    existing = path
    while True:
        try:
            st = os.stat(existing)
            break
        except (FileNotFoundError, NotADirectoryError):
            if existing.parent == existing:
                return Check("state-dir", FAIL, f"{path}: no existing parent", fix)
            existing = existing.parent
        except OSError as exc:
            return Check("state-dir", FAIL, f"{existing} is not reachable by {_user()}: {exc.strerror}", fix)
    if not stat.S_ISDIR(st.st_mode):
        return Check("state-dir", FAIL, f"{path}: {existing} is not a directory", fix)
    try:
        fd, probe = tempfile.mkstemp(prefix=".aether-doctor-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        make = f"chown {_user_name()} {path}" if existing == path else f"mkdir -p {path} && chown {_user_name()} {path}"
        return Check("state-dir", FAIL, f"{existing} is not writable by {_user()}: {exc.strerror}", f"{make}, or {fix}")
    if config_error:
        return Check(
            "state-dir",
            FAIL,
            f"{path} is writable, but {config_error}",
            f"correct or remove {path / 'config.json'}: aether serve refuses to start with it",
        )
    if existing == path:
        return Check("state-dir", OK, f"{path} is writable")
    return Check("state-dir", OK, f"{path} does not exist yet; {existing} is writable, so aether serve can create it")


def _holders(port: int) -> str:
    """Who listens on ``port``, in words."""
    from aether.ports import procs
    from aether.ports.sockdiag import DiagSocket

    with DiagSocket() as diag:
        raw = diag.raw()
    states = procs.port_states(raw, [port])
    if not states:
        return "not by a listening socket"
    state = states[0]
    if state.pid is None:
        return "by a process this user cannot see (CAP_SYS_PTRACE shows it)"
    who = f"by pid {state.pid} ({state.process})"
    return f"{who}: that is aether itself" if procs.is_aether_server(state.pid) else who


def check_port(host: str, port: int) -> Check:
    """Bind (not listen) as ``aether serve`` would: every address of ``host``, SO_REUSEADDR."""
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE | socket.AI_ADDRCONFIG)
    except socket.gaierror as exc:
        return Check("port", FAIL, f"host {host!r} does not resolve: {exc.strerror}", "--host / AETHER_HOST")
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    for family, kind, proto, _name, address in dict.fromkeys(infos):
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    held = _holders(port)
                    fix = (
                        "nothing: aether serve is running on it"
                        if "aether itself" in held
                        else f"stop it (aether ports kill {port}), or choose another --port / AETHER_PORT "
                        f"(this is the port aether serve would take; to see why port {port}'s preview fails: "
                        f"aether doctor --preview {port})"
                    )
                    # The server running is what a port taken by it means: fine, not a warning.
                    verdict = OK if "aether itself" in held else FAIL
                    return Check("port", verdict, f"{where} is taken, {held}", fix)
                if exc.errno == errno.EACCES:
                    return Check(
                        "port",
                        FAIL,
                        f"{where}: binding below 1024 needs CAP_NET_BIND_SERVICE",
                        "a port of 1024 or more, or AmbientCapabilities=CAP_NET_BIND_SERVICE",
                    )
                return Check("port", FAIL, f"{where}: {exc.strerror}", "--host / AETHER_HOST, --port / AETHER_PORT")
    return Check("port", OK, f"{where} is free")
