"""Instructions per event on the hot paths, counted by callgrind: stable where wall clocks are not.

No etcd and no network: WatchResponses and a RangeResponse are built and serialised up front, then fed
through the same code the I/O loops run. ``python -m benchmarks.instructions [SCENARIO...]`` runs
each scenario under ``valgrind --tool=callgrind`` with 0 and with N units of work and prints the
difference per unit (so start-up and building the input cancel out):

* ``raw``: ``WatchResponse.FromString`` and decoding each event into a (key, value, revision) tuple,
  the floor any Python client pays;
* ``watch``: ``FromString`` + ``WatchState.on_response`` + ``PrefixWatch._publish`` to one subscription
  + draining it event by event (``async for`` over the subscription's ready batches);
* ``single`` / ``raw_single``: the same with one event per response (single-put revisions);
* ``stream`` / ``stream_single``: ``watch`` / ``single`` through ``WatchLoop``'s read loop (a fake call
  hands it the responses), so its per-response work (clock, health, progress checks) counts too;
* ``get_prefix`` / ``list_keys``: ``RangeResponse.FromString`` of 40,000 keys x 100 B and what
  ``get_prefix`` (the Snapshot dict) or a watch's listing (state + snapshot for ``with_snapshot``)
  builds from it, per key;
* ``live_start``: what ``async with LiveSettings(Flags, ...)`` does with 40,000 keys of one
  ``dict[str, str]`` field, minus the I/O, per key;
* ``live_revision``: ``LiveSettings._apply`` of single-key revisions to the 200-field model of
  ``benchmarks/livemodel.py`` (one batch in, one validated object swapped in), per revision;
* ``fanout``: ``PrefixWatch._publish`` of single-event revisions to 100 subscriber tasks iterating
  ``async for`` over their subscriptions, per delivery (as ``benchmarks/fanout_gc.py``, smaller).

All scenarios run in one process under callgrind (importing the library there takes ~18 s, so
once), which dumps its counts at each call of a marker function (``os.getloadavg``, which nothing
else calls): per scenario, its warm-up (inputs built, one run with 0 units), a run with 0 units and
a run with N units are each a segment of their own. Per unit is the difference of the last two
over N. The process gets a fixed environment and hash seed, so the same code counts the same
instructions run to run (docs/benchmarks.md has the measured spread).

``python -m benchmarks.instructions --check`` is ``make bench-check``: the hot paths (``CHECK``, at
sizes that keep it under a minute) against ``benchmarks/instructions_baseline.json``; it fails on a
regression beyond ``_baseline.TOLERANCE``. ``--update-baseline`` (``make bench-baseline``) rewrites
that file after a deliberate change. ``python -m benchmarks.instructions SCENARIO run`` runs one
scenario natively (for py-spy or timing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import grpc
from aetcd.rpc import kv_pb2, rpc_pb2

from . import _baseline
from ._baseline import Measurement
from ._util import ROOT, table

PREFIX = b"/bench/0123abcd/"
TXN_EVENTS = 100
VALUE = b"1749400000123456789" + b"v" * 45  # 64 bytes
LOAD_KEYS = 40_000
LOAD_VALUE = b"x" * 100


def watch_responses(count: int, per_response: int) -> list[bytes]:
    """``count`` events of 10,000 keys, ``per_response`` per revision (a txn), serialised."""
    out = []
    revision = 100
    for start in range(0, count, per_response):
        revision += 1
        events = []
        for i in range(start, min(start + per_response, count)):
            kv = kv_pb2.KeyValue(
                key=PREFIX + b"k%05d" % (i % 10_000),
                value=VALUE,
                mod_revision=revision,
                create_revision=50 + i % 10_000,
                version=1 + i // 10_000,
            )
            events.append(kv_pb2.Event(type=kv_pb2.Event.PUT, kv=kv))
        response = rpc_pb2.WatchResponse(
            header=rpc_pb2.ResponseHeader(revision=revision), watch_id=7, events=events
        )
        out.append(response.SerializeToString())
    return out


def range_response(count: int, stem: bytes = b"k") -> bytes:
    kvs = [
        kv_pb2.KeyValue(
            key=PREFIX + stem + b"%06d" % i,
            value=LOAD_VALUE,
            mod_revision=60 + i,
            create_revision=60 + i,
            version=1,
        )
        for i in range(count)
    ]
    return rpc_pb2.RangeResponse(
        header=rpc_pb2.ResponseHeader(revision=60 + count), kvs=kvs, count=count
    ).SerializeToString()


def run_raw(data: list[bytes]) -> int:
    parse = rpc_pb2.WatchResponse.FromString
    seen = 0
    for blob in data:
        response = parse(blob)
        decoded = [(ev.kv.key.decode(), ev.kv.value, ev.kv.mod_revision) for ev in response.events]
        seen += len(decoded)
    return seen


async def run_watch(data: list[bytes]) -> int:
    from aetcdcfg._fanout import PrefixWatch
    from aetcdcfg._resume import WatchState

    hub = PrefixWatch(None, PREFIX, lambda hub: None)  # type: ignore[arg-type]
    state = hub.state = WatchState(PREFIX, 100, {})
    state.watch_id = 7
    subscription, _ = hub.subscribe(None, len(data) + 1, with_snapshot=False)
    parse = rpc_pb2.WatchResponse.FromString
    seen = 0
    for blob in data:
        step = state.on_response(parse(blob))
        hub._publish(step.batches)
        for _ in range(sum(len(batch) for batch in step.batches)):
            event = await subscription.__anext__()
            seen += event.revision > 0
    return seen


class _FakeCall:
    """A Watch stream call answering ``read()`` with pre-serialised responses, then EOF.

    Before each read it drains the subscription event by event, as the subscriber's task would.
    """

    def __init__(self, data: list[bytes], subscription: Any) -> None:
        self.data = iter(data)
        self.subscription = subscription
        self.seen = 0

    async def write(self, request: Any) -> None:
        pass

    async def read(self) -> Any:
        subscription = self.subscription
        while subscription._available or subscription._index < len(subscription._batch):
            event = await subscription.__anext__()
            self.seen += event.revision > 0
        blob = next(self.data, None)
        if blob is None:
            return grpc.aio.EOF
        return rpc_pb2.WatchResponse.FromString(blob)


async def run_stream(data: list[bytes]) -> int:
    """``run_watch`` through ``WatchLoop._read_loop`` (its per-response time and health updates)."""
    from types import SimpleNamespace

    from aetcdcfg._fanout import PrefixWatch
    from aetcdcfg._resume import WatchState
    from aetcdcfg._stream import WatchLoop, _Session, _StreamFailed

    hub = PrefixWatch(None, PREFIX, lambda hub: None)  # type: ignore[arg-type]
    state = hub.state = WatchState(PREFIX, 100, {})
    state.watch_id = 7
    subscription, _ = hub.subscribe(None, len(data) + 1, with_snapshot=False)
    loop = WatchLoop(None, state, hub._publish, label=PREFIX.decode(), health=hub.health)  # type: ignore[arg-type]
    call = _FakeCall(data, subscription)
    endpoint = SimpleNamespace(url="bench", answers_progress=True, closed=False)
    async with anyio.create_task_group() as tg:  # the session's group: its watchdog is not started here
        session = _Session(endpoint, call, tg, None, 0.0)  # type: ignore[arg-type]
        with contextlib.suppress(_StreamFailed):  # EOF after the last response
            await loop._read_loop(session)
    return call.seen


class _FakeConnection:
    """Answers ``Range`` with one pre-serialised response (parsed per call, as grpc would)."""

    def __init__(self, blob: bytes) -> None:
        self.blob = blob

    async def unary(self, service: str, method: str, request: Any, **kwargs: Any) -> Any:
        return rpc_pb2.RangeResponse.FromString(self.blob)


async def run_get_prefix(blob: bytes) -> int:
    from aetcdcfg._kv import KV

    snapshot = await KV(_FakeConnection(blob)).get_prefix(PREFIX.decode())  # type: ignore[arg-type]
    return len(snapshot.items)


async def _listed(blob: bytes) -> Mapping[str, bytes]:
    """A watch's listing of the prefix (state + snapshot for ``with_snapshot``): its snapshot's items."""
    from aetcdcfg._fanout import PrefixWatch
    from aetcdcfg._reads import list_keys
    from aetcdcfg._resume import WatchState

    listing, revision = await list_keys(_FakeConnection(blob), PREFIX)  # type: ignore[arg-type]
    hub = PrefixWatch(None, PREFIX, lambda hub: None)  # type: ignore[arg-type]
    hub.state = WatchState(PREFIX, revision, listing)
    subscription, _ = hub.subscribe(None, 16, with_snapshot=True)
    assert subscription.snapshot is not None
    return subscription.snapshot.items


async def run_list_keys(blob: bytes) -> int:
    return len(await _listed(blob))


async def run_live_start(blob: bytes) -> int:
    """What ``async with LiveSettings(Flags, ...)`` does with a 40,000-key prefix, minus the I/O:
    the watch's listing and snapshot, then ``LiveSettings._load`` from the snapshot's items."""
    from pydantic_settings import BaseSettings

    from aetcdcfg import LiveSettings

    class Flags(BaseSettings):
        flags: dict[str, str] = {}

    live = LiveSettings(Flags, prefix=PREFIX.decode())
    layer = live._layers[0]
    layer.items = layer.relative(await _listed(blob))
    live._load(1)
    return len(live.current.flags)


def live_revisions(count: int) -> list[list[Any]]:
    """``count`` single-put revisions of the 200-field model, as the watch hands them over."""
    from aetcdcfg.events import EventType, make_event

    from .livemodel import change

    batches = []
    for i in range(count):
        key, value = change(i)
        batches.append([make_event(EventType.PUT, PREFIX.decode() + key, value.encode(), 2 + i, None, 1, 1)])
    return batches


def run_live_revisions(batches: list[list[Any]]) -> int:
    """Load the 200-field model from every key, then apply each batch as ``_follow`` does."""
    from aetcdcfg import LiveSettings

    from .livemodel import Service, initial_items

    live = LiveSettings(Service, prefix=PREFIX.decode())
    layer = live._layers[0]
    layer.items = {key: value.encode() for key, value in initial_items().items()}
    live._load(1)
    for batch in batches:
        live._apply(layer, batch, {})
    assert live.last_error is None, live.last_error
    return live.revision


FANOUT_SUBSCRIBERS = 100


def fanout_revisions(deliveries: int) -> list[Any]:
    """Single-event revisions, enough for ``deliveries`` deliveries to ``FANOUT_SUBSCRIBERS``."""
    from aetcdcfg.events import EventType, make_event

    prefix = PREFIX.decode()
    return [
        make_event(EventType.PUT, f"{prefix}k{i % 10}", VALUE, 101 + i, None, 50, 1)
        for i in range(deliveries // FANOUT_SUBSCRIBERS)
    ]


async def run_fanout(events: list[Any]) -> int:
    """Publish each revision once every subscriber task has taken the previous one (a writer's pace)."""
    from ._util import DetachedFanout

    async with DetachedFanout(PREFIX, FANOUT_SUBSCRIBERS) as fanout:
        for event in events:
            await fanout.publish(event)
    return fanout.taken


#: name -> (unit, units, build the input, process it)
SCENARIOS: dict[str, tuple[str, int, Callable[[int], Any], Callable[[Any], object]]] = {
    "raw": ("event", 20_000, lambda n: watch_responses(n, TXN_EVENTS), run_raw),
    "watch": ("event", 20_000, lambda n: watch_responses(n, TXN_EVENTS), lambda d: asyncio.run(run_watch(d))),
    "raw_single": ("event", 5_000, lambda n: watch_responses(n, 1), run_raw),
    "single": ("event", 5_000, lambda n: watch_responses(n, 1), lambda d: asyncio.run(run_watch(d))),
    "stream": (
        "event",
        20_000,
        lambda n: watch_responses(n, TXN_EVENTS),
        lambda d: asyncio.run(run_stream(d)),
    ),
    "stream_single": ("event", 5_000, lambda n: watch_responses(n, 1), lambda d: asyncio.run(run_stream(d))),
    "fanout": ("delivery", 20_000, fanout_revisions, lambda d: asyncio.run(run_fanout(d))),
    "get_prefix": ("key", LOAD_KEYS, range_response, lambda d: asyncio.run(run_get_prefix(d))),
    "list_keys": ("key", LOAD_KEYS, range_response, lambda d: asyncio.run(run_list_keys(d))),
    "live_start": (
        "key",
        LOAD_KEYS,
        lambda n: range_response(n, b"flags/f"),
        lambda d: asyncio.run(run_live_start(d)),
    ),
    "live_revision": ("revision", 200, live_revisions, run_live_revisions),
}

#: ``make bench-check``: the hot paths and their sizes, chosen to keep the check near 30 s of CPU
#: (importing the library under callgrind is ~18 s of it). Per unit differs a little from the
#: table's larger runs (``stream`` 1.5 % more: 12,000 events fill the 10,000-event history once).
CHECK: dict[str, int] = {
    "stream": 12_000,  # per event of 100-event transactions, through the read loop
    "stream_single": 3_000,  # per single-put revision, through the read loop
    "fanout": 10_000,  # per delivery to one of 100 subscribers
    "live_revision": 200,  # per revision of the 200-field model (each field changed once)
    "live_start": 5_000,  # per key of LiveSettings' first load
    "get_prefix": 5_000,  # per key of get_prefix
}

#: The check's proof that it can fail, run with it: ``fanout`` again with one more Python call per
#: delivery, looping 5 times (``SCENARIO+LOOPS``, :func:`_injected`: ~2,100 instructions, 12 %),
#: must compare as a regression with the plain run.
SELF_TEST = "fanout+5"

#: The measured process's whole environment: the same wherever the check runs. Hash seeds move
#: dict and set layouts, and the environment's size moves the heap's (up to 1.2 % of a fan-out
#: delivery, measured); the interpreter finds the checkout as the working directory of ``-m``.
SEGMENTS_ENV = {"PYTHONHASHSEED": "0", "LC_ALL": "C.UTF-8"}

#: The marker between measured segments: callgrind dumps its counts at each call (``--dump-before``).
MARKER = "getloadavg"


def run_one(scenario: str, process: bool) -> None:
    """Build the input; process it only if asked (natively, for py-spy or timing)."""
    _, n, build, run = SCENARIOS[scenario]
    data = build(n)
    if process:
        run(data)


@contextlib.contextmanager
def _injected(loops: int) -> Iterator[None]:
    """A stand-in regression: ``loops`` turns of an empty Python loop in every delivery to a subscriber."""
    from aetcdcfg._fanout import _Subscriber

    offer = _Subscriber.offer

    def slower(self: _Subscriber, batch: Any) -> None:
        for _ in range(loops):
            pass
        offer(self, batch)

    _Subscriber.offer = slower  # type: ignore[method-assign]
    try:
        yield
    finally:
        _Subscriber.offer = offer  # type: ignore[method-assign]


def run_segments(plan: list[tuple[str, int]]) -> None:
    """Under callgrind: each scenario's warm-up, its 0-unit run and its N-unit run, each a segment.

    A scenario named ``NAME+LOOPS`` is ``NAME`` with :func:`_injected` work. Prints the segments'
    labels (one per call of the marker) as JSON for :func:`measure`.
    """
    labels = []

    def end_segment(label: str) -> None:
        labels.append(label)
        os.getloadavg()  # MARKER

    for key, n in plan:
        name, _, loops = key.partition("+")
        _, _, build, run = SCENARIOS[name]
        empty, data = build(0), build(n)
        with _injected(int(loops)) if loops else contextlib.nullcontext():
            run(build(0))  # lazy imports, first calls and classes built once: in neither measured run
            gc.collect()
            end_segment(f"{key} warm-up")
            run(empty)
            end_segment(f"{key} 0")
            gc.collect()  # the 0-unit run's cycles, collected outside the N-unit run
            end_segment(f"{key} collect")
            run(data)
            end_segment(f"{key} {n}")
        del empty, data
    print(json.dumps(labels))


def measure(plan: Mapping[str, int]) -> dict[str, Measurement]:
    """Instructions per unit of each scenario, all in one callgrind run of :func:`run_segments`."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    # Loading a module's bytecode or compiling its source leaves different heaps behind, and so
    # different counts later (0.3 % of a single-put event, measured): always load, from fresh .pyc.
    subprocess.run([sys.executable, "-m", "compileall", "-q", "aetcdcfg", "benchmarks"], cwd=ROOT, check=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        done = subprocess.run(
            [
                valgrind,
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                f"--dump-before={MARKER}",
                "--dump-line=no",
                sys.executable,
                "-m",
                "benchmarks.instructions",
                "--segments",
                *(f"{key}:{n}" for key, n in plan.items()),
            ],
            cwd=ROOT,
            env=SEGMENTS_ENV,
            capture_output=True,
            text=True,
        )
        if done.returncode:
            raise SystemExit(f"the scenarios failed under callgrind:\n{done.stderr[-3000:]}")
        labels = json.loads(done.stdout.splitlines()[-1])
        dumps = sorted(out.parent.glob(f"{out.name}.*"), key=lambda path: int(path.suffix[1:]))
        assert len(dumps) == len(labels), f"{len(dumps)} callgrind dumps for {len(labels)} segments"
        counts = dict(zip(labels, map(_total, dumps), strict=True))
    result = {}
    for key, n in plan.items():
        unit = SCENARIOS[key.partition("+")[0]][0]
        result[key] = Measurement(unit, n, (counts[f"{key} {n}"] - counts[f"{key} 0"]) / n)
    return result


def _total(dump: Path) -> int:
    match = re.search(r"^(?:summary|totals): (\d+)", dump.read_text(), re.MULTILINE)
    assert match, f"no totals in {dump}"
    return int(match.group(1))


def check(plan: Mapping[str, int], *, ci: bool, inject: int = 0) -> int:
    """``make bench-check``: measure, compare with the committed baseline, print the table.

    With ``inject``, every scenario runs with that much :func:`_injected` work (to see it fail).
    """
    started = time.monotonic()
    baseline = _baseline.load()
    mismatches = _baseline.environment_mismatches(baseline.environment, _baseline.environment())
    if mismatches:
        print(
            f"bench-check {'FAILED' if ci else 'SKIPPED'}: CANNOT COMPARE, the baseline was measured with "
            "other versions and its instruction counts do not apply here:\n  "
            + "\n  ".join(mismatches)
            + "\nMeasure a baseline for this environment with `make bench-baseline` and commit it "
            + ("(docs/benchmarks.md). In CI this fails: CI must compare." if ci else "(docs/benchmarks.md).")
        )
        return _baseline.exit_status(mismatches, [], ci=ci)
    expected = baseline.scenarios
    if set(plan) != set(CHECK):  # some of the scenarios only
        expected = {name: m for name, m in expected.items() if name in plan}
    runs = {f"{name}+{inject}" if inject else name: n for name, n in plan.items()}
    probed = SELF_TEST.partition("+")[0]
    if probed in runs:
        runs[SELF_TEST] = plan[probed]
    results = measure(runs)
    probe = results.pop(SELF_TEST, None)
    measured = {key.partition("+")[0]: m for key, m in results.items()}
    rows = _baseline.compare(expected, measured, _baseline.TOLERANCE)
    print(_baseline.render(rows, _baseline.TOLERANCE))
    status = _baseline.exit_status([], rows, ci=ci)
    failed = [row.scenario for row in rows if row.failed]
    improved = [row.scenario for row in rows if row.verdict == _baseline.IMPROVED]
    if failed:
        print(
            f"\nFAILED: {', '.join(failed)}. A deliberate change? `make bench-baseline`, then commit "
            "benchmarks/instructions_baseline.json saying why (docs/benchmarks.md)."
        )
    elif improved:
        print(
            f"\nFaster: {', '.join(improved)}. Keep the gain guarded: `make bench-baseline` and commit "
            "the new baseline with the change."
        )
    notes = _baseline.build_notes(baseline.measured_on, _baseline.build_info())
    if notes and (failed or improved):
        print(
            "Measured on another build than the baseline (counts may move a little):\n  " + "\n  ".join(notes)
        )
    if probe is not None:
        status |= _self_test(measured[probed], probe)
    print(f"bench-check: {time.monotonic() - started:.0f} s")
    return status


def _self_test(now: Measurement, probe: Measurement) -> int:
    """The check's own proof that it sees a regression: the injected run must compare as one."""
    [row] = _baseline.compare({SELF_TEST: now}, {SELF_TEST: probe}, _baseline.TOLERANCE)
    extra = f"{probe.per_unit - now.per_unit:+,.0f} instructions/{now.unit} ({row.ratio or 0:.3f}x)"
    if row.verdict == _baseline.REGRESSED:
        print(f"self-test: {SELF_TEST} (injected work) measured {extra}: {row.verdict}, as it must")
        return 0
    print(f"SELF-TEST FAILED: {SELF_TEST} measured {extra}, not a regression: the measurement is broken")
    return 1


def update_baseline(plan: Mapping[str, int]) -> None:
    """Measure as the check does (the self-test included: the same process, the same counts)."""
    probed = SELF_TEST.partition("+")[0]
    measured = measure({**plan, SELF_TEST: plan[probed]} if probed in plan else plan)
    measured.pop(SELF_TEST, None)
    _baseline.BASELINE_PATH.write_text(
        _baseline.dump(measured, _baseline.environment(), _baseline.build_info())
    )
    for name, m in measured.items():
        print(f"{name}: {m.per_unit:,.0f} instructions/{m.unit} over {m.units:,}")
    print(f"wrote {_baseline.BASELINE_PATH.relative_to(ROOT)}: commit it, saying why the counts moved")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.instructions", description=__doc__.split("\n")[0]
    )
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO", help=f"any of {', '.join(SCENARIOS)}")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--check", action="store_true", help="compare the hot paths with the baseline (exit 1 if slower)"
    )
    mode.add_argument(
        "--update-baseline", action="store_true", help="rewrite the baseline (every --check scenario)"
    )
    parser.add_argument(
        "--inject-work",
        type=int,
        default=0,
        metavar="LOOPS",
        help="with --check: add LOOPS turns of a Python loop to every delivery to a subscriber, to see the check fail",
    )
    args = parser.parse_args(argv)
    unknown = set(args.scenarios) - set(CHECK if args.check else SCENARIOS)
    if unknown or (args.update_baseline and args.scenarios):
        parser.error(f"not a scenario here: {', '.join(sorted(unknown)) or ' '.join(args.scenarios)}")
    if args.inject_work and not args.check:
        parser.error("--inject-work goes with --check")
    if args.update_baseline:
        update_baseline(CHECK)
        return 0
    if args.check:
        plan = {name: CHECK[name] for name in args.scenarios} if args.scenarios else CHECK
        return check(plan, ci=os.environ.get("CI") == "true", inject=args.inject_work)
    rows = []
    for name, m in measure({name: SCENARIOS[name][1] for name in args.scenarios or SCENARIOS}).items():
        units = f"{m.unit[:-1]}ies" if m.unit.endswith("y") else f"{m.unit}s"
        rows.append([name, f"{m.units:,} {units}", f"{m.per_unit:,.0f}"])
    print(table(["scenario", "work", "instructions per unit"], rows))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in SCENARIOS and sys.argv[2] in ("run", "build"):
        run_one(sys.argv[1], sys.argv[2] == "run")
    elif len(sys.argv) > 1 and sys.argv[1] == "--segments":
        run_segments([(key, int(n)) for key, n in (arg.rsplit(":", 1) for arg in sys.argv[2:])])
    else:
        raise SystemExit(main(sys.argv[1:]))
