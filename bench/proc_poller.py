"""Baseline: what Gitpod and VS Code do. Re-read /proc/net/tcp{,6} every N seconds (default 2)
and print the same JSON lines as `aether ports watch`."""

import json
import sys
import time

INTERVAL = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0


def listening():
    ports = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "0A":
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


print("poller ready", file=sys.stderr, flush=True)
known = set()
while True:
    now = listening()
    for port in sorted(now - known):
        print(json.dumps({"channel": "ports", "type": "open", "port": port}), flush=True)
    for port in sorted(known - now):
        print(json.dumps({"channel": "ports", "type": "close", "port": port}), flush=True)
    known = now
    time.sleep(INTERVAL)
