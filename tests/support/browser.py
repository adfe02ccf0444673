"""Debian's Chromium driven by selenium through Debian's chromedriver, for the dashboard's test
and benchmark: headless, with a fresh profile, and kept off the network (the test host has none:
without these flags Chromium keeps trying to reach Google's services).

Also what both measure with: a listener that prints the moment it listens, and an observer in
the page that stamps the moment a port's row appears or goes. Browser and test read the same
system clock, so the difference is the whole path: probe, server, WebSocket, page, DOM. And
what the dashboard's tests do with the page: wait for it, find a port's row, press its buttons,
save screenshots to ``test-artifacts/``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support import ROOT

#: Where screenshots (and the dashboard test's latency report) are saved.
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--metrics-recording-only",
    "--window-size=1360,860",
]

#: Records, per port, when its row appeared and went (``Date.now()``), in ``window.rowTimes``.
ROW_TIMES_JS = """
window.rowTimes = window.rowTimes || {};
if (!window.rowObserver) {
  const stamp = (nodes, key) => {
    for (const node of nodes) {
      if (node.nodeType === 1 && node.dataset.port) {
        const times = window.rowTimes[node.dataset.port] = window.rowTimes[node.dataset.port] || {};
        if (times[key] === undefined) times[key] = Date.now();
      }
    }
  };
  window.rowObserver = new MutationObserver((records) => {
    const now = new Set([...document.querySelectorAll('#ports tbody tr')].map((tr) => tr.dataset.port));
    for (const record of records) {
      stamp(record.addedNodes, 'shown');
      stamp([...record.removedNodes].filter((n) => n.nodeType === 1 && !now.has(n.dataset.port)), 'gone');
    }
  });
  window.rowObserver.observe(document.querySelector('#ports tbody'), {childList: true});
}
"""

#: ``python - PORT DIRECTORY``: http.server on 127.0.0.1:PORT serving DIRECTORY, printing
#: ``time.time()`` the moment it listens (ThreadingHTTPServer's constructor binds and listens).
TIMED_HTTP_SERVER = """
import functools, http.server, sys, time
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[2])
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), handler)
print(time.time(), flush=True)
server.serve_forever()
"""


def chromium(profile: Path, flags: tuple[str, ...] = ()):
    """A selenium WebDriver for Debian's Chromium (with ``flags`` besides its own); fails
    plainly when it is not installed."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not shutil.which(path):
            pytest.fail(f"{path} is missing: deploy/setup.sh installs Debian's {package}")
    # The driver's path is given, so Selenium Manager is skipped; offline in case it were not.
    os.environ["SE_OFFLINE"] = "true"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, *flags):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    service = Service(executable_path=CHROMEDRIVER, log_output=subprocess.DEVNULL)
    return webdriver.Chrome(options=options, service=service)


def timed_http_server(port: int, directory: Path) -> tuple[subprocess.Popen, float]:
    """A listening http.server and the ``time.time()`` at which it started to listen."""
    proc = subprocess.Popen(
        [sys.executable, "-c", TIMED_HTTP_SERVER, str(port), str(directory)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise AssertionError(f"http.server on {port} did not start: exit {proc.wait()}")
    return proc, float(line)


def wait(driver, predicate, timeout: float = 10.0, what: str = "the page"):
    """Until ``predicate(driver)`` is truthy (its value), within ``timeout`` seconds; at the
    deadline, a screenshot of the page and an AssertionError naming ``what``."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.02).until(predicate)
    except TimeoutException:
        screenshot(driver, "dashboard-failure.png")
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; see test-artifacts/dashboard-failure.png") from None


def screenshot(driver, name: str) -> None:
    """The page from its top, saved as ``test-artifacts/NAME``."""
    ARTIFACTS.mkdir(exist_ok=True)
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(ARTIFACTS / name))


def row(driver, port: int):
    """The dashboard's row for ``port``, or None."""
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, f'#ports tr[data-port="{port}"]')
    return rows[0] if rows else None


def cells(driver, port: int) -> list[str]:
    from selenium.webdriver.common.by import By

    found = row(driver, port)
    return [td.text for td in found.find_elements(By.TAG_NAME, "td")] if found else []


def connection(driver) -> str:
    """The page's WebSocket state, as it shows it (``body[data-connection]``)."""
    return driver.execute_script("return document.body.dataset.connection || ''")


def press(driver, element) -> None:
    """Click ``element`` once it is in the middle of the window: scrolled to the top, the
    dashboard's sticky header (the connection's state) would take the click."""
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    element.click()


def click(driver, port: int, action: str) -> None:
    """Press the button for ``action`` in ``port``'s row."""
    from selenium.webdriver.common.by import By

    press(driver, row(driver, port).find_element(By.CSS_SELECTOR, f'button[data-action="{action}"]'))
