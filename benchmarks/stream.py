"""One stream, per event: the CPU a watcher process spends per event, against raw grpc.aio stubs.

A separate writer process writes either 500 transactions of 100 keys (50,000 events) or 5,000 single
puts as fast as etcd takes them; this process follows the prefix with one watch and touches each
event's key, value and revision. CPU µs/event is this process's CPU time from the writer's start to
the last event, divided by the events; events/s counts from the first event to the last. Contenders:

* ``aetcdcfg``: ``async for event in client.watch(prefix)`` (one subscription);
* ``aetcd``: ``async for event in await client.watch_prefix(prefix)``;
* ``raw stubs`` (the floor): ``WatchStub(channel).Watch()``, each response's events decoded into
  (key, value, revision) tuples, nothing else; what any Python client built on grpc.aio must pay.

Each contender runs ROUNDS times, interleaved; the table shows the min and median, and the ratios are
of the medians against the raw stubs measured in the same run.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aetcd
import anyio
import grpc
from aetcd.rpc import rpc_pb2, rpc_pb2_grpc

from aetcdcfg import EtcdClient
from aetcdcfg.testing import EtcdServer

from ._util import start_writer, table

ROUNDS = 3
LOADS = [("100-event txns", 500, 100), ("single puts", 5_000, 1)]  # (name, revisions, events each)
LIMIT = 64 << 20

#: Follows ``prefix`` until ``events`` arrived; calls ``ready`` once the watch is created and
#: ``first`` at the first event. Returns the number of events seen.
Follow = Callable[[str, str, int, Callable[[], None], Callable[[], None]], Awaitable[int]]


def _prefix_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


async def follow_aetcdcfg(
    endpoint: str, prefix: str, events: int, ready: Callable[[], None], first: Callable[[], None]
) -> int:
    seen = 0
    async with EtcdClient(endpoints=[endpoint]) as client, client.watch(prefix, buffer_size=events) as sub:
        ready()
        async for event in sub:
            if not seen:
                first()
            seen += event.revision > 0 and len(event.key) > 0 and len(event.value) > 0
            if seen >= events:
                break
    return seen


async def follow_aetcd(
    endpoint: str, prefix: str, events: int, ready: Callable[[], None], first: Callable[[], None]
) -> int:
    host, port = endpoint.split("://", 1)[1].rsplit(":", 1)
    options = {"grpc.max_receive_message_length": LIMIT}
    seen = 0
    async with aetcd.Client(host=host, port=int(port), options=options) as client:
        watch = await client.watch_prefix(prefix.encode())
        ready()
        async for event in watch:
            if not seen:
                first()
            kv = event.kv
            seen += kv.mod_revision > 0 and len(kv.key.decode()) > 0 and len(kv.value) > 0
            if seen >= events:
                break
        await watch.cancel()
    return seen


async def follow_raw(
    endpoint: str, prefix: str, events: int, ready: Callable[[], None], first: Callable[[], None]
) -> int:
    target = endpoint.split("://", 1)[1]
    options = [("grpc.max_receive_message_length", LIMIT)]
    raw = prefix.encode()
    seen = 0
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        call = rpc_pb2_grpc.WatchStub(channel).Watch()
        create = rpc_pb2.WatchCreateRequest(key=raw, range_end=_prefix_end(raw))
        await call.write(rpc_pb2.WatchRequest(create_request=create))
        await call.read()  # created
        ready()
        while seen < events:
            response = await call.read()
            decoded = [(ev.kv.key.decode(), ev.kv.value, ev.kv.mod_revision) for ev in response.events]
            if decoded and not seen:
                first()
            for key, value, revision in decoded:
                seen += revision > 0 and len(key) > 0 and len(value) > 0
        call.cancel()
    return seen


@dataclass
class Samples:
    cpu_us: list[float] = field(default_factory=list)
    rate: list[float] = field(default_factory=list)


async def measure(endpoint: str, follow: Follow, revisions: int, per_txn: int) -> tuple[float, float]:
    """(CPU µs per event, events per second) of one run."""
    prefix = f"/bench/{uuid.uuid4().hex[:8]}/"
    events = revisions * per_txn
    created = anyio.Event()
    marks: dict[str, float] = {}
    result: list[int] = []

    def first() -> None:
        marks["first"] = time.perf_counter()

    async def watcher() -> None:
        result.append(await follow(endpoint, prefix, events, created.set, first))
        marks["last"] = time.perf_counter()
        marks["cpu_end"] = time.process_time()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watcher)
        with anyio.fail_after(30):
            await created.wait()
        cpu0 = time.process_time()
        writer = await start_writer(endpoint, prefix, revisions, 0.0, keys=max(per_txn, 10), txn=per_txn)
        with anyio.fail_after(300):
            await writer.wait()
    assert result == [events], f"saw {result} of {events} events"
    wall = max(marks["last"] - marks["first"], 1e-9)
    return (marks["cpu_end"] - cpu0) / events * 1e6, events / wall


async def main() -> str:
    contenders: list[tuple[str, Follow]] = [
        ("raw grpc.aio stubs (floor)", follow_raw),
        ("aetcd watch_prefix", follow_aetcd),
        ("aetcdcfg client.watch", follow_aetcdcfg),
    ]
    rows = []
    notes = []
    with EtcdServer() as server:
        for load, revisions, per_txn in LOADS:
            samples = {name: Samples() for name, _ in contenders}
            for _ in range(ROUNDS):
                for name, follow in contenders:
                    cpu_us, rate = await measure(server.endpoint, follow, revisions, per_txn)
                    samples[name].cpu_us.append(cpu_us)
                    samples[name].rate.append(rate)
            floor = statistics.median(samples[contenders[0][0]].cpu_us)
            for name, _ in contenders:
                s = samples[name]
                cpu = statistics.median(s.cpu_us)
                rows.append(
                    [
                        load,
                        name,
                        f"{min(s.cpu_us):.2f}",
                        f"{cpu:.2f}",
                        f"{cpu / floor:.2f}x",
                        f"{statistics.median(s.rate):,.0f}",
                    ]
                )
            ours, theirs = samples[contenders[2][0]], samples[contenders[1][0]]
            notes.append(
                f"{load} ({revisions * per_txn:,} events): aetcdcfg "
                f"{statistics.median(theirs.cpu_us) / statistics.median(ours.cpu_us):.2f}x less CPU per event "
                f"than aetcd, events/s {statistics.median(ours.rate) / statistics.median(theirs.rate):.2f}x aetcd's"
            )
    headers = ["load", "watcher", "CPU µs/event min", "median", "vs raw (median)", "events/s (median)"]
    return "\n".join([f"{ROUNDS} rounds per contender, interleaved", "", table(headers, rows), "", *notes])


if __name__ == "__main__":
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # quiet: warnings up
    print(anyio.run(main))
