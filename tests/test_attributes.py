"""Port attributes: the JSON-with-comments reader, each format's rules (examples from the
formats' own documentation), precedence within and across files, bad rules, the matcher under
hypothesis, hiding a command line's secrets, and the files read beneath a real workspace root."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aether.attributes import formats, jsonc, sources
from aether.attributes.rules import (
    MATCH_CHARS,
    NONE,
    Attributes,
    Layer,
    Origin,
    Port,
    Range,
    Rule,
    Ruleset,
    command,
    command_text,
    redact,
)
from aether.files import beneath, libc

ROOT = Path(__file__).resolve().parents[1]
DEV = formats.DEVCONTAINER


def ruleset(config=None, devcontainer=None, gitpod=None) -> Ruleset:
    layers = []
    for reader, value in (
        (formats.from_config, config),
        (formats.from_devcontainer, devcontainer),
        (formats.from_gitpod, gitpod),
    ):
        if value is not None:
            layer, problems = reader(value)
            assert problems == [], problems
            if layer is not None:
                layers.append(layer)
    return Ruleset(layers)


def problems_of(reader, value):
    layer, problems = reader(value)
    return layer, [(p.file, p.key, p.code) for p in problems], [str(p) for p in problems]


# -- JSON with comments ------------------------------------------------------------------------

#: A devcontainer.json as the dev container templates write them: comments (holding URLs) before
#: keys, commented-out keys, strings holding // and /*, and a trailing comma.
TEMPLATE = """// For format details, see https://aka.ms/devcontainer.json. For config options, see the
// README at: https://github.com/devcontainers/templates/tree/main/src/javascript-node
{
\t"name": "Node.js",
\t// Or use a Dockerfile or Docker Compose file. More info: https://containers.dev/guide/dockerfile
\t"image": "mcr.microsoft.com/devcontainers/javascript-node:1-20-bullseye",

\t// Features to add to the dev container. More info: https://containers.dev/features.
\t// "features": {},

\t// Use 'forwardPorts' to make a list of ports inside the container available locally.
\t"forwardPorts": [3000, "db:5432"],
\t"portsAttributes": {
\t\t"3000": {"label": "Application port", "onAutoForward": "openBrowser"}, /* the app */
\t\t"9229": {"label": "Debugger", "onAutoForward": "silent"},
\t},
\t"otherPortsAttributes": {"onAutoForward": "silent"},
\t"postCreateCommand": "echo '// not a comment' && echo \\"/* nor this */\\"",
}
"""


def test_jsonc_reads_a_template_devcontainer():
    data = jsonc.loads(TEMPLATE)
    assert data["forwardPorts"] == [3000, "db:5432"]
    assert data["portsAttributes"]["9229"] == {"label": "Debugger", "onAutoForward": "silent"}
    assert data["postCreateCommand"] == "echo '// not a comment' && echo \"/* nor this */\""
    assert "features" not in data


@pytest.mark.parametrize(
    "text, value",
    [
        ('{"a": "// no", "b": "/* no */", "c": "http://x/*y*/"}', {"a": "// no", "b": "/* no */", "c": "http://x/*y*/"}),
        ('{"a": "x\\"//y"}', {"a": 'x"//y'}),  # an escaped quote does not end the string
        ('{"a": "x\\\\"// a comment after a string ending in a backslash\n}', {"a": "x\\"}),
        ("[1, 2, ]", [1, 2]),
        ('{"a": [1, /* c */ ], "b": {"c": 1, // c\n}, }', {"a": [1], "b": {"c": 1}}),
        ('{"a": 1 /* a // b */, "b": 2}', {"a": 1, "b": 2}),  # // inside a block comment
        ('{"a": 1, // a /* b\n "b": 2}', {"a": 1, "b": 2}),  # /* inside a line comment
        ('/**/{"a":/**/1}/**/', {"a": 1}),
        ('\ufeff{"a": 1}', {"a": 1}),  # a byte-order mark
        ('{"a": "é ✓"}', {"a": "é ✓"}),
    ],
)
def test_jsonc_comments_strings_and_trailing_commas(text, value):
    assert jsonc.loads(text) == value


@pytest.mark.parametrize(
    "text, line, column, message",
    [
        ('{\n  "a": 1 /* a /* b */ c */\n}', 2, 23, "Expecting ',' delimiter"),  # block comments do not nest
        ('{"a": 1,\n/* never closed\n}', 2, 1, "a /* comment is never closed with */"),
        ('/* one\ntwo\nthree */ {"a": }', 3, 16, "Expecting value"),  # the file's own line and column
        ("{'a': 1}", 1, 2, "Expecting property name enclosed in double quotes"),  # JSON5 is not JSONC
        ("{a: 1}", 1, 2, "Expecting property name enclosed in double quotes"),
        ("[1,,]", 1, 5, "Expecting value"),
        ('{"a": 1} x', 1, 10, "Extra data"),
        ("", 1, 1, "Expecting value"),
    ],
)
def test_jsonc_errors_say_where(text, line, column, message):
    with pytest.raises(jsonc.JsoncError) as caught:
        jsonc.loads(text)
    assert (caught.value.line, caught.value.column, caught.value.message) == (line, column, message)


def test_jsonc_duplicates_and_depth():
    duplicates: list[str] = []
    assert jsonc.loads('{"3000": {"label": "a"}, "3000": {"label": "b"}}', duplicates) == {"3000": {"label": "b"}}
    assert duplicates == ["3000"]
    with pytest.raises(jsonc.JsoncError, match="nested too deep"):
        jsonc.loads("[" * 100_000 + "]" * 100_000)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
_comment = st.sampled_from(["", " ", "// c\n", "/* c */", "/* // */", "// /* \n", "\n/*\n*/\n"])


def _commented(value, draw) -> str:
    """``value`` as JSON with comments and trailing commas drawn between its tokens."""
    if isinstance(value, dict):
        items = [f"{draw(_comment)}{json.dumps(k)}{draw(_comment)}:{_commented(v, draw)}" for k, v in value.items()]
        return "{" + ",".join(items) + ("," + draw(_comment) if items and draw(st.booleans()) else "") + "}"
    if isinstance(value, list):
        items = [f"{draw(_comment)}{_commented(v, draw)}{draw(_comment)}" for v in value]
        return "[" + ",".join(items) + ("," if items and draw(st.booleans()) else "") + draw(_comment) + "]"
    return draw(_comment) + json.dumps(value) + draw(_comment)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(value=_json, data=st.data())
def test_jsonc_reads_any_json_with_comments_inserted(value, data):
    assert jsonc.loads(json.dumps(value)) == value
    assert jsonc.loads(_commented(value, data.draw)) == value


@settings(max_examples=500)
@given(st.text(alphabet=st.sampled_from(list('{}[],:"\\/*\n 1ax')) | st.characters(), max_size=60))
def test_jsonc_refuses_anything_with_a_jsonc_error_only(text):
    try:
        jsonc.loads(text)
    except jsonc.JsoncError as exc:
        assert exc.line >= 1 and exc.column >= 1


# -- each format, from its documentation --------------------------------------------------------


def test_devcontainer_examples():
    """The reference's examples: a label on 3000, a range, an expression on the command line,
    otherPortsAttributes, forwardPorts with a "host:port"."""
    rules = ruleset(
        devcontainer={
            "forwardPorts": [3000, "localhost:8080"],
            "portsAttributes": {
                "3000": {
                    "label": "Application port",
                    "onAutoForward": "openBrowser",
                    "protocol": "https",
                    "requireLocalPort": True,
                    "elevateIfNeeded": False,
                },
                "40000-55000": {"onAutoForward": "ignore"},
                ".+\\/server.js": {"onAutoForward": "openPreview", "label": "server.js"},
            },
            "otherPortsAttributes": {"onAutoForward": "silent"},
        }
    )
    app = rules.resolve(3000, ["node", "app.js"])
    assert (app.label, app.on_open, app.protocol) == ("Application port", "open", "https")
    assert app.sources["label"] == Origin(DEV, 'portsAttributes["3000"]')
    assert rules.resolve(45000).on_open == "ignore"
    server = rules.resolve(8000, ["node", "/srv/app/server.js"])
    assert (server.label, server.on_open) == ("server.js", "open")
    assert server.sources["on_open"] == Origin(DEV, 'portsAttributes[".+\\\\/server.js"]')
    other = rules.resolve(8000, ["python3", "-m", "http.server"])
    assert (other.label, other.on_open) == (None, "silent")
    assert other.sources["on_open"] == Origin(DEV, "otherPortsAttributes")
    assert [port for port, _ in rules.forward_ports] == [3000, 8080]


@pytest.mark.parametrize(
    "vscode, ours",
    [
        ("notify", "notify"),
        ("openBrowser", "open"),
        ("openBrowserOnce", "open"),
        ("openPreview", "open"),
        ("silent", "silent"),
        ("ignore", "ignore"),
    ],
)
def test_vscode_on_auto_forward_mapping(vscode, ours):
    rules = ruleset(devcontainer={"portsAttributes": {"5173": {"onAutoForward": vscode}}})
    assert rules.resolve(5173).on_open == ours


GITPOD_YML = """
# From Gitpod's documentation: open a preview of 8080, say nothing of 3000-8999.
ports:
  - name: Web App
    port: 8080
    onOpen: open-browser
    visibility: public
    description: The site, served by the dev server
  - port: 3000-8999
    onOpen: ignore
  - port: 5432
    onOpen: ignore-completely
  - port: "9000:9100"
    onOpen: open-preview
    protocol: https
"""


def test_gitpod_examples():
    layer, problems = sources.formats.from_gitpod(sources._yaml(GITPOD_YML))
    assert problems == []
    rules = Ruleset([layer])
    web = rules.resolve(8080)
    assert (web.label, web.on_open, web.visibility) == ("Web App", "open", "public")
    assert web.sources["label"] == Origin(".gitpod.yml", "ports[0]")
    assert rules.resolve(4000).on_open == "silent"  # Gitpod's ignore: served, no notice
    assert rules.resolve(5432).on_open == "ignore"  # ignore-completely: left out
    assert (rules.resolve(9050).on_open, rules.resolve(9050).protocol) == ("open", "https")
    assert rules.resolve(9200) is NONE


def test_gitpod_precedence_is_gitpods():
    """The first entry for the exact port, else the first range in file order, and that entry
    alone: a later range does not fill in what the first left unset."""
    rules = ruleset(
        gitpod={
            "ports": [
                {"port": "3000-3999", "onOpen": "notify"},
                {"port": "3000-3100", "visibility": "public", "name": "inner"},
                {"port": 3050, "name": "exact"},
            ]
        }
    )
    exact = rules.resolve(3050)
    assert (exact.label, exact.on_open, exact.visibility) == ("exact", None, None)
    first = rules.resolve(3060)
    assert (first.on_open, first.label, first.visibility) == ("notify", None, None)
    layer, keys, _ = problems_of(formats.from_gitpod, {"ports": [{"port": 80, "name": "a"}, {"port": 80, "name": "b"}]})
    assert keys == [(".gitpod.yml", "ports[1]", "ignored")]
    assert Ruleset([layer]).resolve(80).label == "a"


def test_config_json_rules():
    rules = ruleset(
        config={
            "ports_attributes": {
                "5173": {"label": "vite", "on_open": "open", "visibility": "public", "protocol": "https"},
                "9229-9239": {"label": "node inspector", "on_open": "ignore"},
                "manage\\.py runserver": {"label": "django"},
            },
            "other_ports_attributes": {"on_open": "silent"},
        }
    )
    vite = rules.resolve(5173, "node /w/node_modules/.bin/vite")
    assert vite.as_dict() == {
        "label": "vite",
        "visibility": "public",
        "protocol": "https",
        "onOpen": "open",
        "sources": {
            name: {"file": "config.json", "key": 'ports_attributes["5173"]'}
            for name in ("label", "visibility", "protocol", "onOpen")
        },
    }
    assert rules.resolve(8000, ["python", "manage.py", "runserver"]).label == "django"
    assert rules.resolve(9230).on_open == "ignore"
    assert rules.resolve(1234).as_dict() == {
        "onOpen": "silent",
        "sources": {"onOpen": {"file": "config.json", "key": "other_ports_attributes"}},
    }


# -- precedence ---------------------------------------------------------------------------------


def test_vscode_precedence_within_a_file():
    """As VS Code's getAttributes: the exact port sets first, then ranges by their first port
    (whatever the declaration order), then expressions in declaration order, each filling only
    what is unset; a later key for the same port wins."""
    rules = ruleset(
        config={
            "ports_attributes": {
                "node": {"label": "expression 1", "visibility": "public", "protocol": "http", "on_open": "notify"},
                "3000-3999": {"label": "wide range", "visibility": "private", "protocol": "http"},
                "3000": {"label": "exact"},
                "2000-3500": {"label": "lower range", "protocol": "https"},
                "no": {"on_open": "silent"},
                "03000": {"label": "exact, later key"},
            }
        }
    )
    found = rules.resolve(3000, "node server.js")
    assert (found.label, found.protocol, found.visibility, found.on_open) == ("exact, later key", "https", "private", "notify")
    assert found.sources["protocol"].key == 'ports_attributes["2000-3500"]'
    assert found.sources["on_open"].key == 'ports_attributes["node"]'
    # No command line: expressions do not match.
    assert rules.resolve(3600).as_dict()["label"] == "wide range"
    assert rules.resolve(3600).on_open is None


def test_other_ports_attributes_only_when_no_rule_matched():
    """VS Code falls back to otherPortsAttributes whole, when the matching rules set nothing:
    a port whose rule sets only a label does not get the other onAutoForward."""
    rules = ruleset(
        devcontainer={
            "portsAttributes": {"3000": {"label": "web"}},
            "otherPortsAttributes": {"onAutoForward": "silent", "label": "other"},
        }
    )
    assert (rules.resolve(3000).label, rules.resolve(3000).on_open) == ("web", None)
    assert (rules.resolve(3001).label, rules.resolve(3001).on_open) == ("other", "silent")


def test_precedence_across_files():
    """config.json over devcontainer.json over .gitpod.yml, attribute by attribute, each value
    naming its file; a specific rule in any file beats every file's other-ports attributes."""
    rules = ruleset(
        config={"ports_attributes": {"3000": {"label": "mine"}}, "other_ports_attributes": {"on_open": "silent"}},
        devcontainer={
            "portsAttributes": {"3000": {"label": "theirs", "onAutoForward": "openBrowser"}, "4000": {"onAutoForward": "notify"}}
        },
        gitpod={"ports": [{"port": 3000, "name": "gitpod", "visibility": "public", "onOpen": "ignore"}]},
    )
    found = rules.resolve(3000)
    assert (found.label, found.on_open, found.visibility) == ("mine", "open", "public")
    assert {name: origin.file for name, origin in found.sources.items()} == {
        "label": "config.json",
        "on_open": DEV,
        "visibility": ".gitpod.yml",
    }
    assert rules.resolve(4000).on_open == "notify"  # devcontainer's rule over config's fallback
    assert rules.resolve(5000).on_open == "silent"


# -- bad rules -----------------------------------------------------------------------------------


def test_bad_rules_are_reported_and_skipped_one_by_one():
    layer, keys, messages = problems_of(
        formats.from_config,
        {
            "ports_attributes": {
                "3000": {"label": "good"},
                "(?=lookahead)": {"label": "x"},
                "[": {"label": "x"},
                "0": {"label": "x"},
                "70000": {"label": "x"},
                "99999999999999999999": {"label": "x"},
                "5000-4000": {"label": "x"},
                "": {"label": "x"},
                "4000": {"on_open": "openBrowser"},
                "4001": {"onOpen": "open"},
                "4002": {"label": "two\nlines"},
                "4003": {"label": "x" * 101},
                "4004": {"visibility": "secret", "protocol": "ftp"},
                "4005": "public",
                "4006": {"hide_command": "yes"},
                "4007": {"redact": "--password"},
                "5000": {"label": "also good"},
            },
            "other_ports_attributes": {"on_open": "loud"},
        },
    )
    assert [key for _, key, code in keys if code == "invalid"] == [
        'ports_attributes["(?=lookahead)"]',
        'ports_attributes["["]',
        'ports_attributes["0"]',
        'ports_attributes["70000"]',
        'ports_attributes["99999999999999999999"]',
        'ports_attributes["5000-4000"]',
        'ports_attributes[""]',
        'ports_attributes["4000"]',
        'ports_attributes["4001"]',
        'ports_attributes["4002"]',
        'ports_attributes["4003"]',
        'ports_attributes["4004"]',
        'ports_attributes["4005"]',
        'ports_attributes["4006"]',
        'ports_attributes["4007"]',
        "other_ports_attributes",
    ]
    assert {file for file, _, _ in keys} == {"config.json"}
    text = "\n".join(messages)
    for expected in [
        'ports_attributes["(?=lookahead)"]: not a regular expression: invalid perl operator: (?= (RE2 syntax: no lookahead, lookbehind or backreferences); rule skipped',
        'ports_attributes["["]: not a regular expression: missing ]: [; rule skipped',
        'ports_attributes["0"]: port 0 is out of range 1-65535; rule skipped',
        'ports_attributes["5000-4000"]: range 5000-4000 ends before it starts; rule skipped',
        'ports_attributes["4000"]: on_open must be one of notify, open, silent, ignore, not "openBrowser"; rule skipped',
        'ports_attributes["4001"]: unknown attribute "onOpen" (did you mean on_open?); known: label, visibility, protocol, on_open, hide_command, redact; rule skipped',
        'ports_attributes["4002"]: label holds a control character; rule skipped',
        'ports_attributes["4004"]: visibility must be one of private, public, not "secret"; protocol must be one of http, https, tcp, not "ftp"; rule skipped',
    ]:
        assert f"config.json: {expected}" in text
    rules = Ruleset([layer])
    assert (rules.resolve(3000).label, rules.resolve(5000).label) == ("good", "also good")
    assert rules.resolve(4000) is NONE  # the bad rules, and the bad fallback, are not used


def test_foreign_formats_report_what_they_do_not_use():
    _, keys, messages = problems_of(
        formats.from_devcontainer,
        {
            "forwardPorts": [3000, "db:5432", 0, "x"],
            "portsAttributes": {
                "3000": {"label": "web", "visibility": "public", "onAutoForward": "openBrowser", "color": "red"},
                "db:5432": {"label": "db"},
                "3001": {"onAutoForward": "open-browser"},
            },
        },
    )
    assert keys == [
        (DEV, 'portsAttributes["3000"]', "ignored"),
        (DEV, 'portsAttributes["3000"]', "ignored"),
        (DEV, 'portsAttributes["db:5432"]', "ignored"),
        (DEV, 'portsAttributes["3001"]', "invalid"),
        (DEV, "forwardPorts[1]", "ignored"),
        (DEV, "forwardPorts[2]", "invalid"),
        (DEV, "forwardPorts[3]", "invalid"),
    ]
    assert any("visibility is not one of this format's port attributes: set it in aether's config.json" in m for m in messages)
    _, keys, messages = problems_of(
        formats.from_gitpod,
        {
            "ports": [
                {"port": "3000-", "onOpen": "notify"},
                {"onOpen": "notify"},
                "3000",
                {"port": 80, "onOpen": "ignore-all"},
                {"port": 81, "protocol": "UDP"},
                {"port": 82, "protocol": "TCP", "visiblity": "public"},
            ]
        },
    )
    assert keys == [
        (".gitpod.yml", f"ports[{i}]", code)
        for i, code in [(0, "invalid"), (1, "invalid"), (2, "invalid"), (3, "invalid"), (4, "invalid"), (5, "ignored")]
    ]
    assert 'ports[0]: port must be a number or a range such as 3000-3999, not "3000-"; entry skipped' in "\n".join(messages)


def test_limits_on_rules_and_expressions():
    many = {str(port): {"label": "x"} for port in range(1, formats.MAX_RULES + 11)}
    layer, problems = formats.from_config({"ports_attributes": many})
    assert len(layer.rules) == formats.MAX_RULES
    assert [p.key for p in problems] == ['ports_attributes["1001"]'] and "more than 1000 rules" in problems[0].message
    expressions = {f"prog{i}": {"label": "x"} for i in range(formats.MAX_EXPRESSIONS + 1)}
    layer, problems = formats.from_config({"ports_attributes": expressions})
    assert len(layer.rules) == formats.MAX_EXPRESSIONS and len(problems) == 1
    bad = {f"[{i}": {"label": "x"} for i in range(300)}
    _, problems = formats.from_config({"ports_attributes": bad})
    assert len(problems) == formats.MAX_PROBLEMS + 1 and problems[-1].message == "200 more problems not listed"


def test_re2_writes_nothing_to_stderr_for_a_bad_expression():
    """RE2 logs its own line for a pattern it refuses unless told not to: aether's stderr is one
    structured line per record."""
    script = (
        "from aether.attributes import formats; print(len(formats.from_config({'ports_attributes': {'(?=x)': {}, '(': {}}})[1]))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "2\n", "")


def test_an_expression_that_backtracks_elsewhere_is_linear_here():
    """(a+)+$ takes Python's re seconds on 30 characters; RE2 answers at once."""
    rules = ruleset(config={"ports_attributes": {"(a+)+$": {"label": "never"}}})
    assert rules.resolve(3000, "a" * 4000 + "!").label is None
    assert rules.resolve(3000, "aaaa").label == "never"


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["3000", "3000-3999", "3000:3999", "node", "(", "open", "openBrowser", "ignore", "public", "https", "-p"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "label",
                    "on_open",
                    "onAutoForward",
                    "onOpen",
                    "port",
                    "name",
                    "visibility",
                    "protocol",
                    "redact",
                    "hide_command",
                    "3000",
                    "1-9",
                    "x",
                    "",
                ]
            )
            | st.text(max_size=6),
            inner,
            max_size=5,
        )
    ),
    max_leaves=25,
)
_documents = (
    st.dictionaries(
        st.sampled_from(
            ["ports_attributes", "other_ports_attributes", "portsAttributes", "otherPortsAttributes", "forwardPorts", "ports"]
        ),
        _values,
        max_size=6,
    )
    | _values
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(_documents, st.integers(), st.none() | st.text(max_size=30) | st.lists(st.text(max_size=10), max_size=4))
def test_any_document_gives_rules_and_problems_never_an_exception(document, port, cmd):
    layers = []
    for reader in (formats.from_config, formats.from_devcontainer, formats.from_gitpod):
        layer, problems = reader(document)
        assert all(p.code in ("unreadable", "invalid", "ignored") and p.message for p in problems)
        if layer is not None:
            layers.append(layer)
    found = Ruleset(layers).resolve(port, cmd)
    assert isinstance(found, Attributes)
    assert found == Ruleset(layers).resolve(port, cmd)  # cached or not, the same answer


@settings(max_examples=300)
@given(st.text(alphabet=st.sampled_from(list("ports:- 3000-9\n\"'&*[]{}!%@`#|>onOpen")) | st.characters(), max_size=80))
def test_any_gitpod_text_gives_rules_or_a_problem(text):
    try:
        data = sources._yaml(text)
    except ValueError:
        return
    layer, problems = formats.from_gitpod(data)
    assert all(p.message for p in problems)


def test_yaml_aliases_and_loops_stay_bounded():
    """A list that holds itself, and aliases that would expand a billionfold, are read as
    shared references and reported, bounded."""
    looped = sources._yaml("ports: &p [*p]\n")
    _, problems = formats.from_gitpod(looped)
    assert [p.key for p in problems] == ["ports[0]"] and len(problems[0].message) < 200
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
    )
    layer, problems = formats.from_gitpod(sources._yaml(laughs + "ports: [*i, *i]\n"))
    assert layer is None and len(problems) == 2


# -- the matcher ----------------------------------------------------------------------------------

MATCHER = ruleset(
    config={
        "ports_attributes": {
            "3000": {"label": "web"},
            "8000-8999": {"on_open": "silent"},
            "python": {"label": "python", "redact": ["--token"]},
            "é|\ufffd": {"label": "unicode"},
        },
        "other_ports_attributes": {"hide_command": True},
    },
    devcontainer={"portsAttributes": {"vite": {"onAutoForward": "openBrowser"}}},
    gitpod={"ports": [{"port": "1-65535", "visibility": "private"}]},
)


@settings(max_examples=1000)
@given(st.integers(), st.none() | st.text() | st.lists(st.text()) | st.binary())
def test_the_matcher_never_raises(port, cmd):
    found = MATCHER.resolve(port, cmd)
    assert found.hide_command  # every file's fallback hiding applies to every port
    assert MATCHER.resolve(port, cmd) is found


def test_the_matcher_sees_argv_joined_and_bounded():
    assert command_text(["node", "/w/vite", "--port", "5173"]) == "node /w/vite --port 5173"
    assert command_text("a\0b\0") == "a b "
    assert command_text(["x" * 10, "y"] * MATCH_CHARS) == (("x" * 10 + " y ") * MATCH_CHARS)[:MATCH_CHARS]
    assert command_text(["caf\udce9"]) == "caf\ufffd"  # an undecodable byte, as os.fsdecode gives it
    assert MATCHER.resolve(3001, ["caf\udce9"]).label == "unicode"
    # The end of a command line past MATCH_CHARS is not seen.
    rules = ruleset(config={"ports_attributes": {"--secret-flag": {"label": "seen"}}})
    assert rules.resolve(1, ["x" * MATCH_CHARS, "--secret-flag"]).label is None
    assert rules.resolve(1, ["x" * 10, "--secret-flag"]).label == "seen"


def test_the_cache_keeps_the_answer_and_stays_bounded():
    rules = ruleset(config={"ports_attributes": {"node": {"label": "node"}}})
    first = rules.resolve(3000, ["node", "a.js"])
    assert rules.resolve(3000, "node a.js") is first  # an argv and its command line are one key
    for port in range(1, 3 * 4096):
        rules.resolve(port, ["node", str(port)])
    assert len(rules._cache) <= 4096 and len(rules._commands) <= 4096
    assert rules.resolve(3000, "node a.js") == first


# -- secrets on the command line ------------------------------------------------------------------

SECRET = "hunter2-s3cr3t"


def test_redact_forms():
    argv = [
        "redis-server",
        "--requirepass",
        SECRET,
        "--password=" + SECRET,
        "-p" + SECRET,
        "-p",
        SECRET,
        "token=" + SECRET,
        "--port",
        "6379",
    ]
    assert redact(argv, ("--requirepass", "--password", "-p", "token")) == [
        "redis-server",
        "--requirepass",
        "***",
        "--password=***",
        "-p***",
        "-p",
        "***",
        "token=***",
        "--port",
        "6379",
    ]


def test_a_rule_hides_a_secret_in_the_command_line():
    """A regex rule on the program redacts its password; another hides a command whole; the
    secret is in neither the answer, its wire form, nor any problem."""
    rules = ruleset(
        config={
            "ports_attributes": {
                "redis-server": {"label": "redis", "redact": ["--requirepass"]},
                "6379": {"label": "cache"},
                "--api-key": {"hide_command": True},
            }
        }
    )
    argv = ["redis-server", "--port", "6379", "--requirepass", SECRET]
    found = rules.resolve(6379, argv)
    assert found.shown_command(argv) == ["redis-server", "--port", "6379", "--requirepass", "***"]
    assert found.shown_command(" ".join(argv)) == "redis-server --port 6379 --requirepass ***"
    assert found.label == "cache"  # the exact port's label; redaction still applies
    assert SECRET not in json.dumps(found.as_dict())
    assert found.as_dict()["redact"] == ["--requirepass"]
    hidden = rules.resolve(8000, ["my-api", "--api-key", SECRET])
    assert hidden.shown_command(["my-api", "--api-key", SECRET]) is None and hidden.as_dict()["hideCommand"] is True
    assert NONE.shown_command(argv) == argv


def test_hiding_adds_up_and_is_never_undone():
    rules = ruleset(
        config={
            "ports_attributes": {
                "3000": {"hide_command": False, "label": "web"},
                "node": {"hide_command": True, "redact": ["--a"]},
            },
            "other_ports_attributes": {"redact": ["--b"]},
        }
    )
    found = rules.resolve(3000, "node --a 1 --b 2")
    assert found.hide_command and found.redact == ("--a", "--b") and found.label == "web"
    assert found.sources["hide_command"].key == 'ports_attributes["node"]'


# -- the files, beneath a real workspace root -------------------------------------------------------


@pytest.fixture(params=["openat2", "walk"])
def resolver(request, monkeypatch):
    if request.param == "walk":
        monkeypatch.setattr(beneath, "OPENAT2", False)
        monkeypatch.setattr(libc, "openat2", lambda *args: pytest.fail(f"openat2 called with the walk forced: {args}"))
    elif not beneath.has_openat2():
        pytest.skip("no openat2 here: the walk is tested")
    return request.param


@pytest.fixture
def workspace(tmp_path):
    root = tmp_path / "root"
    (root / ".devcontainer").mkdir(parents=True)
    return root.resolve()


def test_load_reads_every_file(workspace, resolver):
    (workspace / ".devcontainer" / "devcontainer.json").write_text(TEMPLATE)
    (workspace / ".gitpod.yml").write_text(GITPOD_YML)
    rules, problems = sources.load(workspace, {"ports_attributes": {"3000": {"label": "mine"}}})
    assert [str(p) for p in problems] == [
        ".devcontainer/devcontainer.json: forwardPorts[1]: names the host db (another container): aether sees this workspace's own ports"
    ]
    assert rules.files == ("config.json", DEV, ".gitpod.yml")
    found = rules.resolve(3000)
    assert (found.label, found.on_open) == ("mine", "open")
    assert (found.sources["label"].file, found.sources["on_open"].file) == ("config.json", DEV)
    assert rules.resolve(8080).sources["label"] == Origin(".gitpod.yml", "ports[0]")
    assert rules.resolve(9229).on_open == "silent"


def test_devcontainer_json_at_the_root_is_the_fallback(workspace, resolver):
    (workspace / ".devcontainer.json").write_text('{"portsAttributes": {"1": {"label": "root file"}}}')
    rules, problems = sources.load(workspace)
    assert problems == [] and rules.resolve(1).sources["label"].file == ".devcontainer.json"
    (workspace / ".devcontainer" / "devcontainer.json").write_text('{"portsAttributes": {"1": {"label": "folder"}}}')
    assert sources.load(workspace)[0].resolve(1).label == "folder"


def test_a_link_out_of_the_root_is_not_read(workspace, tmp_path, resolver):
    outside = tmp_path / "outside.yml"
    outside.write_text("ports:\n  - port: 3000\n    visibility: public\n")
    (workspace / ".gitpod.yml").symlink_to(outside)
    (workspace / ".devcontainer" / "devcontainer.json").symlink_to("../../outside.yml")
    rules, problems = sources.load(workspace)
    assert [(p.file, p.code, p.message) for p in problems] == [
        (DEV, "unreadable", "leads outside the workspace root: not read"),
        (".gitpod.yml", "unreadable", "leads outside the workspace root: not read"),
    ]
    assert rules.resolve(3000) is NONE
    # A link that stays inside is followed.
    (workspace / "config").mkdir()
    (workspace / "config" / "gitpod.yml").write_text(outside.read_text())
    (workspace / ".gitpod.yml").unlink()
    (workspace / ".gitpod.yml").symlink_to("config/gitpod.yml")
    assert sources.load(workspace)[0].resolve(3000).visibility == "public"


def test_what_cannot_be_read_is_reported(workspace, resolver):
    (workspace / ".devcontainer" / "devcontainer.json").write_bytes(b'{"a": "\xff"}')
    os.mkfifo(workspace / ".gitpod.yml")
    result = {}
    reader = threading.Thread(target=lambda: result.update(done=sources.load(workspace)), daemon=True)
    reader.start()
    reader.join(30)  # a FIFO must not block the reader: it is opened without blocking
    assert not reader.is_alive()
    rules, problems = result["done"]
    assert [(p.file, p.message) for p in problems] == [
        (DEV, "not UTF-8 (byte 7): not read"),
        (".gitpod.yml", "not a regular file: not read"),
    ]
    os.unlink(workspace / ".gitpod.yml")
    (workspace / ".gitpod.yml").write_text("x" * (sources.MAX_BYTES + 1))
    (workspace / ".devcontainer" / "devcontainer.json").write_text('{\n  "portsAttributes": {\n    "1": {"label": }\n  }\n}')
    problems = sources.load(workspace)[1]
    assert [str(p) for p in problems] == [
        f"{DEV}: not JSON with comments: line 3, column 20: Expecting value; not used",
        f".gitpod.yml: {sources.MAX_BYTES + 1} bytes: larger than {sources.MAX_BYTES}, not read",
    ]
    for text, message in [
        ("ports:\n  - port: 3000\n  bad: [\n", "not YAML: line 3, column 3: did not find expected '-' indicator; not used"),
        ("when: 2001-02-30\n", "not YAML: day is out of range for month; not used"),
        ("- port: 3000\n", 'must be a mapping of keys such as ports:, not [{"port": 3000}]'),
    ]:
        (workspace / ".gitpod.yml").write_text(text)
        assert [p.message for p in sources.load(workspace)[1] if p.file == ".gitpod.yml"] == [message]


def test_absent_files_and_odd_shapes_are_quiet(workspace, resolver):
    rules, problems = sources.load(workspace)
    assert problems == [] and len(rules) == 0 and rules.resolve(3000) is NONE
    (workspace / ".devcontainer").rmdir()
    (workspace / ".devcontainer").write_text("a file, not a directory")
    (workspace / ".gitpod.yml").write_text("")
    rules, problems = sources.load(workspace)
    assert problems == [] and rules.layers == ()
    (workspace / ".devcontainer.json").mkdir()
    assert [p.message for p in sources.load(workspace)[1]] == ["not a regular file: not read"]
    assert sources.load(None, None)[1] == []
    missing = sources.load(workspace / "gone")[1]
    assert missing and all(p.code == "unreadable" for p in missing)


def test_the_watch_hook():
    assert sources.WATCH_DIRECTORIES == (".", ".devcontainer")
    for path in (".gitpod.yml", ".devcontainer", ".devcontainer/", "./.devcontainer/devcontainer.json", ".devcontainer.json"):
        assert sources.affects(path), path
    for path in ("", ".", "src/app.py", ".devcontainer/Dockerfile", ".gitpod.yaml", "a/.gitpod.yml"):
        assert not sources.affects(path), path
    assert sources.watched(Path("/w")) == (
        Path("/w/.devcontainer/devcontainer.json"),
        Path("/w/.devcontainer.json"),
        Path("/w/.gitpod.yml"),
    )


def test_selectors_and_layers_directly():
    """The public pieces the server wires: Rule, Layer and Ruleset built by hand."""
    origin = Origin("config.json", "x")
    layer = Layer(
        "config.json",
        [
            Rule(origin, Port(80), {"label": "http"}),
            Rule(origin, Range(1, 1023), {"on_open": "ignore"}),
            Rule(origin, command("nginx"), {"protocol": "http"}),
        ],
    )
    found = Ruleset([layer]).resolve(80, "nginx: master process")
    assert (found.label, found.on_open, found.protocol) == ("http", "ignore", "http")
    with pytest.raises(ValueError):
        Layer("x", style="other")
