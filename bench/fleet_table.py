"""A gateway's route table at fleet scale, against a real redis-server: the full load of 10,000
workspaces x 5 ports (time, and the gateway process's RSS), then 1,000 changes/s written by VMs'
update script and applied by the follower (lag from the write to the table). Baselines in the
same run: HGETALL of the same hash alone (the transfer a load cannot avoid), and the process's RSS
before the load (Python, aether.fleet and the redis client). Goals: load <= 2 s, RSS <= 200 MB,
lag p99 <= 50 ms.

    .venv/bin/python bench/fleet_table.py [--workspaces 10000] [--ports 5] [--rate 1000] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import subprocess
import sys
import time

from common import PY, ROOT, fmt, summary

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from aether.fleet import auth, blob, keys  # noqa: E402

KEYS = auth.FleetKeys([b"bench-fleet-key-" * 2])
PORTS = (3000, 5173, 8000, 8080, 9229, 4200, 5000, 6006)


def prefix_of(i: int) -> str:
    return f"w{i:06d}"


def workspace_blob(i: int, epoch: str, ports: int, stamp: float | None = None) -> bytes:
    prefix = prefix_of(i)
    open_ports = {port: ("public" if n % 2 else "private") for n, port in enumerate(PORTS[:ports])}
    raw = blob.encode(
        prefix=prefix,
        project=prefix + "-0123456789abcdef",
        workspace=f"ws-{i}",
        address=f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:3001",
        epoch=epoch,
        started=1765000000000,
        dead_after=3000,
        verifier=auth.verifier(KEYS, f"token-{i}", prefix),
        alive=True,
        ports=open_ports,
        public=(),
        names={"web": PORTS[0], "api": PORTS[1 % ports]},
    )
    if stamp is None:
        return raw
    # A field the gateway ignores (unknown fields are): when the VM wrote this change.
    return raw[:-1] + b',"bench_t":%r}' % stamp


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# -- the gateway process: what is measured ---------------------------------------------------


async def gateway(url: str, expected: int, timeout: float) -> dict:
    import gc

    from aether.fleet import connection
    from aether.fleet import routes as r
    from aether.fleet.follower import Follower

    lags: list[float] = []

    def on_change(prefix, old, new):
        if new is not None and b"bench_t" in new.raw:
            lags.append((time.time() - json.loads(new.raw)["bench_t"]) * 1000)

    client = connection.client(url, socket_timeout=30)
    await client.ping()
    gc.collect()
    before = rss_mb()
    started = time.perf_counter()
    await client.hgetall(keys.STATE)
    transfer = time.perf_counter() - started
    await client.aclose()
    gc.collect()

    routes = r.Routes(on_change=on_change)
    follower = Follower(url, routes, reload_interval=3600, reap_interval=3600)
    started = time.perf_counter()
    await follower.start(timeout=30)
    first_load = follower.last_load_seconds
    gc.collect()
    after = rss_mb()
    started = time.perf_counter()
    await follower._reload("interval")  # a periodic reload: the same bytes, nothing decoded again
    reload = time.perf_counter() - started
    count, ports, alive = routes.counts()
    print(json.dumps({"ready": True}), flush=True)
    deadline = time.monotonic() + timeout
    while len(lags) < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    peak = rss_mb()
    await follower.stop()
    return {
        "transfer": transfer,
        "load": first_load,
        "reload": reload,
        "rss_before": before,
        "rss_after": after,
        "rss_end": peak,
        "workspaces": count,
        "ports": ports,
        "alive": alive,
        "lags": lags,
        "gaps": follower.reloads["gap"],
        "applied": follower.applied,
        "lag_buckets": follower.lag.counts,
    }


# -- the driver ------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workspaces", type=int, default=10_000)
    parser.add_argument("--ports", type=int, default=5, choices=range(1, len(PORTS) + 1))
    parser.add_argument("--rate", type=int, default=1000, help="changes per second")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--gateway", help=argparse.SUPPRESS)  # internal: run as the gateway process
    parser.add_argument("--expected", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gateway:
        result = asyncio.run(gateway(args.gateway, args.expected, args.seconds + 30))
        print(json.dumps(result), flush=True)
        return 0

    from support.redis import RedisServer

    with RedisServer() as server:
        sync = server.client()
        claim = sync.register_script(keys.CLAIM)
        update = sync.register_script(keys.UPDATE)
        epochs = [secrets.token_hex(8) for _ in range(args.workspaces)]
        started = time.perf_counter()
        for first in range(0, args.workspaces, 1000):
            pipe = sync.pipeline(transaction=False)
            for i in range(first, min(first + 1000, args.workspaces)):
                prefix = prefix_of(i)
                claim(
                    keys=keys.CHANGE_KEYS,
                    client=pipe,
                    args=[
                        prefix,
                        prefix + "-0123456789abcdef",
                        epochs[i],
                        workspace_blob(i, epochs[i], args.ports),
                        3_600_000,
                        "bench-boot",
                        keys.STREAM_MAXLEN,
                    ],
                )
            pipe.execute()
        populate = time.perf_counter() - started
        memory = sync.memory_usage(keys.STATE) or 0
        expected = int(args.rate * args.seconds)

        proc = subprocess.Popen(
            [PY, __file__, "--gateway", server.url, "--expected", str(expected), "--seconds", str(args.seconds)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT / "bench",
        )
        if json.loads(proc.stdout.readline()).get("ready") is not True:
            print("the gateway process did not start")
            return 1
        # The VMs: one update each 1/rate s, to a random workspace, paced on a fixed schedule.
        rng = random.Random(7)
        t0 = time.monotonic()
        for n in range(expected):
            delay = t0 + n / args.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            i = rng.randrange(args.workspaces)
            update(
                keys=keys.CHANGE_KEYS,
                args=[prefix_of(i), epochs[i], workspace_blob(i, epochs[i], args.ports, time.time()), keys.STREAM_MAXLEN],
            )
        written = time.monotonic() - t0
        result = json.loads(proc.stdout.readline())
        proc.wait()

        # What the fleet's steady state costs Redis: one heartbeat per VM a second.
        heartbeat = sync.register_script(keys.HEARTBEAT)
        sync.config_resetstat()
        pipe = sync.pipeline(transaction=False)
        for i in range(args.workspaces):
            heartbeat(keys=keys.CHANGE_KEYS, client=pipe, args=[prefix_of(i), epochs[i], 3_600_000, keys.STREAM_MAXLEN])
        pipe.execute()
        per_heartbeat = sync.info("commandstats")["cmdstat_evalsha"]["usec_per_call"]

    lags = result["lags"]
    routes = result["workspaces"] * args.ports
    print(
        f"fleet table: {result['workspaces']} workspaces x {args.ports} ports ({routes} routes, {result['ports']} open), "
        f"{memory / 1e6:.1f} MB in Redis (claimed in {populate:.2f} s)"
    )
    print(
        f"full load: {result['load']:.3f} s (HGETALL alone, baseline: {result['transfer']:.3f} s); "
        f"periodic reload of the same bytes: {result['reload']:.3f} s  [goal: load <= 2 s]"
    )
    print(
        f"gateway RSS: {result['rss_before']:.0f} MB before the load (baseline: Python, aether.fleet, redis), "
        f"{result['rss_after']:.0f} MB after, {result['rss_end']:.0f} MB after the changes  [goal: <= 200 MB]"
    )
    print(
        f"{args.rate} changes/s for {args.seconds:g} s ({expected} written in {written:.2f} s): "
        f"{len(lags)} applied, {result['gaps']} gaps"
    )
    print(f"write -> applied: {fmt(summary(lags))}  [goal: p99 <= 50 ms]")
    print(
        f"heartbeat script: {per_heartbeat:.1f} us of Redis time a call: {args.workspaces} VMs at 1/s use "
        f"{per_heartbeat * args.workspaces / 1e4:.1f}% of its core"
    )
    return 0 if len(lags) == expected else 1


if __name__ == "__main__":
    sys.exit(main())
