"""``make bench``: every benchmark, each against its baseline in the same run."""

from __future__ import annotations

import anyio

from . import fanout, live


async def main() -> None:
    print(await fanout.main())


if __name__ == "__main__":
    print("## Fan-out: put-to-subscriber latency (writer process puts every 5 ms)\n")
    print("asyncio event loop:\n")
    anyio.run(main)
    print("\nuvloop event loop (what uvicorn uses when installed):\n")
    anyio.run(main, backend_options={"use_uvloop": True})
    print("\n## LiveSettings: put-to-settings latency (writer process puts every 5 ms)\n")
    print(anyio.run(live.main))
