"""The dashboard in Debian's Chromium, driven by selenium: it signs in with the token and drops
it from the address, shows a real http.server's row as it opens, opens its private preview,
flips it public and back, refuses a kill with the server's own words, kills on confirmation,
shows the registry, and tells the server going away and coming back.

Screenshots go to ``test-artifacts/`` at the repository root; the open-to-row latencies it
measured go to ``test-artifacts/dashboard-latency.txt`` (and stdout, with ``-s``).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import pytest
from support.browser import ARTIFACTS, ROW_TIMES_JS, cells, click, connection, row, screenshot, timed_http_server, wait
from support.ports import free_port
from support.processes import proc_comm
from support.servers import Server

PROJECT = "b0a4d45e"

#: Listens on 127.0.0.1, then (a line in) on ::1 too and forks a child that holds both and
#: prints its pid; (stdin closed) exits, as a daemonizing server's parent does.
DAEMONIZING = """
import os, socket, sys, time
v4 = socket.socket(); v4.bind(("127.0.0.1", {port})); v4.listen()
sys.stdin.readline()
v6 = socket.socket(socket.AF_INET6); v6.bind(("::1", {port})); v6.listen()
pid = os.fork()
if pid == 0:
    time.sleep(60); os._exit(0)
print(pid, flush=True)
sys.stdin.readline()
"""


def preview_status(server: Server, port: int) -> int:
    """A request with no credentials at all to the port's preview: 200 public, 401 private."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", "/", headers={"Host": f"{port}-{PROJECT[:6]}.preview.localhost:{server.port}"})
    status = conn.getresponse().status
    conn.close()
    return status


def api_put(server: Server, key: str, body: dict) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("PUT", f"/api/ports/{key}", json.dumps(body), {"Authorization": f"Bearer {server.token}"})
    assert conn.getresponse().status == 200
    conn.close()


def accept_confirmation(driver) -> str:
    from selenium.webdriver.support import expected_conditions

    alert = wait(driver, expected_conditions.alert_is_present(), 5, "the confirmation")
    text = alert.text
    alert.accept()
    return text


@pytest.mark.ebpf  # `aether serve --backend auto`: the probe, where it loads
@pytest.mark.slow
def test_dashboard_in_chromium(driver, tmp_path):
    from selenium.webdriver.common.by import By

    state = tmp_path / "state"
    server = Server("auto", state, "--project-id", PROJECT)
    servers = [server]
    site = tmp_path / "site"
    site.mkdir()
    (site / "hello-from-the-dashboard-test.txt").write_text("hi\n")
    procs = []
    try:
        # Sign in: the token is traded for an HttpOnly cookie and leaves the address bar.
        driver.get(f"http://127.0.0.1:{server.port}/?token={server.token}")
        assert driver.current_url == f"http://127.0.0.1:{server.port}/"
        wait(driver, lambda d: connection(d) == "connected", what="the WebSocket to connect")
        assert driver.execute_script("return document.cookie") == ""
        assert server.token not in driver.page_source
        (cookie,) = driver.get_cookies()
        assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and cookie["domain"] == "127.0.0.1"
        driver.execute_script(ROW_TIMES_JS)

        # A server started now appears in the table, with its process, pid and address.
        port = free_port()
        http_server, listening = timed_http_server(port, site)
        procs.append(http_server)
        wait(driver, lambda d: row(d, port), what=f"port {port}'s row")
        shown = driver.execute_script(f"return window.rowTimes['{port}'].shown")
        latencies = [shown - listening * 1000]
        number, process, pid, address, visibility, open_for, _, _ = cells(driver, port)
        assert (number, process.split("\n")[0], pid, address) == (
            str(port),
            proc_comm(http_server.pid),
            str(http_server.pid),
            "127.0.0.1",
        )
        # the command line and directory under the name, once the server has read them
        wait(driver, lambda d: "http.server" in cells(d, port)[1], what=f"port {port}'s command line")
        assert visibility.startswith("private") and open_for.endswith(" s")
        preview_url = f"http://{port}-{PROJECT[:6]}.preview.localhost:{server.port}"
        assert row(driver, port).find_element(By.CSS_SELECTOR, "a.preview").text == preview_url

        # The registry, beside the ports: an entry for this port says it listens.
        api_put(server, "site", {"port": port, "app": "demo", "label": "web", "description": "the test's files"})
        wait(
            driver,
            lambda d: (
                "listening" in d.find_element(By.CSS_SELECTOR, '#registry tr[data-key="site"]').text
                if d.find_elements(By.CSS_SELECTOR, '#registry tr[data-key="site"]')
                else False
            ),
            what="the registry entry",
        )
        assert "site" in cells(driver, port)[1]
        screenshot(driver, "dashboard.png")

        # The link opens the private preview (a grant, traded for the preview's cookie).
        dashboard = driver.current_window_handle
        row(driver, port).find_element(By.CSS_SELECTOR, "a.preview").click()
        wait(driver, lambda d: len(d.window_handles) == 2, what="the preview's tab")
        driver.switch_to.window([h for h in driver.window_handles if h != dashboard][0])
        wait(driver, lambda d: "hello-from-the-dashboard-test.txt" in d.page_source, what="the preview's listing")
        assert driver.current_url == preview_url + "/"
        driver.close()
        driver.switch_to.window(dashboard)

        # Public and back: a request with no credentials gets through, then no longer.
        assert preview_status(server, port) == 401
        click(driver, port, "visibility")
        wait(driver, lambda d: cells(d, port)[4].startswith("public"), what="the port to turn public")
        assert preview_status(server, port) == 200
        assert row(driver, port).find_element(By.CSS_SELECTOR, "a.preview").get_attribute("href") == preview_url + "/"
        click(driver, port, "visibility")
        wait(driver, lambda d: cells(d, port)[4].startswith("private"), what="the port to turn private")
        assert preview_status(server, port) == 401

        # A kill the server refuses is said plainly: this test's own listener is an ancestor's.
        own = socket.create_server(("127.0.0.1", 0))
        own_port = own.getsockname()[1]
        try:
            wait(driver, lambda d: row(d, own_port), what="the test's own listener")
            click(driver, own_port, "kill")
            assert str(own_port) in accept_confirmation(driver)
            error = wait(driver, lambda d: d.find_element(By.ID, "errors").text, 5, "the refusal")
            assert f"port {own_port} is held by pid {os.getpid()}, the caller's own process" in error
            assert row(driver, own_port).find_element(By.CSS_SELECTOR, 'button[data-action="kill"]').is_enabled()
            assert row(driver, own_port) is not None
        finally:
            own.close()

        # Kill, confirmed: the process dies and its row goes; the registry says so.
        click(driver, port, "kill")
        assert f"port {port}" in accept_confirmation(driver)
        assert http_server.wait(10) is not None
        wait(driver, lambda d: row(d, port) is None, what="the killed port's row to go")
        wait(
            driver,
            lambda d: "not listening" in d.find_element(By.CSS_SELECTOR, '#registry tr[data-key="site"]').text,
            what="the registry entry to say not listening",
        )

        # A server that daemonizes: its row follows the `update`s in place, without a reload:
        # the second address, then the child that holds the sockets once the parent exits.
        forker_port = free_port()
        forker = subprocess.Popen(
            [sys.executable, "-c", DAEMONIZING.format(port=forker_port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        procs.append(forker)
        wait(driver, lambda d: cells(d, forker_port)[2:4] == [str(forker.pid), "127.0.0.1"], what="the forker's row")
        shown = row(driver, forker_port)
        forker.stdin.write(b"\n")
        forker.stdin.flush()
        child = int(forker.stdout.readline())
        wait(driver, lambda d: cells(d, forker_port)[3] == "127.0.0.1, ::1", what="the row's second address")
        forker.stdin.close()  # the parent exits; the child holds both sockets
        try:
            wait(
                driver,
                lambda d: [cells(d, forker_port)[1].split("\n")[0], cells(d, forker_port)[2]] == [proc_comm(child), str(child)],
                what="the row's new owner",
            )
            assert row(driver, forker_port) == shown
        finally:
            os.kill(child, 9)

        # More samples of the open-to-row latency, and of close-to-row-gone.
        gone = []
        for _ in range(4):
            sample_port = free_port()
            proc, listening = timed_http_server(sample_port, site)
            procs.append(proc)
            wait(driver, lambda d: row(d, sample_port), what=f"port {sample_port}'s row")
            latencies.append(driver.execute_script(f"return window.rowTimes['{sample_port}'].shown") - listening * 1000)
            killed = time.time()
            proc.kill()
            proc.wait()
            wait(driver, lambda d: row(d, sample_port) is None, what=f"port {sample_port}'s row to go")
            gone.append(driver.execute_script(f"return window.rowTimes['{sample_port}'].gone") - killed * 1000)
        report = (
            f"backend {backend_of(server)}: "
            f"listen -> row shown (ms): {', '.join(f'{v:.1f}' for v in latencies)}; median {statistics.median(latencies):.1f}\n"
            f"kill -> row gone (ms): {', '.join(f'{v:.1f}' for v in gone)}; median {statistics.median(gone):.1f}\n"
        )
        print(report)
        (ARTIFACTS / "dashboard-latency.txt").write_text(report)
        assert max(latencies) < 2000 and max(gone) < 2000

        # The server goes away and comes back on the same port: the page says both, and the
        # server's snapshot replaces the table (a port that closed meanwhile goes).
        survivor_port, doomed_port, newcomer_port = free_port(), free_port(), free_port()
        for number in (survivor_port, doomed_port):
            procs.append(timed_http_server(number, site)[0])
            wait(driver, lambda d: row(d, number), what=f"port {number}'s row")
        server.stop()
        wait(driver, lambda d: connection(d) == "lost", what="the page to say the connection is lost")
        assert "connection lost (the server stopped) — reconnecting" in driver.find_element(By.ID, "connection").text
        screenshot(driver, "dashboard-lost.png")
        procs[-1].kill()
        procs[-1].wait()
        procs.append(timed_http_server(newcomer_port, site)[0])
        assert row(driver, doomed_port) is not None and row(driver, newcomer_port) is None  # the last state known
        server = Server("auto", state, "--project-id", PROJECT, port=server.port)
        servers.append(server)
        wait(driver, lambda d: connection(d) == "reconnected", 15, "the page to reconnect")
        wait(
            driver,
            lambda d: row(d, newcomer_port) and row(d, survivor_port) and not row(d, doomed_port),
            what="the table to be replaced by the new snapshot",
        )
        screenshot(driver, "dashboard-reconnected.png")

        # Back with another token: the cookie no longer opens anything, and the page says so.
        server.stop()
        server = Server("auto", state, "--project-id", PROJECT, "--token", "another-token", port=server.port)
        servers.append(server)
        wait(driver, lambda d: connection(d) == "signed-out", 20, "the page to say it is signed out")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for srv in servers:
            srv.stop()


def backend_of(server: Server) -> str:
    return next((line.get("backend") for line in server.log if line.get("msg") == "serving"), "?")
