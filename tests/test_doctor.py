"""`aether doctor` as a whole process: on the host as it is, with each thing it checks
broken for real, and as user nobody without capabilities and with the minimal set the README
gives for a dedicated user."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import uuid
from pathlib import Path

import pytest
from support import ROOT
from support.ebpf import ebpf_unavailable, need_ebpf
from support.ports import free_port
from support.processes import aether
from support.servers import Server

from aether import caps, cgroup
from aether.doctor.cgroups import MISSES

NAMES = [
    *("privileges", "kernel", "btf", "tracepoint", "kprobes", "bcc", "headers", "probe", "sock_diag", "state-dir", "port"),
    "cgroups",
]
#: What loading the probe takes as a non-root user (README, "aether doctor").
PROBE_CAPS = ["bpf", "perfmon", "dac_read_search"]
#: ...and seeing and stopping other users' processes too: the dedicated user's whole set.
DAEMON_CAPS = PROBE_CAPS + ["sys_ptrace", "kill"]

LISTEN = "import socket, time; s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(60)"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing to user nobody needs root")


def doctor(state_dir: Path, *args: str, port: int | None = None, env: dict | None = None):
    """(exit status, the JSON report by check name, the whole report) of one doctor run."""
    result = aether(
        "doctor",
        "--json",
        "--state-dir",
        str(state_dir),
        "--port",
        str(port or free_port()),
        *args,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode in (0, 1), result.stderr
    report = json.loads(result.stdout)
    return result.returncode, {check["name"]: check for check in report["checks"]}, report


def ebpf_status() -> int:
    """The exit status a doctor run must have when nothing but the port or state dir is wrong."""
    return 1 if ebpf_unavailable() else 0


@pytest.mark.ebpf
def test_this_machine(tmp_path):
    need_ebpf()
    state = tmp_path / "not" / "yet"
    result = aether("doctor", "--state-dir", str(state), "--port", str(free_port()))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("doctor: eBPF backend will run ("), lines[-1]
    checks = [line.split()[:2] for line in lines[:-1] if not line.startswith(" ")]
    assert [name for _verdict, name in checks] == NAMES
    assert all(verdict in ("ok", "warn", "fail") for verdict, _name in checks)
    for line, following in zip(lines, lines[1:]):
        if line.startswith("ok "):
            assert not following.lstrip().startswith("fix:"), f"an ok check has a fix: {line}"
        elif line.startswith(("warn", "fail")):
            assert following.lstrip().startswith("fix:"), f"no fix under {line}"
    assert "loaded, attached and unloaded in" in result.stdout
    # The doctor creates nothing: it found where the state dir would go, and left it at that.
    assert f"{state} does not exist yet; {tmp_path} is writable" in result.stdout
    assert not (tmp_path / "not").exists()


def test_json_report(tmp_path):
    status, checks, report = doctor(tmp_path)
    assert list(checks) == NAMES
    assert report["ebpf"] is (status == 0)
    assert status == ebpf_status(), report["summary"]
    for check in checks.values():
        assert check["verdict"] in ("ok", "warn", "fail")
        assert check["detail"]
        assert (check["fix"] is None) == (check["verdict"] == "ok"), check
    assert report["summary"].startswith("doctor: eBPF backend will")


def test_usage_errors(tmp_path):
    high = aether("doctor", "--port", "70000")
    assert high.returncode == 2 and high.stderr == 'aether: --port must be 1-65535, not "70000"\n'
    bad = aether("doctor", env={**os.environ, "AETHER_PORT": "web"})
    assert bad.returncode == 2 and bad.stderr.startswith("aether: AETHER_PORT must be a whole number")
    # A bad value in the state directory's config.json is named with its file and key.
    (tmp_path / "config.json").write_text(json.dumps({"port": 0}))
    stored = aether("doctor", "--state-dir", str(tmp_path))
    assert stored.returncode == 2 and stored.stderr == f"aether: {tmp_path}/config.json key port must be 1-65535, not 0\n"


def test_port_taken_names_the_holder(tmp_path, listeners):
    port = free_port()
    holder = listeners.python(LISTEN.format(port=port), port)
    status, checks, report = doctor(tmp_path, port=port)
    assert checks["port"]["verdict"] == "fail"
    assert f"127.0.0.1:{port} is taken, by pid {holder.pid} (" in checks["port"]["detail"]
    assert f"aether ports kill {port}" in checks["port"]["fix"]
    # The port decides whether `aether serve` starts, not how it watches ports.
    assert status == ebpf_status()
    assert report["summary"].endswith("1 failed: port)") or status == 1, report["summary"]


def test_port_held_by_aether_itself(tmp_path):
    server = Server("sockdiag", tmp_path / "state")
    try:
        _status, checks, _report = doctor(tmp_path / "state", port=server.port)
    finally:
        server.stop()
    assert checks["port"]["verdict"] == "ok"  # the server running: fine, not a warning
    assert f"is taken, by pid {server.proc.pid} (" in checks["port"]["detail"]
    assert checks["port"]["detail"].endswith("): that is aether itself")


def test_state_dir_under_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    status, checks, _report = doctor(tmp_path / "file" / "state")
    check = checks["state-dir"]
    assert check["verdict"] == "fail"
    assert check["detail"] == f"{tmp_path}/file/state: {tmp_path}/file is not a directory"
    assert "--state-dir" in check["fix"]
    assert status == ebpf_status()


def test_unreadable_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{")
    _status, checks, _report = doctor(tmp_path)
    assert checks["state-dir"]["verdict"] == "fail"
    assert "config.json: not valid JSON" in checks["state-dir"]["detail"]
    assert checks["state-dir"]["fix"].startswith(f"correct or remove {tmp_path}/config.json")


def test_config_json_port_is_the_one_checked(tmp_path, listeners):
    port = free_port()
    (tmp_path / "config.json").write_text(json.dumps({"port": port}))
    result = aether("doctor", "--json", "--state-dir", str(tmp_path))
    checks = {check["name"]: check for check in json.loads(result.stdout)["checks"]}
    assert checks["port"]["detail"] == f"127.0.0.1:{port} is free"


@pytest.mark.ebpf
def test_probe_that_does_not_compile(tmp_path):
    need_ebpf()
    source = (ROOT / "bpf" / "listen_events.c").read_text()
    (tmp_path / "listen_events.c").write_text(source.replace("return 0;", "return undefined_thing;", 1))
    status, checks, report = doctor(tmp_path, env={"AETHER_BPF_DIR": str(tmp_path)})
    assert status == 1
    assert checks["probe"]["verdict"] == "fail"
    assert "error: use of undeclared identifier 'undefined_thing'" in checks["probe"]["detail"]
    assert "aether ports watch --backend ebpf" in checks["probe"]["fix"]
    assert report["summary"].startswith("doctor: eBPF backend will NOT run (probe failed); aether serve would use sock_diag")


def test_pypi_bcc_is_named(tmp_path):
    fake = tmp_path / "site" / "bcc"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('"""The PyPI package named bcc: nothing to do with BPF."""\n')
    status, checks, report = doctor(tmp_path, env={"PYTHONPATH": str(tmp_path / "site")})
    assert status == 1
    assert checks["bcc"]["verdict"] == "fail"
    assert checks["bcc"]["detail"] == f"{fake} is the PyPI package named bcc, unrelated to BPF"
    assert "apt-get install python3-bpfcc" in checks["bcc"]["fix"]
    assert checks["probe"]["verdict"] == "fail"
    assert "will NOT run (bcc, probe failed)" in report["summary"]


# -- as user nobody ---------------------------------------------------------------------


def nobody_python() -> tuple[str, dict]:
    """A Python 3.11+ that user nobody can run, and an environment in which it imports aether
    and its dependencies from this tree and its venv (which must be readable by nobody)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), sysconfig.get_paths()["purelib"]])}
    probe = "import sys; assert sys.version_info >= (3, 11); import aether.cli, ujson, pyroute2, tornado"
    for candidate in (sys.executable, "/usr/bin/python3"):
        result = subprocess.run(as_nobody([], [candidate, "-c", probe]), env=env, cwd="/", capture_output=True)
        if result.returncode == 0:
            return candidate, env
    pytest.fail(f"no Python 3.11+ that user nobody can run with {ROOT} and the venv readable")


def as_nobody(capabilities: list[str], argv: list[str]) -> list[str]:
    setpriv = shutil.which("setpriv") or pytest.fail("setpriv is not installed (util-linux)")
    granted = ",".join(["-all"] + [f"+{cap}" for cap in capabilities])
    cmd = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", f"--inh-caps={granted}", f"--ambient-caps={granted}"]
    if not capabilities:
        cmd.append("--bounding-set=-all")
    return cmd + argv


def doctor_as_nobody(capabilities: list[str], port: int):
    python, env = nobody_python()
    # A state dir nobody may create (tmp_path is root's, mode 0700); the doctor creates nothing.
    state = f"/tmp/aether-doctor-{uuid.uuid4().hex}"
    argv = [python, "-m", "aether", "doctor", "--json", "--state-dir", state, "--port", str(port)]
    result = subprocess.run(as_nobody(capabilities, argv), env=env, cwd="/", capture_output=True, text=True, timeout=30)
    assert result.returncode in (0, 1), result.stderr
    report = json.loads(result.stdout)
    assert not os.path.exists(state)
    return result.returncode, {check["name"]: check for check in report["checks"]}, report


@needs_root
def test_nobody_without_capabilities():
    status, checks, report = doctor_as_nobody([], free_port())
    assert status == 1
    assert checks["privileges"]["verdict"] == "fail"
    assert checks["privileges"]["detail"].startswith(
        "uid 65534 (nobody) lacks CAP_BPF, CAP_PERFMON, CAP_DAC_READ_SEARCH (to load the probe)"
    )
    assert "AmbientCapabilities=" in checks["privileges"]["fix"]
    assert checks["tracepoint"]["verdict"] == "fail"
    assert checks["probe"]["verdict"] == "fail"
    assert report["ebpf"] is False
    assert report["summary"].startswith("doctor: eBPF backend will NOT run (privileges, tracepoint, probe failed)")
    assert checks["state-dir"]["verdict"] == "ok"  # /tmp: nobody may create it there
    # Not root: no cgroup of its own under the cgroup2 mount, so the fallback, and why.
    assert checks["cgroups"]["verdict"] == "warn"
    assert checks["cgroups"]["detail"].startswith("process trees found in /proc, not cgroups: cannot make "), checks["cgroups"]
    assert checks["cgroups"]["detail"].endswith(": Permission denied; " + MISSES)
    assert checks["cgroups"]["fix"].startswith("run aether serve as root")


@needs_root
@pytest.mark.ebpf
def test_nobody_with_the_minimal_capabilities(listeners):
    """CAP_BPF, CAP_PERFMON and CAP_DAC_READ_SEARCH load the probe; root's listener stays
    anonymous without CAP_SYS_PTRACE."""
    need_ebpf()
    port = free_port()
    listeners.python(LISTEN.format(port=port), port)
    status, checks, report = doctor_as_nobody(PROBE_CAPS, port)
    assert status == 0, report
    assert checks["probe"]["verdict"] == "ok"
    assert checks["privileges"]["verdict"] == "warn"
    assert checks["privileges"]["detail"] == (
        "uid 65534 (nobody) lacks CAP_SYS_PTRACE, CAP_KILL (other users' pids, and stopping their processes)"
    )
    assert checks["port"]["detail"].endswith("by a process this user cannot see (CAP_SYS_PTRACE shows it)")
    assert report["summary"].startswith("doctor: eBPF backend will run (")


@needs_root
@pytest.mark.ebpf
def test_nobody_with_the_daemon_capabilities(listeners):
    need_ebpf()
    port = free_port()
    holder = listeners.python(LISTEN.format(port=port), port)
    status, checks, _report = doctor_as_nobody(DAEMON_CAPS, port)
    assert status == 0
    assert checks["privileges"] == {
        "name": "privileges",
        "verdict": "ok",
        "fix": None,
        "detail": "uid 65534 (nobody), with every capability aether uses",
    }
    assert f"by pid {holder.pid} (" in checks["port"]["detail"]


def _trees_logged(server: Server) -> dict:
    return next(line for line in server.log if line["msg"].startswith("process trees: "))


@pytest.mark.parametrize("setting", ["auto", "off"])
def test_cgroups_says_which_process_trees_serve_gets(tmp_path, setting):
    """The doctor's `cgroups` check says what `aether serve` with the same state directory and
    setting logs at start: a cgroup each (ok), or the fallback (a warning naming why, what it
    misses, and where that is described). It makes the daemon's cgroup to find out, and
    leaves nothing of it."""
    env, state = {"AETHER_CGROUPS": setting}, tmp_path / "state"
    status, checks, report = doctor(state, env=env)
    assert status == ebpf_status(), report["summary"]  # a warning here does not change the verdict
    mount = cgroup.mount_point(Path("/proc/self/mountinfo").read_text())
    if mount is not None:
        assert not os.path.exists(cgroup.state_cgroup(mount[0], os.path.realpath(state)))
    server = Server("sockdiag", state, env=env)
    server.stop()
    logged = _trees_logged(server)
    check = checks["cgroups"]
    if setting == "off":
        assert logged["msg"] == "process trees: fallback (session, process group and descendants)"
        assert check["verdict"] == "warn"
        assert check["detail"] == f"process trees found in /proc, not cgroups: AETHER_CGROUPS=off; {MISSES}"
        assert check["fix"] == (
            "unset AETHER_CGROUPS (or set it to auto) for a cgroup per tree; see docs/protocol.md#terminal-channel (process trees)"
        )
    else:
        assert logged["msg"] == "process trees: cgroup", f"this test needs cgroup v2 with cgroup.kill: {logged}"
        assert check == {
            "name": "cgroups",
            "verdict": "ok",
            "detail": f"a cgroup v2 for each terminal session and agent turn, under {mount[0]}/aether, ended by cgroup.kill",
            "fix": None,
        }


def test_capabilities_the_probe_needs():
    bit = lambda *caps_: sum(1 << cap for cap in caps_)  # noqa: E731
    assert caps.missing_for_probe(0) == [caps.CAP_BPF, caps.CAP_PERFMON]
    assert caps.missing_for_probe(bit(caps.CAP_BPF)) == [caps.CAP_PERFMON]
    assert caps.missing_for_probe(bit(caps.CAP_BPF, caps.CAP_PERFMON)) == []
    assert caps.missing_for_probe(bit(caps.CAP_SYS_ADMIN)) == []


def test_service_reads_the_units_environment_file(tmp_path):
    """--service checks what aether.service runs with: its env file's settings, /var/lib/aether."""
    from aether.doctor import service_environment

    env_file = tmp_path / "aether.env"
    env_file.write_text("# comment\n#AETHER_PORT=1\nAETHER_PORT=4123\nAETHER_HOST=::1\nOTHER=x\n")
    environ = {"AETHER_PORT": "9"}
    service_environment(env_file, environ)
    assert environ == {"AETHER_PORT": "4123", "AETHER_HOST": "::1"}
    service_environment(tmp_path / "missing.env", environ)  # EnvironmentFile=-: a missing file is fine
    assert environ == {"AETHER_PORT": "4123", "AETHER_HOST": "::1"}

    result = aether("doctor", "--json", "--service", "--port", str(free_port()))
    assert result.returncode in (0, 1), result.stderr
    state = {c["name"]: c for c in json.loads(result.stdout)["checks"]}["state-dir"]
    assert "/var/lib" in state["detail"], state  # /var/lib/aether, or its parent before the first start
