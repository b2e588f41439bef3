"""Exactness at the edges of the shared watch, against real etcd: orders of subscribers, compaction at
exactly the resume revision, clients closed under calls, catch-ups outliving their subscription.

Each test here failed before the fix it names (issue 17)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from typing import Any

import anyio
import pytest

from aetcdcfg import (
    ClientClosedError,
    EtcdClient,
    EtcdUnavailable,
    Event,
    EventType,
    RevisionCompacted,
    SubscriberLagged,
    Subscription,
)
from aetcdcfg.testing import EtcdServer, FaultProxy

from .harness import apply_events
from .test_watch import collect_until

pytestmark = pytest.mark.anyio


async def test_lagging_subscriber_before_a_fast_one_does_not_make_it_skip(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """The lagging subscriber leaves the hub's list while a revision is being published; the one after
    it in that list must still get that revision (it got [2, 4, 5, 6] before)."""
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        async with (
            client.watch(etcd_prefix, buffer_size=1) as slow,
            client.watch(etcd_prefix, buffer_size=1) as slow2,
            client.watch(etcd_prefix) as fast,
        ):
            revisions = [await client.put(f"{etcd_prefix}k{i}", str(i)) for i in range(6)]
            with anyio.fail_after(5):
                seen = [e.revision for e in await collect_until(fast, revisions[-1])]
            assert seen == revisions
            for lagging in (slow, slow2):
                got = []
                with pytest.raises(SubscriberLagged) as info:
                    async for event in lagging:
                        got.append(event.revision)
                assert got == revisions[:1]
                assert info.value.resume_revision == revisions[1]


async def test_delete_at_exactly_the_compact_revision_during_an_outage_is_resynced(
    etcd_server: EtcdServer, fault_proxy: FaultProxy, etcd_prefix: str
) -> None:
    """etcd accepts a watch created *at* its compact revision but has dropped the delete tombstone
    written there: a resume at delivered + 1 == compact revision must re-list, not replay."""
    async with (
        EtcdClient(endpoints=[etcd_server.endpoint]) as writer,
        EtcdClient(endpoints=[fault_proxy.endpoint], keepalive_time=1.0, keepalive_timeout=1.0) as watcher,
    ):
        await writer.put(etcd_prefix + "a", "1")
        async with watcher.watch(etcd_prefix, with_snapshot=True) as sub:
            assert sub.snapshot is not None
            state = dict(sub.snapshot.items)
            delivered = await writer.put(etcd_prefix + "b", "1")
            with anyio.fail_after(5):
                first = await collect_until(sub, delivered)
            fault_proxy.refuse(True)
            fault_proxy.reset()
            deleted = await writer.delete(etcd_prefix + "a")
            assert deleted == delivered + 1
            last = await writer.put(etcd_prefix + "c", "1")
            etcd_server.etcdctl("compact", str(deleted))
            fault_proxy.refuse(False)
            events: list[Event] = list(first)
            with anyio.fail_after(20):
                async for batch in sub.batches():  # a resync is one batch: take all of it
                    events.extend(batch)
                    if batch[-1].revision >= last:
                        break
            apply_events(state, events)
            final = await writer.get_prefix(etcd_prefix)
    assert state == dict(final.items), [(e.type, e.key, e.revision, e.resync) for e in events]
    assert any(e.type is EventType.DELETE and e.key == etcd_prefix + "a" for e in events)


async def test_watch_from_exactly_the_compact_revision_raises_revision_compacted(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """A private catch-up from the compact revision itself would silently miss a delete there."""
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put(etcd_prefix + "a", "1")
        deleted = await client.delete(etcd_prefix + "a")
        await client.put(etcd_prefix + "b", "1")
        etcd_server.etcdctl("compact", str(deleted))
        async with client.watch(etcd_prefix, start_revision=deleted) as sub:
            with anyio.fail_after(10), pytest.raises(RevisionCompacted) as info:
                await sub.__anext__()
    assert info.value.requested_revision == deleted
    assert info.value.compact_revision == deleted


async def test_catch_up_ends_with_its_subscription(
    etcd_server: EtcdServer, fault_proxy: FaultProxy, etcd_prefix: str
) -> None:
    """A subscription from the past that leaves while its private catch-up cannot reach etcd must not
    leave that catch-up retrying forever in the client's task group."""

    def catch_ups() -> list[str]:
        return [task.name for task in anyio.get_running_tasks() if "catch_up" in (task.name or "")]

    async with (
        EtcdClient(endpoints=[etcd_server.endpoint]) as writer,
        EtcdClient(endpoints=[fault_proxy.endpoint], keepalive_time=1.0, keepalive_timeout=1.0) as watcher,
    ):
        first = await writer.put(etcd_prefix + "a", "1")
        for i in range(5):
            await writer.put(etcd_prefix + "a", str(i))
        async with watcher.watch(etcd_prefix):
            fault_proxy.refuse(True)
            fault_proxy.reset()
            try:
                async with watcher.watch(etcd_prefix, start_revision=first):
                    assert catch_ups()
                with anyio.fail_after(5):
                    while catch_ups():
                        await anyio.sleep(0.05)
            finally:
                fault_proxy.refuse(False)


async def test_closing_a_client_under_calls_raises_our_errors_not_cancelled(
    etcd_server: EtcdServer, fault_proxy: FaultProxy, etcd_prefix: str
) -> None:
    """grpc.aio cancels calls on a closed channel with a bare CancelledError nobody asked for."""
    outcomes: dict[str, BaseException | None] = {}

    async def run(name: str, call: Awaitable[object]) -> None:
        try:
            await call
            outcomes[name] = None
        except BaseException as exc:  # the point: what escapes
            outcomes[name] = exc

    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                async with EtcdClient(endpoints=[fault_proxy.endpoint], request_timeout=30) as client:
                    fault_proxy.blackhole(True)
                    tg.start_soon(run, "get", client.get(etcd_prefix + "a"))
                    tg.start_soon(run, "put", client.put(etcd_prefix + "a", "1"))
                    tg.start_soon(run, "get_prefix", client.get_prefix(etcd_prefix))
                    await anyio.sleep(0.5)
    finally:
        fault_proxy.blackhole(False)
    assert set(outcomes) == {"get", "put", "get_prefix"}
    for name, exc in outcomes.items():
        assert isinstance(exc, ClientClosedError | EtcdUnavailable), (name, repr(exc))
    assert "may or may not have been applied" in str(outcomes["put"])


async def test_an_anyio_timeout_around_a_call_to_a_silent_etcd_is_a_timeout_not_a_stray_cancel(
    fault_proxy: FaultProxy, etcd_prefix: str
) -> None:
    """grpc.aio swallows the cancellation anyio throws into a call and raises a bare one, which
    anyio's scope does not take for its own: move_on_after raised CancelledError out of the block,
    and fail_after CancelledError instead of TimeoutError (a stray cancellation in user code)."""
    async with EtcdClient(endpoints=[fault_proxy.endpoint], request_timeout=30) as client:
        lease, _ = await client.grant_lease(30)
        fault_proxy.blackhole()
        with anyio.move_on_after(0.3) as scope:
            await client.get(etcd_prefix + "k")
        assert scope.cancelled_caught
        with pytest.raises(TimeoutError), anyio.fail_after(0.3):
            await client.put(etcd_prefix + "k", "v")
        keeper = client.lease_keeper(lease)
        with anyio.move_on_after(0.3) as scope:
            await keeper.refresh()
        assert scope.cancelled_caught
        keeper.close()
        if sys.version_info >= (3, 11):  # Task.cancelling() is new in 3.11
            assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
        fault_proxy.blackhole(False)


async def test_closing_the_pool_while_it_waits_for_a_member_raises_etcd_unavailable() -> None:
    """channel_ready() on a channel closed under it raises grpc's UsageError: ready() let it out
    as an ExceptionGroup (the watch logged watch.crashed) instead of saying no member is ready."""
    from aetcdcfg import EtcdSettings, EtcdUnavailable
    from aetcdcfg._channel import EndpointPool

    from .test_status_routes import free_port

    pool = EndpointPool(EtcdSettings(endpoints=[f"http://127.0.0.1:{free_port()}"]))
    failed: list[BaseException] = []

    async def wait() -> None:
        try:
            await pool.ready(5.0)
        except BaseException as exc:
            failed.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await anyio.sleep(0.3)
        await pool.aclose()
    assert len(failed) == 1 and isinstance(failed[0], EtcdUnavailable), failed


async def test_a_member_going_silent_during_the_resume_check_fails_only_the_session(
    etcd_server: EtcdServer, fault_proxy: FaultProxy, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On resume the watch checks that its revision is still readable (a unary Range) while nothing
    reads the stream; a member that goes silent then lets the watchdog fail the session, cancelling
    that Range. grpc's bare CancelledError was re-raised unrecognised, took down the watcher
    client's task group and cancelled the code under it: CI's py3.13 cell lost a whole run to it
    (a kill -9 stalls a Range the same way). Now only the session fails; the watch resumes exactly."""
    from aetcdcfg import _stream

    readable_at = _stream.readable_at
    armed: list[bool] = []

    async def goes_silent(*args: object, **kwargs: object) -> object:
        if armed:
            armed.clear()
            fault_proxy.blackhole()
        return await readable_at(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_stream, "readable_at", goes_silent)
    async with (
        EtcdClient(endpoints=[etcd_server.endpoint]) as writer,
        EtcdClient(endpoints=[fault_proxy.endpoint], keepalive_time=1, keepalive_timeout=1) as watcher,
        watcher.watch(etcd_prefix) as sub,
    ):
        first = await writer.put(etcd_prefix + "a", "1")
        await anyio.sleep(0.5)
        fault_proxy.blackhole(drop=True)
        for i in range(3):
            await writer.put(f"{etcd_prefix}b{i}", "x")
        await anyio.sleep(3.0)  # the watchdog has given the stream up
        armed.append(True)
        fault_proxy.blackhole(False)  # the resume's check makes it silent again
        await anyio.sleep(4.0)
        fault_proxy.blackhole(False)
        last = await writer.put(etcd_prefix + "c", "2")
        with anyio.fail_after(20):
            events = await collect_until(sub, last)
    assert not armed, "the resume never checked its revision: the test did not test anything"
    assert [(e.key[len(etcd_prefix) :], e.revision) for e in events] == [
        ("a", first),
        ("b0", first + 1),
        ("b1", first + 2),
        ("b2", first + 3),
        ("c", last),
    ]


async def _until_etcds_revision(sub: Subscription, revision: int) -> list[Event]:
    """Whole batches (a resync is one) until the subscriber reaches ``revision``; not one more."""
    events: list[Event] = []
    async for batch in sub.batches():
        events.extend(batch)
        if batch[-1].revision >= revision:
            return events
    raise AssertionError("the subscription ended")  # pragma: no cover


async def test_a_delete_compacted_between_the_first_listing_and_the_watch_is_resynced(
    etcd_server: EtcdServer, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watch is created at listing + 1 after the listing returned. A delete written at exactly
    that revision and compacted at it in between is gone from etcd's history, yet etcd accepts the
    watch there: without the readability check on creation the subscriber missed the delete and held
    a key etcd no longer had (snapshot {a} + PUT b, where etcd held {b})."""
    from aetcdcfg import _fanout

    list_keys = _fanout.list_keys
    window: list[int] = []
    async with (
        EtcdClient(endpoints=[etcd_server.endpoint]) as writer,
        EtcdClient(endpoints=[etcd_server.endpoint]) as watcher,
    ):

        async def then_delete_and_compact(*args: Any, **kwargs: Any) -> Any:
            listing, revision = await list_keys(*args, **kwargs)
            deleted = await writer.delete(etcd_prefix + "a")
            window.extend([revision, deleted, await writer.put(etcd_prefix + "b", "1")])
            etcd_server.etcdctl("compact", str(deleted))
            return listing, revision

        await writer.put(etcd_prefix + "a", "1")
        monkeypatch.setattr(_fanout, "list_keys", then_delete_and_compact)
        async with watcher.watch(etcd_prefix, with_snapshot=True) as sub:
            monkeypatch.undo()
            listed, deleted, last = window
            assert deleted == listed + 1, "a write came between: the test did not test the window"
            assert sub.snapshot is not None and set(sub.snapshot.items) == {etcd_prefix + "a"}
            state = dict(sub.snapshot.items)
            with anyio.fail_after(10):
                events = await _until_etcds_revision(sub, last)
            apply_events(state, events)
            final = await writer.get_prefix(etcd_prefix)
    assert state == dict(final.items), [(e.type, e.key, e.revision, e.resync) for e in events]
    assert any(e.type is EventType.DELETE and e.key == etcd_prefix + "a" and e.resync for e in events)


async def test_a_delete_compacted_between_a_relisting_and_the_new_watch_is_resynced(
    etcd_server: EtcdServer, fault_proxy: FaultProxy, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same window after a re-list: history compacted during an outage makes the watch re-list
    and go on from listing + 1; a delete there, compacted at it before the new watch is created, must
    not be lost (the watch re-lists again instead of replaying from the compact revision)."""
    from aetcdcfg import _stream

    list_keys = _stream.list_keys
    window: list[int] = []
    async with (
        EtcdClient(endpoints=[etcd_server.endpoint]) as writer,
        EtcdClient(endpoints=[fault_proxy.endpoint], keepalive_time=1.0, keepalive_timeout=1.0) as watcher,
    ):

        async def then_delete_and_compact(*args: Any, **kwargs: Any) -> Any:
            listing, revision = await list_keys(*args, **kwargs)
            if not window:  # the first re-list only
                deleted = await writer.delete(etcd_prefix + "a")
                window.extend([revision, deleted, await writer.put(etcd_prefix + "b", "1")])
                etcd_server.etcdctl("compact", str(deleted))
            return listing, revision

        await writer.put(etcd_prefix + "a", "1")
        async with watcher.watch(etcd_prefix, with_snapshot=True) as sub:
            assert sub.snapshot is not None
            state = dict(sub.snapshot.items)
            with anyio.fail_after(5):
                events = await collect_until(sub, await writer.put(etcd_prefix + "x", "1"))
            monkeypatch.setattr(_stream, "list_keys", then_delete_and_compact)
            fault_proxy.refuse(True)
            fault_proxy.reset()
            etcd_server.etcdctl("compact", str(await writer.put(etcd_prefix + "c", "1")))
            fault_proxy.refuse(False)  # the resume finds its revision compacted: a re-list
            with anyio.fail_after(20):
                while len(window) < 3:
                    await anyio.sleep(0.05)
                listed, deleted, last = window
                assert deleted == listed + 1, "a write came between: the test did not test the window"
                events += await _until_etcds_revision(sub, last)
            apply_events(state, events)
            final = await writer.get_prefix(etcd_prefix)
    assert state == dict(final.items), [(e.type, e.key, e.revision, e.resync) for e in events]
    assert any(e.type is EventType.DELETE and e.key == etcd_prefix + "a" and e.resync for e in events)
