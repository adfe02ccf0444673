"""Debian's Chromium driven by selenium through Debian's chromedriver, for the dashboard's test
and benchmark: headless, with a fresh profile, and kept off the network (the test host has none:
without these flags Chromium keeps trying to reach Google's services).

Also what both measure with: a listener that prints the moment it listens, and an observer in
the page that stamps the moment a port's row appears or goes. Browser and test read the same
system clock, so the difference is the whole path: probe, server, WebSocket, page, DOM.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
