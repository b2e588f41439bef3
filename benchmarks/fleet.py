"""Fleet: 200 clients of one prefix, straight to etcd ("direct") or through one etcd gRPC proxy ("proxy").

Clients run in ``benchmarks.fleet_worker`` processes (8 x 25 ``EtcdClient``s, each with one
``client.watch(prefix)``; keepalive_time 5 s, etcd's default minimum), so their CPU is neither this
process's nor etcd's. A writer process puts ``"<counter> <time_ns>"`` straight to etcd every 20 ms.
Measured per topology, each on a fresh etcd:

- etcd's watcher count (``etcd_debugging_mvcc_watcher_total``) with 20, then 200 clients, and after
  the storm;
- steady state: per put, the time until the *last* of the 200 clients has it (p50/p99 over puts),
  and every single delivery's latency; etcd CPU per write and per second, over a steady window;
- a storm: the clients' path is cut for 20 s while the writer goes on. Direct: the clients connect
  through a ``FaultProxy`` that refuses and resets every connection. Proxy: the grpc-proxy is
  SIGKILLed and restarted on the same port (what a crash or a redeploy of a proxy does; it also
  makes the proxy rebuild its coalesced etcd watchers, which a cut between clients and a live proxy
  would not). Measured from the moment the path is back: the time until every client has the first
  write made after it (the outage counts from the kill/refuse; a restarted proxy's start-up counts
  against it), etcd's CPU per second until then and over 5 s against the steady window just
  before the cut, etcd's peak RSS (/proc polled every 100 ms), and the clients' reconnect log events.

Every client checks every event on arrival: consecutive counters and revisions, starting at its
subscription's ``start_revision``, up to the writer's last write (see ``fleet_worker``). Direct
steady state is measured without the FaultProxy (a Python hop would tax latency and the 2 cores);
the direct storm uses a second fleet through it, with its own steady window before the cut.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from aetcdcfg.testing import EtcdGrpcProxy, EtcdServer, FaultProxy

from ._util import ROOT, percentile, table
from .replay import cpu_seconds

MiB = 1024 * 1024


def rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class Options:
    processes: int = 8
    clients: int = 25  # per process
    small: int = 20
    interval: float = 0.02
    steady: float = 10.0
    pre_storm: float = 5.0
    outage: float = 20.0


class Worker:
    """A child process speaking JSON lines (``fleet_worker``)."""

    def __init__(self, process: anyio.abc.Process, out: Path | None = None) -> None:
        self.process = process
        assert process.stdout is not None
        assert process.stdin is not None
        self._reader = BufferedByteReceiveStream(process.stdout)
        self.out = out

    @classmethod
    async def spawn(cls, *args: str, out: Path | None = None) -> Worker:
        command = [sys.executable, "-m", "benchmarks.fleet_worker", *args]
        process = await anyio.open_process(command, cwd=ROOT, env=dict(os.environ), stderr=None)
        worker = cls(process, out)
        await worker.receive()  # {"ready": true}
        return worker

    async def send(self, line: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send(f"{line}\n".encode())

    async def receive(self) -> dict[str, Any]:
        line = await self._reader.receive_until(b"\n", 1 << 24)
        return dict(json.loads(line))

    async def ask(self, line: str) -> dict[str, Any]:
        await self.send(line)
        return await self.receive()


async def ask_all(workers: Sequence[Worker], lines: Sequence[str]) -> list[dict[str, Any]]:
    answers: list[dict[str, Any]] = [{} for _ in workers]

    async def one(i: int) -> None:
        answers[i] = await workers[i].ask(lines[i])

    async with anyio.create_task_group() as tg:
        for i in range(len(workers)):
            tg.start_soon(one, i)
    return answers


class Sampler:
    """etcd's CPU seconds and RSS every 100 ms, with wall-clock times."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[int, float, int]] = []

    def sample(self) -> tuple[int, float, int]:
        point = (time.time_ns(), cpu_seconds(self.pid), rss_of(self.pid))
        self.samples.append(point)
        return point

    async def run(self) -> None:
        while True:
            self.sample()
            await anyio.sleep(0.1)

    def cpu_at(self, t_ns: int) -> float:
        """CPU seconds at ``t_ns``, interpolated between samples."""
        before = max((s for s in self.samples if s[0] <= t_ns), default=self.samples[0])
        after = min((s for s in self.samples if s[0] >= t_ns), default=self.samples[-1])
        if after[0] == before[0]:
            return before[1]
        return before[1] + (after[1] - before[1]) * (t_ns - before[0]) / (after[0] - before[0])

    def cpu_per_second(self, t0: int, t1: int) -> float:
        return (self.cpu_at(t1) - self.cpu_at(t0)) / max((t1 - t0) / 1e9, 1e-9)

    def peak_rss(self, t0: int, t1: int) -> int:
        return max((s[2] for s in self.samples if t0 <= s[0] <= t1), default=0)


@dataclass
class Steady:
    t0: int
    t1: int
    etcd_cpu: float  # seconds over the window
    proxy_cpu: float | None
    worker_cpu: float
    rss: int


@dataclass
class Storm:
    cut: int
    restored: int
    reported: int  # when the workers said all had caught up (orchestrator clock)
    watchers_after: int


@dataclass
class FleetResult:
    name: str
    put_ns: list[int]
    clients: list[dict[str, Any]]
    complete: bool
    sampler: Sampler
    steady: Steady
    watchers: dict[str, int] = field(default_factory=dict)
    storm: Storm | None = None


async def run_fleet(
    name: str,
    opts: Options,
    etcd: EtcdServer,
    endpoint: str,
    *,
    count_watchers: bool,
    steady_s: float,
    cut: Callable[[], None] | None = None,
    restore: Callable[[], None] | None = None,
    proxy_pid: Callable[[], int | None] = lambda: None,
) -> FleetResult:
    prefix = f"/fleet/{uuid.uuid4().hex[:8]}/"
    assert etcd.pid is not None
    sampler = Sampler(etcd.pid)
    watchers: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="aetcdcfg-fleet-") as tmp:
        async with anyio.create_task_group() as tg:
            tg.start_soon(sampler.run)
            watchers["before"] = etcd.watcher_count()
            writer = await Worker.spawn("write", etcd.endpoint, prefix, str(opts.interval))
            workers: list[Worker] = []

            async def spawn(i: int) -> None:
                out = Path(tmp) / f"w{i}.json"
                workers.append(await Worker.spawn("watch", endpoint, prefix, str(out), out=out))

            async with anyio.create_task_group() as spawning:
                for i in range(opts.processes):
                    spawning.start_soon(spawn, i)
            total = opts.processes * opts.clients
            if count_watchers:
                first = [
                    opts.small // opts.processes + (i < opts.small % opts.processes)
                    for i in range(len(workers))
                ]
                await ask_all(workers, [f"open {n}" for n in first])
                await anyio.sleep(2)  # the proxy merges watches after their first responses
                watchers[str(opts.small)] = etcd.watcher_count()
                await ask_all(workers, [f"open {opts.clients - n}" for n in first])
                await anyio.sleep(2)
                watchers[str(total)] = etcd.watcher_count()
            else:
                await ask_all(workers, [f"open {opts.clients}"] * len(workers))
                await anyio.sleep(1)

            def worker_cpu() -> float:
                return sum(cpu_seconds(w.process.pid) for w in workers)

            pid = proxy_pid()
            t0, cpu0, _ = sampler.sample()
            proxy0, wcpu0 = (cpu_seconds(pid) if pid else 0.0), worker_cpu()
            await anyio.sleep(steady_s)
            t1, cpu1, rss1 = sampler.sample()
            proxy_cpu = cpu_seconds(pid) - proxy0 if pid else None
            steady = Steady(t0, t1, cpu1 - cpu0, proxy_cpu, worker_cpu() - wcpu0, rss1)

            storm = None
            if cut is not None and restore is not None:
                await anyio.sleep(1.5)  # the window's last puts reach every client before the cut
                t_cut = time.time_ns()
                cut()
                await anyio.sleep(opts.outage)
                t_restored = time.time_ns()
                restore()
                await ask_all(workers, [f"restored {t_restored}"] * len(workers))
                reported = time.time_ns()
                await anyio.sleep(max(0.0, 5.0 - (reported - t_restored) / 1e9) + 1.0)
                storm = Storm(t_cut, t_restored, reported, etcd.watcher_count())

            stopped = await writer.ask("stop")
            last, put_ns = stopped["last"], stopped["put_ns"]
            await writer.process.wait()
            await ask_all(workers, [f"finish {last}"] * len(workers))
            clients: list[dict[str, Any]] = []
            complete = True
            for w in workers:
                await w.process.wait()
                assert w.out is not None
                data = json.loads(w.out.read_text())
                complete &= data["complete"]
                clients += data["clients"]
            tg.cancel_scope.cancel()
    return FleetResult(name, put_ns, clients, complete, sampler, steady, watchers, storm)


# -- analysis ----------------------------------------------------------------------------------------


def received(result: FleetResult, client: dict[str, Any]) -> Iterator[tuple[int, int, int]]:
    """(counter, put_ns, receive_ns) of each event a client received."""
    for i, lat in enumerate(client["latency_us"]):
        counter = client["first"] + i
        if counter > len(result.put_ns):  # only a broken history gets here; exactly_once() says so
            return
        put = result.put_ns[counter - 1]
        yield counter, put, put + lat * 1000


def steady_latencies(result: FleetResult) -> tuple[list[float], list[float]]:
    """Per put in the steady window: ms until the last client had it; and every delivery's ms."""
    t0, t1 = result.steady.t0, result.steady.t1
    last_rx: dict[int, int] = {}
    seen: dict[int, int] = {}
    deliveries: list[float] = []
    for client in result.clients:
        for counter, put, rx in received(result, client):
            if t0 <= put <= t1:
                deliveries.append((rx - put) / 1e6)
                last_rx[counter] = max(last_rx.get(counter, 0), rx)
                seen[counter] = seen.get(counter, 0) + 1
    n = len(result.clients)
    per_put = [(rx - result.put_ns[c - 1]) / 1e6 for c, rx in last_rx.items() if seen[c] == n]
    return per_put, deliveries


def late_clients(result: FleetResult, limit_s: float = 1.0) -> int:
    """Clients that received some put of the steady window more than ``limit_s`` after it was made."""
    t0, t1 = result.steady.t0, result.steady.t1
    return sum(
        any(t0 <= put <= t1 and rx - put > limit_s * 1e9 for _, put, rx in received(result, client))
        for client in result.clients
    )


def window_disconnects(result: FleetResult) -> int:
    """``watch.disconnected`` events in the steady window: streams that broke without a fault."""
    t0, t1 = result.steady.t0, result.steady.t1
    return sum(
        name == "watch.disconnected" and t0 <= t <= t1 for c in result.clients for name, t, _ in c["logs"]
    )


def exactly_once(result: FleetResult) -> tuple[int, list[str]]:
    """Clients whose history is exact (consecutive, from their start revision to the last write),
    and what went wrong for the others: a skipped range is described by where it starts relative to
    the revision the client resumed from after the storm."""
    last = len(result.put_ns)
    good = 0
    problems = []
    offsets: dict[int, int] = {}
    for client in result.clients:
        n = len(client["latency_us"])
        if client["resyncs"]:  # re-listed: exact if it ends on the last write with no error
            ok = not client["errors"] and client["last"] == last
        else:
            ok = not client["errors"] and client["last"] == last and n == last - client["first"] + 1
        good += ok
        resumed = [rev for name, _, rev in client["logs"] if name == "watch.resumed"]
        for delivered, following in client["jumps"]:
            if resumed and following > delivered + 1:
                offset = delivered - resumed[-1]  # revisions received after resuming, before the gap
                offsets[offset] = offsets.get(offset, 0) + 1
        if not ok and len(problems) < 2:
            detail = client["errors"][:1] or [f"first {client['first']}, last {client['last']}, {n} events"]
            problems.append(f"client {client['index']}: {detail[0]}")
    if offsets:
        described = ", ".join(f"{count} after {offset}" for offset, count in sorted(offsets.items()))
        problems.insert(0, f"revisions skipped, counted from the resume point: {described};")
    return good, problems


@dataclass
class StormStats:
    catch_up: list[float]  # per client, seconds after restore
    cpu_until: float  # etcd CPU s/s from restore until the last client caught up
    cpu_5s: float
    cpu_steady: float  # s/s over the steady window before the cut
    cpu_outage: float
    rss_peak: int
    disconnected: int
    retries: list[int]  # per client
    first_resume: list[float]  # per client, seconds after restore
    busiest_100ms: int


def storm_stats(result: FleetResult) -> StormStats:
    storm = result.storm
    assert storm is not None
    s = result.sampler
    catch_up = []
    for client in result.clients:
        after = (rx for _, put, rx in received(result, client) if put >= storm.restored)
        catch_up.append((next(after, storm.reported) - storm.restored) / 1e9)
    done = storm.restored + int(max(catch_up) * 1e9)
    retries, resumes, disconnected = [], [], 0
    for client in result.clients:
        logs = [(name, t) for name, t, _ in client["logs"] if t >= storm.cut]
        disconnected += sum(name == "watch.disconnected" for name, _ in logs)
        retries.append(sum(name == "watch.retry" for name, _ in logs))
        resumed = [t for name, t in logs if name == "watch.resumed" and t >= storm.restored]
        if resumed:
            resumes.append((min(resumed) - storm.restored) / 1e9)
    buckets: dict[int, int] = {}
    for r in resumes:
        buckets[int(r * 10)] = buckets.get(int(r * 10), 0) + 1
    steady = result.steady
    return StormStats(
        catch_up=catch_up,
        cpu_until=s.cpu_per_second(storm.restored, max(done, storm.restored + 100_000_000)),
        cpu_5s=s.cpu_per_second(storm.restored, storm.restored + 5_000_000_000),
        cpu_steady=steady.etcd_cpu / ((steady.t1 - steady.t0) / 1e9),
        cpu_outage=s.cpu_per_second(storm.cut + 1_000_000_000, storm.restored),
        rss_peak=s.peak_rss(storm.cut, max(done, storm.restored + 5_000_000_000)),
        disconnected=disconnected,
        retries=retries,
        first_resume=resumes,
        busiest_100ms=max(buckets.values(), default=0),
    )


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "—"


def report(opts: Options, direct: FleetResult, direct_storm: FleetResult, proxy: FleetResult) -> str:
    total = opts.processes * opts.clients
    out = [
        f"{opts.processes} processes x {opts.clients} clients = {total} clients, one watch each on one "
        f"prefix; writer every {opts.interval * 1000:g} ms straight to etcd; outage {opts.outage:g} s",
        "",
        "etcd watchers (`etcd_debugging_mvcc_watcher_total`)",
        "",
    ]
    rows = []
    for label, key in (
        ("no clients", "before"),
        (f"{opts.small} clients", str(opts.small)),
        (f"{total} clients", str(total)),
    ):
        d, p = direct.watchers[key], proxy.watchers[key]
        rows.append([label, d, p, ratio(p, d)])
    assert direct_storm.storm is not None
    assert proxy.storm is not None
    d, p = direct_storm.storm.watchers_after, proxy.storm.watchers_after
    rows.append([f"{total} clients, after the storm", d, p, ratio(p, d)])
    out += [table(["", "direct", "proxy", "proxy / direct"], rows), ""]

    rows = []
    dl, dd = steady_latencies(direct)
    pl, pd = steady_latencies(proxy)
    for label, d_values, p_values, q in (
        ("put -> last of all clients p50 ms", dl, pl, 50),
        ("put -> last of all clients p99 ms", dl, pl, 99),
        ("put -> each delivery p50 ms", dd, pd, 50),
        ("put -> each delivery p99 ms", dd, pd, 99),
    ):
        a, b = percentile(d_values, q), percentile(p_values, q)
        rows.append([label, f"{a:.2f}", f"{b:.2f}", ratio(b, a)])
    late = [late_clients(direct), late_clients(proxy)]
    rows.append(["clients with a delivery more than 1 s late", late[0], late[1], ""])
    drops = [window_disconnects(direct), window_disconnects(proxy)]
    rows.append(["`watch.disconnected` during the window", drops[0], drops[1], ""])
    writes = [len(dl), len(pl)]
    rows.append(["puts in the window (all clients had them)", writes[0], writes[1], ""])
    d_cpu = direct.steady.etcd_cpu / max(writes[0], 1) * 1e3
    p_cpu = proxy.steady.etcd_cpu / max(writes[1], 1) * 1e3
    rows.append(["etcd CPU ms / write", f"{d_cpu:.2f}", f"{p_cpu:.2f}", ratio(p_cpu, d_cpu)])
    d_s = direct.steady.etcd_cpu / ((direct.steady.t1 - direct.steady.t0) / 1e9)
    p_s = proxy.steady.etcd_cpu / ((proxy.steady.t1 - proxy.steady.t0) / 1e9)
    rows.append(["etcd CPU s / s", f"{d_s:.3f}", f"{p_s:.3f}", ratio(p_s, d_s)])
    pp = (proxy.steady.proxy_cpu or 0) / max(writes[1], 1) * 1e3
    rows.append(["grpc-proxy CPU ms / write", "—", f"{pp:.2f}", ""])
    dw = direct.steady.worker_cpu / max(len(dd), 1) * 1e6
    pw = proxy.steady.worker_cpu / max(len(pd), 1) * 1e6
    rows.append(["client processes CPU µs / delivery", f"{dw:.0f}", f"{pw:.0f}", ratio(pw, dw)])
    rows.append(["etcd RSS MiB", f"{direct.steady.rss / MiB:.0f}", f"{proxy.steady.rss / MiB:.0f}", ""])
    out += [
        f"Steady state, {opts.steady:g} s window",
        "",
        table(["", "direct", "proxy", "proxy / direct"], rows),
        "",
    ]

    ds, ps = storm_stats(direct_storm), storm_stats(proxy)
    d_ok, d_problems = exactly_once(direct_storm)
    p_ok, p_problems = exactly_once(proxy)
    a_ok, a_problems = exactly_once(direct)

    def spread(values: list[float]) -> str:
        if not values:
            return "—"
        return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"

    rows = [
        [
            "all clients have a write made after the path returned, s",
            f"{max(ds.catch_up):.2f}",
            f"{max(ps.catch_up):.2f}",
            ratio(max(ps.catch_up), max(ds.catch_up)),
        ],
        ["per client: min / median / max s", spread(ds.catch_up), spread(ps.catch_up), ""],
        [
            "clients with every write exactly once, in order (or re-listed exactly)",
            f"{d_ok}/{total}",
            f"{p_ok}/{total}",
            "",
        ],
        [
            "clients re-listed instead of replaying (resync events)",
            f"{sum(bool(c['resyncs']) for c in direct_storm.clients)}",
            f"{sum(bool(c['resyncs']) for c in proxy.clients)}",
            "",
        ],
        [
            "etcd CPU s / s, steady window before the cut",
            f"{ds.cpu_steady:.3f}",
            f"{ps.cpu_steady:.3f}",
            ratio(ps.cpu_steady, ds.cpu_steady),
        ],
        [
            "etcd CPU s / s, during the outage",
            f"{ds.cpu_outage:.3f}",
            f"{ps.cpu_outage:.3f}",
            ratio(ps.cpu_outage, ds.cpu_outage),
        ],
        [
            "etcd CPU s / s, path back until all caught up",
            f"{ds.cpu_until:.3f}",
            f"{ps.cpu_until:.3f}",
            ratio(ps.cpu_until, ds.cpu_until),
        ],
        ["  vs steady", ratio(ds.cpu_until, ds.cpu_steady), ratio(ps.cpu_until, ps.cpu_steady), ""],
        [
            "etcd CPU s / s, first 5 s after the path is back",
            f"{ds.cpu_5s:.3f}",
            f"{ps.cpu_5s:.3f}",
            ratio(ps.cpu_5s, ds.cpu_5s),
        ],
        ["  vs steady", ratio(ds.cpu_5s, ds.cpu_steady), ratio(ps.cpu_5s, ps.cpu_steady), ""],
        [
            "etcd RSS MiB: steady -> storm peak",
            f"{direct_storm.steady.rss / MiB:.0f} -> {ds.rss_peak / MiB:.0f}",
            f"{proxy.steady.rss / MiB:.0f} -> {ps.rss_peak / MiB:.0f}",
            ratio(ps.rss_peak, ds.rss_peak),
        ],
        ["`watch.disconnected` events", ds.disconnected, ps.disconnected, ""],
        [
            "`watch.retry` events (per client min / median / max)",
            f"{sum(ds.retries)} ({min(ds.retries)} / {statistics.median(ds.retries):g} / {max(ds.retries)})",
            f"{sum(ps.retries)} ({min(ps.retries)} / {statistics.median(ps.retries):g} / {max(ps.retries)})",
            "",
        ],
        [
            "first `watch.resumed` after the path is back: min / median / max s",
            spread(ds.first_resume),
            spread(ps.first_resume),
            "",
        ],
        ["  most resumes in one 100 ms", ds.busiest_100ms, ps.busiest_100ms, ""],
    ]
    out += [
        f"Storm: the clients' path cut for {opts.outage:g} s under writes",
        "",
        table(["", "direct", "proxy", "proxy / direct"], rows),
        "",
    ]

    w_small, w_total = proxy.watchers[str(opts.small)], proxy.watchers[str(total)]
    verdicts = [
        (
            # O(1) in practice: not one per client. Groups of 5+ are never merged again, so a few remain.
            f"etcd watchers O(1) through the proxy (at most one per 10 clients: <= {total // 10} "
            "more than with none)",
            w_total - proxy.watchers["before"] <= total // 10,
            f"{opts.small} -> {total} clients: {w_small} -> {w_total} (direct {direct.watchers[str(opts.small)]} -> {direct.watchers[str(total)]}); after the storm {proxy.storm.watchers_after}",
        ),
    ]
    for label, stats in (("direct", ds), ("proxy", ps)):
        worst = max(stats.catch_up)
        verdicts.append(
            (f"{label}: all caught up <= 5 s after the path returns", worst <= 5.0, f"{worst:.2f} s")
        )
    verdicts.append(
        (
            "every client every write exactly once, in order",
            d_ok == p_ok == a_ok == total and direct_storm.complete and proxy.complete and direct.complete,
            f"direct steady {a_ok}/{total}, direct storm {d_ok}/{total}, proxy {p_ok}/{total} {' '.join(a_problems + d_problems + p_problems)}",
        ),
    )
    for label, stats in (("direct", ds), ("proxy", ps)):
        r = stats.cpu_until / max(stats.cpu_steady, 1e-9)
        verdicts.append(
            (
                f"{label}: storm etcd CPU/s <= 2x steady",
                r <= 2.0,
                f"{r:.2f}x until caught up, {stats.cpu_5s / max(stats.cpu_steady, 1e-9):.2f}x over 5 s",
            )
        )
    failures = [sum(c["open_failures"] > 0 for c in r.clients) for r in (direct, direct_storm, proxy)]
    out.append(
        "Clients that needed more than one attempt to open (gRPC connect deadline passed): "
        f"direct {failures[0]}, direct via FaultProxy {failures[1]}, proxy {failures[2]}"
    )
    for label, r, stats in (("direct", direct_storm, ds), ("proxy", proxy, ps)):
        slowest = max(range(len(stats.catch_up)), key=stats.catch_up.__getitem__)
        client = r.clients[slowest]
        out.append(
            f"Slowest {label} client to catch up: {stats.catch_up[slowest]:.2f} s after the path returned; "
            f"its last `watch.retry` cause: {client['last_cause'] or '—'}"
        )
    out.append("")
    out.append("Verdicts")
    out.append("")
    for label, ok, detail in verdicts:
        out.append(f"- {'PASS' if ok else 'FAIL'} {label}: {detail}")
    return "\n".join(out)


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


async def main(opts: Options) -> str:
    load_before = load_average()
    with ExitStack() as stack:
        etcd = stack.enter_context(EtcdServer())
        direct = await run_fleet(
            "direct", opts, etcd, etcd.endpoint, count_watchers=True, steady_s=opts.steady
        )
        faults = stack.enter_context(FaultProxy.to(etcd.endpoint))

        def cut() -> None:
            faults.refuse(True)
            faults.reset()

        direct_storm = await run_fleet(
            "direct storm",
            opts,
            etcd,
            faults.endpoint,
            count_watchers=False,
            steady_s=opts.pre_storm,
            cut=cut,
            restore=lambda: faults.refuse(False),
        )
    with ExitStack() as stack:
        etcd = stack.enter_context(EtcdServer())
        grpc_proxy = stack.enter_context(EtcdGrpcProxy([etcd.endpoint]))
        proxy = await run_fleet(
            "proxy",
            opts,
            etcd,
            grpc_proxy.endpoint,
            count_watchers=True,
            steady_s=opts.steady,
            cut=grpc_proxy.kill,
            restore=lambda: grpc_proxy.start(wait=False),
            proxy_pid=lambda: grpc_proxy.pid,
        )
    loads = f"load average (2-core machine, shared): {load_before} at start, {load_average()} at end"
    return f"{report(opts, direct, direct_storm, proxy)}\n\n{loads}"


def parse(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    defaults = Options()
    for name in ("processes", "clients", "small"):
        parser.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
    for name in ("interval", "steady", "pre_storm", "outage"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    return Options(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    started = time.monotonic()
    print(anyio.run(main, parse(sys.argv[1:])))
    print(f"\n(fleet section: {time.monotonic() - started:.0f} s)")
