"""What a person sees in the dashboard, in Debian's Chromium: the filter, hiding a port or a
process (kept across a reload), the browser's and aether's own ports hidden until asked, a
label written to the registry through its REST API with the page's cookie (and what that
cookie may not do), the copy button, and no horizontal scroll at 700 px and on a 390 px phone.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time

import pytest
from support.browser import click, connection, press, row, screenshot, timed_http_server, wait
from support.ports import free_port
from support.processes import proc_comm
from support.servers import Server

PROJECT = "c0ffee12"


def request(server: Server, method: str, path: str, body: dict | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request(method, path, None if body is None else json.dumps(body), headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, (json.loads(data) if data else None)


def bearer(server: Server) -> dict:
    return {"Authorization": f"Bearer {server.token}"}


def dashboard_cookie(server: Server, origin: str | None) -> dict:
    from aether.server import cookie

    headers = {"Cookie": f"{cookie.NAME}={cookie.value(server.token)}"}
    if origin:
        headers["Origin"] = origin
    return headers


def shown_ports(driver) -> set[int]:
    return set(driver.execute_script("return [...document.querySelectorAll('#ports tbody tr')].map((tr) => +tr.dataset.port)"))


def no_horizontal_scroll(driver) -> str:
    """'' when neither the page nor a section scrolls sideways and every row's buttons are in
    sight; else what overflows."""
    return driver.execute_script(
        """
        const width = document.documentElement.clientWidth;
        if (document.documentElement.scrollWidth > width) return `page ${document.documentElement.scrollWidth} > ${width}`;
        for (const s of document.querySelectorAll('section')) {
          if (s.scrollWidth > s.clientWidth + 1) return `section ${s.id || s.className} ${s.scrollWidth} > ${s.clientWidth}`;
        }
        for (const b of document.querySelectorAll('#ports button')) {
          const r = b.getBoundingClientRect();
          const out = r.right > width + 0.5 || r.left < 0;
          if (!b.hidden && out) return `button ${b.textContent} at ${r.left}-${r.right} of ${width}`;
        }
        return '';
        """
    )


@pytest.mark.ebpf
@pytest.mark.slow
def test_filter_hide_label_copy_and_narrow_widths(driver, tmp_path):
    from selenium.webdriver.common.by import By

    site = tmp_path / "site"
    site.mkdir()
    first_port, second_port = free_port(), free_port()
    early, _ = timed_http_server(first_port, site)  # open before the server: its owner's start time
    server = Server("auto", tmp_path / "state", "--project-id", PROJECT)
    procs = [early]
    try:
        late, _ = timed_http_server(second_port, site)
        procs.append(late)
        driver.get(f"http://127.0.0.1:{server.port}/?token={server.token}")
        wait(driver, lambda d: connection(d) == "connected", what="the WebSocket to connect")
        wait(driver, lambda d: row(d, first_port) and row(d, second_port), what="both servers' rows")

        # The port that was open before the server says how long at most, from its owner's start.
        open_for = row(driver, first_port).find_element(By.CSS_SELECTOR, "td.duration")
        assert open_for.text.startswith("≤ "), open_for.text
        assert "its process started at" in open_for.get_attribute("title")
        assert row(driver, second_port).find_element(By.CSS_SELECTOR, "td.duration").text[0].isdigit()

        # The browser's own ports (chromedriver's, Chromium's devtools) are hidden until asked for.
        driver_port = int(driver.service.service_url.rsplit(":", 1)[1].strip("/"))
        assert driver_port not in shown_ports(driver)
        toggle = driver.find_element(By.ID, "show-hidden")
        assert toggle.text.startswith("show ") and toggle.text.endswith(" hidden")
        press(driver, toggle)
        wait(driver, lambda d: row(d, driver_port), what="the driver's row once shown")
        assert "(browser)" in row(driver, driver_port).text
        press(driver, toggle)
        wait(driver, lambda d: row(d, driver_port) is None, what="the driver's row hidden again")

        # The filter: one port by its number, then nothing, then both again.
        box = driver.find_element(By.ID, "filter")
        box.send_keys(str(second_port))
        wait(driver, lambda d: shown_ports(d) == {second_port}, what="the filter to leave one row")
        assert "(1 of " in driver.find_element(By.ID, "port-count").text
        box.send_keys("no-such-thing")
        wait(driver, lambda d: not shown_ports(d), what="the filter to leave none")
        assert driver.find_element(By.ID, "all-filtered").text == "No port matches the filter."
        box.clear()
        box.send_keys(" ")  # clear() fires no input event
        wait(driver, lambda d: {first_port, second_port} <= shown_ports(d), what="the filter cleared")

        # Hide one port: gone, and still gone after a reload; shown faded on request; unhidden.
        click(driver, first_port, "hide-port")
        wait(driver, lambda d: row(d, first_port) is None, what="the hidden port's row to go")
        driver.refresh()
        wait(driver, lambda d: connection(d) == "connected" and row(d, second_port), what="the page after a reload")
        assert row(driver, first_port) is None
        press(driver, driver.find_element(By.ID, "show-hidden"))
        wait(driver, lambda d: row(d, first_port), what="the hidden row on request")
        assert "hidden-row" in row(driver, first_port).get_attribute("class")
        unhide = row(driver, first_port).find_element(By.CSS_SELECTOR, 'button[data-action="hide-port"]')
        assert unhide.text == "unhide"
        press(driver, unhide)
        wait(driver, lambda d: "hidden-row" not in (row(d, first_port).get_attribute("class") or ""), what="unhidden")
        press(driver, driver.find_element(By.ID, "show-hidden"))  # back to hiding aether's and the browser's

        # Hide a process: every row of that program goes at once.
        name = proc_comm(late.pid)
        click(driver, second_port, "hide-process")
        wait(driver, lambda d: row(d, first_port) is None and row(d, second_port) is None, what="the process's rows to go")
        assert name in json.loads(driver.execute_script("return localStorage.getItem('aether.dashboard.hidden')"))["processes"]
        driver.execute_script("localStorage.removeItem('aether.dashboard.hidden')")
        driver.refresh()
        wait(driver, lambda d: connection(d) == "connected" and row(d, first_port) and row(d, second_port))

        # A label, through the registry: the port gets an entry named after it, shown in the row.
        click(driver, second_port, "label")
        prompt = driver.switch_to.alert
        assert str(second_port) in prompt.text
        prompt.send_keys("web")
        prompt.accept()
        wait(driver, lambda d: row(d, second_port).find_element(By.CSS_SELECTOR, ".label").text == "web", what="the label")
        status, entry = request(server, "GET", "/api/ports/web", headers=bearer(server))
        assert status == 200 and entry["port"] == second_port and entry["label"] == "web"
        # Changed again, on the entry the port has now.
        click(driver, second_port, "label")
        prompt = driver.switch_to.alert
        prompt.send_keys("api")  # in place of the current label
        prompt.accept()
        wait(driver, lambda d: row(d, second_port).find_element(By.CSS_SELECTOR, ".label").text == "api", what="the new label")
        assert request(server, "GET", "/api/ports/web", headers=bearer(server))[1]["label"] == "api"

        # The cookie sets a label and nothing else, and only with this origin's Origin.
        origin = f"http://127.0.0.1:{server.port}"
        path = "/api/ports/web"
        assert request(server, "PUT", path, {"port": second_port, "label": "x"}, dashboard_cookie(server, None))[0] == 401
        assert (
            request(server, "PUT", path, {"port": second_port, "label": "x"}, dashboard_cookie(server, "http://evil.test"))[0]
            == 401
        )
        status, answer = request(server, "PUT", path, {"port": first_port, "label": "x"}, dashboard_cookie(server, origin))
        assert status == 409 and answer["error"] == "conflict"
        status, answer = request(server, "PUT", path, {"port": second_port, "app": "x"}, dashboard_cookie(server, origin))
        assert status == 403 and answer["error"] == "forbidden"
        assert request(server, "GET", path, dashboard_cookie(server, origin))[0] == 401
        assert request(server, "DELETE", path, headers=dashboard_cookie(server, origin))[0] == 401
        assert request(server, "GET", path, headers=bearer(server))[1]["port"] == second_port

        # Copy the preview's URL.
        driver.execute_cdp_cmd(
            "Browser.grantPermissions",
            {"origin": origin, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]},
        )
        click(driver, second_port, "copy")
        wait(driver, lambda d: row(d, second_port).find_element(By.CSS_SELECTOR, "button.copy").text == "copied")
        copied = driver.execute_async_script("navigator.clipboard.readText().then(arguments[0], (e) => arguments[0](String(e)))")
        assert copied == f"http://{second_port}-{PROJECT[:6]}.preview.localhost:{server.port}"

        # Narrow: a 700 px window, then a 390 px phone; nothing scrolls sideways, buttons in reach.
        driver.set_window_size(700, 900)
        wait(driver, lambda d: d.execute_script("return document.documentElement.clientWidth") <= 700)
        assert no_horizontal_scroll(driver) == ""
        screenshot(driver, "dashboard-700.png")
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride", {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True}
        )
        wait(driver, lambda d: d.execute_script("return document.documentElement.clientWidth") == 390)
        press(driver, driver.find_element(By.ID, "show-hidden"))  # the widest rows too: the browser's
        wait(driver, lambda d: row(d, driver_port))
        assert no_horizontal_scroll(driver) == ""
        screenshot(driver, "dashboard-390.png")
        press(driver, row(driver, second_port).find_element(By.CSS_SELECTOR, 'button[data-action="kill"]'))
        driver.switch_to.alert.dismiss()  # reachable: it asked
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        server.stop()


def test_label_in_the_registry(tmp_path):
    """``Registry.label``: creates at a port, relabels, clears, never moves a key."""
    from aether.registry.store import Registry, RegistryError

    with Registry(tmp_path / "registry.db") as registry:
        assert registry.label("web", 5173, "ui").label == "ui"
        registry.set("api", 8000, app="shop", description="the API")
        entry = registry.label("api", 8000, "backend")
        assert (entry.app, entry.label, entry.description) == ("shop", "backend", "the API")
        assert registry.label("api", 8000, "").label is None
        with pytest.raises(RegistryError) as moved:
            registry.label("api", 8001, "x")
        assert moved.value.code == "conflict"
        with pytest.raises(RegistryError) as taken:
            registry.label("other", 8000, "x")
        assert taken.value.code == "conflict"
        with pytest.raises(RegistryError):
            registry.label("api", 8000, "two words")
        assert registry.get("api").port == 8000 and registry.get("other") is None


def test_started_is_sent_for_ports_open_before_the_server(tmp_path):
    before = time.time() * 1000
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import socket,sys; s=socket.create_server(('127.0.0.1',{port})); print(1,flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    proc.stdout.readline()
    server = Server("sockdiag", tmp_path / "state")
    try:
        with server.connect() as ws:
            while True:
                message = json.loads(ws.recv(timeout=10))
                if message.get("type") == "open" and message["port"] == port:
                    break
        assert message["seenAtStart"] is True
        # Clock ticks are 10 ms: the start time is within a tick of the test's own clock.
        assert before - 20 <= message["started"] <= message["opened"]
        assert "ownerStarted" not in message  # one name for one thing
    finally:
        proc.kill()
        proc.wait()
        server.stop()
