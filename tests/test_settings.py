"""The one table of settings: what the command line, the environment and ``config.json`` give
is read through it, a bad value is one line naming where it was, and every variable the code
reads is in it. In-process (resolve and the kinds), plus whole ``aether`` processes where the
command line itself is the point."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import subprocess
import sys

import pytest
from support import AETHER, ROOT
from support.processes import aether

from aether import state
from aether.settings import kinds, markdown, sources
from aether.settings.serve import Settings, add_arguments, resolve
from aether.settings.table import BY_NAME, ENV, GATEWAY, GLOBAL, SERVE, SETTINGS, of


def _resolve(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return resolve(parser.parse_args(argv))


@pytest.fixture
def clean_env(monkeypatch):
    """No AETHER_* setting from the environment the tests run in."""
    for setting in SETTINGS:
        monkeypatch.delenv(setting.env, raising=False)
    return monkeypatch


def test_every_setting_of_serve_is_a_field_of_settings():
    fields = {field.name for field in dataclasses.fields(Settings)}
    read_into_others = {"token_file"}  # read into token and token_source
    computed = {"token_source", "preview_public_ports", "fleet_keys"}
    assert fields == {s.name for s in of(SERVE)} - read_into_others | computed


def test_names_flags_variables_and_keys_are_each_one_settings():
    for attribute in ("name", "env", "key"):
        values = [getattr(s, attribute) for s in SETTINGS if getattr(s, attribute)]
        assert len(values) == len(set(values)), attribute
    # A flag is one setting's on each command that takes it.
    for command in ("", "serve", "ports list", "ports watch", "ports kill", "doctor", "gateway", "fleet status"):
        flags = [s.flag for s in sources.flags_of(command)]
        assert len(flags) == len(set(flags)), command
    assert {s.scope for s in SETTINGS} == {SERVE, GLOBAL, ENV, GATEWAY}
    # The one variable read outside the table, for `aether port`'s start (see aether.state).
    assert state.ENV == BY_NAME["state_dir"].env


#: AETHER_* names in the code that are not settings: what aether sets for the processes it
#: starts, and the probe's compile-time macros.
NOT_SETTINGS = {
    "AETHER_APP",
    "AETHER_TERMINAL_SESSION",
    "AETHER_AGENT_CONVERSATION",
    "AETHER_RING_PAGES",
    "AETHER_PERF_BUFFER",
    "AETHER_PORT_KEY",
}


def test_every_variable_the_code_reads_is_a_setting():
    """An ``AETHER_*`` name anywhere in aether/ is a setting of the table (and so documented),
    or one aether sets for others."""
    found = set()
    for path in (ROOT / "aether").rglob("*.py"):
        found |= set(re.findall(r"\bAETHER_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    assert sorted(found - NOT_SETTINGS - {s.env for s in SETTINGS}) == []


@pytest.mark.parametrize(
    "argv, env, stored, message",
    [
        (["--port", "0"], {}, None, '--port must be 1-65535, not "0"'),
        ([], {"AETHER_PORT": "http"}, None, 'AETHER_PORT must be a whole number, 1-65535, not "http"'),
        ([], {}, {"port": 70000}, "{config} key port must be 1-65535, not 70000"),
        ([], {}, {"port": True}, "{config} key port must be a whole number, 1-65535, not true"),
        ([], {}, {"port": 4100.5}, "{config} key port must be a whole number, 1-65535, not 4100.5"),
        ([], {"AETHER_PING_INTERVAL": "0"}, None, 'AETHER_PING_INTERVAL must be a positive number of seconds, not "0"'),
        (["--pong-timeout", "inf"], {}, None, '--pong-timeout must be a positive number of seconds, not "inf"'),
        ([], {}, {"terminal_idle_timeout": -1}, "{config} key terminal_idle_timeout must be 0 (never) or more seconds, not -1"),
        ([], {}, {"max_connections": 0}, "{config} key max_connections must be at least 1, not 0"),
        (
            [],
            {},
            {"max_unauthenticated_per_address": -1},
            "{config} key max_unauthenticated_per_address must be 0 (no cap) or more, not -1",
        ),
        ([], {"AETHER_BACKEND": "magic"}, None, 'AETHER_BACKEND must be auto, ebpf or sockdiag, not "magic"'),
        (["--preview-upstream-host", "app"], {}, None, '--preview-upstream-host must be localhost or original, not "app"'),
        (
            [],
            {},
            {"metrics_public": "maybe"},
            '{config} key metrics_public must be a boolean: true or false (1/0, yes/no, on/off), not "maybe"',
        ),
        (["--ignore", "22,0"], {}, None, '--ignore must be port numbers (1-65535), not "0"'),
        (
            [],
            {},
            {"ignored_ports": "22"},
            '{config} key ignored_ports must be an array of at most 1,024 port numbers (1-65535), not "22"',
        ),
        ([], {}, {"ignored_ports": list(range(1, 2000))}, "{config} key ignored_ports must be at most 1,024 ports, not 1,999"),
        (
            [],
            {"AETHER_TRUSTED_PROXIES": "10.0.0.0/8,nope"},
            None,
            'AETHER_TRUSTED_PROXIES must be addresses or networks, e.g. 127.0.0.1,::1,10.0.0.0/8, not "10.0.0.0/8,nope"',
        ),
        (
            ["--agent-command", "'unclosed"],
            {},
            None,
            '--agent-command must be a command: a JSON array of strings, or one shell-quoted string, not "\'unclosed"',
        ),
        ([], {}, {"agent": {"max_output_bytes": 0}}, "{config} key agent.max_output_bytes must be at least 1, not 0"),
        (["--workspace-root", "/nonexistent/x"], {}, None, "--workspace-root must be a directory: /nonexistent/x is not one"),
        (["--prefix-length", "33"], {}, None, '--prefix-length must be 1-32, not "33"'),
    ],
)
def test_a_bad_value_is_one_line_naming_where_it_was(tmp_path, clean_env, argv, env, stored, message):
    for name, value in env.items():
        clean_env.setenv(name, value)
    if stored is not None:
        (tmp_path / "config.json").write_text(json.dumps(stored))
    before = sorted(path.name for path in tmp_path.iterdir())
    with pytest.raises(ValueError) as caught:
        _resolve(["--state-dir", str(tmp_path), *argv])
    assert str(caught.value) == message.format(config=tmp_path / "config.json")
    assert sorted(path.name for path in tmp_path.iterdir()) == before  # nothing generated meanwhile


def test_the_first_source_that_gives_a_value_wins(tmp_path, clean_env):
    (tmp_path / "config.json").write_text(json.dumps({"ping_interval": 7, "agent": {"timeout": 9}, "metrics_public": True}))
    s = _resolve(["--state-dir", str(tmp_path)])
    assert (s.ping_interval, s.agent_timeout, s.metrics_public) == (7.0, 9.0, True)
    clean_env.setenv("AETHER_PING_INTERVAL", "8")
    clean_env.setenv("AETHER_METRICS_PUBLIC", "off")
    s = _resolve(["--state-dir", str(tmp_path)])
    assert (s.ping_interval, s.metrics_public) == (8.0, False)
    s = _resolve(["--state-dir", str(tmp_path), "--ping-interval", "9.5", "--metrics-public"])
    assert (s.ping_interval, s.metrics_public) == (9.5, True)
    # An empty variable is as good as none (systemd's Environment=AETHER_PING_INTERVAL=).
    clean_env.setenv("AETHER_PING_INTERVAL", "")
    assert _resolve(["--state-dir", str(tmp_path)]).ping_interval == 7.0
    # A bad value further down is never read when one above it is given.
    (tmp_path / "config.json").write_text(json.dumps({"port": "many"}))
    assert _resolve(["--state-dir", str(tmp_path), "--port", "4000"]).port == 4000


def test_kinds_read_the_command_lines_and_json_alike():
    assert kinds.Ports()("22, 2222,22,") == kinds.Ports().json([2222, 22]) == (22, 2222)
    assert kinds.Integer(1)("+5") == kinds.Integer(1)(5) == 5
    for bad in (True, 5.0, "5.0", "٣", "1_000", None, [5]):
        with pytest.raises(ValueError):
            kinds.Integer()(bad)
    for bad in ("nan", "inf", math.inf, "-1", True, ""):
        with pytest.raises(ValueError):
            kinds.Seconds()(bad)
    assert kinds.Seconds(positive=False)("0") == 0.0
    assert kinds.Boolean()("YES") is True and kinds.Boolean()(" off ") is False
    assert kinds.Command()("run --model 'a b'") == ("run", "--model", "a b")
    assert kinds.Command()('["a b", "c"]') == ("a b", "c")
    with pytest.raises(ValueError, match="whose program is named"):
        kinds.Command()(["", "x"])
    assert [kinds.PowerOfTwo()(raw) for raw in ("1", "64", 512)] == [1, 64, 512]
    for bad in ("0", "3", "-4", "x"):
        with pytest.raises(ValueError, match="must be a power of two"):
            kinds.PowerOfTwo()(bad)
    assert kinds.Text(("debug", "info"), lower=True)("INFO") == "info"


def test_help_names_each_flags_variable_and_default():
    text = " ".join(aether("serve", "--help").stdout.split())
    for setting in sources.flags_of("serve"):
        shown = sources.plain(sources.shown_default(setting)).replace("%%", "%")
        assert f"(env {setting.env}; default {' '.join(shown.split())})" in text, setting.name


def test_the_generated_tables_and_the_check(tmp_path):
    printed = subprocess.run(
        [sys.executable, "-m", "aether.settings", "--markdown"], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert printed == markdown.table(SERVE)
    assert printed.splitlines()[2].startswith("| `host` | `--host` | `AETHER_HOST` | `127.0.0.1` |")
    assert len(printed.splitlines()) == 2 + len(of(SERVE))
    doc = tmp_path / "settings.md"
    doc.write_text("# x\n\n<!-- settings:begin env -->\n| stale |\n<!-- settings:end env -->\n\nkept\n")
    check = [sys.executable, "-m", "aether.settings", "--check", str(doc)]
    stale = subprocess.run(check, capture_output=True, text=True, cwd=ROOT)
    assert stale.returncode == 1 and f"python -m aether.settings --write {doc}" in stale.stderr
    subprocess.run([sys.executable, "-m", "aether.settings", "--write", str(doc)], check=True, cwd=ROOT)
    assert doc.read_text() == f"# x\n\n<!-- settings:begin env -->\n{markdown.table(ENV)}<!-- settings:end env -->\n\nkept\n"
    assert subprocess.run(check, cwd=ROOT).returncode == 0
    with pytest.raises(ValueError, match="unknown settings block 'nope'"):
        markdown.rewrite("<!-- settings:begin nope -->\n<!-- settings:end nope -->\n")


def test_private_settings_stay_out_of_childrens_environment(monkeypatch):
    monkeypatch.setenv("AETHER_TOKEN", "s3cret")
    monkeypatch.setenv("AETHER_HOST", "127.0.0.1")
    child = sources.child_environment()
    assert "AETHER_TOKEN" not in child and child["AETHER_HOST"] == "127.0.0.1"
    monkeypatch.setenv("AETHER_FLEET_REDIS", "redis://:pw@redis:6379/0")  # a URL may hold a password
    assert "AETHER_FLEET_REDIS" not in sources.child_environment()
    assert set(sources.PRIVATE_ENV) == {"AETHER_TOKEN", "AETHER_FLEET_REDIS"}


def test_port_get_imports_nothing_of_the_server(tmp_path):
    """``aether port get`` runs inside shell substitutions: it imports the registry and the
    state directory's location, not the server, Tornado, asyncio or the settings table."""
    done = subprocess.run(
        [*AETHER[:1], "-X", "importtime", *AETHER[1:], "port", "get", "web", "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 1 and "no port registered as web" in done.stderr
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "aether.registry.store" in imported
    heavy = {
        name
        for name in imported
        if name.split(".")[0] in ("tornado", "asyncio", "prometheus_client")
        or name.startswith(("aether.server", "aether.settings", "aether.ports", "aether.preview"))
    }
    assert heavy == set()
