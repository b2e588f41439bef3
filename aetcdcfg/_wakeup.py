"""Putting a task to sleep and waking it without allocating per sleep: the fan-out's hand-off.

A subscriber's task sleeps between revisions. With an asyncio future per sleep, each sleeping
subscriber held a future, a ``FutureIter``, the coroutines awaiting it and the task's wake-up
callback, and each revision scheduled one ``Handle`` (plus its argument tuple) per subscriber. At
K = 1,000 subscribers that is ~6,000 GC-tracked objects per revision, alive across the collector's
young-generation passes, so it promoted thousands per revision to the old generation and ran a full
collection (30-90 ms with a thousand subscribers' state) every ~130 revisions: the p99 tail.

asyncio's ``Task`` sleeps on any future-like object: one that has ``_asyncio_future_blocking``,
``get_loop()``, ``add_done_callback()``, ``result()`` and ``cancel()`` (``asyncio.isfuture``'s
contract, what the C ``Task`` calls). :class:`Sleeper` is one such object, made once per
subscription and reused for every sleep, and :class:`Waker` wakes every sleeper due in one loop
callback per round by calling each task's wake-up callback in its context, which is what the
``Handle`` per sleeper would have done. Cancelling a sleeping task (``task.cancel()``, anyio cancel
scopes, timeouts) works as with a future: :meth:`Sleeper.cancel` schedules the wake-up, and
``result()`` raises the ``CancelledError`` with the cancel message.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Generator

__all__ = ["Sleeper", "Waker"]

WakeUp = Callable[["Sleeper"], object]


class Sleeper:
    """A reusable future-like object one task sleeps on; :meth:`Waker.wake` wakes it."""

    __slots__ = ("_asyncio_future_blocking", "_callback", "_cancel_message", "_context", "_due", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._asyncio_future_blocking = False
        self._callback: WakeUp | None = None  # the sleeping task's wake-up, while it sleeps
        self._context: contextvars.Context | None = None
        self._cancel_message: object = None
        self._due = False  # queued in a Waker's round

    def __await__(self) -> Generator[Sleeper, None, None]:
        """Sleep until woken (``await sleeper``); raises CancelledError if cancelled meanwhile."""
        self._asyncio_future_blocking = True  # what Future.__await__ sets before it yields
        yield self  # the task's wake-up calls result(), which raises if it was cancelled

    @property
    def sleeping(self) -> bool:
        return self._callback is not None

    # The future-like protocol asyncio.Task uses.

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def add_done_callback(self, fn: WakeUp, *, context: contextvars.Context | None = None) -> None:
        self._callback = fn
        self._context = context if context is not None else contextvars.copy_context()

    def remove_done_callback(self, fn: WakeUp) -> int:
        if self._callback is None or self._callback != fn:
            return 0
        self._callback = self._context = None
        return 1

    def done(self) -> bool:
        return self._callback is None

    def cancelled(self) -> bool:
        return False

    def result(self) -> None:
        message, self._cancel_message = self._cancel_message, None
        if message is not None:
            raise asyncio.CancelledError(*(() if message is _NO_MESSAGE else (message,)))

    def cancel(self, msg: object = None) -> bool:
        callback, context = self._callback, self._context
        if callback is None:
            return False
        self._callback = self._context = None
        self._cancel_message = _NO_MESSAGE if msg is None else msg
        self._loop.call_soon(callback, self, context=context)
        return True

    def __repr__(self) -> str:
        return f"<Sleeper {'sleeping' if self._callback is not None else 'idle'}>"


_NO_MESSAGE = object()


class Waker:
    """Wakes the due sleepers of one loop in one callback: ``wake()`` is cheap to call per delivery."""

    __slots__ = ("_due", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._due: list[Sleeper] = []

    def wake(self, sleeper: Sleeper) -> None:
        """Wake ``sleeper``'s task soon (in this loop iteration's callbacks), if it sleeps."""
        if sleeper._callback is None or sleeper._due:
            return
        sleeper._due = True
        due = self._due
        due.append(sleeper)
        if len(due) == 1:
            self.loop.call_soon(self._run)

    def _run(self) -> None:
        due, self._due = self._due, []
        for index, sleeper in enumerate(due):
            sleeper._due = False
            callback, context = sleeper._callback, sleeper._context
            if callback is None or context is None:
                continue  # cancelled meanwhile: its wake-up is already scheduled
            sleeper._callback = sleeper._context = None
            try:
                context.run(callback, sleeper)  # the task runs up to its next await
            except BaseException:  # KeyboardInterrupt/SystemExit out of a task: wake the rest later
                for rest in due[index + 1 :]:
                    rest._due = False
                    self.wake(rest)
                raise
