"""The fan-out's promises that the state machine (``test_fanout_machine``) does not reach, without etcd:
a subscriber older than the in-memory history (the private catch-up), a catch-up that falls behind,
a failing watch, ``batches()``, a wiped cluster, the snapshot, and who stops the shared watch.

Found by mutation testing (``make mutation``): each test fails on a one-line change that no fast test
noticed. The hub is driven through the calls the stream makes (``_publish``, ``_reset``) and the
ones ``watch()`` makes (``subscribe``, ``catch_up``'s ``offer_caught_up``/``finish_catch_up``,
``release``); the I/O around it is tested against real etcd in ``test_watch``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from aetcdcfg import EtcdError, Event, SubscriberLagged, Subscription, _fanout
from aetcdcfg._fanout import PrefixWatch, _Subscriber
from aetcdcfg._resume import Batch, WatchState
from aetcdcfg.events import EventType, make_event

pytestmark = pytest.mark.anyio

PREFIX = b"/f/"


def revision(number: int, *keys: str) -> Batch:
    """One revision of PUTs (a transaction when several keys)."""
    return tuple(
        make_event(EventType.PUT, f"/f/{key}", b"v", number, None, number, 1) for key in keys or ("a",)
    )


class Hubs:
    """Makes hubs and subscribes to them; every subscription is released when the test ends."""

    def __init__(self) -> None:
        self.joined: list[tuple[PrefixWatch, _Subscriber]] = []

    def make(self, delivered: int, first_in_memory: int) -> tuple[PrefixWatch, list[PrefixWatch]]:
        """A hub that has delivered up to ``delivered`` and still holds ``first_in_memory`` onward;
        and the hubs it reported closed."""
        closed: list[PrefixWatch] = []
        hub = PrefixWatch(None, PREFIX, closed.append)  # type: ignore[arg-type]
        hub.state = WatchState(PREFIX, first_in_memory - 1, {})
        hub.floor = first_in_memory
        for number in range(first_in_memory, delivered + 1):
            publish(hub, revision(number))
        return hub, closed

    def join(
        self, hub: PrefixWatch, start: int | None, buffer_size: int, *, with_snapshot: bool = False
    ) -> tuple[Subscription, _Subscriber]:
        sub, handle = hub.subscribe(start, buffer_size, with_snapshot=with_snapshot)
        self.joined.append((hub, handle))
        return sub, handle


@pytest.fixture
def hubs() -> Iterator[Hubs]:
    made = Hubs()
    yield made
    for _hub, handle in made.joined:  # closing twice is fine; a released one is closed already
        handle.send.close()
        if handle.subscription is not None:
            handle.subscription._receive.close()


def publish(hub: PrefixWatch, batch: Batch) -> None:
    assert hub.state is not None
    hub.state.delivered = batch[0].revision
    hub._publish((batch,))


async def read(sub: Subscription, count: int) -> list[int]:
    with anyio.fail_after(2):
        return [(await sub.__anext__()).revision for _ in range(count)]


async def test_a_subscriber_older_than_the_history_gets_the_catch_up_then_live_revisions_once(
    hubs: Hubs,
) -> None:
    hub, _ = hubs.make(delivered=10, first_in_memory=8)
    sub, handle = hubs.join(hub, 5, 20)
    assert handle.catching_up  # watch() starts the private catch-up stream for [5, 8)
    publish(hub, revision(11))  # live revisions wait behind the catch-up
    # the private stream may run past the floor: revision 8 comes from it and from the history
    handle.offer_caught_up(tuple(revision(n) for n in (5, 6, 7, 8)))
    publish(hub, revision(12))
    handle.finish_catch_up()
    publish(hub, revision(13))
    assert await read(sub, 9) == [5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert sub._available == 0


async def test_a_catch_up_that_falls_behind_lags_a_waiting_reader(
    hubs: Hubs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Live revisions held for a catching-up subscriber are bounded; past the bound it lags at the
    first revision it did not get, and a reader asleep on it wakes with SubscriberLagged."""
    monkeypatch.setattr(_fanout, "PENDING_LIMIT", 2)
    monkeypatch.setattr(_fanout, "HISTORY_EVENTS", 0)  # room for replayed history: none here
    hub, _ = hubs.make(delivered=10, first_in_memory=11)
    sub, handle = hubs.join(hub, 5, 4)
    handle.offer_caught_up((revision(5), revision(6)))
    assert await read(sub, 2) == [5, 6]
    async with anyio.create_task_group() as tg:
        outcome: list[BaseException] = []

        async def reader() -> None:
            try:
                await read(sub, 1)
            except SubscriberLagged as exc:
                outcome.append(exc)

        tg.start_soon(reader)
        await wait_all_tasks_blocked()
        for number in (11, 12, 13):
            publish(hub, revision(number))
    (lagged,) = outcome
    assert isinstance(lagged, SubscriberLagged)
    assert lagged.resume_revision == 7
    assert handle not in hub.subscribers
    assert hub.status().lagged_subscribers == 1


async def test_a_catch_up_holds_the_whole_replayed_history_and_still_live_revisions(
    hubs: Hubs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subscriber older than the history gets that history queued behind its catch-up: up to
    HISTORY_EVENTS batches. With PENDING_LIMIT as large (the defaults), the first live revision
    lagged it at once, and again on every resume: the live revisions have their own room."""
    monkeypatch.setattr(_fanout, "HISTORY_EVENTS", 20)
    monkeypatch.setattr(_fanout, "PENDING_LIMIT", 20)
    hub, _ = hubs.make(delivered=30, first_in_memory=11)
    assert len(hub.history) == 20
    sub, handle = hubs.join(hub, 5, 64)
    assert handle.catching_up and len(handle.pending) == 20
    publish(hub, revision(31))
    assert handle in hub.subscribers
    handle.offer_caught_up(tuple(revision(n) for n in range(5, 11)))
    handle.finish_catch_up()
    assert await read(sub, 27) == list(range(5, 32))


async def test_a_catch_up_lagging_while_a_relist_of_its_last_revision_waits_resumes_there(
    hubs: Hubs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The catch-up reached 10; the shared watch found a gap and re-listed at 10 (nothing written
    since), and that resync waits in pending when the subscriber lags. Resuming at 11 would skip
    the correction: it resumes at 10 (and LiveSettings, which reflects 10, reads afresh)."""
    monkeypatch.setattr(_fanout, "PENDING_LIMIT", 1)
    monkeypatch.setattr(_fanout, "HISTORY_EVENTS", 0)
    hub, _ = hubs.make(delivered=10, first_in_memory=11)
    sub, handle = hubs.join(hub, 5, 64)
    handle.offer_caught_up(tuple(revision(n) for n in range(5, 11)))
    relist = (dataclasses.replace(revision(10, "b")[0], resync=True),)
    publish(hub, relist)
    publish(hub, revision(11))
    assert await read(sub, 6) == list(range(5, 11))
    with pytest.raises(SubscriberLagged) as lagged:
        await read(sub, 1)
    assert lagged.value.resume_revision == 10


async def test_a_failing_watch_wakes_a_waiting_reader_with_its_error_after_the_buffer(hubs: Hubs) -> None:
    hub, _ = hubs.make(delivered=10, first_in_memory=11)
    sub, handle = hubs.join(hub, None, 4)
    publish(hub, revision(11))
    error = EtcdError("the watch of '/f/' stopped")
    async with anyio.create_task_group() as tg:
        seen: list[int] = []
        outcome: list[BaseException] = []

        async def reader() -> None:
            try:
                with anyio.fail_after(2):
                    async for event in sub:
                        seen.append(event.revision)
            except EtcdError as exc:
                outcome.append(exc)

        tg.start_soon(reader)
        await wait_all_tasks_blocked()
        assert seen == [11]
        handle.fail(error)
    assert outcome == [error]


async def test_a_lagged_subscriber_reports_its_lag_whatever_fails_after(hubs: Hubs) -> None:
    """The first end wins: a later error (its catch-up failing, the watch closing) does not replace
    the SubscriberLagged whose resume_revision the reader needs."""
    hub, _ = hubs.make(delivered=10, first_in_memory=11)
    sub, handle = hubs.join(hub, None, 1)
    publish(hub, revision(11))
    publish(hub, revision(12))  # the buffer holds one revision: lags at 12
    handle.fail(EtcdError("the watch of '/f/' stopped"))
    assert await read(sub, 1) == [11]
    with pytest.raises(SubscriberLagged) as info:
        await read(sub, 1)
    assert info.value.resume_revision == 12


async def test_a_subscription_never_yields_revisions_before_its_start(hubs: Hubs) -> None:
    """A private catch-up stream may begin below the start (a replay that overlaps): those are dropped."""
    hub, _ = hubs.make(delivered=10, first_in_memory=8)
    sub, handle = hubs.join(hub, 5, 20)
    handle.offer_caught_up(tuple(revision(n) for n in range(3, 8)))
    handle.finish_catch_up()
    assert await read(sub, 6) == [5, 6, 7, 8, 9, 10]


async def test_the_history_holds_the_newest_events_and_a_big_transaction_whole(
    hubs: Hubs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The in-memory history is bounded by HISTORY_EVENTS events (the oldest revisions go first, and
    ``floor`` says where it starts); a transaction larger than the bound is kept whole."""
    monkeypatch.setattr(_fanout, "HISTORY_EVENTS", 4)
    hub, _ = hubs.make(delivered=10, first_in_memory=1)
    assert [b[0].revision for b in hub.history] == [7, 8, 9, 10]
    assert hub.floor == 7
    assert hub.status().events_delivered == 10
    publish(hub, revision(11, "a", "b", "c", "d", "e"))
    assert [b[0].revision for b in hub.history] == [11]
    assert hub.floor == 11
    publish(hub, revision(12))
    assert [b[0].revision for b in hub.history] == [12]
    assert hub.floor == 12


async def test_a_read_with_nothing_buffered_waits_for_the_next_revision(hubs: Hubs) -> None:
    hub, _ = hubs.make(delivered=10, first_in_memory=8)
    sub, _handle = hubs.join(hub, 9, 4)
    assert await read(sub, 2) == [9, 10]
    async with anyio.create_task_group() as tg:
        got: list[Event] = []

        async def reader() -> None:
            with anyio.fail_after(2):
                got.append(await sub.__anext__())

        tg.start_soon(reader)
        await wait_all_tasks_blocked()
        assert not got
        publish(hub, revision(11))
    assert [e.revision for e in got] == [11]


async def test_batches_yields_the_rest_of_a_revision_whole_revisions_then_the_lag(hubs: Hubs) -> None:
    hub, _ = hubs.make(delivered=10, first_in_memory=11)
    sub, _handle = hubs.join(hub, None, 2)
    publish(hub, revision(11, "a", "b"))
    publish(hub, revision(12))
    publish(hub, revision(13))  # the buffer holds two revisions: this one lags
    first = await sub.__anext__()
    assert (first.revision, first.key) == (11, "/f/a")
    seen = []
    with pytest.raises(SubscriberLagged) as info, anyio.fail_after(2):
        async for batch in sub.batches():
            seen.append([(e.revision, e.key) for e in batch])
    assert seen == [[(11, "/f/b")], [(12, "/f/a")]]
    assert info.value.resume_revision == 13


async def test_batches_ends_when_the_subscription_ends(hubs: Hubs) -> None:
    hub, _ = hubs.make(delivered=10, first_in_memory=11)
    sub, handle = hubs.join(hub, None, 2)
    publish(hub, revision(11))
    hub.discard(handle)
    with anyio.fail_after(2):
        assert [[e.revision for e in b] async for b in sub.batches()] == [[11]]


async def test_after_a_wiped_cluster_its_lower_revisions_reach_subscribers_and_resumes(
    hubs: Hubs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """etcd's history was replaced: the resync at the new (lower) revision and what follows are
    delivered; a resume from the new history is served from memory (which counts only the new
    history), without the old one; one from before the resync needs etcd."""
    monkeypatch.setattr(_fanout, "HISTORY_EVENTS", 10)
    hub, _ = hubs.make(delivered=10, first_in_memory=8)
    sub, _handle = hubs.join(hub, None, 20)
    hub._reset(3)
    for number in range(3, 13):
        publish(hub, revision(number, "new"))
    assert await read(sub, 10) == list(range(3, 13))
    resumed, handle = hubs.join(hub, 4, 20)
    assert not handle.catching_up
    with anyio.fail_after(2):
        events = [await resumed.__anext__() for _ in range(9)]
    assert [(e.revision, e.key) for e in events] == [(n, "/f/new") for n in range(4, 13)]
    _older, before_resync = hubs.join(hub, 2, 20)
    assert before_resync.catching_up


async def test_a_subscription_with_a_snapshot_starts_where_the_snapshot_ends(hubs: Hubs) -> None:
    hub, _ = hubs.make(delivered=10, first_in_memory=11)
    assert hub.state is not None
    hub.state.keys = {b"/f/a": (b"1", 5, 5, 1), b"/f/b": (b"2", 9, 9, 1)}
    sub, _handle = hubs.join(hub, None, 4, with_snapshot=True)
    assert sub.snapshot is not None
    assert (sub.snapshot.revision, dict(sub.snapshot.items)) == (10, {"/f/a": b"1", "/f/b": b"2"})
    assert sub.start_revision == 11
    assert sub.status.subscribers == 1
    assert repr(sub) == "<Subscription '/f/' from revision 11>"


async def test_the_last_subscription_to_leave_stops_the_shared_watch_not_before(hubs: Hubs) -> None:
    hub, closed = hubs.make(delivered=10, first_in_memory=11)
    hub._scope = anyio.CancelScope()  # as _run sets it
    _first, one = hubs.join(hub, None, 4)
    _second, two = hubs.join(hub, None, 4)
    hub.release(one)
    assert not hub.closed and not closed and not hub._scope.cancel_called
    hub.release(two)
    assert hub.closed and closed == [hub] and hub._scope.cancel_called


async def test_status_reports_the_delivered_revision_and_the_fullest_buffer(hubs: Hubs) -> None:
    unlisted = PrefixWatch(None, PREFIX, lambda _hub: None)  # type: ignore[arg-type]
    assert unlisted.status().revision == 0  # nothing listed yet
    hub, _ = hubs.make(delivered=10, first_in_memory=11)
    _one, _ = hubs.join(hub, None, 1)
    _four, _ = hubs.join(hub, None, 4)
    assert (hub.status().revision, hub.status().max_buffer_fill) == (10, 0.0)
    publish(hub, revision(11))  # fills the one-revision buffer
    assert (hub.status().revision, hub.status().max_buffer_fill) == (11, 1.0)


async def test_after_a_wiped_cluster_the_history_starts_at_the_resync(
    hubs: Hubs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The history holds exactly HISTORY_EVENTS events, counted from the resync on."""
    monkeypatch.setattr(_fanout, "HISTORY_EVENTS", 3)
    hub, _ = hubs.make(delivered=10, first_in_memory=8)
    hub._reset(3)
    publish(hub, revision(3))
    assert hub.floor == 4  # the resync's revision is the one etcd's new history starts after
    _sub, handle = hubs.join(hub, 4, 4)
    assert not handle.catching_up
    publish(hub, revision(4))
    publish(hub, revision(5))
    assert [b[0].revision for b in hub.history] == [3, 4, 5]


async def test_a_relist_at_the_revision_last_handed_over_still_reaches_a_subscriber(hubs: Hubs) -> None:
    """A gap found with nothing written since: the re-list's batch carries the revision the
    subscriber has, and corrects what it was given; a plain batch of that revision is a repeat."""
    hub, _ = hubs.make(delivered=10, first_in_memory=11)
    sub, _handle = hubs.join(hub, None, 4)
    hub._publish((revision(10),))  # handed over already (before the subscriber joined): dropped
    fix = (Event(EventType.PUT, "/f/a", b"fixed", 10, None, 3, 2, resync=True),)
    hub._publish((fix,))
    publish(hub, revision(11))
    with anyio.fail_after(2):
        got = [await sub.__anext__() for _ in range(2)]
    assert [(e.revision, e.value, e.resync) for e in got] == [(10, b"fixed", True), (11, b"v", False)]


async def test_a_subscription_cut_off_is_never_caught_up(hubs: Hubs) -> None:
    """``caught_up`` (a LiveSettings layer follows its watch again) holds while the subscription
    has taken all it was handed and is still handed the rest: never once it lagged or failed,
    though its buffer is empty; not while its private catch-up runs."""
    hub, _ = hubs.make(delivered=10, first_in_memory=11)
    sub, _handle = hubs.join(hub, None, 1)
    assert _fanout.caught_up(sub)
    publish(hub, revision(11))
    assert not _fanout.caught_up(sub)  # buffered
    assert await read(sub, 1) == [11]
    assert _fanout.caught_up(sub)
    publish(hub, revision(12))
    publish(hub, revision(13))  # the buffer of one overflows: cut off
    assert await read(sub, 1) == [12]
    assert not _fanout.caught_up(sub)
    old, catching = hubs.join(hub, 5, 4)
    assert catching.catching_up and not _fanout.caught_up(old)
