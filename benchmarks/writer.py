"""A separate writer process: puts ``time.time_ns()`` under a prefix every ``interval`` seconds.

Run as ``python -m benchmarks.writer ENDPOINT PREFIX COUNT INTERVAL [KEYS [TXN]]``; being its own process,
its CPU does not count against the subscribers being measured. With ``TXN`` > 1 each of the ``COUNT``
revisions is one transaction putting ``TXN`` keys (of ``KEYS``, which must be at least ``TXN``).
"""

from __future__ import annotations

import sys
import time

import anyio

from aetcdcfg import EtcdClient


async def write(
    endpoint: str, prefix: str, count: int, interval: float, keys: int = 10, txn: int = 1
) -> None:
    async with EtcdClient(endpoints=[endpoint]) as client:
        next_at = time.monotonic()
        for i in range(count):
            if txn > 1:
                now = str(time.time_ns())
                await client.put_many({f"{prefix}k{(i * txn + j) % keys}": now for j in range(txn)})
            else:
                await client.put(f"{prefix}k{i % keys}", str(time.time_ns()))
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                await anyio.sleep(delay)


if __name__ == "__main__":
    endpoint, prefix, count, interval = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    keys = int(sys.argv[5]) if len(sys.argv) > 5 else 10
    txn = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    anyio.run(write, endpoint, prefix, count, interval, keys, txn)
