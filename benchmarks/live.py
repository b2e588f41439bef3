"""Put-to-settings latency: how long after a put ``live.current`` and ``updates()`` readers see it.

A separate writer process puts ``time.time_ns()`` at ``<prefix>k0`` every 5 ms; a LiveSettings
model reads it as an int. ``current`` latency is taken in ``on_change`` (the moment the
new object is swapped in); ``updates()`` latency is taken by N tasks iterating ``live.updates()``.
The baseline is polling: one task that re-reads the prefix with ``get_prefix`` and re-validates the
model every 100 ms (a common do-it-yourself approach); a put overwritten before the next poll is
never seen by it and so has no latency sample, which flatters the baseline.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import anyio
from pydantic_settings import BaseSettings

from aetcdcfg import EtcdClient, LiveSettings
from aetcdcfg.testing import EtcdServer

from ._util import percentile, start_writer, table

PUTS = 400
INTERVAL = 0.005


class Timestamps(BaseSettings):
    k0: int = 0


def record(out: list[int]) -> Callable[[Timestamps], None]:
    """Per-put latency: a put counts as seen once the settings reflect it or a later put. Puts
    overwritten before a reader looked are reconstructed from the writer's fixed 5 ms schedule, so a
    reader that skips versions (polling, or conflating updates()) is charged for them too."""
    last = 0
    step = int(INTERVAL * 1e9)

    def observe(settings: Timestamps) -> None:
        nonlocal last
        newest = settings.k0
        if newest == last:
            return
        now = time.time_ns()
        if last == 0:
            out.append(now - newest)
        else:
            covered = newest
            while covered > last:
                out.append(now - covered)
                covered -= step
        last = newest

    return observe


async def measure_live(endpoint: str, readers: int) -> tuple[list[int], list[int]]:
    prefix = f"/bench/{uuid.uuid4().hex[:8]}/"
    current_ns: list[int] = []
    updates_ns: list[int] = []

    on_change = record(current_ns)

    async with (
        EtcdClient(endpoints=[endpoint]) as client,
        LiveSettings(Timestamps, prefix=prefix, client=client, on_change=on_change) as live,
    ):

        async def reader() -> None:
            observe = record(updates_ns)
            async for settings in live.updates():
                observe(settings)

        async with anyio.create_task_group() as tg:
            for _ in range(readers):
                tg.start_soon(reader)
            await anyio.sleep(0.2)
            writer = await start_writer(endpoint, prefix, PUTS, INTERVAL, keys=1)
            await writer.wait()
            await anyio.sleep(0.5)
            tg.cancel_scope.cancel()
    return current_ns, updates_ns


async def measure_polling(endpoint: str) -> list[int]:
    prefix = f"/bench/{uuid.uuid4().hex[:8]}/"
    seen: list[int] = []
    async with EtcdClient(endpoints=[endpoint]) as client, anyio.create_task_group() as tg:

        async def poll() -> None:
            observe = record(seen)
            while True:
                snapshot = await client.get_prefix(prefix)
                items = {k[len(prefix) :]: v.decode() for k, v in snapshot.items.items()}
                observe(Timestamps.model_validate(items))
                await anyio.sleep(0.1)

        tg.start_soon(poll)
        writer = await start_writer(endpoint, prefix, PUTS, INTERVAL, keys=1)
        await writer.wait()
        await anyio.sleep(0.3)
        tg.cancel_scope.cancel()
    return seen


def ms(values: list[int], q: float) -> str:
    return f"{percentile([v / 1e6 for v in values], q):.2f}"


async def main() -> str:
    rows = []
    with EtcdServer() as server:
        polled = await measure_polling(server.endpoint)
        rows.append(
            ["polling get_prefix every 100 ms (baseline)", "-", ms(polled, 50), ms(polled, 99), "-", "-"]
        )
        for readers in (10, 1000):
            current, updates = await measure_live(server.endpoint, readers)
            rows.append(
                ["LiveSettings", readers, ms(current, 50), ms(current, 99), ms(updates, 50), ms(updates, 99)]
            )
    headers = [
        "reader",
        "updates() tasks",
        "current p50 ms",
        "current p99 ms",
        "updates() p50 ms",
        "updates() p99 ms",
    ]
    return table(headers, rows)


if __name__ == "__main__":
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # quiet: warnings up
    print(anyio.run(main))
