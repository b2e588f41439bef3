"""A stateful property test of the fan-out, without etcd: subscribers join and leave in any order, with
any buffer sizes, read at any pace, lag, are cancelled mid-read and resume from ``resume_revision``.

The invariant is the promise of ``EtcdClient.watch``: each subscriber gets exactly the prefix's history
from its start revision, in order, or its buffered revisions and then :class:`SubscriberLagged` whose
``resume_revision`` gives the rest exactly; and it lags only when its own buffer is full. The hub is
driven through the calls the stream makes (``_publish``) and the ones ``watch()`` makes
(``subscribe``/``release``); the I/O under it is tested against real etcd elsewhere.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from aetcdcfg import SubscriberLagged, Subscription, _fanout
from aetcdcfg._fanout import PrefixWatch
from aetcdcfg._resume import Batch, WatchState
from aetcdcfg.events import EventType, make_event

PREFIX = b"/m/"
#: A small history, so that the hub drops old revisions while the machine runs.
HISTORY_EVENTS = 12


@dataclass
class Model:
    """What one subscriber must see: its start, its buffer, what it has read."""

    sub: Subscription
    handle: Any
    start: int
    capacity: int
    #: revisions in its buffer, not yet taken (a taken batch is being iterated event by event)
    queued: deque[int] = field(default_factory=deque)
    #: events of the batch being iterated, still to be read
    current: deque[tuple[int, str]] = field(default_factory=deque)
    read: list[tuple[int, str]] = field(default_factory=list)
    lagged_at: int | None = None
    done: bool = False


class FanOut(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.saved_history = _fanout.HISTORY_EVENTS
        _fanout.HISTORY_EVENTS = HISTORY_EVENTS
        self.hub: PrefixWatch = self.run(self._make_hub())
        self.history: list[Batch] = []
        self.models: list[Model] = []
        self.revision = 1

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def next_event(self, model: Model) -> Any:
        """The subscriber's next event; one the model expects but the hub never buffered fails fast."""
        return self.run(asyncio.wait_for(model.sub.__anext__(), 2))

    async def _make_hub(self) -> PrefixWatch:
        hub = PrefixWatch(None, PREFIX, lambda _hub: None)  # type: ignore[arg-type]
        hub.state = WatchState(PREFIX, 1, {})
        hub.floor = 2
        return hub

    def teardown(self) -> None:
        for model in self.live():
            self.leave_model(model)
        _fanout.HISTORY_EVENTS = self.saved_history
        self.loop.close()

    # -- what etcd does ----------------------------------------------------------------------------

    @initialize()
    def first_write(self) -> None:
        self.write(["a"])

    @rule(keys=st.lists(st.sampled_from("abcd"), min_size=1, max_size=3, unique=True))
    def write(self, keys: list[str]) -> None:
        """One revision (a transaction when several keys), published to the hub."""
        self.revision += 1
        revision = self.revision
        batch = tuple(
            make_event(EventType.PUT, f"/m/{key}", b"v", revision, None, revision, 1) for key in keys
        )
        assert self.hub.state is not None
        self.hub.state.delivered = revision
        self.history.append(batch)
        for model in self.live():
            if model.lagged_at is not None:
                continue
            if len(model.queued) >= model.capacity:
                model.lagged_at = revision
            else:
                model.queued.append(revision)
        self.hub._publish((batch,))

    # -- what subscribers do -----------------------------------------------------------------------

    def live(self) -> list[Model]:
        return [m for m in self.models if not m.done]

    def revisions_from(self, first: int) -> list[Batch]:
        return [b for b in self.history if b[0].revision >= first]

    @rule(
        buffer_size=st.integers(1, 4),
        back=st.none() | st.integers(0, 20),
    )
    def subscribe(self, buffer_size: int, back: int | None) -> None:
        """Join now (``back`` None) or from a revision the hub's history still holds."""
        assert self.hub.state is not None
        delivered = self.hub.state.delivered
        start = None if back is None else max(self.hub.floor, delivered + 1 - back)
        self.join(start, buffer_size)

    def join(self, start: int | None, buffer_size: int) -> None:
        assert self.hub.state is not None
        first = self.hub.state.delivered + 1 if start is None else start
        replay = [b[0].revision for b in self.revisions_from(first)]
        sub, handle = self.hub.subscribe(start, buffer_size, with_snapshot=False)
        assert not handle.catching_up
        assert sub.start_revision == first
        self.models.append(
            Model(sub, handle, first, capacity=buffer_size + len(replay), queued=deque(replay))
        )

    @precondition(lambda self: self.live())
    @rule(data=st.data(), count=st.integers(1, 6))
    def read(self, data: st.DataObject, count: int) -> None:
        """Read up to ``count`` events; a lagged subscriber gets its buffer, then SubscriberLagged."""
        model = data.draw(st.sampled_from(self.live()))
        for _ in range(count):
            if not model.current and not model.queued:
                if model.lagged_at is None:
                    return  # nothing to read: the real reader would sleep
                with pytest.raises(SubscriberLagged) as info:
                    self.next_event(model)
                assert info.value.resume_revision == model.lagged_at
                # everything before resume_revision was delivered: the resume gives the rest
                assert model.read == [
                    (e.revision, e.key)
                    for b in self.revisions_from(model.start)
                    if b[0].revision < model.lagged_at
                    for e in b
                ]
                self.leave_model(model)
                if model.lagged_at >= self.hub.floor:  # older ones need etcd (a private catch-up)
                    self.join(model.lagged_at, data.draw(st.integers(1, 4)))
                return
            if not model.current:
                revision = model.queued.popleft()
                batch = next(b for b in self.history if b[0].revision == revision)
                model.current.extend((e.revision, e.key) for e in batch)
            expected = model.current.popleft()
            event = self.next_event(model)
            got = (event.revision, event.key)
            assert got == expected
            model.read.append(got)

    @precondition(
        lambda self: any(not m.current and not m.queued and m.lagged_at is None for m in self.live())
    )
    @rule(data=st.data())
    def cancel_a_sleeping_read(self, data: st.DataObject) -> None:
        """A read that sleeps (nothing buffered) and is cancelled loses nothing."""
        idle = [m for m in self.live() if not m.current and not m.queued and m.lagged_at is None]
        model = data.draw(st.sampled_from(idle))

        async def cancelled() -> None:
            task = asyncio.ensure_future(model.sub.__anext__())
            await asyncio.sleep(0)
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        self.run(cancelled())

    @precondition(lambda self: self.live())
    @rule(data=st.data())
    def leave(self, data: st.DataObject) -> None:
        self.leave_model(data.draw(st.sampled_from(self.live())))

    def leave_model(self, model: Model) -> None:
        self.hub.release(model.handle)
        model.done = True

    # -- the promise -------------------------------------------------------------------------------

    @invariant()
    def each_reads_exactly_the_history_from_its_start(self) -> None:
        for model in self.models:
            expected = [(e.revision, e.key) for b in self.revisions_from(model.start) for e in b]
            assert model.read == expected[: len(model.read)]

    @invariant()
    def only_subscribers_still_in_place_are_published_to(self) -> None:
        subscribed = {id(h) for h in self.hub.subscribers}
        for model in self.models:
            in_hub = id(model.handle) in subscribed
            assert in_hub == (not model.done and model.lagged_at is None)


def test_fan_out_delivers_exact_history_or_lag_whatever_the_order() -> None:
    run_state_machine_as_test(
        FanOut, settings=settings(max_examples=300, stateful_step_count=40, deadline=None)
    )
