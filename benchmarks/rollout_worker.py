"""A process of ``benchmarks.rollout``: COUNT LiveSettings instances, each with its own EtcdClient.

``python -m benchmarks.rollout_worker ENDPOINT PREFIX FIRST COUNT REPORT``: instances ``i<FIRST>``
onwards, labels ``zone=a``/``zone=b`` alternating, reporting records if REPORT is 1. Prints
``ready`` once every instance is loaded (and, reporting, its record is in etcd), then runs until
its stdin closes, and exits cleanly (revoking the records' leases).
"""

from __future__ import annotations

import contextlib
import sys

import anyio
from pydantic_settings import BaseSettings

from aetcdcfg import EtcdClient, LiveSettings


class Settings(BaseSettings):
    rate_limit: int = 100


async def main(endpoint: str, prefix: str, first: int, count: int, report: bool) -> None:
    async with contextlib.AsyncExitStack() as stack:
        lives = []
        for n in range(first, first + count):
            client = await stack.enter_async_context(EtcdClient(endpoints=[endpoint]))
            live = LiveSettings(
                Settings,
                prefix=prefix,
                client=client,
                instance=f"i{n:03d}",
                labels={"zone": "ab"[n % 2]},
                report=report,
            )
            lives.append(await stack.enter_async_context(live))
        if report:
            while not all(live.reporter is not None and live.reporter.in_etcd for live in lives):
                await anyio.sleep(0.05)
        print("ready", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)  # until the parent closes our stdin


if __name__ == "__main__":
    endpoint, prefix, first, count, report = sys.argv[1:6]
    anyio.run(main, endpoint, prefix, int(first), int(count), report == "1")
