"""The fan-out without etcd: what K sleeping subscribers cost the cyclic GC and the CPU per delivery.

K subscriber tasks iterate ``async for`` over subscriptions of one ``PrefixWatch``; the benchmark
publishes N single-event revisions to it, one at a time, each once every subscriber has taken the
previous one (as a writer putting every 5 ms does, minus etcd and the network). It prints the
collections of each GC generation during the N revisions (``gc.callbacks``, the interpreter's
default thresholds), their total time, the CPU per delivery and the time from publishing a revision
to its last delivery (p50/p99/max). Deterministic enough to compare two versions of the hand-off:
``python -m benchmarks.fanout_gc [K] [N]``.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time

from aetcdcfg.events import EventType, make_event

from ._util import DetachedFanout, GcClock, percentile

PREFIX = b"/bench/gc/"


async def main(k: int, n: int) -> str:
    rounds: list[float] = []
    async with DetachedFanout(PREFIX, k) as fanout:
        gc.collect()
        with GcClock() as clock:
            cpu = time.process_time()
            for i in range(n):
                event = make_event(EventType.PUT, f"/bench/gc/k{i % 10}", b"v", 101 + i, None, 50, 1)
                begin = time.perf_counter()
                await fanout.publish(event)
                rounds.append(time.perf_counter() - begin)
            cpu = time.process_time() - cpu
    if not n:
        return "no revisions"
    ms = [r * 1e3 for r in rounds]
    return (
        f"K={k}, {n} revisions: CPU {cpu / (k * n) * 1e6:.2f} µs/delivery; publish -> last delivery "
        f"p50 {percentile(ms, 50):.2f} ms, p99 {percentile(ms, 99):.2f} ms, max {max(ms):.2f} ms; "
        f"GC collections gen0/gen1/gen2 {'/'.join(map(str, clock.counts))}, {clock.seconds * 1e3:.0f} ms"
    )


if __name__ == "__main__":
    k = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    print(asyncio.run(main(k, n)))
