"""``make bench``: every benchmark, each against its baseline in the same run.

Each section runs in a process of its own: grpc.aio binds to the first event loop of a process,
so a second ``anyio.run`` (say, with uvloop) in the same process would measure a broken client.
"""

from __future__ import annotations

import subprocess
import sys

SECTIONS = [
    ("## Fan-out: put-to-subscriber latency (writer process puts every 5 ms), asyncio loop", ["fanout"]),
    ("## Fan-out again on uvloop (what uvicorn uses when installed)", ["fanout", "--uvloop"]),
    ("## Fan-out without etcd: GC collections and CPU per delivery, 1,000 subscribers", ["fanout_gc"]),
    ("## LiveSettings: put-to-settings latency (writer process puts every 5 ms)", ["live"]),
    (
        "## LiveSettings, a 200-field model: put-to-settings latency, one key per revision every 5 ms",
        ["livemodel"],
    ),
    ("## Replay: a watch from an old revision over a 50,000-event backlog", ["replay"]),
    (
        "## One stream: CPU per event against raw grpc.aio stubs (writer process, as fast as etcd takes it)",
        ["stream"],
    ),
    ("## First load: 40,000 keys into a dict, LiveSettings start, idle subscribers", ["firstload"]),
    (
        "## Probes: /livez, /readyz and settings_dependency while sync handlers fill the threadpool",
        ["probes"],
    ),
    ("## Fleet: 200 clients of one prefix, direct vs through etcd's gRPC proxy; a 20 s storm", ["fleet"]),
    ("## Rollout: 200 instances reporting records; set --wait, record cost, a 500-change burst", ["rollout"]),
]


def main() -> int:
    failed = 0
    for title, args in SECTIONS:
        print(f"{title}\n", flush=True)
        module, *rest = args
        failed |= subprocess.call([sys.executable, "-m", f"benchmarks.{module}", *rest])
        print(flush=True)
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
