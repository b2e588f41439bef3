"""Behind etcd's gRPC proxy, whatever the timing: no revision is skipped silently (issue 18).

Ten separate clients watch one prefix through ``etcd grpc-proxy``. After a warm-up, the proxy is
SIGKILLed, a burst of puts, deletes and 3-key transactions is written straight to etcd, and the proxy
is restarted on its port. Every client must end with etcd's state, and its events must be etcd's
history exactly, except where a re-list (events marked ``resync``) covers a gap. Without the fix,
clients a second or two old, or any client while etcd sends progress notifications, replayed the
backlog through the proxy, lost revisions silently and stayed "live" at an old revision for good.

The matrix is warm-up x outage size x etcd's progress notifications. By default six of its 30 cells
run (~45 s), chosen so that every warm-up, every outage size and both notification settings appear;
``AETCDCFG_PROXY_MATRIX=full`` (``make test-proxy-matrix``, ~3 min, not run by CI) runs the issue's
whole matrix: 0.5, 1, 2, 4, 8 s x 300, 1,500, 3,000 revisions x off/on.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import anyio
import pytest
from pydantic_settings import BaseSettings
from structlog.testing import capture_logs

from aetcdcfg import EtcdClient, Event, LiveSettings, Subscription, WatchStatus
from aetcdcfg.testing import EtcdGrpcProxy, EtcdServer, Record, etcd_history

from .harness import apply_events, drop_revisions, learned_not_etcd, logged

pytestmark = pytest.mark.anyio

CLIENTS = 10
KEYS = [f"k{i:02d}" for i in range(43)]
OPTIONS = {"keepalive_time": 2.0, "keepalive_timeout": 2.0}
#: keepalive_time + keepalive_timeout: a watch alive but behind is found within this (plus a read).
WINDOW = OPTIONS["keepalive_time"] + OPTIONS["keepalive_timeout"]

if os.environ.get("AETCDCFG_PROXY_MATRIX") == "full":
    CELLS = list(itertools.product([0.5, 1, 2, 4, 8], [300, 1_500, 3_000], [False, True]))
else:
    CELLS = [
        (0.5, 1_500, True),
        (1, 3_000, False),
        (1, 3_000, True),
        (2, 300, False),
        (4, 300, True),
        (8, 3_000, True),
    ]


@dataclass
class Follower:
    """One client's view: the prefix's state from its snapshot and events, and every event."""

    sub: Subscription
    state: dict[str, bytes]
    events: list[Event] = field(default_factory=list)

    async def follow(self) -> None:
        async for batch in self.sub.batches():
            self.events.extend(batch)
            apply_events(self.state, batch)


def unexplained_gaps(events: list[Event], history: list[Record], start: int) -> list[str]:
    """Events that are neither etcd's next event nor after a re-list (a resync batch)."""
    problems: list[str] = []
    position = 0
    for event in events:
        if event.resync:
            position = next((i for i, r in enumerate(history) if r[0] > event.revision), len(history))
            continue
        record = (event.revision, event.key, event.type.value, event.value)
        if position >= len(history) or history[position] != record:
            expected = history[position] if position < len(history) else None
            problems.append(f"got {record[:3]}, etcd's next was {expected and expected[:3]}")
            position = next((i for i, r in enumerate(history) if r == record), position) + 1
            continue
        position += 1
    if position < len(history) and not (events and events[-1].resync):
        problems.append(f"never delivered {history[position][:3]} and after")
    return problems


async def write_burst(writer: EtcdClient, prefix: str, count: int, seed: int) -> int:
    rng = random.Random(seed)
    revision = 0
    for n in range(count):
        pick = rng.random()
        if pick < 0.6:
            revision = await writer.put(prefix + rng.choice(KEYS), str(n))
        elif pick < 0.8:
            revision = await writer.delete(prefix + rng.choice(KEYS))
        else:
            revision = await writer.put_many({prefix + k: f"t{n}" for k in rng.sample(KEYS, 3)})
    return revision


@contextlib.contextmanager
def etcd_and_proxy(notify: bool) -> Iterator[tuple[EtcdServer, EtcdGrpcProxy]]:
    with (
        EtcdServer(keepalive_min_time=1, progress_notify_interval=1 if notify else None) as server,
        EtcdGrpcProxy([server.endpoint], keepalive_min_time=1) as proxy,
    ):
        yield server, proxy


def current(status: WatchStatus, revision: int) -> bool:
    """The status of a watch that has delivered ``revision`` and says so: live, and fresh."""
    return status.state == "live" and status.revision >= revision and status.is_fresh(WINDOW + 1)


@pytest.mark.parametrize(("warm_up", "outage", "notify"), CELLS)
async def test_clients_of_any_age_end_exact_or_resynced_after_a_proxy_restart(
    warm_up: float, outage: int, notify: bool, etcd_prefix: str
) -> None:
    with etcd_and_proxy(notify) as (server, proxy), anyio.fail_after(120):
        async with contextlib.AsyncExitStack() as stack:
            writer = await stack.enter_async_context(EtcdClient(endpoints=[server.endpoint]))
            await writer.put_many({etcd_prefix + k: "0" for k in KEYS[:20]})
            followers: list[Follower] = []
            tg = await stack.enter_async_context(anyio.create_task_group())
            for _ in range(CLIENTS):
                client = await stack.enter_async_context(EtcdClient(endpoints=[proxy.endpoint], **OPTIONS))
                sub = await stack.enter_async_context(
                    client.watch(etcd_prefix, with_snapshot=True, buffer_size=100_000)
                )
                assert sub.snapshot is not None
                follower = Follower(sub, dict(sub.snapshot.items))
                followers.append(follower)
                tg.start_soon(follower.follow)
            start = min(f.sub.start_revision for f in followers)
            await anyio.sleep(warm_up)
            await write_burst(writer, etcd_prefix, 50, seed=1)
            proxy.kill()
            await write_burst(writer, etcd_prefix, outage, seed=2)
            await anyio.to_thread.run_sync(proxy.restart)
            last = await writer.put(etcd_prefix + "end", "1")
            expected = dict((await writer.get_prefix(etcd_prefix)).items)
            # every client ends with etcd's state, within the probe window of the restart, and
            # says it is current (live at the last revision, and fresh) only then
            with anyio.move_on_after(30):
                while any(f.state != expected or not current(f.sub.status, last) for f in followers):
                    await anyio.sleep(0.1)
            # taken as the wait ends: reading the history below takes seconds on a busy machine,
            # and a status taken after it judged the staleness of a healthy watch that much later
            statuses = [f.sub.status for f in followers]
            stuck = [i for i, f in enumerate(followers) if f.state != expected]
            history = await etcd_history(server.endpoint, etcd_prefix, start, last)
            tg.cancel_scope.cancel()
    assert stuck == [], [(i, statuses[i].state, statuses[i].revision) for i in stuck]
    assert [i for i, status in enumerate(statuses) if not current(status, last)] == [], statuses
    for i, follower in enumerate(followers):
        own = [r for r in history if r[0] >= follower.sub.start_revision]
        assert unexplained_gaps(follower.events, own, follower.sub.start_revision) == [], i


class Flags(BaseSettings):
    """Two keys of the prefix and one of a shared layer."""

    a: int = 0
    b: int = 0
    shared: int = 0


@pytest.mark.parametrize("notify", [False, True])
async def test_live_settings_a_second_old_end_equal_to_etcd_after_a_proxy_restart(
    notify: bool, etcd_prefix: str
) -> None:
    """Single-prefix and layered LiveSettings, a second old, through the proxy: after the restart each
    holds the settings etcd's keys give, and says it is fresh only then."""
    shared = etcd_prefix + "shared/"
    own = etcd_prefix + "own/"
    with etcd_and_proxy(notify) as (server, proxy), anyio.fail_after(90):
        async with contextlib.AsyncExitStack() as stack:
            writer = await stack.enter_async_context(EtcdClient(endpoints=[server.endpoint]))
            await writer.put_many({own + "a": "0", own + "b": "0", shared + "shared": "0"})
            lives: list[LiveSettings[Flags]] = []
            for n in range(6):
                client = await stack.enter_async_context(EtcdClient(endpoints=[proxy.endpoint], **OPTIONS))
                prefixes = [shared, own] if n % 2 else [own]
                lives.append(
                    await stack.enter_async_context(LiveSettings(Flags, prefix=prefixes, client=client))
                )
            await anyio.sleep(1)
            proxy.kill()
            for n in range(1, 1_500):
                await writer.put_many({own + "a": str(n), own + "b": str(n)})
                if n % 10 == 0:
                    await writer.put(shared + "shared", str(n))
            await anyio.to_thread.run_sync(proxy.restart)
            want_own = Flags(a=1_499, b=1_499, shared=0)
            want_layered = Flags(a=1_499, b=1_499, shared=1_490)
            with anyio.move_on_after(30):
                while any(
                    live.current != (want_layered if n % 2 else want_own) or not live.is_fresh(WINDOW + 1)
                    for n, live in enumerate(lives)
                ):
                    await anyio.sleep(0.1)
            got = [live.current for live in lives]
            fresh = [live.is_fresh(WINDOW + 1) for live in lives]
            statuses = [live.status for live in lives]
    assert got == [want_layered if n % 2 else want_own for n in range(len(got))]
    assert fresh == [True] * len(got), statuses[:2]


@pytest.mark.parametrize("notify", [False, True])
async def test_a_stream_alive_but_behind_is_replaced_within_the_window_and_never_called_fresh(
    notify: bool, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The proxy keeps the stream open (forwarding etcd's progress notifications, with ``notify``) but
    no longer its events. Written right after a verification passed (the worst moment), the change
    is found undelivered and the stream replaced (``watch.behind``) within keepalive_time +
    keepalive_timeout (+ the reads); meanwhile the status says ``behind``, and neither the watch nor
    a LiveSettings says fresh while the change is missing. Once events flow again both equal etcd's,
    live and fresh."""
    dropping = drop_revisions(monkeypatch, etcd_prefix)
    with etcd_and_proxy(notify) as (server, proxy), capture_logs() as logs, anyio.fail_after(90):
        async with (
            EtcdClient(endpoints=[server.endpoint]) as writer,
            EtcdClient(endpoints=[proxy.endpoint], **OPTIONS) as watcher,
            watcher.watch(etcd_prefix) as sub,
            LiveSettings(Flags, prefix=etcd_prefix, client=watcher, report=False) as live,
        ):
            with anyio.fail_after(2 * WINDOW):  # any of its watches (the canary layer's) may learn it
                while not learned_not_etcd(logs, proxy.endpoint):
                    await anyio.sleep(0.02)
            while sub.status.staleness > 0.05:  # until a verification has just confirmed the watch
                await anyio.sleep(0.005)
            dropping.from_revision = 0  # every revision from now on
            written = anyio.current_time()
            revision = await writer.put(etcd_prefix + "a", "1")
            states = set()
            while not logged(logs, "watch.behind", etcd_prefix):
                states.add(sub.status.state)
                await anyio.sleep(0.01)
            detected = anyio.current_time() - written
            await anyio.sleep(max(written + WINDOW + 0.5 - anyio.current_time(), 0))
            missing = [sub.status.is_fresh(WINDOW), live.is_fresh(WINDOW), live.current.a]
            dropping.clear()
            with anyio.move_on_after(3 * WINDOW):
                event = await anext(sub)
                # a verification passed since: nothing confirmed the watch while the change was missing
                while not (live.current.a == 1 and live.is_fresh(WINDOW) and sub.status.is_fresh(WINDOW)):
                    await anyio.sleep(0.05)
            final = sub.status
            current = live.current
    assert detected <= WINDOW + 1, detected
    assert "behind" in states, states
    assert missing == [False, False, 0]
    assert (event.key, event.revision, event.resync) == (etcd_prefix + "a", revision, False)
    assert (current.a, final.state, final.revision, final.is_fresh(WINDOW)) == (1, "live", revision, True)
