"""Rollout: 200 instances reporting records; how fast ``set --wait`` returns, what records cost etcd.

Instances run in ``benchmarks.rollout_worker`` processes (8 x 25 LiveSettings, each with its own
EtcdClient), so their CPU is neither this process's nor etcd's. For each topology (straight to
etcd, and through one etcd gRPC proxy) and each mode (records on, records off: ``report=False``):

- idle: etcd's CPU per second over 10 s with nothing written (lease refreshes: 200 / (TTL/3));
- steady: 20 changes, one every 0.5 s; etcd CPU per change over that window, and what records add
  per instance per change (records on minus records off, over the instances). With records, each
  change is followed by ``wait_applied`` (what ``set --wait`` runs after its write): the time from
  the write's answer until every one of the 200 instances reported it (p50/p99), plus three runs
  of the real ``aetcdcfg set --wait`` command (wall time, Python's start-up included);
- burst (direct, records on): 500 changes in 5 s; record writes per instance, counted from a watch
  of the records prefix (every PUT of every record).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass

import anyio
import anyio.abc

from aetcdcfg import EtcdClient, instances, wait_applied
from aetcdcfg._records import records_prefix
from aetcdcfg.testing import EtcdGrpcProxy, EtcdServer

from ._util import ROOT, percentile, table
from .replay import cpu_seconds

MODEL = "class Settings(__import__('pydantic_settings').BaseSettings):\n    rate_limit: int = 100\n"


@dataclass
class Options:
    processes: int = 8
    per_process: int = 25
    changes: int = 20
    idle: float = 10.0
    burst_only: bool = False


@asynccontextmanager
async def fleet(opts: Options, endpoint: str, prefix: str, report: bool) -> AsyncIterator[None]:
    """The instances, in worker processes, all loaded (and reported) before it yields."""
    workers: list[anyio.abc.Process] = []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LOG_LEVEL": "warning"}
    try:
        for w in range(opts.processes):
            args = [
                endpoint,
                prefix,
                str(w * opts.per_process),
                str(opts.per_process),
                "1" if report else "0",
            ]
            workers.append(
                await anyio.open_process(
                    [sys.executable, "-m", "benchmarks.rollout_worker", *args], cwd=ROOT, env=env, stderr=None
                )
            )
        with anyio.fail_after(180):
            for worker in workers:
                assert worker.stdout is not None
                line = await worker.stdout.receive()
                assert b"ready" in line, line
        yield
    finally:
        for worker in workers:
            if worker.stdin is not None:
                await worker.stdin.aclose()
        with anyio.move_on_after(30):
            for worker in workers:
                await worker.wait()
        for worker in workers:
            if worker.returncode is None:
                worker.kill()


async def cpu_over(pids: Sequence[int], seconds: float) -> list[float]:
    before = [cpu_seconds(pid) for pid in pids]
    await anyio.sleep(seconds)
    return [(cpu_seconds(pid) - b) / seconds for pid, b in zip(pids, before, strict=True)]


@dataclass
class Run:
    topology: str
    report: bool
    idle_cpu: list[float]
    cpu_per_change: list[float]
    wait_s: list[float]
    cli_s: list[float]


async def measure(
    opts: Options, topology: str, endpoint: str, pids: list[int], etcd: str, report: bool
) -> Run:
    prefix = f"/bench/{uuid.uuid4().hex[:8]}/"
    async with EtcdClient(endpoints=[etcd]) as admin, fleet(opts, endpoint, prefix, report):
        if report:
            total = opts.processes * opts.per_process
            assert len((await instances(admin, prefix, check_leases=False)).instances) == total
        idle = await cpu_over(pids, opts.idle)
        waits: list[float] = []
        before = [cpu_seconds(pid) for pid in pids]
        for n in range(opts.changes):
            started = time.monotonic()
            revision = await admin.put(prefix + "rate_limit", str(200 + n))
            if report:
                written = time.monotonic()
                result = await wait_applied(admin, prefix, revision, timeout=30)
                assert result.ok, result
                waits.append(time.monotonic() - written)
            await anyio.sleep(max(0.0, started + 0.5 - time.monotonic()))
        per_change = [(cpu_seconds(pid) - b) / opts.changes for pid, b in zip(pids, before, strict=True)]
        cli: list[float] = []
        if report:
            with tempfile.TemporaryDirectory() as tmp:
                await anyio.Path(tmp, "bench_model.py").write_text(MODEL)
                env = {**os.environ, "ETCD_ENDPOINTS": etcd, "PYTHONPATH": f"{ROOT}:{tmp}"}
                for n in range(3):
                    started = time.monotonic()
                    result = await anyio.run_process(
                        [
                            sys.executable,
                            "-m",
                            "aetcdcfg",
                            "set",
                            prefix,
                            f"rate_limit={900 + n}",
                            "--model",
                            "bench_model:Settings",
                            "--wait",
                            "--timeout",
                            "30",
                        ],
                        cwd=tmp,
                        env=env,
                        check=False,
                    )
                    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
                    cli.append(time.monotonic() - started)
    return Run(topology, report, idle, per_change, waits, cli)


async def burst(opts: Options, etcd: str) -> tuple[int, float, int, float, str]:
    """500 changes in 5 s; (max, mean record writes per instance, instances, seconds taken)."""
    prefix = f"/bench/{uuid.uuid4().hex[:8]}/"
    writes: Counter[str] = Counter()
    async with (
        EtcdClient(endpoints=[etcd]) as admin,
        fleet(opts, etcd, prefix, True),
        admin.watch(records_prefix(prefix)) as sub,
        anyio.create_task_group() as tg,
    ):

        async def count() -> None:
            async for event in sub:
                if event.value:
                    writes[event.key] += 1

        tg.start_soon(count)
        started = time.monotonic()
        last = 0
        for n in range(500):
            last = await admin.put(prefix + "rate_limit", str(n + 1))
            await anyio.sleep(max(0.0, started + (n + 1) * 0.01 - time.monotonic()))
        paced = time.monotonic() - started
        waited = time.monotonic()
        # 200 instances share this machine's 2 cores (a real fleet has a core per pod): give them
        # time to work through 500 revisions each, and report how long it took.
        result = await wait_applied(admin, prefix, last, timeout=180)
        outcome = (
            f"500 changes took {paced:.1f} s to write; all {len(result.applied)} instances applied the last "
            f"one {time.monotonic() - waited:.2f} s after it"
            if result.ok
            else f"writing took {paced:.1f} s; {len(result.applied)} applied the last change within 180 s"
        )
        tg.cancel_scope.cancel()
        counted = time.monotonic() - started  # the window the writes were counted over
    counts = list(writes.values())
    return max(counts), statistics.fmean(counts), len(counts), counted, outcome


def report_text(
    runs: list[Run], burst_result: tuple[int, float, int, float, str] | None, load: str, instances: int
) -> str:
    rows = []
    base = {(r.topology, r.report): r for r in runs}
    for r in runs:
        off = base.get((r.topology, False))
        etcd_ratio = f"{r.cpu_per_change[0] / off.cpu_per_change[0]:.2f}x" if r.report and off else "—"
        extra = (
            f"{(r.cpu_per_change[0] - off.cpu_per_change[0]) / instances * 1e6:.0f} µs"
            if r.report and off
            else "—"
        )
        rows.append(
            [
                r.topology,
                "on" if r.report else "off",
                f"{r.idle_cpu[0] * 100:.1f} %",
                f"{r.idle_cpu[1] * 100:.1f} %" if len(r.idle_cpu) > 1 else "—",
                f"{r.cpu_per_change[0] * 1000:.1f} ms",
                etcd_ratio,
                extra,
                f"{r.cpu_per_change[1] * 1000:.1f} ms" if len(r.cpu_per_change) > 1 else "—",
                f"{percentile(r.wait_s, 50) * 1000:.0f} / {percentile(r.wait_s, 99) * 1000:.0f} ms"
                if r.wait_s
                else "—",
                " ".join(f"{s:.2f}" for s in r.cli_s) or "—",
            ]
        )
    text = table(
        [
            "topology",
            "records",
            "etcd CPU idle",
            "proxy CPU idle",
            "etcd CPU / change",
            "vs records off",
            "etcd CPU added per instance per change",
            "proxy CPU / change",
            "wait after write p50/p99",
            "CLI set --wait (s)",
        ],
        rows,
    )
    if burst_result is None:
        return text
    high, mean, count, took, outcome = burst_result
    return (
        f"{text}\n\nburst: 500 changes paced at 100/s; over the {took:.1f} s from the first change until "
        f"the wait ended, record writes per instance max {high}, mean {mean:.1f}, over {count} instances "
        f"(bound: {took / 0.25 + 1:.0f}); {outcome}\n{load}"
    )


async def main(opts: Options) -> str:
    runs = []
    with ExitStack() as stack:
        server = stack.enter_context(EtcdServer(keepalive_min_time=1))
        proxy = stack.enter_context(EtcdGrpcProxy([server.endpoint], keepalive_min_time=1))
        assert server.pid is not None
        assert proxy.pid is not None
        for report in () if opts.burst_only else (False, True):
            runs.append(await measure(opts, "direct", server.endpoint, [server.pid], server.endpoint, report))
        for report in () if opts.burst_only else (False, True):
            pids = [server.pid, proxy.pid]
            runs.append(await measure(opts, "proxy", proxy.endpoint, pids, server.endpoint, report))
        if runs:
            print(report_text(runs, None, "", opts.processes * opts.per_process), flush=True)
        burst_result = await burst(opts, server.endpoint)
    load = "load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    return report_text(runs, burst_result, load, opts.processes * opts.per_process)


def parse(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rollout")
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--per-process", type=int, default=25)
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--burst-only", action="store_true")
    args = parser.parse_args(argv)
    return Options(
        processes=args.processes,
        per_process=args.per_process,
        changes=args.changes,
        burst_only=args.burst_only,
    )


if __name__ == "__main__":
    print(anyio.run(main, parse(sys.argv[1:])))
