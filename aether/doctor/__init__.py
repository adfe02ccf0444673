"""``aether doctor``: will the eBPF backend run here, and if not, what to change.

The eBPF verdict is the probe's test load (which the privileges, kernel, tracepoint, bcc and
headers checks explain when it fails) together with sock_diag, which every backend takes its
start-up snapshot from. The state directory and the port are checked and reported beside it:
they decide whether ``aether serve`` starts, not how it watches ports; and so is how terminal
sessions and agent turns will be ended (a cgroup each, or the fallback).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from aether.doctor import cgroups, checks
from aether.doctor.checks import FAIL, OK, WARN, Check

#: The checks that explain a failed test load, in the order a fix should go.
PROBE_DEPENDS = ("privileges", "kernel", "tracepoint", "bcc", "headers")


@dataclasses.dataclass
class Report:
    checks: list[Check]
    ebpf: bool
    summary: str

    def to_json(self) -> dict:
        return {"checks": [check.to_json() for check in self.checks], "ebpf": self.ebpf, "summary": self.summary}

    def lines(self) -> list[str]:
        """One line per check, its fix indented under it; the summary last."""
        out = []
        for check in self.checks:
            out.append(f"{check.verdict:<4} {check.name:<11} {check.detail}")
            if check.fix:
                out.append(f"{'':<5}{'':<11} fix: {check.fix}")
        out.append(self.summary)
        return out


def run(host: str, port: int, state_dir: Path, backend: str = "auto", config_error: str | None = None) -> Report:
    steps: list[tuple[str, Callable[[], Check]]] = [
        ("privileges", checks.check_privileges),
        ("kernel", checks.check_kernel),
        ("btf", checks.check_btf),
        ("tracepoint", checks.check_tracepoint),
        ("kprobes", checks.check_kprobes),
        ("bcc", checks.check_bcc),
        ("headers", checks.check_headers),
        ("probe", checks.check_probe),
        ("sock_diag", checks.check_sockdiag),
        ("state-dir", lambda: checks.check_state_dir(state_dir, config_error)),
        ("port", lambda: checks.check_port(host, port)),
        ("cgroups", lambda: cgroups.check_cgroups(state_dir)),
    ]
    found = [_checked(name, step) for name, step in steps]
    by_name = {check.name: check for check in found}
    ebpf = by_name["probe"].verdict == OK and by_name["sock_diag"].verdict == OK
    return Report(found, ebpf, summary(found, ebpf, backend))


def _checked(name: str, step: Callable[[], Check]) -> Check:
    """The step's verdict; a check that breaks on something the host does (a kernel without
    IPv6, a truncated /proc/config.gz) fails with what broke, and the others still run."""
    try:
        return step()
    except Exception as exc:
        return Check(
            name, FAIL, f"the check itself failed: {type(exc).__name__}: {exc}", "report this; the other checks still hold"
        )


def summary(found: list[Check], ebpf: bool, backend: str) -> str:
    """The last line: the verdict, why when negative, and the count of each verdict, naming the
    failed checks the verdict does not already name."""
    by_name = {check.name: check for check in found}
    why = [] if ebpf else [name for name in (*PROBE_DEPENDS, "probe", "sock_diag") if by_name[name].verdict == FAIL]
    others = [check.name for check in found if check.verdict == FAIL and check.name not in why]
    counts = [
        (sum(check.verdict == verdict for check in found), word)
        for verdict, word in ((OK, "ok"), (WARN, "warning"), (FAIL, "failed"))
    ]
    tally = ", ".join(f"{n} {word}{'s' if n > 1 and word == 'warning' else ''}" for n, word in counts if n)
    tally += f": {', '.join(others)}" if others else ""
    if ebpf:
        configured = ", but the configured backend is sockdiag" if backend == "sockdiag" else ""
        return f"doctor: eBPF backend will run{configured} ({tally})"
    if by_name["sock_diag"].verdict == FAIL:
        after = "without sock_diag, aether serve cannot watch ports at all"
    else:
        after = "aether serve would use sock_diag"
    return f"doctor: eBPF backend will NOT run ({', '.join(why)} failed); {after} ({tally})"


#: What deploy/aether.service reads (EnvironmentFile=) and where it keeps its state.
SERVICE_ENV_FILE = Path("/etc/aether/aether.env")
SERVICE_STATE_DIR = "/var/lib/aether"


def service_environment(path: Path, environ=None) -> None:
    """Put the ``AETHER_*`` settings of the unit's environment file into ``environ`` (this
    process's by default), as systemd would (install.sh writes plain ``NAME=VALUE`` lines); a
    missing file is fine, as for ``EnvironmentFile=-``."""
    import os

    environ = os.environ if environ is None else environ
    try:
        text = path.read_text()
    except FileNotFoundError:
        return
    for line in text.splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and name.startswith("AETHER_") and not line.lstrip().startswith("#"):
            environ[name] = value


def command(args) -> int:
    """``aether doctor``: the report on stdout; 0 iff the eBPF backend will run, 2 for bad
    settings. Host, port and state directory are found as ``aether serve`` finds them."""
    import os
    import sys

    import ujson

    from aether.settings import serve, sources
    from aether.state import StateDir, locate

    if args.service:
        try:
            service_environment(SERVICE_ENV_FILE)
        except OSError as exc:
            print(f"aether: {SERVICE_ENV_FILE}: {exc.strerror}", file=sys.stderr)
            return 2
        args.state_dir = args.state_dir or SERVICE_STATE_DIR
    running_port, running_preview, several = None, None, None
    if not args.state_dir and not args.service:
        # No flags: the server running here, if one is (see aether.running).
        from aether import running as running_servers

        found = running_servers.servers()
        if len(found) == 1 and not os.environ.get("AETHER_STATE_DIR"):
            args.state_dir, running_port = found[0]["stateDir"], found[0]["port"]
            running_preview = found[0].get("preview")
        elif len(found) > 1 and not os.environ.get("AETHER_STATE_DIR"):
            dirs = ", ".join(sorted({str(record.get("stateDir")) for record in found}))
            several = f"aether: several aether servers run ({dirs}): checking the defaults; pass --state-dir"
    try:
        sources.check_environment()  # again: --service may have read more of it
        state = StateDir(locate(args.state_dir))
        try:
            file, config_error = state.load_config(), None
        except ValueError as exc:
            file, config_error = {}, str(exc)
        except OSError as exc:
            file, config_error = {}, f"{exc.filename}: {exc.strerror}"
        host, port, backend = (serve.peek(name, args, file, state.config_path) for name in ("host", "port", "backend"))
        if running_port is not None and args.port is None and not os.environ.get("AETHER_PORT"):
            port = running_port
        domain = serve.peek("preview_domain", args, file, state.config_path)
        if args.preview is not None:
            preview_settings = {
                name: serve.peek(name, args, file, state.config_path)
                for name in ("preview_upstream_host", "prefix_length", "project_id", "workspace_root")
            }
    except ValueError as exc:
        print(f"aether: {exc}", file=sys.stderr)
        return 2
    if several is not None:  # once the settings are known good: a usage error stays one line
        print(several, file=sys.stderr)
    if args.preview is not None:
        if isinstance(running_preview, dict):
            # The running server's own: its flags may have set them, which nothing here sees.
            domain = running_preview.get("domain") or domain
            preview_settings["preview_upstream_host"] = running_preview.get("upstreamHost") or "localhost"
            if running_preview.get("workspaceRoot"):
                preview_settings["workspace_root"] = running_preview["workspaceRoot"]
            if running_preview.get("prefix"):
                preview_settings["project_id"] = prefix = str(running_preview["prefix"])
                preview_settings["prefix_length"] = len(prefix)
        return _preview(args, args.preview, domain, state.path, as_json=args.json, **preview_settings)
    report = run(host, port, state.path, backend, config_error)
    if args.json:
        print(ujson.dumps(report.to_json(), escape_forward_slashes=False))
    else:
        print("\n".join(report.lines()))
    return 0 if report.ebpf else 1


def _preview(
    args,
    port: int,
    domain: str,
    state_dir: Path,
    as_json: bool,
    preview_upstream_host: str = "localhost",
    prefix_length: int = 6,
    project_id: str | None = None,
    workspace_root: str | Path | None = None,
) -> int:
    """``--preview PORT``: the preview checks alone; 0 when none failed."""
    import os
    import sys

    import ujson

    from aether.doctor import preview

    if not 1 <= port <= 65535:
        print(f"aether: --preview {port}: a port number 1-65535", file=sys.stderr)
        return 2
    try:
        project = project_id or (Path(state_dir) / "project-id").read_text().strip()
    except OSError:
        project = ""
    prefix = project[:prefix_length] or "project"
    host = f"{port}-{prefix}.{domain}"
    from aether.attributes.live import read_all

    # The rules the server follows: a protocol one overrides what the port speaks.
    root = Path(workspace_root) if workspace_root else Path(os.path.expanduser("~"))
    rules, _problems = read_all(root if root.is_dir() else None, Path(state_dir) / "config.json")
    found = preview.check(port, host, domain, preview_upstream_host, rules, _registry_entry(Path(state_dir), port))
    failed = [check.name for check in found if check.verdict == FAIL]
    verdict = f"doctor: the preview of port {port} " + (f"fails ({', '.join(failed)})" if failed else "should work")
    report = Report(found, not failed, verdict)
    if as_json:
        print(
            ujson.dumps(
                {"checks": [c.to_json() for c in found], "ok": not failed, "summary": verdict}, escape_forward_slashes=False
            )
        )
    else:
        print("\n".join(report.lines()))
    return 1 if failed else 0


def _registry_entry(state_dir: Path, port: int):
    """``port``'s entry in the state directory's registry (a protocol there is the preview's
    over the rules'), or None: no registry, no entry, or one that cannot be read (the
    registry's own checks say why)."""
    from aether.registry.store import Registry, RegistryError

    path = state_dir / "registry.db"
    if not path.is_file():
        return None
    try:
        with Registry(path) as registry:
            return registry.by_port(port)
    except RegistryError:
        return None
