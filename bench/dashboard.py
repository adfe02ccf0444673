"""The dashboard in Debian's Chromium: from an http.server starting to listen to its row in the
page's DOM, and from its process being killed to its row going, beside a plain WebSocket client
(the `websockets` library) receiving the same `open` in the same run.

Both clocks are the host's: the listener prints `time.time()` right after `listen()`, the
page stamps `Date.now()` in a MutationObserver when the row is inserted or removed.

    .venv/bin/python bench/dashboard.py [--samples 20] [--backend auto] [--burst 1000]

``--burst N`` then opens N ports at once (listening sockets of this process) and closes them
at once: the time until the page shows every row, and until every row is gone, beside the
websockets client's last ``open`` and ``close``; and how long the page's main thread stalled
meanwhile (the longest gap between its 50 ms ticks).
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
    parser.add_argument("--burst", type=int, default=0, help="then N ports at once (0: no burst)")
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
            with connect(server.url, subprotocols=["Bearer", server.token], max_queue=None) as ws:
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
                burst = measure_burst(driver, ws, args.burst) if args.burst else None
        finally:
            driver.quit()
            server.stop()
    print(f"backend {backend}, {args.samples} samples")
    print(f"listen() -> open message at a websockets client (upper bound, includes its recv): {fmt(summary(ws_open))}")
    print(f"listen() -> row in the dashboard's DOM (Chromium):                              {fmt(summary(shown))}")
    print(f"SIGKILL  -> row gone from the dashboard's DOM:                                  {fmt(summary(gone))}")
    if burst is not None:
        print(
            f"{args.burst} ports at once: every open at the websockets client {burst['ws_open']:.0f} ms, "
            f"every row in the DOM {burst['shown']:.0f} ms; closed at once: every close {burst['ws_close']:.0f} ms, "
            f"every row gone {burst['gone']:.0f} ms; the page's longest stall {burst['stall']:.0f} ms"
        )


#: Stamps the page's longest main-thread stall: the biggest gap between 50 ms ticks.
STALL_JS = """
window.stall = 0; window.lastTick = Date.now();
window.stallTimer = setInterval(() => {
  const now = Date.now(); window.stall = Math.max(window.stall, now - window.lastTick - 50); window.lastTick = now;
}, 50);
"""


def measure_burst(driver, ws, count: int) -> dict:
    import socket

    from selenium.webdriver.support.ui import WebDriverWait

    def until(kind: str, ports: set[int]) -> float:
        while ports:
            message = json.loads(ws.recv(timeout=30))
            if message.get("type") == kind:
                ports.discard(message.get("port"))
        return time.time()

    driver.execute_script(STALL_JS)
    sockets = []
    started = time.time()
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        sockets.append(sock)
    ports = {sock.getsockname()[1] for sock in sockets}
    ws_open = until("open", set(ports)) - started
    listed = "[" + ",".join(f"'{p}'" for p in ports) + "]"
    every = f"return {listed}.every((p) => (window.rowTimes[p] || {{}}).%s)"
    WebDriverWait(driver, 120, poll_frequency=0.05).until(lambda d: d.execute_script(every % "shown"))
    shown = max(driver.execute_script(f"return {listed}.map((p) => window.rowTimes[p].shown)")) / 1000 - started
    closed = time.time()
    for sock in sockets:
        sock.close()
    ws_close = until("close", set(ports)) - closed
    WebDriverWait(driver, 120, poll_frequency=0.05).until(lambda d: d.execute_script(every % "gone"))
    gone = max(driver.execute_script(f"return {listed}.map((p) => window.rowTimes[p].gone)")) / 1000 - closed
    stall = driver.execute_script("return window.stall")
    return {"ws_open": ws_open * 1000, "shown": shown * 1000, "ws_close": ws_close * 1000, "gone": gone * 1000, "stall": stall}


if __name__ == "__main__":
    main()
