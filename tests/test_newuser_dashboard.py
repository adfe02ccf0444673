"""The dashboard opened as a new user opens it: after the dev server is up. A port that
answered before the page connected shows its ready time (the ``ready`` of its ``open``), not
"not answering yet". Debian's Chromium against a real `aether serve` on the probe."""

from __future__ import annotations

import pytest
from support.browser import chromium
from support.clients import recv_until
from support.ebpf import need_ebpf
from support.servers import Server
from support.waiting import wait_for
from websockets.sync.client import connect

PROBE_FIXTURES = ("server",)


@pytest.fixture
def server(tmp_path):
    need_ebpf()
    srv = Server("ebpf", tmp_path / "state")
    yield srv
    srv.stop()


@pytest.fixture
def driver(tmp_path):
    browser = chromium(tmp_path / "profile")
    yield browser
    browser.quit()


def test_a_port_ready_before_the_page_opened_shows_its_ready_time(server, listeners, driver):
    from selenium.webdriver.common.by import By

    with connect(server.url, subprotocols=["Bearer", server.token], open_timeout=10) as ws:
        port = listeners.http_server().port
        ready = recv_until(ws, lambda m: m.get("type") == "ready" and m.get("port") == port, timeout=15)
    driver.get(f"http://127.0.0.1:{server.port}/?token={server.token}")

    def shown() -> str | None:
        rows = driver.find_elements(By.CSS_SELECTOR, f'#ports tbody tr[data-port="{port}"]')
        text = rows[0].text if rows else ""
        return text if "http" in text.split() else None

    text = wait_for(shown, 15)
    assert f"ready in {ready['ms']} ms" in text, text
    assert "not answering yet" not in text


@pytest.mark.ebpf
def test_a_port_open_before_the_server_started_is_answering_without_a_time(tmp_path, listeners, driver):
    """Its ``ready`` counts from the server's start (the port is older), so a time in ms would
    say how long aether took to look, not the app to start."""
    from selenium.webdriver.common.by import By

    need_ebpf()
    port = listeners.http_server().port
    server = Server("ebpf", tmp_path / "state")
    try:
        with connect(server.url, subprotocols=["Bearer", server.token], open_timeout=10) as ws:
            recv_until(ws, lambda m: m.get("port") == port and m.get("ready") is not None, timeout=15)
        driver.get(f"http://127.0.0.1:{server.port}/?token={server.token}")

        def shown() -> str | None:
            rows = driver.find_elements(By.CSS_SELECTOR, f'#ports tbody tr[data-port="{port}"]')
            text = rows[0].text if rows else ""
            return text if "http" in text.split() else None

        text = wait_for(shown, 15)
        assert "answering" in text.split("\n") and "ready in" not in text and "not answering" not in text, text
    finally:
        server.stop()
