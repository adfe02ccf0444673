"""The documentation stays true to the tree: every relative link in README.md, CONTRIBUTING.md
and docs/ points to a file that exists (and to a heading that exists, for an ``#anchor``), the
code layout of CONTRIBUTING.md names every module, every setting of ``aether serve --help`` is
in docs/settings.md, whose tables are the ones the code's settings table writes, and no
document speaks of the project's internal history. No server, no network: files and one
``--help``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", ROOT / "CONTRIBUTING.md", *(ROOT / "docs").glob("*.md")])
#: Markdown a reader meets, beyond DOCS: the benchmark notes and results.
ALL_MARKDOWN = DOCS + sorted((ROOT / "bench").glob("*.md"))

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose(text: str):
    """(line number, line) of every line outside fenced code blocks."""
    fenced = None
    for number, line in enumerate(text.splitlines(), 1):
        match = _FENCE.match(line)
        if match:
            if fenced is None:
                fenced = match.group(1)
            elif match.group(1) == fenced:
                fenced = None
            continue
        if fenced is None:
            yield number, line


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text without markup, lower case, anything but
    letters, digits, ``_``, ``-`` and spaces dropped, spaces made hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a document's headings; a repeated heading gets ``-1``, ``-2``, ..."""
    found, counts = set(), {}
    for _, line in prose(path.read_text()):
        match = _HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = counts.get(base, 0)
            counts[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path):
    """(line number, target) of every link in the document's prose."""
    for number, line in prose(path.read_text()):
        reference = _REFERENCE.match(line)
        if reference:
            yield number, reference.group(1)
            continue
        for match in _LINK.finditer(_CODE_SPAN.sub(lambda m: m.group(0).replace("]", "").replace("(", ""), line)):
            yield number, match.group(1)


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    broken = []
    for number, target in links(path):
        if _SCHEME.match(target):
            continue  # another site: not this test's to check
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / unquote(file_part)).resolve() if file_part else path
        where = f"{path.relative_to(root)}:{number}: {target}"
        if root not in resolved.parents:
            broken.append(f"{where} leaves the repository")
        elif not resolved.exists():
            broken.append(f"{where}: no such file")
        elif anchor and resolved.suffix == ".md" and unquote(anchor) not in anchors(resolved):
            broken.append(f"{where}: no heading #{anchor} in {resolved.relative_to(root)}")
    return broken


def test_the_documents_exist():
    names = {str(path.relative_to(ROOT)) for path in DOCS}
    for name in (
        "README.md",
        "CONTRIBUTING.md",
        "docs/protocol.md",
        "docs/channels.md",
        "docs/settings.md",
        "docs/previews.md",
        "docs/registry.md",
        "docs/deploying.md",
        "docs/metrics-and-logs.md",
        "docs/doctor.md",
        "docs/ports.md",
    ):
        assert name in names


@pytest.mark.parametrize("path", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    assert broken_links(path) == []


def test_the_link_check_catches_what_it_should(tmp_path):
    """The checker itself: a missing file, a missing heading, and links inside code are not links."""
    (tmp_path / "there.md").write_text("# A `code` heading: yes\n## Twice\n## Twice\n")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "[ok](there.md#a-code-heading-yes) [ok](there.md#twice-1) [ok](#local) [web](https://example.com/x)\n"
        "[gone](missing.md) [bad anchor](there.md#nope)\n"
        "`[not a link](nowhere.md)`\n"
        "```\n[not a link either](nowhere.md)\n```\n"
        "## Local\n"
    )
    assert broken_links(doc, tmp_path.resolve()) == [
        "doc.md:2: missing.md: no such file",
        "doc.md:2: there.md#nope: no heading #nope in there.md",
    ]


def test_readme_stays_a_front_door():
    """What aether is, the two commands, connect, a preview, and links: the rest is in docs/."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    makefile = (ROOT / "Makefile").read_text()
    for command in ("run", "test"):
        assert f"make {command}" in readme
        assert re.search(rf"^{command}:", makefile, re.M), f"the README's `make {command}` is not a Makefile target"


def test_the_layout_names_every_module():
    """CONTRIBUTING.md's code layout links every module under aether/ (the link test checks that
    each link still points to a file)."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    linked = {unquote(target) for _, target in links(ROOT / "CONTRIBUTING.md")}
    missing = [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "aether").rglob("*.py"))
        if path.name not in ("__init__.py", "__main__.py") and str(path.relative_to(ROOT)) not in linked
    ]
    assert missing == [], f"modules missing from CONTRIBUTING.md's layout: {missing}"
    assert "## Layout" in text


def test_every_setting_of_serve_is_documented():
    """Each flag and AETHER_* variable ``aether serve --help`` and ``aether --help`` print is in
    docs/settings.md."""
    settings = (ROOT / "docs" / "settings.md").read_text()
    helps = [
        subprocess.run(
            [sys.executable, "-m", "aether", *args, "--help"], capture_output=True, text=True, check=True, cwd=ROOT
        ).stdout
        for args in (["serve"], [])
    ]
    names = set()
    for text in helps:
        names |= set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", text)) | set(re.findall(r"AETHER_[A-Z_]+", text))
    names -= {"--help", "--version"}
    assert names, "no flags found in --help"
    assert sorted(name for name in names if f"`{name}" not in settings) == []


def test_the_settings_tables_are_the_codes():
    """docs/settings.md holds the tables ``python -m aether.settings --write`` (``make docs``)
    writes from aether/settings/table.py, each between its markers."""
    from aether.settings import markdown

    text = (ROOT / "docs" / "settings.md").read_text()
    assert sorted(markdown.blocks(text)) == sorted(markdown.BLOCKS)
    assert markdown.rewrite(text) == text, "run `make docs`: docs/settings.md differs from aether/settings/table.py"


#: The project's own history and one machine are no reader's business: name the protocol, the
#: behaviour, or the environment a figure was measured in instead.
_HISTORY = re.compile(r"\bseeds?\b|\bissues? #?\d+|\bthis machine\b|\bthese machines\b|\bthese VMs\b", re.I)


@pytest.mark.parametrize("path", ALL_MARKDOWN, ids=lambda path: str(path.relative_to(ROOT)))
def test_no_document_speaks_of_seeds_issues_or_this_machine(path):
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if _HISTORY.search(line)
    ]
    assert found == []


#: Code speaks of random seeds (the fuzzers print theirs); the project's seeds it never names.
_CODE_HISTORY = re.compile(r"\bseeds? \d{3}\b|\bseed's\b|\bissues? #?\d+|\bthis machine\b|\bthese machines\b", re.I)
_CODE = sorted(
    path
    for top in ("aether", "bench", "tests", "deploy")
    for path in (ROOT / top).rglob("*")
    if path.suffix in (".py", ".sh", ".service", ".js", ".html", ".css", ".c") and "__pycache__" not in path.parts
)


def test_no_code_speaks_of_seeds_issues_or_this_machine():
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in _CODE
        if path != Path(__file__)
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if _CODE_HISTORY.search(line)
    ]
    assert found == []


def test_no_merge_conflict_is_left_in_a_file():
    marker = re.compile(r"^(<{7}|>{7}) ")
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in [*_CODE, *ALL_MARKDOWN]
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if marker.match(line)
    ]
    assert found == []
