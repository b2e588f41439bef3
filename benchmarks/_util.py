"""Small helpers shared by the benchmarks: percentiles, RSS, the writer process, tables, and a
fan-out hub without etcd."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import anyio.abc

ROOT = Path(__file__).resolve().parent.parent


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def rss_bytes() -> int:
    """Resident set size of this process, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def start_writer(
    endpoint: str, prefix: str, count: int, interval: float, keys: int = 10, txn: int = 1
) -> anyio.abc.Process:
    """The writer runs as its own process so its CPU is not billed to the subscribers."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.writer",
        endpoint,
        prefix,
        str(count),
        str(interval),
        str(keys),
        str(txn),
    ]
    return await anyio.open_process(command, cwd=ROOT, env=dict(os.environ), stdout=None, stderr=None)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table, so results paste straight into the README."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


class GcClock:
    """Counts the cyclic GC's collections per generation and their time while installed
    (``with GcClock() as clock:``; ``gc.callbacks``)."""

    def __init__(self) -> None:
        self.counts = [0, 0, 0]
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> GcClock:
        gc.callbacks.append(self)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        gc.callbacks.remove(self)

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.counts[info["generation"]] += 1
            self.seconds += time.perf_counter() - self._start


class DetachedFanout:
    """K subscriber tasks following a ``PrefixWatch`` that is never started (no etcd, no stream).

    ``await publish(event)`` hands one single-event revision to the hub and returns once every
    subscriber has taken it: the pace of a writer putting one value at a time, minus the network.
    """

    def __init__(self, prefix: bytes, subscribers: int, buffer_size: int = 64) -> None:
        from aetcdcfg._fanout import PrefixWatch
        from aetcdcfg._resume import WatchState

        self.hub = PrefixWatch(None, prefix, lambda hub: None)  # type: ignore[arg-type]
        self.state = self.hub.state = WatchState(prefix, 100, {})
        self.subscribers = subscribers
        self.buffer_size = buffer_size
        self.taken = 0
        self._round: asyncio.Future[None] | None = None
        self._handles: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> DetachedFanout:
        for _ in range(self.subscribers):
            subscription, handle = self.hub.subscribe(None, self.buffer_size, with_snapshot=False)
            self._handles.append(handle)
            self._tasks.append(asyncio.create_task(self._follow(subscription)))
        await asyncio.sleep(0)  # every subscriber waits on its stream
        return self

    async def _follow(self, subscription: Any) -> None:
        async for _ in subscription:
            self.taken += 1
            if self.taken % self.subscribers == 0:
                assert self._round is not None
                self._round.set_result(None)

    async def publish(self, event: Any) -> None:
        self._round = asyncio.get_running_loop().create_future()
        self.state.delivered = event.revision
        self.hub._publish(((event,),))
        await self._round

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for handle in self._handles:
            self.hub.release(handle)
