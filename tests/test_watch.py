"""Shared prefix watches against real etcd: exact history through faults, compaction, fan-out, lag."""

from __future__ import annotations

import random
from collections.abc import Iterator

import anyio
import pytest
from structlog.testing import capture_logs

from aetcdcfg import EtcdClient, Event, EventType, RevisionCompacted, SubscriberLagged, Subscription
from aetcdcfg.testing import EtcdCluster, EtcdServer, FaultProxy, as_records, etcd_history

from .harness import apply_events

pytestmark = pytest.mark.anyio

END = "zz-end"


@pytest.fixture(scope="module")
def counted() -> Iterator[EtcdServer]:
    """A member only the watcher-counting tests use. On the shared ``etcd_server`` a baseline read at
    a test's start can still include a server watcher of the test before it (etcd drops it only once it
    has processed that stream's cancellation), so the counts would be off by it."""
    with EtcdServer() as server:
        yield server


async def wait_for_count(server: EtcdServer, expected: int) -> None:
    """Wait until etcd counts ``expected`` server watchers: entering ``client.watch()`` does not wait for
    etcd to create the watcher (delivery from ``start_revision`` is guaranteed either way), and leaving
    it does not wait for etcd to drop it."""
    with anyio.fail_after(5):
        while server.watcher_count() != expected:
            await anyio.sleep(0.05)


async def random_writes(client: EtcdClient, prefix: str, count: int, *, seed: int, pause: float = 0.0) -> int:
    """Puts, deletes and multi-key txns; then an end marker whose revision is returned."""
    rng = random.Random(seed)
    keys = [f"{prefix}k{i}" for i in range(12)]
    for i in range(count):
        choice = rng.random()
        if choice < 0.55:
            await client.put(rng.choice(keys), f"v{i}")
        elif choice < 0.75:
            await client.delete(rng.choice(keys))
        else:
            await client.put_many({k: f"t{i}" for k in rng.sample(keys, rng.randint(2, 5))})
        if pause:
            await anyio.sleep(pause)
    return await client.put(prefix + END, "done")


async def collect_until_end(sub: Subscription, out: list[Event]) -> None:
    """Read into ``out`` until the writer's end marker arrives."""
    async for event in sub:
        out.append(event)
        if event.key.endswith(END):
            return


async def collect_until(sub: object, last_revision: int) -> list[Event]:
    events: list[Event] = []
    async for event in sub:  # type: ignore[attr-defined]
        events.append(event)
        if event.revision >= last_revision:
            break
    return events


async def test_subscriber_sees_every_change_after_entry_in_order(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put(etcd_prefix + "before", "x")
        async with client.watch(etcd_prefix) as sub:
            first = await client.put(etcd_prefix + "a", "1")
            await client.put_many({etcd_prefix + "b": "2", etcd_prefix + "c": "3"})
            await client.delete(etcd_prefix + "a")
            with anyio.fail_after(5):
                batches = []
                async for batch in sub.batches():
                    batches.append([(e.type, e.key, e.value, e.prev_value) for e in batch])
                    if len(batches) == 3:
                        break
    assert sub.start_revision == first
    assert batches == [
        [(EventType.PUT, etcd_prefix + "a", b"1", None)],
        [(EventType.PUT, etcd_prefix + "b", b"2", None), (EventType.PUT, etcd_prefix + "c", b"3", None)],
        [(EventType.DELETE, etcd_prefix + "a", b"", b"1")],
    ]


async def test_start_revision_replays_history_gap_free(etcd_server: EtcdServer, etcd_prefix: str) -> None:
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        first = await client.put(etcd_prefix + "a", "1")
        await client.put(etcd_prefix + "b", "2")
        async with client.watch(etcd_prefix) as live:
            # a second subscriber from the past joins the shared stream after a private catch-up
            async with client.watch(etcd_prefix, start_revision=first) as old:
                last = await client.put(etcd_prefix + "c", "3")
                with anyio.fail_after(5):
                    replayed = await collect_until(old, last)
                    seen_live = await collect_until(live, last)
    assert [(e.revision, e.key) for e in replayed] == [
        (first, etcd_prefix + "a"),
        (first + 1, etcd_prefix + "b"),
        (last, etcd_prefix + "c"),
    ]
    assert [e.revision for e in seen_live] == [last]


async def test_exact_history_through_resets_and_black_hole(
    etcd_server: EtcdServer, fault_proxy: FaultProxy, etcd_prefix: str
) -> None:
    """15+ connection resets and a 4 s black hole while ~1,500 changes are written: nothing lost or doubled."""
    async with (
        EtcdClient(endpoints=[etcd_server.endpoint]) as writer,
        EtcdClient(endpoints=[fault_proxy.endpoint], keepalive_time=1.0, keepalive_timeout=1.0) as watcher,
        watcher.watch(etcd_prefix) as sub,
    ):
        start = sub.start_revision
        events: list[Event] = []

        async def resumed(count: int) -> None:
            while sum(entry["event"] == "watch.resumed" for entry in logs) < count:
                await anyio.sleep(0.01)

        async def chaos() -> None:
            for n in range(16):
                await resumed(n)  # each reset hits an established watch stream
                await anyio.sleep(0.1)
                fault_proxy.reset()
            await resumed(16)
            fault_proxy.blackhole(True)
            await anyio.sleep(4)
            fault_proxy.blackhole(False)

        with capture_logs() as logs, anyio.fail_after(90):
            async with anyio.create_task_group() as tg:
                tg.start_soon(chaos)
                tg.start_soon(collect_until_end, sub, events)
                last = await random_writes(writer, etcd_prefix, 1500, seed=1, pause=0.002)
    expected = await etcd_history(etcd_server.endpoint, etcd_prefix, start, last)
    assert as_records(events) == expected
    assert [entry["event"] for entry in logs].count("watch.resumed") >= 16


async def test_compaction_during_outage_resyncs_to_etcd_state(
    etcd_server: EtcdServer, fault_proxy: FaultProxy, etcd_prefix: str
) -> None:
    async with (
        EtcdClient(endpoints=[etcd_server.endpoint]) as writer,
        EtcdClient(endpoints=[fault_proxy.endpoint], keepalive_time=1.0, keepalive_timeout=1.0) as watcher,
    ):
        await writer.put_many(
            {etcd_prefix + "keep": "1", etcd_prefix + "change": "1", etcd_prefix + "drop": "1"}
        )
        async with watcher.watch(etcd_prefix, with_snapshot=True) as sub:
            assert sub.snapshot is not None
            state = dict(sub.snapshot.items)
            fault_proxy.refuse(True)
            fault_proxy.reset()
            await writer.put(etcd_prefix + "change", "2")
            await writer.delete(etcd_prefix + "drop")
            await writer.put(etcd_prefix + "new", "1")
            last = await writer.put(etcd_prefix + "change", "3")
            etcd_server.etcdctl("compact", str(last))
            with capture_logs() as logs:
                fault_proxy.refuse(False)
                events: list[Event] = []
                with anyio.fail_after(20):
                    async for batch in sub.batches():
                        events.extend(batch)
                        if batch[-1].revision >= last:
                            break
            apply_events(state, events)
            final = await writer.get_prefix(etcd_prefix)
    assert state == dict(final.items)
    assert all(e.resync for e in events)
    assert [e.revision for e in events] == sorted(e.revision for e in events)
    assert {(e.type, e.key) for e in events} == {
        (EventType.PUT, etcd_prefix + "change"),
        (EventType.DELETE, etcd_prefix + "drop"),
        (EventType.PUT, etcd_prefix + "new"),
    }
    names = [entry["event"] for entry in logs]
    assert "watch.compacted" in names and "watch.resynced" in names


async def test_start_revision_older_than_compaction_raises_revision_compacted(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        first = await client.put(etcd_prefix + "a", "1")
        last = await client.put(etcd_prefix + "a", "2")
        etcd_server.etcdctl("compact", str(last))
        async with client.watch(etcd_prefix, start_revision=first) as sub:
            with anyio.fail_after(10), pytest.raises(RevisionCompacted) as info:
                await sub.__anext__()
    assert info.value.requested_revision == first
    assert info.value.compact_revision >= last


async def test_thousand_subscribers_on_ten_prefixes_share_ten_server_watchers(
    counted: EtcdServer, etcd_prefix: str
) -> None:
    prefixes = [f"{etcd_prefix}p{i}/" for i in range(10)]
    await wait_for_count(counted, 0)  # the other counting test's watchers are gone
    received: dict[int, list[int]] = {}
    async with EtcdClient(endpoints=[counted.endpoint]) as client, anyio.create_task_group() as tg:
        ready = anyio.Semaphore(0)
        done: list[int] = []
        lasts: dict[str, int] = {}
        all_written = anyio.Event()

        async def subscriber(n: int) -> None:
            prefix = prefixes[n % 10]
            async with client.watch(prefix) as sub:
                ready.release()
                revisions: list[int] = []
                received[n] = revisions
                async for event in sub:
                    revisions.append(event.revision)
                    if all_written.is_set() and event.revision >= lasts[prefix]:
                        break
                    if len(revisions) >= 5:
                        break
            done.append(n)

        for n in range(1000):
            tg.start_soon(subscriber, n)
        with anyio.fail_after(30):
            for _ in range(1000):
                await ready.acquire()
        with anyio.fail_after(5):  # etcd creates the watchers after entry
            while (count := counted.watcher_count()) < 10:
                await anyio.sleep(0.05)
        assert count == 10  # one per prefix, not one per subscriber
        for round_ in range(5):
            for prefix in prefixes:
                lasts[prefix] = await client.put(prefix + "k", str(round_))
        all_written.set()
    per_prefix: dict[str, list[int]] = {}
    for n, revisions in received.items():
        per_prefix.setdefault(prefixes[n % 10], revisions)
        assert revisions == per_prefix[prefixes[n % 10]], n
        assert len(revisions) == 5
    await wait_for_count(counted, 0)


async def test_slow_subscriber_lags_without_stalling_fast_one_and_resumes_gap_free(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        async with client.watch(etcd_prefix) as fast, client.watch(etcd_prefix, buffer_size=4) as slow:
            revisions = [await client.put(f"{etcd_prefix}k", str(i)) for i in range(30)]
            with anyio.fail_after(5):
                fast_seen = [e.revision for e in await collect_until(fast, revisions[-1])]
            assert fast_seen == revisions
            slow_seen: list[int] = []
            with pytest.raises(SubscriberLagged) as info:
                async for event in slow:
                    slow_seen.append(event.revision)
        assert slow_seen == revisions[:4]
        assert info.value.resume_revision == revisions[4]
        async with client.watch(etcd_prefix, start_revision=info.value.resume_revision) as resumed:
            with anyio.fail_after(5):
                rest = [e.revision for e in await collect_until(resumed, revisions[-1])]
    assert slow_seen + rest == revisions


async def test_leaving_cancelling_and_closing_remove_server_watchers(
    counted: EtcdServer, etcd_prefix: str
) -> None:
    await wait_for_count(counted, 0)  # the other counting test's watchers are gone

    async with EtcdClient(endpoints=[counted.endpoint]) as client:
        async with client.watch(etcd_prefix + "a/"), client.watch(etcd_prefix + "a/"):
            await wait_for_count(counted, 1)
        await wait_for_count(counted, 0)

        entered = anyio.Event()

        async def subscriber() -> None:
            async with client.watch(etcd_prefix + "b/") as sub:
                entered.set()
                async for _ in sub:
                    pass

        async with anyio.create_task_group() as tg:
            tg.start_soon(subscriber)
            await entered.wait()
            await wait_for_count(counted, 1)
            tg.cancel_scope.cancel()
        await wait_for_count(counted, 0)

        async with client.watch(etcd_prefix + "c/"):
            await wait_for_count(counted, 1)
            closing = client.watch(etcd_prefix + "d/")
            await closing.__aenter__()
            await wait_for_count(counted, 2)
    await wait_for_count(counted, 0)


@pytest.mark.cluster
async def test_exact_history_while_members_are_killed_and_restarted(
    cluster: EtcdCluster, etcd_prefix: str
) -> None:
    async with (
        EtcdClient(endpoints=cluster.endpoints, request_timeout=5) as writer,
        EtcdClient(endpoints=cluster.endpoints, keepalive_time=1.0, keepalive_timeout=1.0) as watcher,
        watcher.watch(etcd_prefix) as sub,
    ):
        start = sub.start_revision
        killed_and_restarted = anyio.Event()

        async def killer() -> None:
            for index in (0, 1, 2, 0):
                await anyio.sleep(0.6)
                cluster.kill(index)
                await anyio.sleep(0.6)
                await anyio.to_thread.run_sync(cluster.restart, index)
            killed_and_restarted.set()

        async def write_through_failures() -> int:
            rng = random.Random(2)
            for i in range(400):
                for _attempt in range(20):
                    try:
                        if rng.random() < 0.7:
                            await writer.put(f"{etcd_prefix}k{rng.randint(0, 9)}", f"v{i}")
                        else:
                            await writer.put_many({f"{etcd_prefix}t{j}": f"t{i}" for j in range(3)})
                        break
                    except Exception:  # ambiguous writes are fine here: etcd's history is the reference
                        await anyio.sleep(0.05)
                await anyio.sleep(0.005)
            # The end marker is written once, with no kill in flight: an ambiguous write of it
            # could not be retried (a second END would follow the first in etcd's history).
            await killed_and_restarted.wait()
            return await writer.put(etcd_prefix + END, "done")

        with anyio.fail_after(120):
            events: list[Event] = []
            async with anyio.create_task_group() as tg:
                tg.start_soon(killer)
                tg.start_soon(collect_until_end, sub, events)
                last = await write_through_failures()
    cluster.ensure_all_running()
    alive = cluster.endpoints[0]
    expected = await etcd_history(alive, etcd_prefix, start, last)
    assert as_records(events) == expected


@pytest.mark.parametrize("catch_up", [False, True], ids=["revision-behind", "revision-caught-up"])
async def test_cluster_wiped_and_restarted_is_detected_and_resynced(catch_up: bool, etcd_prefix: str) -> None:
    """etcd restarted on an empty data dir: its history is new even once its revision passes ours."""
    with EtcdServer(keepalive_min_time=1, progress_notify_interval=1) as server:
        async with (
            EtcdClient(endpoints=[server.endpoint], keepalive_time=1, keepalive_timeout=1) as watcher,
            watcher.watch(etcd_prefix, with_snapshot=True) as sub,
        ):
            async with EtcdClient(endpoints=[server.endpoint]) as writer:
                for i in range(20):
                    await writer.put(f"{etcd_prefix}old{i % 3}", str(i))
            state: dict[str, bytes] = {}
            with anyio.fail_after(10):
                async for event in sub:
                    state[event.key] = event.value
                    if event.value == b"19":
                        break
            with capture_logs() as logs:
                await anyio.to_thread.run_sync(server.wipe_and_restart)
                async with EtcdClient(endpoints=[server.endpoint]) as writer:
                    rounds = 40 if catch_up else 2
                    for i in range(rounds):
                        last = await writer.put(f"{etcd_prefix}new{i % 2}", str(i))
                    with anyio.fail_after(20):
                        # Whole revisions: if the watch re-lists only after these writes, the resync
                        # batch holds the last write *and*, sorted after it by key, the old keys'
                        # deletions; stopping at the event would leave those unapplied.
                        async for batch in sub.batches():
                            for event in batch:
                                if event.type is EventType.PUT:
                                    state[event.key] = event.value
                                else:
                                    state.pop(event.key, None)
                            if any(e.revision >= last and e.value == str(rounds - 1).encode() for e in batch):
                                break
                    final = await writer.get_prefix(etcd_prefix)
    assert state == dict(final.items)
    assert any(e["event"] == "watch.revision_reset" for e in logs)


async def test_a_subscriber_replaying_old_history_when_etcd_is_wiped_gets_history_replaced(
    etcd_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subscriber from a revision older than the shared watch remembers replays it on a private
    stream. etcd is wiped meanwhile: the shared watch re-lists the new history, whose revisions are
    below the subscriber's. Its replay cannot go on (the revisions it waits for are the new
    history's, or never come) and the resync is relative to the shared watch's old state, not to
    where the subscriber got: it ends with HistoryReplaced, never silently stuck on old values."""
    from aetcdcfg import HistoryReplaced, _fanout

    monkeypatch.setattr(_fanout, "HISTORY_EVENTS", 1)
    go = anyio.Event()

    class WatchLoop(_fanout.WatchLoop):
        async def run(self) -> None:
            if self._stop_at is not None:  # a private catch-up: replays once etcd was wiped and re-listed
                await go.wait()
            await super().run()

    monkeypatch.setattr(_fanout, "WatchLoop", WatchLoop)
    with EtcdServer(keepalive_min_time=1) as server, anyio.fail_after(60):
        async with (
            EtcdClient(endpoints=[server.endpoint], keepalive_time=1, keepalive_timeout=1) as watcher,
            watcher.watch(etcd_prefix) as shared,
        ):
            async with EtcdClient(endpoints=[server.endpoint]) as writer:
                first = await writer.put(etcd_prefix + "k", "0")
                for i in range(1, 20):
                    last = await writer.put(etcd_prefix + "k", str(i))
            while shared.status.revision < last:
                await anyio.sleep(0.02)
            hub = shared._hub
            assert hub.floor > first + 1
            events: list[Event] = []
            with pytest.raises(HistoryReplaced) as raised:
                async with watcher.watch(etcd_prefix, start_revision=first + 1) as old:
                    await anyio.to_thread.run_sync(server.wipe_and_restart)
                    async with EtcdClient(endpoints=[server.endpoint]) as writer:
                        new = await writer.put(etcd_prefix + "k", "new")
                    while hub.state is None or hub.state.delivered != new:  # re-listed the new etcd
                        await anyio.sleep(0.02)
                    go.set()
                    with anyio.fail_after(10):
                        async for event in old:
                            events.append(event)
    assert new < first + 1 < last
    assert events == []  # nothing of either history: its replay had not begun
    assert raised.value.requested_revision == first + 1
    assert 1 <= raised.value.compact_revision <= new  # where the new history was re-listed
    assert "history was replaced" in str(raised.value)
