"""Fan-out: put-to-subscriber latency with K subscribers of one prefix, aetcdcfg vs plain aetcd.

A separate writer process puts ``time.time_ns()`` every 5 ms, 2,000 times (10 s); K tasks in this
process each iterate their subscription and record ``now - value`` per event. aetcdcfg shares one
server watcher among the K subscriptions; the baseline opens K aetcd watches (K server watchers), as
a FastAPI service would without this library. CPU per delivery is this process's CPU time over the
run divided by the number of (event, subscriber) deliveries; RSS per subscriber is the growth from
opening the K subscriptions, divided by K. The interpreter's GC settings are left at their defaults;
the ``gc`` column counts the collections of each generation during the run (``gc.callbacks``) and
their total time. K = 1,000 runs ``RUNS`` times per client, interleaved, and the summary gives
min / median / max.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cached_property

import aetcd
import anyio

from aetcdcfg import EtcdClient
from aetcdcfg.testing import EtcdServer

from ._util import GcClock, percentile, rss_bytes, start_writer, table

PUTS = 2_000
INTERVAL = 0.005
RUNS = 3  # of K = 1,000
TARGET_P99_MS = 10.0
TARGET_CPU_US = 2.5


@dataclass
class Result:
    name: str
    k: int
    latencies_ns: array[int]  # an int64 array: a list of 2,000,000 ints would grow RSS by ~70 MB
    wall_s: float
    cpu_s: float
    rss_per_sub: float
    collections: tuple[int, int, int]
    gc_s: float

    @cached_property
    def p50_ms(self) -> float:
        return percentile(self.latencies_ns, 50) / 1e6

    @cached_property
    def p99_ms(self) -> float:
        return percentile(self.latencies_ns, 99) / 1e6

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / max(self.deliveries, 1) * 1e6

    @property
    def deliveries(self) -> int:
        return len(self.latencies_ns)

    def row(self) -> list[object]:
        g0, g1, g2 = self.collections
        return [
            self.name,
            self.k,
            f"{self.p50_ms:.2f}",
            f"{self.p99_ms:.2f}",
            f"{self.deliveries / self.wall_s:,.0f}",
            f"{self.cpu_us:.2f}",
            f"{self.rss_per_sub / 1024:.1f}",
            f"{g0}/{g1}/{g2}, {self.gc_s * 1e3:.0f} ms",
            f"{self.deliveries}/{PUTS * self.k}",
        ]


Subscribe = Callable[[str, Callable[[], None], "array[int]"], Awaitable[None]]


async def measure(name: str, endpoint: str, k: int, subscribe: Subscribe) -> Result:
    prefix = f"/bench/{uuid.uuid4().hex[:8]}/"
    latencies = array("q")
    ready = anyio.Semaphore(0)
    rss_before = rss_bytes()
    # Plain asyncio tasks, as uvicorn runs requests: an anyio 4.16 task group wraps each task in
    # one more coroutine (its _run_coro) that every wake-up passes through, for either client.
    tasks = [asyncio.create_task(subscribe(prefix, ready.release, latencies)) for _ in range(k)]
    try:
        with anyio.fail_after(60):
            for _ in range(k):
                await ready.acquire()
        rss_after = rss_bytes()
        with GcClock() as clock:
            cpu0, t0 = time.process_time(), time.monotonic()
            writer = await start_writer(endpoint, prefix, PUTS, INTERVAL)
            with anyio.move_on_after(60):  # a client that falls this far behind shows it in "delivered"
                while len(latencies) < PUTS * k:
                    await anyio.sleep(0.05)
            cpu1, t1 = time.process_time(), time.monotonic()
        await writer.wait()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    counts = (clock.counts[0], clock.counts[1], clock.counts[2])
    return Result(
        name, k, latencies, t1 - t0, cpu1 - cpu0, (rss_after - rss_before) / k, counts, clock.seconds
    )


async def run(endpoint: str, ks: list[int]) -> list[Result]:
    results = []
    host, port = endpoint.split("://", 1)[1].rsplit(":", 1)
    for k in [each for each in ks for _ in range(RUNS if each == 1000 else 1)]:
        async with EtcdClient(endpoints=[endpoint]) as client:

            async def ours(prefix: str, ready: Callable[[], None], out: array[int]) -> None:
                async with client.watch(prefix, buffer_size=PUTS + 10) as sub:
                    ready()
                    async for event in sub:
                        out.append(time.time_ns() - int(event.value))

            results.append(await measure("aetcdcfg", endpoint, k, ours))

        baseline = aetcd.Client(host=host, port=int(port))
        await baseline.connect()
        try:

            async def plain(prefix: str, ready: Callable[[], None], out: array[int]) -> None:
                watch = await baseline.watch_prefix(prefix.encode())  # noqa: B023 (awaited in this loop)
                ready()
                async for event in watch:
                    out.append(time.time_ns() - int(event.kv.value))

            results.append(await measure("aetcd (K watches)", endpoint, k, plain))
        finally:
            with anyio.move_on_after(5, shield=True):
                await baseline.close()
    return results


async def main(ks: list[int] | None = None) -> str:
    with EtcdServer() as server:
        results = await run(server.endpoint, ks or [1, 100, 1000])
    return report(results)


def report(results: list[Result]) -> str:
    headers = [
        "client",
        "K",
        "p50 ms",
        "p99 ms",
        "deliveries/s",
        "CPU µs/delivery",
        "RSS KiB/sub",
        "gc gen0/1/2, time",
        "delivered",
    ]
    out = [table(headers, [r.row() for r in results]), ""]
    for ours, base in zip(results[::2], results[1::2], strict=True):
        out.append(
            f"K={ours.k}: p99 {base.p99_ms / max(ours.p99_ms, 1e-9):.1f}x lower, "
            f"CPU per delivery {base.cpu_us / max(ours.cpu_us, 1e-9):.1f}x lower than aetcd"
        )
    out.append("")
    summary = []
    for name in dict.fromkeys(r.name for r in results):
        runs = [r for r in results if r.name == name and r.k == 1000]
        if not runs:
            continue
        cells = [name, len(runs)]
        for values in ([r.p50_ms for r in runs], [r.p99_ms for r in runs], [r.cpu_us for r in runs]):
            cells.append(f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}")
        summary.append(cells)
    if summary:
        headers = ["K = 1,000", "runs", "p50 ms min/med/max", "p99 ms min/med/max", "CPU µs min/med/max"]
        out.append(table(headers, summary))
        ours = [r for r in results if r.name == "aetcdcfg" and r.k == 1000]
        p99 = statistics.median(r.p99_ms for r in ours)
        cpu = statistics.median(r.cpu_us for r in ours)
        out.append(
            f"\ntargets at K = 1,000 (median of {len(ours)} runs): p99 {p99:.2f} ms "
            f"({'met' if p99 <= TARGET_P99_MS else 'NOT met'}: <= {TARGET_P99_MS:g} ms), "
            f"CPU {cpu:.2f} µs/delivery ({'met' if cpu <= TARGET_CPU_US else 'NOT met'}: "
            f"<= {TARGET_CPU_US:g} µs)"
        )
    return "\n".join(out)


if __name__ == "__main__":
    import sys

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # quiet: warnings up
    options = {"use_uvloop": True} if "--uvloop" in sys.argv else {}
    # --k 1000 measures one K only (e.g. while working on the fan-out); --runs N repeats K = 1,000.
    ks = [int(sys.argv[sys.argv.index("--k") + 1])] if "--k" in sys.argv else None
    if "--runs" in sys.argv:
        RUNS = int(sys.argv[sys.argv.index("--runs") + 1])
    print(anyio.run(main, ks, backend_options=options))
