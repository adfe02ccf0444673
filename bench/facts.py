"""listen() returning in this process -> the `open` message read by one WebSocket client, and
close() -> `close`, for `aether serve` as it is and for another checkout (the baseline: the
code before each port's protocol, command line and attributes were looked into after its
event), measured in the same run, in alternating rounds so that the machine's load falls on
both alike. Each open's look (a connection to the port, which here never answers) and
command-line read happen while the next cycles run.

    .venv/bin/python bench/facts.py --baseline /tmp/old-checkout [--cycles 300] [--rounds 4] [--hold 0.06]

With ``--hold 0.06`` each port stays open long enough to be looked at (10 ms settle, 50 ms
banner wait), so every cycle's lookups and probe connection run; without it, ports close
before the settle and the figure is the event path alone.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import ROOT, fmt, stop, summary
from server import free_port, start_server, ws_receiver


def cycles_of(tree: Path, cycles: int, port: int, hold: float) -> tuple[list[float], list[float]]:
    from websockets.sync.client import connect

    proc, sport, token = start_server("ebpf", tree=tree)
    opens, closes = [], []
    try:
        with connect(f"ws://127.0.0.1:{sport}/workspaces/bench/ws", subprotocols=["Bearer", token]) as ws:
            time.sleep(1.0)  # past the start-up's looks at the ports already open
            receive = ws_receiver(ws)
            import socket

            for _ in range(cycles):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
                s.listen()
                t0 = time.perf_counter_ns()
                receive(port, "open")
                opens.append((time.perf_counter_ns() - t0) / 1e6)
                if hold:
                    time.sleep(hold)
                s.close()
                t0 = time.perf_counter_ns()
                receive(port, "close")
                closes.append((time.perf_counter_ns() - t0) / 1e6)
    finally:
        stop(proc)
    return opens, closes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", type=Path, required=True, help="a checkout of the code to compare with")
    parser.add_argument("--cycles", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--hold", type=float, default=0.0, help="seconds each port stays open: 0.06 lets every port be looked at before it closes"
    )
    args = parser.parse_args()
    port = free_port()
    results = {"baseline": ([], []), "this": ([], [])}
    for _ in range(args.rounds):
        for name, tree in (("baseline", args.baseline), ("this", ROOT)):
            opens, closes = cycles_of(tree, args.cycles, port, args.hold)
            results[name][0].extend(opens)
            results[name][1].extend(closes)
    for name, label in (("baseline", f"baseline ({args.baseline})"), ("this", "this checkout")):
        print(f"{label:<44} open:  {fmt(summary(results[name][0]))}")
        print(f"{'':<44} close: {fmt(summary(results[name][1]))}", flush=True)
    base, this = summary(results["baseline"][0]), summary(results["this"][0])
    print(f"open p50 ratio this/baseline: {this['p50'] / base['p50']:.2f}; p99: {this['p99'] / base['p99']:.2f}")


if __name__ == "__main__":
    main()
