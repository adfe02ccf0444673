"""Baseline: the least a bcc consumer can do. The same probe, a blocking ring_buffer_poll, and
one JSON line per record, with no table, namespace check, or process lookup."""

import ctypes
import json
import struct
import sys
from pathlib import Path

from bcc import BPF

source = (Path(__file__).resolve().parents[1] / "bpf" / "listen_events.c").read_bytes()
bpf = BPF(text=source, cflags=["-DAETHER_RING_PAGES=64"])
record = struct.Struct("=QQQHHBB2x16s16s")


def callback(_ctx, data, size):
    _sk, _pid, _ts, _family, port, _old, new, _addr, _comm = record.unpack(ctypes.string_at(data, size))
    kind = "open" if new == 10 else "close"
    sys.stdout.write(json.dumps({"channel": "ports", "type": kind, "port": port}) + "\n")
    sys.stdout.flush()
    return 0


bpf[b"events"].open_ring_buffer(callback)
print("minimal ready", file=sys.stderr, flush=True)
while True:
    bpf.ring_buffer_poll(-1)
