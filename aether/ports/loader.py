"""The probe's compiler, a short-lived helper process: ``python -P -m aether.ports.loader``.

bcc needs LLVM and clang (~120 MB of mappings, most of it resident once used) to compile an
88-line probe once. In the daemon that memory would stay for its whole life, so the daemon
starts this helper instead: it reads the probe's C source on stdin and its compile flags as
arguments, compiles, loads and attaches it with bcc (so the kernel's verifier and bcc report
any problem exactly as before), writes a :class:`~aether.ports.compiled.CompiledProbe` as one
JSON line, and exits. The daemon loads that itself (``aether.ports.compiled``).

Its output is ``{"probe": {...}}``, or ``{"error": "..."}`` with exit status 1: the one-line
reason the probe cannot run. bcc's own diagnostics (compiler errors) go to stderr, which is
the daemon's.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from aether.ports.ebpf import ProbeUnavailable, bcc_compile, check_compiler

#: Seconds a compile may take: ~0.3 s alone, several on a loaded 2-core machine.
TIMEOUT = 120


def helper_command() -> tuple[list[str], dict]:
    """(argv, environment) that run the helper with this process's Python and this very copy
    of aether, wherever the current directory is (``-P``: not on the import path)."""
    tree = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": tree + (os.pathsep + path if path else "")}
    return [sys.executable, "-P", "-m", "aether.ports.loader"], env


def describe() -> str:
    """The helper's command line, as ``aether doctor`` shows it."""
    argv, _env = helper_command()
    return shlex.join(argv)


def compile_in_helper(source: bytes, cflags: list[str]):
    """The probe compiled by the helper: a CompiledProbe, or ProbeUnavailable saying why not."""
    from aether.ports.compiled import CompiledProbe

    argv, env = helper_command()
    try:
        done = subprocess.run([*argv, *cflags], input=source, stdout=subprocess.PIPE, env=env, timeout=TIMEOUT, close_fds=True)
    except subprocess.TimeoutExpired:
        raise ProbeUnavailable(f"the probe's compiler ({describe()}) did not finish in {TIMEOUT} s") from None
    except OSError as exc:
        raise ProbeUnavailable(f"could not start the probe's compiler ({describe()}): {exc}") from exc
    try:
        answer = json.loads(done.stdout.decode("utf-8", "replace").strip().splitlines()[-1])
    except (ValueError, IndexError):
        answer = None
    if not isinstance(answer, dict) or not ({"probe", "error"} & answer.keys()):
        raise ProbeUnavailable(f"the probe's compiler ({describe()}) failed with exit status {done.returncode}")
    if "error" in answer:
        raise ProbeUnavailable(str(answer["error"]))
    try:
        return CompiledProbe.from_json(answer["probe"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ProbeUnavailable(f"the probe's compiler gave an unusable probe: {exc}") from exc


# -- the helper itself -----------------------------------------------------------------------


def compile_probe(source: bytes, cflags: list[str]):
    """Compile, load and attach with bcc; the program as data. ProbeUnavailable if it fails."""
    check_compiler()
    from bcc import lib

    from aether.ports import bpfsys
    from aether.ports.compiled import CompiledProbe, map_fd_slots

    bpf = bcc_compile(source, cflags)
    names = [lib.bpf_function_name(bpf.module, i) for i in range(lib.bpf_num_functions(bpf.module))]
    programs = [name for name in names if name.startswith(b"tracepoint__")]
    if len(programs) != 1:
        raise ProbeUnavailable(f"the probe must define one tracepoint program, not {len(programs)}")
    insns = bpf.dump_func(programs[0])
    maps: list = []
    relocations = []
    by_fd: dict[int, int] = {}
    for index, fd in map_fd_slots(insns):
        if fd not in by_fd:
            by_fd[fd] = len(maps)
            maps.append(bpfsys.map_info(fd))
        relocations.append((index, by_fd[fd]))
    return CompiledProbe(
        insns, lib.bpf_module_license(bpf.module), lib.bpf_module_kern_version(bpf.module), tuple(maps), tuple(relocations)
    )


def main(argv: list[str] | None = None) -> int:
    cflags = list(sys.argv[1:] if argv is None else argv)
    # The answer gets a descriptor of its own: whatever bcc or LLVM print on stdout goes
    # to stderr instead of into the JSON.
    answer = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    source = sys.stdin.buffer.read()
    try:
        probe = compile_probe(source, cflags)
    except ProbeUnavailable as exc:
        answer.write(json.dumps({"error": str(exc)}) + "\n")
        answer.flush()
        return 1
    except (ValueError, OSError) as exc:  # a relocation the loader cannot replay; map info refused
        answer.write(json.dumps({"error": f"the compiled probe cannot be handed over: {exc}"}) + "\n")
        answer.flush()
        return 1
    answer.write(json.dumps({"probe": probe.to_json()}) + "\n")
    answer.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
