"""deploy/: install.sh into a staging root and into a copy of /etc, the units checked by
`systemd-analyze verify`, and the locked-down drop-in's user, capabilities and file-system
sandbox applied to a real `aether serve` with the eBPF probe (no systemd needed).

What is not exercised here: systemd itself starting the unit (PID 1 is not systemd on these
machines), and the drop-in's seccomp and namespace options (RestrictAddressFamilies=,
ProtectClock=, ProtectHostname=...), which only systemd applies.
"""

from __future__ import annotations

import http.client
import re
import subprocess
from pathlib import Path

import pytest
from support import ROOT
from support.clients import recv_until
from support.ebpf import need_ebpf
from support.processes import proc_comm, tool
from support.servers import Server
from support.waiting import wait_for

from aether import caps

INSTALL = ROOT / "deploy" / "install.sh"
DROPIN = ROOT / "deploy" / "aether-locked-down.conf"
NOBODY = 65534  # the drop-in's user stands in as nobody: a test creates no system user


def install(*args: str, destdir: Path | None = None) -> subprocess.CompletedProcess:
    extra = ["--destdir", str(destdir)] if destdir else []
    return subprocess.run(["bash", str(INSTALL), *extra, *args], capture_output=True, text=True, timeout=300)


def said(result: subprocess.CompletedProcess, prefix: str = "install:") -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith(prefix)]


def verify(unit: Path) -> subprocess.CompletedProcess:
    """`systemd-analyze verify` on a unit file (its .d/ drop-ins included)."""
    return subprocess.run([tool("systemd-analyze"), "verify", str(unit)], capture_output=True, text=True, timeout=60)


def settings(path: Path) -> dict[str, list[str]]:
    """A unit file's ``Key=value`` lines: each key's values, in order."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def snapshot(root: Path) -> dict[str, tuple[bytes, int, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_mode) for p in root.rglob("*") if p.is_file()
    }


# -- install.sh and the units ----------------------------------------------------------------


def test_install_renders_a_unit_that_verifies_and_a_second_run_changes_nothing(tmp_path):
    first = install("--set", "AETHER_HOST=0.0.0.0", destdir=tmp_path)
    assert first.returncode == 0, first.stderr
    unit = tmp_path / "etc/systemd/system/aether.service"
    assert said(first) == [
        "install: installed /etc/systemd/system/aether.service",
        "install: installed /etc/aether/aether.env",
        "install: updated /etc/aether/aether.env",
    ]
    values = settings(unit)
    assert values["ExecStart"] == [f"{ROOT}/.venv/bin/aether serve"]
    assert values["Restart"] == ["on-failure"] and values["StateDirectory"] == ["aether"]
    assert values["EnvironmentFile"] == ["-/etc/aether/aether.env"] and values["KillMode"] == ["mixed"]
    env = tmp_path / "etc/aether/aether.env"
    assert "AETHER_HOST=0.0.0.0" in env.read_text().splitlines() and env.stat().st_mode & 0o777 == 0o600
    checked = verify(unit)
    assert (checked.returncode, checked.stdout + checked.stderr) == (0, "")

    before = snapshot(tmp_path)
    second = install("--set", "AETHER_HOST=0.0.0.0", destdir=tmp_path)
    assert second.returncode == 0, second.stderr
    assert said(second) == []
    assert all(line.startswith("setup: eBPF") for line in said(second, "setup:")), second.stderr
    assert snapshot(tmp_path) == before


def test_locked_down_drop_in_verifies_and_is_removed_without_user(tmp_path):
    result = install("--user", "svc-aether", destdir=tmp_path)
    assert result.returncode == 0, result.stderr
    unit = tmp_path / "etc/systemd/system/aether.service"
    dropin = tmp_path / "etc/systemd/system/aether.service.d/locked-down.conf"
    values = settings(dropin)
    assert values["User"] == values["Group"] == ["svc-aether"]
    assert values["NoNewPrivileges"] == ["yes"] and values["ProtectSystem"] == ["strict"]
    checked = verify(unit)
    assert (checked.returncode, checked.stdout + checked.stderr) == (0, "")

    back = install(destdir=tmp_path)
    assert said(back) == ["install: removed /etc/systemd/system/aether.service.d/locked-down.conf: the service runs as root"]
    assert not dropin.exists() and unit.exists()


def test_verify_does_check_the_drop_in(tmp_path):
    """The test above means something: a bad value in the drop-in makes verify speak."""
    assert install("--user", "aether", destdir=tmp_path).returncode == 0
    dropin = tmp_path / "etc/systemd/system/aether.service.d/locked-down.conf"
    dropin.write_text(dropin.read_text().replace("NoNewPrivileges=yes", "NoNewPrivileges=maybe"))
    checked = verify(tmp_path / "etc/systemd/system/aether.service")
    assert "NoNewPrivileges" in checked.stderr or "maybe" in checked.stderr, checked.stderr


def test_exposure_scores(tmp_path):
    """systemd's own measure: the root unit is as exposed as sshd's; the drop-in halves it."""
    scores = {}
    for name, args in (("root", ()), ("locked", ("--user", "aether"))):
        root = tmp_path / name
        assert install(*args, destdir=root).returncode == 0
        out = subprocess.run(
            [tool("systemd-analyze"), "security", "--offline=yes", f"--root={root}", "aether.service"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        scores[name] = float(re.search(r"Overall exposure level for aether.service: ([\d.]+)", out).group(1))
    assert scores["locked"] < 5.0 < scores["root"], scores


@pytest.mark.parametrize(
    "args, message",
    [
        (("--user", "Not A Name"), "not a valid user name"),
        (("--set", "HOST=0.0.0.0"), "expected AETHER_NAME=VALUE"),
        (("--set", "AETHER_AGENT_COMMAND=run a\\ b"), "may not hold"),
        (("--set", "AETHER_AGENT_COMMAND='run'"), "may not hold"),
        (("--set", "AETHER_SHELL=$HOME/sh"), "may not hold"),
        (("--frobnicate",), "unknown argument"),
    ],
)
def test_install_refuses_bad_arguments_and_writes_nothing(tmp_path, args, message):
    result = install(*args, destdir=tmp_path / "root")
    assert result.returncode != 0 and message in result.stderr
    assert not (tmp_path / "root").exists()


def test_install_on_a_host_without_systemd_creates_the_user_and_stops_cleanly(tmp_path):
    """The real path (no --destdir), with /etc a copy in a mount namespace of its own, and
    /run/systemd hidden there where systemd does run (the Vagrant VM)."""
    etc = tmp_path / "etc"
    script = (
        'cp -a /etc "$1" && mount -n --bind "$1" /etc && { [ ! -d /run/systemd ] || mount -n -t tmpfs tmpfs /run/systemd; }'
        ' && exec bash "$2" --user aether-test'
    )
    result = subprocess.run(
        [tool("unshare"), "--mount", "--propagation", "private", "sh", "-ec", script, "sh", str(etc), str(INSTALL)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = said(result)
    assert "install: created system user aether-test" in lines
    assert "install: installed /etc/systemd/system/aether.service.d/locked-down.conf" in lines
    assert lines[-1] == "install: systemd is not running here (no /run/systemd/system): aether.service is installed, not started"
    entry = [line for line in (etc / "passwd").read_text().splitlines() if line.startswith("aether-test:")]
    assert len(entry) == 1 and entry[0].endswith(":/var/lib/aether:/usr/sbin/nologin")
    assert "aether-test:" not in Path("/etc/passwd").read_text()


# -- the drop-in's restrictions on a real server -----------------------------------------------

SANDBOX = r"""
uid=$1 caps=$2 nnp=$3; shift 3
# -n: /run, with mount's own table, is read-only too.
# ProtectSystem=strict, ProtectHome=read-only, and (with /sys) ProtectKernelTunables= and
# ProtectControlGroups=: every mount read-only but /proc and /dev, handled below.
for mp in $(awk '{print $5}' /proc/self/mountinfo | sort -u); do
    case $mp in /proc|/proc/*|/dev|/dev/*) continue ;; esac
    mount -n -o remount,bind,ro "$mp" || { echo "sandbox: cannot make $mp read-only" >&2; exit 1; }
done
# The checkout itself may live under /tmp (a CI clone): keep it visible, read-only, through
# the private /tmp, by way of /var/lib's own tmpfs (the state directory's, below).
mount -n -t tmpfs -o mode=755 tmpfs /var/lib
case $CHECKOUT in /tmp/*) mkdir /var/lib/.checkout && mount -n --bind "$CHECKOUT" /var/lib/.checkout ;; esac
mount -n -t tmpfs -o mode=1777 tmpfs /tmp                                  # PrivateTmp=
case $CHECKOUT in /tmp/*) mkdir -p "$CHECKOUT" && mount -n --move /var/lib/.checkout "$CHECKOUT" &&
    rmdir /var/lib/.checkout ;; esac
# ProtectKernelTunables=: /proc/sys read-only, kallsyms and kcore inaccessible; ProtectKernelLogs=:
# kmsg inaccessible. systemd binds an empty mode-0 file over them, as here.
: > /tmp/.inaccessible && chmod 0 /tmp/.inaccessible
for f in /proc/kallsyms /proc/kcore /proc/kmsg; do [ ! -e $f ] || mount -n --bind /tmp/.inaccessible $f; done
mount -n --bind /proc/sys /proc/sys && mount -n -o remount,bind,ro /proc/sys
# PrivateDevices=: a /dev of pseudo devices and ptys only.
mkdir /tmp/.dev && mount -n -t tmpfs -o mode=755 tmpfs /tmp/.dev
for d in null zero full random urandom tty ptmx; do : > /tmp/.dev/$d && mount -n --bind /dev/$d /tmp/.dev/$d; done
mkdir /tmp/.dev/pts /tmp/.dev/shm && mount -n --bind /dev/pts /tmp/.dev/pts && mount -n -t tmpfs tmpfs /tmp/.dev/shm
mount -n --move /tmp/.dev /dev
# StateDirectory=aether aether/workspace, owned by the user, 0700; UMask=.
mkdir -p -m 0700 /var/lib/aether/workspace && chown -R "$uid:$uid" /var/lib/aether
umask "$UMASK"
exec setpriv --reuid="$uid" --regid="$uid" --clear-groups --inh-caps=-all,"$caps" \
    --ambient-caps=-all,"$caps" --bounding-set=-all,"$caps" $nnp "$@"
"""


#: Fixtures that start `aether serve` on the probe (see conftest).
PROBE_FIXTURES = ("locked_server",)


@pytest.fixture
def locked_server():
    """`aether serve --backend ebpf` as the drop-in would run it: its capabilities (ambient and
    bounding), no-new-privs, umask and environment, as a user that is not root, in a mount
    namespace approximating its file-system options. The state directory is /var/lib/aether."""
    need_ebpf()
    values = settings(DROPIN)
    for key, value in (
        ("ProtectSystem", "strict"),
        ("ProtectHome", "read-only"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
    ):
        assert values.get(key) == [value], f"the sandbox below emulates {key}={value}; the drop-in now says {values.get(key)}"
    assert values["AmbientCapabilities"] == values["CapabilityBoundingSet"]
    caps = ",".join("+" + cap.lower().removeprefix("cap_") for cap in values["AmbientCapabilities"][0].split())
    nnp = "--no-new-privs" if values.get("NoNewPrivileges") == ["yes"] else ""
    env = dict(line.split("=", 1) for line in values["Environment"])
    wrap = (tool("unshare"), "--mount", "--propagation", "private", "sh", "-ec", SANDBOX, "sandbox", str(NOBODY), caps, nnp)
    server = Server(
        "ebpf",
        Path("/var/lib/aether"),
        "--project-id",
        "abc123def456",
        wrap=wrap,
        env={**env, "UMASK": values["UMask"][0], "HOME": "/var/lib/aether", "SHELL": "/usr/sbin/nologin", "CHECKOUT": str(ROOT)},
    )
    server.caps = values["AmbientCapabilities"][0].split()
    yield server
    server.stop()


def test_locked_down_server_runs_the_probe_finds_owners_kills_and_proxies(locked_server, listeners):
    server = locked_server
    # The drop-in grants what aether.caps says a dedicated user needs, no more.
    assert sorted(server.caps) == sorted(caps.names(caps.DAEMON))
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines())
    assert status["Uid"].split()[0] == str(NOBODY) and status["NoNewPrivs"] == "1"
    assert caps.effective(f"/proc/{server.proc.pid}/status") == int(status["CapBnd"], 16) == sum(1 << cap for cap in caps.DAEMON)
    root_mount = [
        line.split() for line in Path(f"/proc/{server.proc.pid}/mountinfo").read_text().splitlines() if line.split()[4] == "/"
    ]
    assert "ro" in root_mount[-1][5].split(","), root_mount
    assert [line.get("backend") for line in server.log if line.get("msg") == "serving"] == ["ebpf"]

    with server.connect() as ws:
        app = listeners.http_server()  # root's: its owner is found through CAP_SYS_PTRACE
        port = app.port
        opened = recv_until(ws, lambda m: m.get("type") == "open" and m.get("port") == port)
        assert (opened["pid"], opened["process"]) == (app.pid, proc_comm(app.pid))

        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        conn.request(
            "GET",
            "/",
            headers={"Host": f"{port}-abc123.preview.localhost:{server.port}", "Authorization": f"Bearer {server.token}"},
        )
        response = conn.getresponse()
        assert response.status == 200 and b"Directory listing" in response.read()
        conn.close()

        ws.send(f'{{"channel": "ports", "type": "kill", "port": {port}, "id": "k1"}}')
        closed = recv_until(ws, lambda m: m.get("port") == port and m.get("type") in ("close", "error"))
        assert closed == {"channel": "ports", "type": "close", "port": port}
        wait_for(lambda: app.poll() is not None)


@pytest.mark.ebpf
def test_probe_needs_each_capability_it_is_given():
    """The drop-in's probe capabilities are the minimum: without any one of them, the eBPF
    backend refuses to start (the sockdiag fallback is for `auto`, not asked for here)."""
    need_ebpf()
    for missing in ("bpf", "perfmon", "dac_read_search"):
        caps = ",".join("+" + c for c in ("bpf", "perfmon", "dac_read_search") if c != missing)
        result = subprocess.run(
            [
                tool("setpriv"),
                f"--reuid={NOBODY}",
                f"--regid={NOBODY}",
                "--clear-groups",
                f"--inh-caps=-all,{caps}",
                f"--ambient-caps=-all,{caps}",
                f"--bounding-set=-all,{caps}",
                "--no-new-privs",
                str(ROOT / ".venv" / "bin" / "aether"),
                "ports",
                "watch",
                "--backend",
                "ebpf",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert result.returncode == 1, (missing, result.stderr)
        assert result.stderr.startswith("aether: eBPF backend unavailable: "), result.stderr
        assert "Traceback" not in result.stderr


# -- the fleet gateway's unit ----------------------------------------------------------------

GATEWAY_UNIT = ROOT / "deploy" / "aether-gateway.service"


def gateway_unit(root: Path) -> Path:
    """The gateway's unit under ``root``, pointing at this checkout, with its environment file."""
    unit = root / "etc/systemd/system/aether-gateway.service"
    unit.parent.mkdir(parents=True)
    unit.write_text(GATEWAY_UNIT.read_text().replace("/opt/aether", str(ROOT)))
    (root / "etc/aether").mkdir(parents=True)
    (root / "etc/aether/gateway.env").write_text("AETHER_FLEET_REDIS=redis://127.0.0.1:6379/0\n")
    return unit


def test_gateway_unit_verifies_runs_as_its_own_user_without_capabilities(tmp_path):
    unit = gateway_unit(tmp_path)
    checked = verify(unit)
    assert (checked.returncode, checked.stdout + checked.stderr) == (0, "")
    values = settings(unit)
    assert values["ExecStart"] == [f"{ROOT}/.venv/bin/aether gateway"]
    assert values["DynamicUser"] == ["yes"] and "User" not in values
    assert values["CapabilityBoundingSet"] == [""] and values["AmbientCapabilities"] == [""]
    assert values["Documentation"] == [f"file://{ROOT}/docs/fleet.md"] and (ROOT / "docs/fleet.md").exists()
    # The key reaches it as a credential, under the name the gateway is told.
    assert values["LoadCredential"] == ["fleet.key:/etc/aether/fleet.key"]
    assert values["Environment"] == ["AETHER_FLEET_KEY_FILE=%d/fleet.key"]

    bad = unit.with_name("bad.service")
    bad.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystem=sometimes"))
    assert "sometimes" in verify(bad).stderr  # verify does read the sandbox's lines


def test_gateway_unit_is_far_less_exposed_than_the_vm_unit(tmp_path):
    gateway_unit(tmp_path)
    assert install(destdir=tmp_path / "vm").returncode == 0

    def exposure(root: Path, name: str) -> float:
        out = subprocess.run(
            [tool("systemd-analyze"), "security", "--offline=yes", f"--root={root}", name],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        return float(re.search(rf"Overall exposure level for {name}: ([\d.]+)", out).group(1))

    gateway, vm = exposure(tmp_path, "aether-gateway.service"), exposure(tmp_path / "vm", "aether.service")
    assert gateway < 2.0 < vm, (gateway, vm)
