"""``make soak``: minutes of random faults under a steady writer and 100 subscribers, then an exact
history check against etcd's own and a leak check.

Faults, one at a time with a few seconds of calm between: connection reset, black hole (held, then
delivered), black hole with drop, 300 ms added latency, refused connections (member down), etcd
frozen with SIGSTOP, etcd SIGKILLed and restarted on its data dir. Compaction is left to the test
suite: it replaces history by a resync, which an exact history check cannot compare.

Recovery time for a fault is measured from the moment it is removed until every subscriber has
received a marker written right after that moment.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import time
import uuid
from collections.abc import Awaitable, Callable

import anyio
import structlog

from aetcdcfg import EtcdClient, EtcdError, Event
from aetcdcfg.testing import EtcdServer, FaultProxy, as_records, etcd_history

from ._util import rss_bytes, table

SUBSCRIBERS = 100
WRITES_PER_SECOND = 50


class Subscriber:
    """Keeps every event (only the reference keeps them all; the others keep a fingerprint)."""

    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.events: list[Event] = []
        self.count = 0
        self.fingerprint = 0
        self.last_revision = 0
        self.out_of_order = 0
        self.last_key = ""

    def take(self, event: Event) -> None:
        if event.revision < self.last_revision:
            self.out_of_order += 1
        self.last_revision = event.revision
        self.last_key = event.key
        self.count += 1
        self.fingerprint = hash((self.fingerprint, event.revision, event.key, event.type, event.value))
        if self.keep:
            self.events.append(event)


async def soak(minutes: float, seed: int) -> str:
    rng = random.Random(seed)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # errors only
    prefix = f"/soak/{uuid.uuid4().hex[:8]}/"
    with (
        EtcdServer(keepalive_min_time=1, progress_notify_interval=1) as server,
        FaultProxy.to(server.endpoint) as proxy,
    ):
        async with (
            EtcdClient(endpoints=[server.endpoint], request_timeout=5) as writer,
            EtcdClient(endpoints=[proxy.endpoint], keepalive_time=1, keepalive_timeout=1) as watcher,
        ):
            subscribers = [Subscriber(keep=i == 0) for i in range(SUBSCRIBERS)]
            recoveries: list[tuple[str, float]] = []
            faults: list[str] = []
            start_revision = 0
            stop_writing = anyio.Event()
            writes = 0
            marker = 0

            async def write_forever() -> None:
                nonlocal writes
                keys = [f"{prefix}k{i}" for i in range(20)]
                while not stop_writing.is_set():
                    try:
                        choice = rng.random()
                        if choice < 0.6:
                            await writer.put(rng.choice(keys), f"v{writes}")
                        elif choice < 0.8:
                            await writer.delete(rng.choice(keys))
                        else:
                            await writer.put_many({k: f"t{writes}" for k in rng.sample(keys, 3)})
                        writes += 1
                    except EtcdError:
                        await anyio.sleep(0.1)  # etcd is down for a fault; the history decides
                    await anyio.sleep(1 / WRITES_PER_SECOND)

            async def recovered(name: str, since: float) -> None:
                nonlocal marker
                marker += 1
                key = f"{prefix}marker"
                while True:
                    try:
                        revision = await writer.put(key, str(marker))
                        break
                    except EtcdError:
                        await anyio.sleep(0.05)
                with anyio.fail_after(60):
                    while min(s.last_revision for s in subscribers) < revision:
                        await anyio.sleep(0.01)
                recoveries.append((name, time.monotonic() - since))

            async def hold(seconds: float) -> None:
                await anyio.sleep(seconds)

            async def reset() -> None:
                proxy.reset()

            async def blackhole() -> None:
                proxy.blackhole(True)
                await hold(3)
                proxy.blackhole(False)

            async def blackhole_drop() -> None:
                proxy.blackhole(True, drop=True)
                await hold(3)
                proxy.blackhole(False)

            async def latency() -> None:
                proxy.set_delay(0.3)
                await hold(3)
                proxy.set_delay(0)

            async def refuse() -> None:
                proxy.refuse(True)
                proxy.reset()
                await hold(3)
                proxy.refuse(False)

            async def sigstop() -> None:
                server.pause()
                await hold(3)
                server.resume()

            async def sigkill() -> None:
                server.kill()
                await hold(1)
                await anyio.to_thread.run_sync(server.start)

            catalogue: list[tuple[str, Callable[[], Awaitable[None]]]] = [
                ("reset", reset),
                ("black hole", blackhole),
                ("black hole + drop", blackhole_drop),
                ("latency 300 ms", latency),
                ("refused", refuse),
                ("SIGSTOP", sigstop),
                ("SIGKILL + restart", sigkill),
            ]

            async with anyio.create_task_group() as tg:
                entered = anyio.Semaphore(0)

                async def subscribe(sub: Subscriber) -> None:
                    nonlocal start_revision
                    async with watcher.watch(prefix, buffer_size=100_000) as events:
                        start_revision = events.start_revision
                        entered.release()
                        async for event in events:
                            sub.take(event)

                for sub in subscribers:
                    tg.start_soon(subscribe, sub)
                for _ in subscribers:
                    await entered.acquire()
                gc.collect()
                rss_start, tasks_start = rss_bytes(), len(asyncio.all_tasks())
                tg.start_soon(write_forever)
                deadline = time.monotonic() + minutes * 60
                while time.monotonic() < deadline:
                    await anyio.sleep(rng.uniform(2, 5))
                    name, inject = rng.choice(catalogue)
                    faults.append(name)
                    await inject()
                    await recovered(name, time.monotonic())
                stop_writing.set()
                await anyio.sleep(0.2)
                last = await writer.put(prefix + "zz-end", "done")
                with anyio.fail_after(60):
                    while min(s.last_revision for s in subscribers) < last:
                        await anyio.sleep(0.05)
                gc.collect()
                rss_end, tasks_end = rss_bytes(), len(asyncio.all_tasks())
                tg.cancel_scope.cancel()

        expected = await etcd_history(server.endpoint, prefix, start_revision, last)
    reference = subscribers[0]
    got = as_records(reference.events)
    missing = len(set(expected) - set(got))
    duplicates = len(got) - len(set(got))
    consistent = sum(
        1 for s in subscribers if (s.count, s.fingerprint) == (reference.count, reference.fingerprint)
    )
    worst: dict[str, float] = {}
    for name, seconds in recoveries:
        worst[name] = max(worst.get(name, 0.0), seconds)
    rows = [
        ["minutes", f"{minutes:g}"],
        [
            "faults injected",
            f"{len(faults)} ({', '.join(f'{n} x{faults.count(n)}' for n in sorted(set(faults)))})",
        ],
        ["writes (ok)", writes],
        ["events in etcd's history", len(expected)],
        ["events per subscriber", reference.count],
        ["history equal to etcd's", got == expected],
        ["missing", missing],
        ["duplicates", duplicates],
        ["out of order", sum(s.out_of_order for s in subscribers)],
        ["subscribers identical to the reference", f"{consistent}/{len(subscribers)}"],
        ["worst recovery (s)", f"{max(worst.values(), default=0):.2f}"],
        *[[f"  worst after {name}", f"{seconds:.2f}"] for name, seconds in sorted(worst.items())],
        ["RSS start -> end (MiB)", f"{rss_start / 2**20:.1f} -> {rss_end / 2**20:.1f}"],
        ["tasks start -> end", f"{tasks_start} -> {tasks_end}"],
    ]
    verdict = (
        "PASS"
        if got == expected and missing == duplicates == 0 and consistent == len(subscribers)
        else "FAIL"
    )
    return table(["soak", "result"], rows) + f"\n\n{verdict}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    report = anyio.run(soak, args.minutes, args.seed)
    print(report)
    raise SystemExit(0 if report.endswith("PASS") else 1)


if __name__ == "__main__":
    main()
