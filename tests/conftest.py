"""Fixtures: real listeners, a real `aether ports watch` and `aether serve`, both backends.

The helpers they are built from are in ``support/``; tests import those from there.
"""

from __future__ import annotations

import json

import pytest
from support import ebpf
from support.browser import chromium
from support.certs import self_signed
from support.ebpf import need_ebpf
from support.listeners import Listeners
from support.servers import Server, Watcher


@pytest.hookimpl(tryfirst=True)  # before -m selects by marker
def pytest_collection_modifyitems(items):
    """A test using a fixture its module names in ``PROBE_FIXTURES`` loads the probe: it is
    marked ``ebpf`` (pytest puts no marks on fixtures)."""
    for item in items:
        fixtures = getattr(getattr(item, "module", None), "PROBE_FIXTURES", ())
        if set(fixtures) & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ebpf)


@pytest.fixture(autouse=True)
def _ebpf_marker_kept(request):
    """A test that loads the probe is marked ``ebpf``, so that ``-m "not ebpf"`` means it:
    one that loaded it (a function-scoped helper noted it) without the marker fails."""
    ebpf.used = False
    yield
    if ebpf.used and request.node.get_closest_marker("ebpf") is None:
        pytest.fail("this test loads the eBPF probe: mark it @pytest.mark.ebpf", pytrace=False)


@pytest.fixture(params=[pytest.param("ebpf", marks=pytest.mark.ebpf), "sockdiag"])
def backend(request) -> str:
    if request.param == "ebpf":
        need_ebpf()
    return request.param


@pytest.fixture
def watch(backend):
    watchers = []

    def start(*args, env=None) -> Watcher:
        w = Watcher(backend, *args, env=env)
        watchers.append(w)
        return w

    yield start
    for w in watchers:
        w.stop()


@pytest.fixture
def listeners(tmp_path):
    pool = Listeners(tmp_path)
    yield pool
    pool.stop_all()


@pytest.fixture
def serve(backend, tmp_path):
    """``serve(*flags, env=None, config=None)``: `aether serve` on ``backend``, with ``config``
    (a dict) as its config.json."""
    servers = []

    def start(*args, env=None, config: dict | None = None) -> Server:
        state = tmp_path / f"state{len(servers)}"
        if config is not None:
            state.mkdir(mode=0o700)
            (state / "config.json").write_text(json.dumps(config))
        server = Server(backend, state, *args, env=env)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def workspace_server(tmp_path):
    """``start(*flags, env=None, state=None, wrap=())``: `aether serve` (sockdiag: the ports
    backend does not matter to the channels that use this) rooted in one fresh workspace,
    ``server.root``."""
    servers = []
    root = tmp_path / "workspace"
    root.mkdir()

    def start(*args: str, env: dict | None = None, state: str | None = None, wrap: tuple = ()) -> Server:
        server = Server(
            "sockdiag", tmp_path / (state or f"state{len(servers)}"), "--workspace-root", str(root), *args, env=env, wrap=wrap
        )
        server.root = root
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def driver(tmp_path):
    """Debian's Chromium under selenium, with a fresh profile; quit at teardown."""
    browser = chromium(tmp_path / "profile")
    yield browser
    browser.quit()


@pytest.fixture(scope="session")
def cert(tmp_path_factory) -> tuple[str, str]:
    """A self-signed certificate for localhost: (certificate, key) paths."""
    return self_signed(tmp_path_factory.mktemp("cert"))
