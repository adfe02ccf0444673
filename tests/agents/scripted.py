#!/usr/bin/env python3
"""A test backend that does what its prompt's first word says (see docs/protocol.md for the
protocol it speaks, or breaks):

    stream N [SECONDS]  N deltas "0 ", "1 ", ... one every SECONDS (0.1), then the message
    count               says how many messages it was given, with their roles and statuses
    crash               one delta, a line on stderr, exit 3
    hang                ignores SIGTERM, starts a child, writes nothing and waits
    garbage             a line that is not JSON
    flood               stderr without end
    chatter             deltas without end
    longline            one line of 2 MiB
    silent              exits 0 having written nothing
    error               an error line
    escape [wait] [no-orphan]
                        starts children that leave its session (setsid), ignore SIGHUP (nohup)
                        and (unless no-orphan) one orphaned at once; writes their pids to
                        agent.pid, then answers (or waits)
    anything else       echoes the prompt

It writes its pid (and a child's, for hang) to agent.pid in its working directory, the
workspace root, so a test can check what is left after the turn.
"""

import json
import os
import signal
import subprocess
import sys
import time


def emit(kind, **fields):
    sys.stdout.write(json.dumps({"type": kind, **fields}) + "\n")
    sys.stdout.flush()


turn = json.loads(sys.stdin.readline())
messages = turn["messages"]
words = messages[-1]["text"].split()
mode = words[0]
with open("agent.pid", "w") as f:
    f.write(str(os.getpid()))

if mode == "stream":
    count = int(words[1])
    delay = float(words[2]) if len(words) > 2 else 0.1
    parts = [f"{i} " for i in range(count)]
    for part in parts:
        emit("delta", text=part)
        time.sleep(delay)
    emit("message", text="".join(parts))
elif mode == "count":
    emit("tool", name="count", text="counted the messages")
    emit("delta", text=f"{len(messages)} messages: ")
    emit("delta", text=" ".join(f"{m['role']}:{m['status']}" for m in messages))
elif mode == "crash":
    emit("delta", text="about to crash ")
    sys.stderr.write("scripted: boom\n")
    sys.exit(3)
elif mode == "hang":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen(["sleep", "300"])
    with open("agent.pid", "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    time.sleep(300)
elif mode == "garbage":
    print("Traceback (most recent call last): this is not JSON", flush=True)
    time.sleep(30)
elif mode == "flood":
    while True:
        sys.stderr.write("z" * 8000 + "\n")
elif mode == "chatter":
    while True:
        emit("delta", text="x" * 8000)
elif mode == "longline":
    sys.stdout.write('{"type": "delta", "text": "' + "y" * (2 << 20) + '"}\n')
    sys.stdout.flush()
    time.sleep(30)
elif mode == "silent":
    pass
elif mode == "error":
    emit("error", message="scripted refusal")
    time.sleep(30)
elif mode == "escape":
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    pids = [subprocess.Popen(["setsid", "sleep", "1000"], **quiet).pid, subprocess.Popen(["nohup", "sleep", "1000"], **quiet).pid]
    if "no-orphan" not in words:
        orphan = subprocess.run(["sh", "-c", "setsid sleep 1000 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True)
        pids.append(int(orphan.stdout))
    with open("agent.pid", "w") as f:
        f.write(" ".join(map(str, pids)))
    emit("delta", text="started")
    if "wait" in words:
        time.sleep(300)
else:
    emit("delta", text="you said: ")
    emit("delta", text=messages[-1]["text"])
