"""Replay cost: a watch from an old revision over a 50,000-event backlog, aetcdcfg vs a raw aetcd watch.

The backlog is a bulk config push, 500 transactions x 100 keys (~6.7 MB of events), written before
the watch opens; each contender then watches from the backlog's first revision and stops at its last
event. Reported: wall time to the last event and the etcd process's CPU over the replay (from
/proc/PID/stat), each the median of ROUNDS, and their ratios against the raw aetcd watch. A third
and fourth row, bare grpc.aio stubs without and with ``fragment=True``, show what etcd 3.5's
fragmenting costs (why aetcdcfg asks for fragments only when a response is too large for it; aetcd
1.0 accepts a ``fragment`` argument but never puts it in its create request).
"""

from __future__ import annotations

import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

import aetcd
import anyio
import grpc
from aetcd.rpc import rpc_pb2, rpc_pb2_grpc

from aetcdcfg import EtcdClient
from aetcdcfg.testing import EtcdServer

from ._util import table

TXNS = 500
KEYS_PER_TXN = 100
EVENTS = TXNS * KEYS_PER_TXN
ROUNDS = 3
VALUE = b"v" * 64


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def write_backlog(client: EtcdClient, prefix: str) -> tuple[int, int]:
    first = 0
    last = 0
    for t in range(TXNS):
        last = await client.put_many(
            {f"{prefix}k{j:03d}": VALUE + str(t).encode() for j in range(KEYS_PER_TXN)}
        )
        first = first or last
    return first, last


async def run_aetcdcfg(endpoint: str, prefix: str, first: int) -> int:
    seen = 0
    async with EtcdClient(endpoints=[endpoint]) as client, client.watch(prefix, start_revision=first) as sub:
        async for batch in sub.batches():
            seen += len(batch)
            if seen >= EVENTS:
                break
    return seen


def run_aetcd() -> Callable[[str, str, int], Awaitable[int]]:
    async def run(endpoint: str, prefix: str, first: int) -> int:
        host, port = endpoint.split("://", 1)[1].rsplit(":", 1)
        options = {"grpc.max_receive_message_length": 64 << 20}
        seen = 0
        async with aetcd.Client(host=host, port=int(port), options=options) as client:
            watch = await client.watch_prefix(prefix.encode(), start_revision=first)
            async for _ in watch:
                seen += 1
                if seen >= EVENTS:
                    break
            await watch.cancel()
        return seen

    return run


def run_raw(fragment: bool) -> Callable[[str, str, int], Awaitable[int]]:
    async def run(endpoint: str, prefix: str, first: int) -> int:
        seen = 0
        options = [("grpc.max_receive_message_length", 64 << 20)]
        async with grpc.aio.insecure_channel(endpoint.split("://", 1)[1], options=options) as channel:
            call = rpc_pb2_grpc.WatchStub(channel).Watch()
            key = prefix.encode()
            end = key[:-1] + bytes([key[-1] + 1])
            create = rpc_pb2.WatchCreateRequest(
                key=key, range_end=end, start_revision=first, fragment=fragment
            )
            await call.write(rpc_pb2.WatchRequest(create_request=create))
            while seen < EVENTS:
                response = await call.read()
                seen += len(response.events)
            call.cancel()
        return seen

    return run


async def main() -> None:
    contenders: list[tuple[str, Callable[[str, str, int], Awaitable[int]]]] = [
        ("aetcd watch (baseline)", run_aetcd()),
        ("aetcdcfg client.watch", run_aetcdcfg),
        ("raw stubs watch", run_raw(False)),
        ("raw stubs watch, fragment=True", run_raw(True)),
    ]
    with EtcdServer() as server:
        assert server.pid is not None
        prefix = f"/bench-replay-{uuid.uuid4().hex[:6]}/"
        async with EtcdClient(endpoints=[server.endpoint]) as client:
            first, last = await write_backlog(client, prefix)
        walls: dict[str, list[float]] = {name: [] for name, _ in contenders}
        cpus: dict[str, list[float]] = {name: [] for name, _ in contenders}
        for _ in range(ROUNDS):
            for name, run in contenders:
                cpu0 = cpu_seconds(server.pid)
                t0 = time.perf_counter()
                seen = await run(server.endpoint, prefix, first)
                walls[name].append(time.perf_counter() - t0)
                cpus[name].append(cpu_seconds(server.pid) - cpu0)
                assert seen == EVENTS, f"{name} got {seen} of {EVENTS} events"
    base = contenders[0][0]
    base_wall = statistics.median(walls[base])
    base_cpu = statistics.median(cpus[base])
    rows = []
    for name, _ in contenders:
        wall = statistics.median(walls[name])
        cpu = statistics.median(cpus[name])
        rows.append(
            [
                name,
                f"{wall:.3f}",
                f"{wall / base_wall:.2f}x",
                f"{cpu:.3f}",
                f"{cpu / max(base_cpu, 0.01):.2f}x",
            ]
        )
    print(
        f"backlog: {TXNS} txns x {KEYS_PER_TXN} keys = {EVENTS:,} events (revisions {first}..{last}); "
        f"median of {ROUNDS} rounds"
    )
    print(
        table(["watch from the backlog's start", "wall s", "vs baseline", "etcd CPU s", "vs baseline"], rows)
    )


if __name__ == "__main__":
    anyio.run(main)
