"""The protocol layer without sockets: every frame gets a Message or a ProtocolError, never
another exception, and a refused message changes nothing."""

from __future__ import annotations

import argparse
import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aether import protocol, wire
from aether.ports.monitor import PortMonitor
from aether.server.app import WorkspaceServer
from aether.settings.serve import add_arguments, resolve

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
channels = st.sampled_from([*protocol.CHANNELS, "", "PORTS", "nope"]) | st.text(max_size=6)
types = st.sampled_from(["kill", "get", "set", "open", "error", ""]) | st.text(max_size=6)
messages = st.fixed_dictionaries(
    {},
    optional={
        "channel": channels | json_values,
        "type": types | json_values,
        "port": st.integers(-5, 70000) | json_values,
        "config": st.dictionaries(st.sampled_from(["ignoredPorts", "workspaceId", "x"]), json_values) | json_values,
        "id": json_values,
    },
)


def _no_constants(name):
    raise AssertionError(f"{name} is not JSON")


def error_reply(exc: protocol.ProtocolError) -> dict:
    return wire.refused(exc, channel=exc.channel, id=exc.id)


def check_error(exc_or_reply) -> None:
    reply = exc_or_reply if isinstance(exc_or_reply, dict) else error_reply(exc_or_reply)
    assert reply["type"] == "error" and reply["code"] and reply["message"]
    # What the server would send must read back as strict JSON (no NaN, no Infinity).
    assert json.loads(wire.encode(reply), parse_constant=_no_constants) == reply


@settings(max_examples=600, deadline=None)
@given(
    st.one_of(
        st.text(max_size=200),
        st.binary(max_size=50),
        st.builds(json.dumps, json_values),
        st.sampled_from(['{"channel": "ports", "type": "x", "id": NaN}', '{"channel": 1, "id": 1e400}']),
    )
)
def test_any_frame_is_a_message_or_a_protocol_error(frame):
    try:
        message = protocol.parse(frame)
    except protocol.ProtocolError as exc:
        check_error(exc)
    else:
        assert message.channel in protocol.CHANNELS


@settings(max_examples=600, deadline=None)
@given(messages)
def test_any_object_is_a_message_or_a_protocol_error(obj):
    try:
        message = protocol.parse(json.dumps(obj))
    except protocol.ProtocolError as exc:
        check_error(exc)
        if isinstance(obj.get("id"), str) and len(obj["id"]) <= 256:
            assert error_reply(exc)["id"] == obj["id"]
    else:
        schema = protocol.SCHEMAS[(message.channel, message.type)]
        for field, (check, _) in schema.items():
            name = field.rstrip("?")
            assert check(message.body[name]) if name in message.body or name == field else True


@pytest.mark.parametrize(
    "frame, code",
    [
        ("{", "bad_json"),
        ("[1, 2]", "bad_message"),
        ('{"type": "get"}', "bad_message"),
        ('{"channel": "config"}', "bad_message"),
        ('{"channel": "weather", "type": "get"}', "unknown_channel"),
        ('{"channel": "ports", "type": "explode"}', "unknown_type"),
        ('{"channel": "ports", "type": "kill"}', "bad_message"),
        ('{"channel": "ports", "type": "kill", "port": "3000"}', "bad_message"),
        ('{"channel": "ports", "type": "kill", "port": true}', "bad_message"),
        ('{"channel": "ports", "type": "kill", "port": 70000}', "bad_message"),
        ('{"channel": "agent", "type": "prompt", "text": " "}', "bad_message"),
        ('{"channel": "agent", "type": "prompt", "text": "hi", "conversationId": "a/b"}', "bad_message"),
        ('{"channel": "agent", "type": "cancel"}', "bad_message"),
        ('{"channel": "terminal", "type": "input", "sessionId": "../x", "data": "ls\\n"}', "bad_message"),
        ('{"channel": "terminal", "type": "create", "cols": 80, "rows": 0}', "bad_message"),
        ('{"channel": "terminal", "type": "create", "cols": 80, "rows": 24, "command": []}', "bad_message"),
        ('{"channel": "files", "type": "read", "path": "a", "offset": -1}', "bad_message"),
        ('{"channel": "files", "type": "write", "path": "a", "content": "x", "encoding": "latin-1"}', "bad_message"),
        ('{"channel": "config", "type": "set", "config": [1]}', "bad_message"),
        ('{"channel": "config", "type": "set", "config": {"ignoredPorts": ' + "[" * 1000 + "]" * 1000 + "}}", "bad_message"),
        ('{"channel": "config", "type": "set", "config": {"ignoredPorts": ' + "[" * 32 + "]" * 32 + "}}", "bad_message"),
        (b'{"channel": "config", "type": "get"}', "bad_message"),
        ('{"channel": "ports", "type": "kill", "port": 1' + "0" * 30 + "}", "bad_message"),
    ],
)
def test_error_codes(frame, code):
    with pytest.raises(protocol.ProtocolError) as caught:
        protocol.parse(frame)
    assert caught.value.code == code


@pytest.mark.parametrize(
    "frame, code, channel",
    [
        ("not json", "bad_json", None),
        ('["a"]', "bad_message", None),
        ('{"channel": "nope", "type": "get"}', "unknown_channel", None),
        ('{"channel": "ports", "type": "nope"}', "unknown_type", "ports"),
        ('{"channel": "ports", "type": "kill", "port": "80"}', "bad_message", "ports"),
        ('{"channel": "terminal", "type": "nope"}', "unknown_type", "terminal"),
        ('{"channel": "files", "type": "list"}', "bad_message", "files"),
        ('{"channel": "agent", "type": "prompt"}', "bad_message", "agent"),
    ],
)
def test_a_refusal_names_the_channel_once_it_is_known(frame, code, channel):
    with pytest.raises(protocol.ProtocolError) as caught:
        protocol.parse(frame)
    check_error(caught.value)
    reply = error_reply(caught.value)
    assert (reply.get("channel"), reply["code"]) == (channel, code)


def test_valid_messages_and_id_echo():
    message = protocol.parse('{"channel": "ports", "type": "kill", "port": 3000, "id": "k1"}')
    assert (message.channel, message.type, message.body["port"], message.id) == ("ports", "kill", 3000, "k1")
    with pytest.raises(protocol.ProtocolError) as caught:
        protocol.parse('{"channel": "ports", "type": "nope", "id": 7}')
    assert error_reply(caught.value) == {
        "channel": "ports",
        "type": "error",
        "code": "unknown_type",
        "message": "unknown type for channel ports; one of kill, protocol, visibility",
        "id": 7,
    }


class Recorder:
    """Stands in for a client that showed the token: the channels only call ``send``."""

    allowed = None  # every channel and type (a dashboard cookie's session has a set)

    def __init__(self):
        self.sent: list[dict] = []

    def send(self, message: dict) -> None:
        self.sent.append(message)


@pytest.fixture
def server(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings_ = resolve(parser.parse_args(["--state-dir", str(tmp_path), "--workspace-id", "w"]))
    # Not started: the config channel only needs its table and ignored set.
    return WorkspaceServer(settings_, PortMonitor(backend="sockdiag", ignored=settings_.monitor_ignored))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["ignoredPorts", "workspaceId", "backend", "zzz"]), json_values, max_size=3))
def test_refused_config_set_changes_nothing(server, changes):
    before = (server.monitor.table.ignored, server.state.load_config())
    client = Recorder()
    frame = json.dumps({"channel": "config", "type": "set", "config": changes, "id": 1})
    server.dispatcher.receive(client, frame)
    if client.sent:  # a change is announced to the hub's clients, which this one is not
        [reply] = client.sent
        check_error(reply)
        assert reply["code"] in ("invalid", "bad_message") and reply["id"] == 1
        assert (server.monitor.table.ignored, server.state.load_config()) == before
    else:
        ports = changes["ignoredPorts"]
        assert list(changes) == ["ignoredPorts"]
        assert server.monitor.table.ignored == frozenset(ports) | {server.settings.port}
        assert server.state.load_config()["ignored_ports"] == sorted(set(ports))


@pytest.mark.parametrize("levels", [1, 5, 30])
def test_a_nested_bad_value_is_named_briefly(server, levels):
    """Nesting the limit lets through reaches validation, whose message shows the value cut
    short: a repr would recurse through all of it (and past 1,000 levels raise)."""
    value = json.loads("[" * levels + "70000" + "]" * levels)
    frame = json.dumps({"channel": "config", "type": "set", "config": {"ignoredPorts": [value, 22]}, "id": 5})
    before = server.state.load_config()
    client = Recorder()
    server.dispatcher.receive(client, frame)
    [reply] = client.sent
    check_error(reply)
    assert reply["code"] == "invalid" and reply["id"] == 5
    assert len(reply["message"]) < 120 and server.state.load_config() == before


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda children: st.lists(children) | st.dictionaries(st.text(), children),
        max_leaves=200,
    )
    | st.text(min_size=1000)
    | st.integers(min_value=1 << 80)
)
def test_an_excerpt_is_short_and_json_like(value):
    from aether.excerpt import LIMIT, excerpt

    shown = excerpt(value)
    assert 0 < len(shown) <= LIMIT
    shown.encode("utf-8")  # never a lone surrogate: it must go into a frame and a log line


def test_an_excerpt_of_a_thousand_levels_or_a_huge_number():
    import ujson

    from aether.excerpt import excerpt

    assert excerpt(ujson.loads("[" * 1000 + "]" * 1000)) == "[[[[…]]]]"
    assert excerpt(10**5000) == "<an integer of 16610 bits>"
    assert excerpt({"a": [1, "\ud800"]}) == '{"a": [1, "\\ud800"]}'
    assert excerpt("x" * 10**6) == '"' + "x" * 58 + "…"


def test_config_get_describes_the_workspace(server):
    client = Recorder()
    server.dispatcher.receive(client, '{"channel": "config", "type": "get", "id": "g"}')
    [reply] = client.sent
    assert reply["type"] == "config" and reply["id"] == "g"
    config = reply["config"]
    assert config["workspaceId"] == "w"
    assert config["projectIdPrefix"] == server.settings.project_id[:6]
    assert all(c in string.hexdigits for c in config["projectIdPrefix"])
    assert config["ignoredPorts"] == [22, 2222, 3001]
    assert config["previewUrl"] == f"http://{{port}}-{config['projectIdPrefix']}.preview.localhost:3001"
    assert config["keepalive"] == {"pingInterval": 45.0, "pongTimeout": 120.0, "writeTimeout": 30.0, "maxMessageBytes": 1 << 20}


def _resolve(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return resolve(parser.parse_args(argv))


def test_settings_precedence_flag_env_file_default(tmp_path, monkeypatch):
    for name in ("AETHER_PORT", "AETHER_PREVIEW_DOMAIN", "AETHER_IGNORED_PORTS", "AETHER_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "config.json").write_text(json.dumps({"port": 4100, "preview_domain": "file.test", "ignored_ports": [22]}))
    base = ["--state-dir", str(tmp_path)]
    s = _resolve(base)
    assert (s.port, s.preview_domain, s.ignored_ports, s.host) == (4100, "file.test", (22,), "127.0.0.1")
    monkeypatch.setenv("AETHER_PORT", "4200")
    assert _resolve(base).port == 4200
    assert _resolve(base + ["--port", "4300"]).port == 4300
    monkeypatch.setenv("AETHER_PORT", "many")
    with pytest.raises(ValueError, match='^AETHER_PORT must be a whole number, 1-65535, not "many"$'):
        _resolve(base)


def test_token_and_project_id_are_generated_once_and_kept(tmp_path, monkeypatch):
    monkeypatch.delenv("AETHER_TOKEN", raising=False)
    monkeypatch.delenv("AETHER_PROJECT_ID", raising=False)
    first = _resolve(["--state-dir", str(tmp_path)])
    again = _resolve(["--state-dir", str(tmp_path)])
    assert (first.token, first.project_id) == (again.token, again.project_id)
    assert len(first.project_id) == 32 and len(first.token) >= 40
    assert (tmp_path / "token").stat().st_mode & 0o777 == 0o600
    assert first.token not in repr(first)
    token_file = tmp_path / "given-token"
    token_file.write_text("from-a-file\n")
    assert _resolve(["--state-dir", str(tmp_path), "--token-file", str(token_file)]).token == "from-a-file"


@pytest.mark.parametrize("stored", ['"8080"', "[0]", "{}"])
def test_bad_stored_ignored_ports_name_the_file(tmp_path, stored, monkeypatch):
    monkeypatch.delenv("AETHER_IGNORED_PORTS", raising=False)
    (tmp_path / "config.json").write_text(f'{{"ignored_ports": {stored}}}')
    with pytest.raises(ValueError, match=f"^{tmp_path}/config.json key ignored_ports must be "):
        _resolve(["--state-dir", str(tmp_path)])
