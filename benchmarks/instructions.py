"""Instructions per event on the hot paths, counted by callgrind: stable where wall clocks are not.

No etcd and no network: WatchResponses and a RangeResponse are built and serialised up front, then fed
through the same code the I/O loops run. ``python -m benchmarks.instructions`` runs each scenario
under ``valgrind --tool=callgrind`` twice, with 0 and with N units of work, and prints the
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
  ``benchmarks/livemodel.py`` (one batch in, one validated object swapped in), per revision.

``python -m benchmarks.instructions SCENARIO run`` runs one scenario natively (for py-spy or timing).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
import grpc
from aetcd.rpc import kv_pb2, rpc_pb2

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


def run_one(scenario: str, process: bool) -> None:
    """Build the input; process it only if asked (the difference is what the processing costs)."""
    _, n, build, run = SCENARIOS[scenario]
    data = build(n)
    if process:
        run(data)
    elif not scenario.startswith("raw"):
        asyncio.run(asyncio.sleep(0))  # start-up of the loop and the imports count in both runs
        run(build(0))


def instructions(scenario: str, process: bool) -> int:
    """Instructions of one run of ``scenario``, as callgrind counts them."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                "-m",
                "benchmarks.instructions",
                scenario,
                "run" if process else "build",
            ],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        match = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.MULTILINE)
        assert match, "no totals in the callgrind output"
        return int(match.group(1))


def main(names: list[str]) -> None:
    rows = []
    for name in names or list(SCENARIOS):
        unit, n, _, _ = SCENARIOS[name]
        per_unit = (instructions(name, True) - instructions(name, False)) / n
        rows.append([name, f"{n:,} {unit}s", f"{per_unit:,.0f}"])
        print(f"{name}: {per_unit:,.0f} instructions/{unit}", file=sys.stderr, flush=True)
    print(table(["scenario", "work", "instructions per unit"], rows))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in SCENARIOS and sys.argv[2] in ("run", "build"):
        run_one(sys.argv[1], sys.argv[2] == "run")
    else:
        main(sys.argv[1:])
