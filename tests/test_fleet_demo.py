"""deploy/fleet-demo.sh: the local fleet a newcomer starts. It starts (Redis, three VMs as network
namespaces each with `aether serve --fleet-...` and the eBPF probe, two gateways), every URL it
prints opens the VM's demo page through its gateway (the token, then the cookie it set), and
`stop` leaves no process, namespace, link or file behind. Names, net, ports and directory are
the test's own, so a demo someone runs on the machine is not touched."""

from __future__ import annotations

import http.client
import os
import re
import secrets
import subprocess
import urllib.parse
from pathlib import Path

import pytest
from support import ROOT
from support.ebpf import need_ebpf
from support.ports import free_port, listening_inodes

DEMO = ROOT / "deploy" / "fleet-demo.sh"
URL = re.compile(r"^  VM (\d): (http://(\d+)-([a-z0-9]+)\.fleet\.localhost:(\d+)/\?token=(\S+))$", re.M)


def namespaces() -> set[str]:
    return set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()


def links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout


def ours(name: str, directory: Path) -> list[str]:
    """Processes whose command line names the demo's directory (every one it starts does)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(directory) in cmdline and "pytest" not in cmdline:
            found.append(f"{pid} {cmdline}")
    return found


def get(port: int, host: str, target: str, cookie: str | None = None) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", target, headers={"Host": host, **({"Cookie": cookie} if cookie else {})})
    response = conn.getresponse()
    response.body = response.read()
    conn.close()
    return response


@pytest.mark.slow
@pytest.mark.ebpf
def test_demo_starts_serves_every_printed_url_and_stop_leaves_nothing(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the demo's VMs are network namespaces: root only")
    need_ebpf()
    name = "aet" + secrets.token_hex(3)
    directory = tmp_path / "demo"
    gateways = [free_port(), free_port()]
    env = {
        **os.environ,
        "AETHER_DEMO_NAME": name,
        "AETHER_DEMO_DIR": str(directory),
        "AETHER_DEMO_NET": f"10.{100 + secrets.randbelow(100)}",
        "AETHER_DEMO_REDIS_PORT": str(free_port()),
        "AETHER_DEMO_GATEWAY_PORTS": " ".join(map(str, gateways)),
    }
    try:
        started = subprocess.run(["bash", str(DEMO)], env=env, capture_output=True, text=True, timeout=300)
        assert started.returncode == 0, started.stderr[-3000:]
        assert {f"{name}{n}" for n in (1, 2, 3)} <= namespaces()
        urls = URL.findall(started.stdout)
        assert sorted((vm, int(port)) for vm, _, _, _, port, _ in urls) == [
            (vm, port) for vm in "123" for port in sorted(gateways)
        ], started.stdout
        assert "deploy/fleet-demo.sh stop" in started.stdout

        for vm, url, app_port, prefix, port, _token in urls:
            host = f"{app_port}-{prefix}.fleet.localhost:{port}"
            # The printed URL: the gateway checks the token, sets its cookie, redirects without it.
            first = get(int(port), host, "/?" + urllib.parse.urlsplit(url).query)
            assert first.status == 302, (url, first.status, first.body[:200])
            assert "token" not in first.getheader("Location")
            cookie = first.getheader("Set-Cookie").split(";")[0]
            page = get(int(port), host, "/", cookie)
            assert page.status == 200 and f"Hello from VM {vm}".encode() in page.body, (url, page.status, page.body[:200])
            # Without the token or cookie the preview is private.
            assert get(int(port), host, "/").status == 401

        again = subprocess.run(["bash", str(DEMO)], env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode != 0 and "running already" in again.stderr
    finally:
        stopped = subprocess.run(["bash", str(DEMO), "stop"], env=env, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert not {f"{name}{n}" for n in (1, 2, 3)} & namespaces()
    assert name not in links()
    assert ours(name, directory) == []
    assert not listening_inodes(int(env["AETHER_DEMO_REDIS_PORT"]))  # redis-server's command line is ADDR:PORT
    assert not any(listening_inodes(port) for port in gateways)
    assert not directory.exists()
