"""What the tests (and benchmarks) share besides fixtures: starting and stopping real servers
and listeners, waiting for events with a deadline, and talking to `aether serve` over a raw
WebSocket. ``tests/conftest.py`` holds the fixtures only, built from these.

- :mod:`support.waiting`: ``wait_for`` (and ``until`` for a running event loop)
- :mod:`support.ports`: free ports, the kernel's listening ports, retrying a start whose port was taken
- :mod:`support.processes`: ``aether`` and other tools as commands, stopping processes, their state in /proc
- :mod:`support.ebpf`: whether the probe can load here (``need_ebpf``)
- :mod:`support.servers`: `aether serve` (``Server``, ``module_server``) and `aether ports watch` (``Watcher``)
- :mod:`support.listeners`: real listening processes (http.server, node, nginx, TLS, not HTTP)
- :mod:`support.certs`: self-signed certificates made by openssl
- :mod:`support.clients`: WebSocket messages, raw upgrades and frames
- :mod:`support.browser`: Debian's Chromium under selenium, and the dashboard's page in it
- :mod:`support.redis`: a real ``redis-server``, and a Sentinel watching it
- :mod:`support.netns`: other hosts, as network namespaces a veth pair away
- :mod:`support.docker`: a dockerd of a test's own (``Dockerd``), its busybox image made here
- :mod:`support.fleet`: ``aether gateway`` (``Gateway``) and requests to it
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
AETHER = [sys.executable, "-m", "aether"]
