"""Probes under a full threadpool: ``/livez``, ``/readyz`` and an async route using
``settings_dependency`` while the app's own sync handlers hold every Starlette worker thread.

The server is a process of its own (uvicorn, one LiveSettings loaded from a real etcd): a FastAPI
app with ``probes_router(live)``, ``GET /work`` (a plain ``def`` handler that blocks its thread for
``WORK`` seconds, like a sync database call), ``GET /limit`` (``async def`` with
``Depends(settings_dependency(live))``), ``GET /livez-sync`` (a plain ``def`` liveness route, what
``probes_router`` served before: the baseline) and ``GET /pool`` (the threadpool's borrowed tokens).

A load process keeps ``LOAD`` connections calling ``/work`` back to back, so the threadpool (40
threads) is always full with a queue behind it; meanwhile this process probes each route every
``PERIOD`` seconds for ``SECONDS``, one request at a time per route. Latency is request to response as the prober sees it.
``/pool`` is sampled alongside: the "pool full" column is the share of samples with every thread
borrowed (it must be 100 % for the numbers to mean anything).

``python -m benchmarks.probes`` (``make bench`` runs it as the section "Probes") exits 1 on FAIL:
``/livez`` p99 at or over ``--target-ms`` (100), or the threadpool not full in every sample.
``--seconds`` shortens the run (``tests/test_bench_guard.py`` runs it for 1 s against a 0 ms target,
which no run meets, to see the FAIL reach the exit status).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import uuid

import anyio
import httpx

from ._util import ROOT, percentile, table

LOAD = 200
WORK = 0.25
PERIOD = 0.05
SECONDS = 15.0
TARGET_MS = 100.0
ROUTES = ["/livez", "/readyz", "/limit", "/livez-sync"]


def serve(port: int, endpoint: str, prefix: str) -> None:
    """The server process: uvicorn with the app described in the module docstring."""
    import uvicorn
    from fastapi import Depends, FastAPI
    from pydantic_settings import BaseSettings

    from aetcdcfg import LiveSettings
    from aetcdcfg.fastapi import probes_router, settings_dependency

    class Service(BaseSettings):
        rate_limit: int = 100

    os.environ["ETCD_ENDPOINTS"] = endpoint
    live = LiveSettings(Service, prefix=prefix)  # its own client, opened by the lifespan
    app = FastAPI(lifespan=live.lifespan)
    app.include_router(probes_router(live))
    current = Depends(settings_dependency(live))

    @app.get("/work")
    def work() -> str:
        time.sleep(WORK)  # a blocking call, as a sync handler of the app would make
        return "done"

    @app.get("/limit")
    async def limit(settings: Service = current) -> int:
        return settings.rate_limit

    @app.get("/livez-sync")
    def livez_sync() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/pool")
    async def pool() -> dict[str, float]:
        limiter = anyio.to_thread.current_default_thread_limiter()
        return {"borrowed": limiter.borrowed_tokens, "total": limiter.total_tokens}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


async def load(port: int) -> None:
    """The load process: ``LOAD`` keep-alive connections calling ``/work`` back to back (plain
    asyncio streams: an HTTP client's own CPU must not delay the prober, which runs elsewhere)."""
    request = b"GET /work HTTP/1.1\r\nHost: bench\r\n\r\n"

    async def worker() -> None:
        stream = await anyio.connect_tcp("127.0.0.1", port)
        buffer = b""
        while True:
            await stream.send(request)
            while b"\r\n\r\n" not in buffer:
                buffer += await stream.receive()
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            while len(buffer) < length:
                buffer += await stream.receive()
            buffer = buffer[length:]

    async with anyio.create_task_group() as tg:
        for _ in range(LOAD):
            tg.start_soon(worker)


def verdict(livez_ms: list[float], share: float, target_ms: float = TARGET_MS) -> tuple[bool, str]:
    """PASS when ``/livez`` answered, its p99 under ``target_ms``, with the pool full in every sample."""
    p99 = percentile(livez_ms, 99)  # NaN without samples: never under the target
    ok = p99 < target_ms and share == 100
    return ok, (
        f"{'PASS' if ok else 'FAIL'}: /livez p99 {p99:.1f} ms over {len(livez_ms)} requests "
        f"(target < {target_ms:g} ms with the threadpool full; full in {share:.0f} % of samples)"
    )


async def measure(url: str, port: int, seconds: float, target_ms: float) -> bool:
    """Probe while the load runs; prints the table and the verdict, returns whether it passed."""
    latencies: dict[str, list[float]] = {route: [] for route in ROUTES}
    failures: dict[str, int] = dict.fromkeys(ROUTES, 0)
    full: list[bool] = []
    command = [sys.executable, "-m", "benchmarks.probes", "--load", str(port)]
    async with (
        await anyio.open_process(command, cwd=ROOT, env=dict(os.environ), stdout=None, stderr=None) as loader,
        httpx.AsyncClient(base_url=url, timeout=30) as probe,
    ):
        with anyio.fail_after(30):  # the pool is full before anything is measured
            while (await probe.get("/pool")).json()["borrowed"] < 40:
                await anyio.sleep(0.1)

        async def prober(route: str) -> None:
            async with httpx.AsyncClient(base_url=url, timeout=30) as own:
                while True:
                    began = time.perf_counter()
                    response = await own.get(route)
                    took = time.perf_counter() - began
                    if response.status_code == 200:
                        latencies[route].append(took)
                    else:
                        failures[route] += 1
                    await anyio.sleep(max(PERIOD - took, 0))

        async def pool_sampler() -> None:
            while True:
                body = (await probe.get("/pool")).json()
                full.append(body["borrowed"] >= body["total"])
                await anyio.sleep(0.1)

        async with anyio.create_task_group() as probes:
            for route in ROUTES:
                probes.start_soon(prober, route)
            probes.start_soon(pool_sampler)
            await anyio.sleep(seconds)
            probes.cancel_scope.cancel()
        loader.terminate()

    rows = []
    for route in ROUTES:
        ms = [t * 1000 for t in latencies[route]]
        rows.append(
            [
                route,
                len(ms),
                f"{percentile(ms, 50):.1f}",
                f"{percentile(ms, 99):.1f}",
                f"{max(ms):.1f}" if ms else "-",
                failures[route],
            ]
        )
    share = 100 * sum(full) / len(full) if full else 0.0
    print(
        f"{LOAD} clients calling a sync handler that blocks {WORK * 1000:.0f} ms, back to back; "
        f"threadpool full in {share:.0f} % of {len(full)} samples\n"
    )
    print(table(["route", "requests", "p50 ms", "p99 ms", "max ms", "non-200"], rows))
    ok, line = verdict([t * 1000 for t in latencies["/livez"]], share, target_ms)
    print(f"\n{line}")
    return ok


def main() -> int:
    """0 on PASS, 1 on FAIL (``make bench`` fails with it)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", nargs=3, metavar=("PORT", "ENDPOINT", "PREFIX"))
    parser.add_argument("--load", type=int, metavar="PORT")
    parser.add_argument("--seconds", type=float, default=SECONDS, help="how long to probe")
    parser.add_argument("--target-ms", type=float, default=TARGET_MS, help="the /livez p99 to stay under")
    args = parser.parse_args()
    if args.load:
        anyio.run(load, args.load)
        return 0
    if args.serve:
        port, endpoint, prefix = args.serve
        serve(int(port), endpoint, prefix)
        return 0

    from aetcdcfg.testing import EtcdServer

    async def run() -> bool:
        with EtcdServer() as server:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = int(sock.getsockname()[1])
            command = [
                sys.executable,
                "-m",
                "benchmarks.probes",
                "--serve",
                str(port),
                server.endpoint,
                f"/bench/{uuid.uuid4().hex[:8]}/",
            ]
            async with await anyio.open_process(
                command, cwd=ROOT, env=dict(os.environ), stdout=None, stderr=None
            ) as proc:
                url = f"http://127.0.0.1:{port}"
                try:
                    async with httpx.AsyncClient(base_url=url, timeout=1) as http:
                        with anyio.fail_after(30):
                            while True:
                                try:
                                    if (await http.get("/readyz")).status_code == 200:
                                        break
                                except httpx.TransportError:
                                    pass
                                await anyio.sleep(0.1)
                    return await measure(url, port, args.seconds, args.target_ms)
                finally:
                    if proc.returncode is None:
                        proc.terminate()

    return 0 if anyio.run(run) else 1


if __name__ == "__main__":
    raise SystemExit(main())
