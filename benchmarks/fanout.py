"""Fan-out: put-to-subscriber latency with K subscribers of one prefix, aetcdcfg vs plain aetcd.

A separate writer process puts ``time.time_ns()`` every 5 ms; K tasks in this process each iterate
their subscription and record ``now - value`` per event. aetcdcfg shares one server watcher among the
K subscriptions; the baseline opens K aetcd watches (K server watchers), as a FastAPI service would
without this library. CPU per delivery is this process's CPU time over the run divided by the
number of (event, subscriber) deliveries; RSS per subscriber is the growth from opening the K
subscriptions, divided by K.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aetcd
import anyio

from aetcdcfg import EtcdClient
from aetcdcfg.testing import EtcdServer

from ._util import percentile, rss_bytes, start_writer, table

PUTS = 400
INTERVAL = 0.005


@dataclass
class Result:
    name: str
    k: int
    latencies_ns: list[int]
    wall_s: float
    cpu_s: float
    rss_per_sub: float

    @property
    def deliveries(self) -> int:
        return len(self.latencies_ns)

    def row(self) -> list[object]:
        ms = [x / 1e6 for x in self.latencies_ns]
        return [
            self.name,
            self.k,
            f"{percentile(ms, 50):.2f}",
            f"{percentile(ms, 99):.2f}",
            f"{self.deliveries / self.wall_s:,.0f}",
            f"{self.cpu_s / max(self.deliveries, 1) * 1e6:.2f}",
            f"{self.rss_per_sub / 1024:.1f}",
            f"{self.deliveries}/{PUTS * self.k}",
        ]


Subscribe = Callable[[str, Callable[[], None], list[int]], Awaitable[None]]


async def measure(name: str, endpoint: str, k: int, subscribe: Subscribe) -> Result:
    prefix = f"/bench/{uuid.uuid4().hex[:8]}/"
    latencies: list[int] = []
    ready = anyio.Semaphore(0)
    rss_before = rss_bytes()
    async with anyio.create_task_group() as tg:
        for _ in range(k):
            tg.start_soon(subscribe, prefix, ready.release, latencies)
        with anyio.fail_after(60):
            for _ in range(k):
                await ready.acquire()
        rss_after = rss_bytes()
        cpu0, t0 = time.process_time(), time.monotonic()
        writer = await start_writer(endpoint, prefix, PUTS, INTERVAL)
        with anyio.move_on_after(120):
            while len(latencies) < PUTS * k:
                await anyio.sleep(0.05)
        cpu1, t1 = time.process_time(), time.monotonic()
        await writer.wait()
        tg.cancel_scope.cancel()
    return Result(name, k, latencies, t1 - t0, cpu1 - cpu0, (rss_after - rss_before) / k)


async def run(endpoint: str, ks: list[int]) -> list[Result]:
    results = []
    host, port = endpoint.split("://", 1)[1].rsplit(":", 1)
    for k in ks:
        async with EtcdClient(endpoints=[endpoint]) as client:

            async def ours(prefix: str, ready: Callable[[], None], out: list[int]) -> None:
                async with client.watch(prefix, buffer_size=PUTS + 10) as sub:
                    ready()
                    async for event in sub:
                        out.append(time.time_ns() - int(event.value))

            results.append(await measure("aetcdcfg", endpoint, k, ours))

        baseline = aetcd.Client(host=host, port=int(port))
        await baseline.connect()
        try:

            async def plain(prefix: str, ready: Callable[[], None], out: list[int]) -> None:
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
        "delivered",
    ]
    out = [table(headers, [r.row() for r in results]), ""]
    for ours, base in zip(results[::2], results[1::2], strict=True):
        p99_ours = percentile(ours.latencies_ns, 99)
        p99_base = percentile(base.latencies_ns, 99)
        cpu_ours = ours.cpu_s / max(ours.deliveries, 1)
        cpu_base = base.cpu_s / max(base.deliveries, 1)
        out.append(
            f"K={ours.k}: p99 {p99_base / max(p99_ours, 1):.1f}x lower, "
            f"CPU per delivery {cpu_base / max(cpu_ours, 1e-12):.1f}x lower than aetcd"
        )
    return "\n".join(out)


if __name__ == "__main__":
    import sys

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # quiet: warnings up
    options = {"use_uvloop": True} if "--uvloop" in sys.argv else {}
    print(anyio.run(main, backend_options=options))
