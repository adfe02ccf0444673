"""The dashboard in Debian's Chromium: from an http.server starting to listen to its row in the
page's DOM, and from its process being killed to its row going, beside a plain WebSocket client
(the `websockets` library) receiving the same `open` in the same run.

Both clocks are the host's: the listener prints `time.time()` right after `listen()`, the
page stamps `Date.now()` in a MutationObserver when the row is inserted or removed.

    .venv/bin/python bench/dashboard.py [--samples 20] [--backend auto]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, fmt, summary

sys.path.insert(0, str(ROOT / "tests"))
from support.browser import ROW_TIMES_JS, chromium, timed_http_server  # noqa: E402
from support.ports import free_port  # noqa: E402
from support.servers import Server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    from selenium.webdriver.support.ui import WebDriverWait
    from websockets.sync.client import connect

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        server = Server(args.backend, tmp / "state")
        driver = chromium(tmp / "profile")
        try:
            backend = next(line["backend"] for line in server.log if line.get("msg") == "serving")
            driver.get(f"http://127.0.0.1:{server.port}/?token={server.token}")
            WebDriverWait(driver, 10).until(lambda d: d.execute_script("return document.body.dataset.connection") == "connected")
            driver.execute_script(ROW_TIMES_JS)
            shown, gone, ws_open = [], [], []
            with connect(server.url, subprotocols=["Bearer", server.token]) as ws:
                for _ in range(args.samples):
                    port = free_port()
                    proc, listening = timed_http_server(port, tmp)
                    while True:  # the plain client's `open`, as the baseline
                        message = json.loads(ws.recv(timeout=10))
                        if message.get("port") == port and message["type"] == "open":
                            ws_open.append((time.time() - listening) * 1000)
                            break
                    times = WebDriverWait(driver, 10, poll_frequency=0.01).until(
                        lambda d: d.execute_script(f"return (window.rowTimes['{port}'] || {{}}).shown")
                    )
                    shown.append(times - listening * 1000)
                    killed = time.time()
                    proc.kill()
                    proc.wait()
                    gone.append(
                        WebDriverWait(driver, 10, poll_frequency=0.01).until(
                            lambda d: d.execute_script(f"return (window.rowTimes['{port}'] || {{}}).gone")
                        )
                        - killed * 1000
                    )
        finally:
            driver.quit()
            server.stop()
    print(f"backend {backend}, {args.samples} samples")
    print(f"listen() -> open message at a websockets client (upper bound, includes its recv): {fmt(summary(ws_open))}")
    print(f"listen() -> row in the dashboard's DOM (Chromium):                              {fmt(summary(shown))}")
    print(f"SIGKILL  -> row gone from the dashboard's DOM:                                  {fmt(summary(gone))}")


if __name__ == "__main__":
    main()
