"""The fan-out's hand-off: tasks sleeping on a reusable Sleeper behave as if on an asyncio future.

Deterministic, no etcd: what is checked is asyncio's contract (wake-up, cancellation with its
message, timeouts, anyio cancel scopes, context variables), on asyncio and on uvloop.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
from collections.abc import Callable, Coroutine, Generator
from typing import Any

import anyio
import pytest

from aetcdcfg._fanout import PrefixWatch
from aetcdcfg._resume import WatchState
from aetcdcfg._wakeup import Sleeper, Waker
from aetcdcfg.events import EventType, make_event

PREFIX = b"/t/"
who: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="nobody")


class Until:
    """An awaitable that sleeps on ``sleeper`` until ``ready()`` is true, then returns "done"."""

    def __init__(self, sleeper: Sleeper, ready: Callable[[], bool]) -> None:
        self.sleeper = sleeper
        self.ready = ready

    def __await__(self) -> Generator[Any, None, str]:
        while not self.ready():
            yield from self.sleeper.__await__()
        return "done"


def run(main: Callable[[], Coroutine[Any, Any, None]], loop: str) -> None:
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        event_loop = uvloop.new_event_loop()  # (asyncio.Runner's loop_factory would need 3.11)
        try:
            event_loop.run_until_complete(main())
        finally:
            event_loop.close()
    else:
        asyncio.run(main())


LOOPS = ["asyncio", "uvloop"]


@pytest.mark.parametrize("loop", LOOPS)
def test_wake_runs_each_task_once_in_its_own_context(loop: str) -> None:
    async def main() -> None:
        waker = Waker(asyncio.get_running_loop())
        flags = [False] * 3
        sleepers = [Sleeper(waker.loop) for _ in flags]
        seen: list[tuple[int, str]] = []

        async def sleeper_task(i: int) -> None:
            who.set(f"task{i}")
            assert await Until(sleepers[i], lambda: flags[i]) == "done"
            seen.append((i, who.get()))

        tasks = [asyncio.create_task(sleeper_task(i)) for i in range(3)]
        await asyncio.sleep(0)
        assert all(s.sleeping for s in sleepers)
        waker.wake(sleepers[1])  # woken but not ready: goes back to sleep
        await asyncio.sleep(0)
        assert seen == [] and sleepers[1].sleeping
        flags[:] = [True, True, True]
        for s in [*sleepers, *sleepers]:  # twice in one round: woken once
            waker.wake(s)
        await asyncio.gather(*tasks)
        assert seen == [(0, "task0"), (1, "task1"), (2, "task2")]
        assert not any(s.sleeping for s in sleepers)
        waker.wake(sleepers[0])  # nobody sleeps on it: nothing happens
        await asyncio.sleep(0)

    run(main, loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_cancel_carries_the_message_and_the_sleeper_is_reusable(loop: str) -> None:
    async def main() -> None:
        waker = Waker(asyncio.get_running_loop())
        sleeper = Sleeper(waker.loop)
        ready = False
        task = asyncio.create_task(_wait(sleeper, lambda: ready))
        await asyncio.sleep(0)
        assert task.cancel("stop now")
        with pytest.raises(asyncio.CancelledError) as info:
            await task
        # CPython 3.10's asyncio drops the message on the way to whoever awaits the task, even
        # around a plain Future (bpo-45390, fixed in 3.11): there only the rest is checked.
        if sys.version_info >= (3, 11):
            assert info.value.args == ("stop now",)
        assert not sleeper.sleeping

        # Reused after a cancellation, and a timeout (asyncio.wait_for) cancels it too.
        with pytest.raises(asyncio.TimeoutError):  # (the builtin TimeoutError from 3.11 on)
            await asyncio.wait_for(_wait(sleeper, lambda: ready), 0.01)
        second = asyncio.create_task(_wait(sleeper, lambda: ready))
        await asyncio.sleep(0)
        ready = True
        waker.wake(sleeper)
        assert await second == "done"

    run(main, loop)


async def _wait(sleeper: Sleeper, ready: Callable[[], bool]) -> str:
    return await Until(sleeper, ready)


@pytest.mark.parametrize("loop", LOOPS)
def test_anyio_cancel_scope_and_a_wake_in_the_same_round(loop: str) -> None:
    async def main() -> None:
        waker = Waker(asyncio.get_running_loop())
        sleeper = Sleeper(waker.loop)
        with anyio.move_on_after(0.01) as scope:
            await _wait(sleeper, lambda: False)
        assert scope.cancelled_caught and not sleeper.sleeping

        # Cancelled and woken in the same loop iteration: the cancellation wins, once.
        task = asyncio.create_task(_wait(sleeper, lambda: False))
        await asyncio.sleep(0)
        task.cancel()
        waker.wake(sleeper)
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main, loop)


def _hub_with(subscribers: int) -> tuple[PrefixWatch, list[Any], list[Any]]:
    hub = PrefixWatch(None, PREFIX, lambda hub: None)  # type: ignore[arg-type]  # never started
    hub.state = WatchState(PREFIX, 100, {})
    pairs = [hub.subscribe(None, 8, with_snapshot=False) for _ in range(subscribers)]
    return hub, [subscription for subscription, _ in pairs], [handle for _, handle in pairs]


def _publish(hub: PrefixWatch, revision: int) -> None:
    event = make_event(EventType.PUT, "/t/k", b"v%d" % revision, revision, None, revision, 1)
    hub.state.delivered = revision  # type: ignore[union-attr]
    hub._publish(((event,),))


@pytest.mark.parametrize("loop", LOOPS)
def test_cancelling_one_subscriber_leaves_the_others_and_it_can_go_on(loop: str) -> None:
    async def main() -> None:
        hub, subs, handles = _hub_with(3)
        got: list[list[int]] = [[], [], []]

        async def follow(i: int, count: int) -> None:
            for _ in range(count):
                got[i].append((await subs[i].__anext__()).revision)

        tasks = [asyncio.create_task(follow(i, 3)) for i in range(3)]
        await asyncio.sleep(0)
        _publish(hub, 101)
        await asyncio.sleep(0)
        tasks[1].cancel()
        _publish(hub, 102)
        _publish(hub, 103)
        await asyncio.gather(tasks[0], tasks[2])
        with pytest.raises(asyncio.CancelledError):
            await tasks[1]
        assert got == [[101, 102, 103], [101], [101, 102, 103]]
        # The cancelled subscriber lost nothing: 102 and 103 are still in its buffer.
        await follow(1, 2)
        assert got[1] == [101, 102, 103]

        # batches() sleeps on the same hand-off.
        async def batches() -> list[int]:
            revisions = []
            async for batch in subs[0].batches():
                revisions.append(batch[0].revision)
                if len(revisions) == 2:
                    break
            return revisions

        task = asyncio.create_task(batches())
        await asyncio.sleep(0)
        _publish(hub, 104)
        await asyncio.sleep(0)
        _publish(hub, 105)
        assert await task == [104, 105]
        for handle in handles:
            hub.release(handle)

    run(main, loop)
