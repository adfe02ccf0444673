"""Port attributes: what :meth:`Ruleset.resolve` costs on a port open, and what reading the
files costs, beside baselines measured in the same run.

- resolve, cached: the same (port, command line) again, beside a bare dict lookup.
- resolve, new port of a known program: ports and ranges looked at, the expressions' answer
  reused (a burst of listeners from one program).
- resolve, new command line: every expression run, for a typical config (a devcontainer
  template's rules and a few of the user's) and for the worst a file may hold (three files,
  each 1,000 rules of which 100 expressions), beside Python's ``re`` on the same expressions.
- load: three typical files from a real directory, and a devcontainer.json of MAX_BYTES.

    .venv/bin/python bench/attributes.py [--resolves 20000]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT

sys.path.insert(0, str(ROOT))

from aether.attributes import formats, sources  # noqa: E402
from aether.attributes.rules import Ruleset  # noqa: E402

COMMAND = "node /home/user/project/node_modules/.bin/vite --port 5173 --host 0.0.0.0 --strictPort"

TYPICAL_CONFIG = {
    "ports_attributes": {
        "5173": {"label": "vite", "on_open": "open"},
        "9229-9239": {"on_open": "ignore"},
        "manage\\.py runserver": {"label": "django"},
    },
    "other_ports_attributes": {"on_open": "notify"},
}
TYPICAL_DEVCONTAINER = {
    "forwardPorts": [3000, 5432],
    "portsAttributes": {
        "3000": {"label": "Application port", "onAutoForward": "openBrowser"},
        "40000-55000": {"onAutoForward": "ignore"},
        ".+\\/server.js": {"onAutoForward": "openPreview"},
    },
    "otherPortsAttributes": {"onAutoForward": "silent"},
}
TYPICAL_GITPOD = "ports:\n  - name: Web App\n    port: 8080\n    onOpen: open-browser\n  - port: 3000-8999\n    onOpen: ignore\n"


def per_call_us(fn, count: int) -> float:
    started = time.perf_counter()
    for i in range(count):
        fn(i)
    return (time.perf_counter() - started) / count * 1e6


def worst_layers() -> tuple[list, list[str]]:
    rules = {}
    patterns = []
    for i in range(formats.MAX_EXPRESSIONS):
        pattern = f"node .*server{i}\\.js --flag{i}"
        rules[pattern] = {"label": f"e{i}"}
        patterns.append(pattern)
    for i in range(formats.MAX_RULES - formats.MAX_EXPRESSIONS):
        rules[f"{10000 + i * 10}-{10000 + i * 10 + 5}" if i % 2 else str(1000 + i)] = {"label": f"p{i}"}
    config, _ = formats.from_config({"ports_attributes": rules})
    vscode = {"portsAttributes": {key: {"label": "x"} for key in rules}}
    dev, _ = formats.from_devcontainer(vscode)
    gitpod, _ = formats.from_gitpod({"ports": [{"port": key, "name": "x"} for key in rules if not key.startswith("node")]})
    return [config, dev, gitpod], patterns


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resolves", type=int, default=20000)
    args = parser.parse_args()
    n = args.resolves

    layers = [
        formats.from_config(TYPICAL_CONFIG)[0],
        formats.from_devcontainer(TYPICAL_DEVCONTAINER)[0],
        formats.from_gitpod(sources._yaml(TYPICAL_GITPOD))[0],
    ]
    typical = Ruleset(layers)
    table = {3000: object()}
    print(f"baseline  dict lookup                              {per_call_us(lambda i: table.get(3000), n):8.2f} µs")
    typical.resolve(5173, COMMAND)
    print(
        f"resolve   cached (same port and command line)      {per_call_us(lambda i: typical.resolve(5173, COMMAND), n):8.2f} µs"
    )
    typical.resolve(1, COMMAND)
    print(
        f"resolve   new port, known command line (typical)   {per_call_us(lambda i: typical.resolve(10000 + i, COMMAND), n):8.2f} µs"
    )
    fresh = n // 4
    print(
        f"resolve   new command line (typical: 2 expressions) {per_call_us(lambda i: typical.resolve(5173, f'{COMMAND} {i}'), fresh):8.2f} µs"
    )

    worst, patterns = worst_layers()
    heavy = Ruleset(worst)
    count = max(20, n // 100)
    print(
        f"resolve   new command line (worst: 3 files x 1,000 rules, 200 expressions) "
        f"{per_call_us(lambda i: heavy.resolve(10005, f'{COMMAND} {i}'), count):8.1f} µs"
    )
    heavy.resolve(1, COMMAND)
    print(
        f"resolve   new port, known command line (worst)     {per_call_us(lambda i: heavy.resolve(20000 + i, COMMAND), count):8.1f} µs"
    )
    compiled = [re.compile(pattern) for pattern in patterns] * 2
    print(
        f"baseline  Python re, the same 200 expressions      "
        f"{per_call_us(lambda i: [p.search(f'{COMMAND} {i}') for p in compiled], count):8.1f} µs"
    )
    long = COMMAND + " x" * 2000
    print(
        f"resolve   new 4 KiB command line (worst)           "
        f"{per_call_us(lambda i: heavy.resolve(10005, f'{i} {long}'), count):8.1f} µs"
    )

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp).resolve()
        (root / ".devcontainer").mkdir()
        (root / ".devcontainer" / "devcontainer.json").write_text("// a comment\n" + json.dumps(TYPICAL_DEVCONTAINER, indent=2))
        (root / ".gitpod.yml").write_text(TYPICAL_GITPOD)
        loads = 200
        print(
            f"load      three typical files                      "
            f"{per_call_us(lambda i: sources.load(root, TYPICAL_CONFIG), loads) / 1000:8.2f} ms"
        )
        big = {"portsAttributes": {str(p): {"label": f"port {p}", "onAutoForward": "silent"} for p in range(1, 1001)}}
        rest = "/* big */\n" + json.dumps(big, indent=1)
        # The rest of the file up to MAX_BYTES: a long comment, as the reader must blank it.
        text = rest + "\n/* " + "x" * (sources.MAX_BYTES - len(rest) - 10) + " */\n"
        (root / ".devcontainer" / "devcontainer.json").write_text(text)
        (root / ".gitpod.yml").unlink()
        rules, problems = sources.load(root)
        assert len(rules) == 1000 and not problems, problems
        print(
            f"load      devcontainer.json of {len(text.encode()) // 1024} KiB, 1,000 rules     "
            f"{per_call_us(lambda i: sources.load(root), 20) / 1000:8.2f} ms"
        )


if __name__ == "__main__":
    main()
