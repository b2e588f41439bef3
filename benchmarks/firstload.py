"""First load: reading a 40,000-key prefix into a dict, starting LiveSettings on it, and idle subscribers.

The prefix holds 40,000 keys x 100 B values (``<prefix>flags/f00000`` ...), written before timing.
Contenders, each ending with a ``dict`` of key -> value:

* ``raw grpc.aio stubs`` (the floor): one ``KV.Range`` of the whole prefix, then a dict comprehension;
* ``aetcd get_prefix`` with its receive limit raised to 64 MiB (its default 4 MiB cannot hold it);
* ``aetcdcfg get_prefix`` (paged, 10,000 keys per page, all at one revision);
* ``LiveSettings start``: ``async with LiveSettings(Flags, prefix=...)`` on an open client, where
  ``Flags`` has one ``flags: dict[str, str]`` field that takes every key (a feature-flag or tenant
  table); this lists the prefix, starts the shared watch and validates the model once.

Wall ms and CPU ms (this process) per load, min and median of ROUNDS; ratios are of the medians
against the raw stubs. Then the memory per idle subscriber: tracemalloc growth from opening 1,000
``client.watch()`` subscriptions on one (small) prefix, divided by 1,000.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import tracemalloc
import uuid
from collections.abc import Awaitable, Callable

import aetcd
import anyio
import grpc
from aetcd.rpc import rpc_pb2, rpc_pb2_grpc
from pydantic_settings import BaseSettings

from aetcdcfg import EtcdClient, LiveSettings
from aetcdcfg.testing import EtcdServer

from ._util import rss_bytes, table

KEYS = 40_000
VALUE = b"x" * 100
ROUNDS = 7
SUBSCRIBERS = 1_000
LIMIT = 64 << 20


class Flags(BaseSettings):
    flags: dict[str, str] = {}


def _prefix_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


Load = Callable[[str, str], Awaitable[int]]


def contenders(
    client: EtcdClient, aetcd_client: aetcd.Client, channel: grpc.aio.Channel
) -> list[tuple[str, Load]]:
    async def raw(endpoint: str, prefix: str) -> int:
        key = prefix.encode()
        request = rpc_pb2.RangeRequest(key=key, range_end=_prefix_end(key))
        response = await rpc_pb2_grpc.KVStub(channel).Range(request)
        items = {kv.key.decode(): kv.value for kv in response.kvs}
        return len(items)

    async def plain(endpoint: str, prefix: str) -> int:
        result = await aetcd_client.get_prefix(prefix.encode())
        items = {kv.key.decode(): kv.value for kv in result}
        return len(items)

    async def ours(endpoint: str, prefix: str) -> int:
        snapshot = await client.get_prefix(prefix)
        return len(snapshot.items)

    async def live(endpoint: str, prefix: str) -> int:
        async with LiveSettings(Flags, prefix=prefix, client=client) as settings:
            return len(settings.current.flags)

    return [
        ("raw grpc.aio stubs, one Range (floor)", raw),
        ("aetcd get_prefix (limit raised)", plain),
        ("aetcdcfg get_prefix", ours),
        ("aetcdcfg LiveSettings start", live),
    ]


async def idle_subscribers(client: EtcdClient, prefix: str) -> tuple[float, float]:
    """(tracemalloc bytes, RSS bytes) per idle subscription, over SUBSCRIBERS of one prefix."""
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(client.watch(prefix))  # the shared watch exists already
        await anyio.sleep(0.2)
        rss0 = rss_bytes()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        for _ in range(SUBSCRIBERS):
            await stack.enter_async_context(client.watch(prefix))
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        rss1 = rss_bytes()
        grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    return grown / SUBSCRIBERS, (rss1 - rss0) / SUBSCRIBERS


async def main() -> str:
    with EtcdServer() as server:
        endpoint = server.endpoint
        prefix = f"/bench/{uuid.uuid4().hex[:8]}/"
        host, port = endpoint.split("://", 1)[1].rsplit(":", 1)
        async with (
            EtcdClient(endpoints=[endpoint]) as client,
            aetcd.Client(
                host=host, port=int(port), options={"grpc.max_receive_message_length": LIMIT}
            ) as aetcd_client,
            grpc.aio.insecure_channel(
                endpoint.split("://", 1)[1], options=[("grpc.max_receive_message_length", LIMIT)]
            ) as channel,
        ):
            for start in range(0, KEYS, 100):
                await client.put_many({f"{prefix}flags/f{i:05d}": VALUE for i in range(start, start + 100)})
            loads = contenders(client, aetcd_client, channel)
            walls: dict[str, list[float]] = {name: [] for name, _ in loads}
            cpus: dict[str, list[float]] = {name: [] for name, _ in loads}
            for _ in range(ROUNDS):
                for name, load in loads:
                    cpu0, t0 = time.process_time(), time.perf_counter()
                    count = await load(endpoint, prefix)
                    walls[name].append((time.perf_counter() - t0) * 1e3)
                    cpus[name].append((time.process_time() - cpu0) * 1e3)
                    assert count == KEYS, f"{name} read {count} keys"
            per_sub, rss_per_sub = await idle_subscribers(client, f"/bench/{uuid.uuid4().hex[:8]}/")
    floor_wall = statistics.median(walls[loads[0][0]])
    floor_cpu = statistics.median(cpus[loads[0][0]])
    rows = []
    for name, _ in loads:
        wall, cpu = statistics.median(walls[name]), statistics.median(cpus[name])
        rows.append(
            [
                name,
                f"{min(walls[name]):.1f}",
                f"{wall:.1f}",
                f"{wall / floor_wall:.2f}x",
                f"{min(cpus[name]):.1f}",
                f"{cpu:.1f}",
                f"{cpu / floor_cpu:.2f}x",
            ]
        )
    headers = [
        "40,000 keys x 100 B into a dict",
        "wall ms min",
        "median",
        "vs raw",
        "CPU ms min",
        "median",
        "vs raw",
    ]
    return "\n".join(
        [
            f"{ROUNDS} rounds, interleaved",
            "",
            table(headers, rows),
            "",
            f"Idle subscriber: {per_sub / 1024:.2f} KiB each (tracemalloc growth over {SUBSCRIBERS:,} "
            f"subscriptions of one prefix; RSS growth {rss_per_sub / 1024:.2f} KiB each)",
        ]
    )


if __name__ == "__main__":
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # quiet: warnings up
    print(anyio.run(main))
