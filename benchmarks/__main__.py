"""``make bench``: every benchmark, each against its baseline in the same run."""

from __future__ import annotations

import anyio

from . import fanout


async def main() -> None:
    print("## Fan-out: put-to-subscriber latency (writer process puts every 5 ms)\n")
    print(await fanout.main())


if __name__ == "__main__":
    anyio.run(main)
