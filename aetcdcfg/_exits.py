"""An async exit stack that leaves exception chaining to the interpreter, so it never makes a cycle.

``contextlib.AsyncExitStack`` rebuilds the ``__context__`` chain of nested ``async with`` blocks by
hand. When a callback raises the very exception an earlier callback raised (an anyio task group
does, for a cancellation) while another exception is being handled, it sets that exception's
``__context__`` to itself (CPython gh-102201; trio#2577). The next ``AsyncExitStack`` that walks the
chain (a test's, FastAPI's lifespan, any user's) then loops forever in the event loop's thread:
a ``LiveSettings`` cancelled while open hung its process at 100% CPU. Here the remaining callbacks
run inside the handler of the exception that is pending, exactly where nested blocks would run
them, and the interpreter (which never makes a cycle) does all the chaining.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, TypeVar

__all__ = ["ExitStack"]

T = TypeVar("T")
_Exit = Callable[
    [type[BaseException] | None, BaseException | None, TracebackType | None], Awaitable[bool | None]
]


class ExitStack:
    """What is entered is exited in reverse order, as nested ``async with`` blocks would be.

    The subset of ``contextlib.AsyncExitStack`` the library uses: ``enter_async_context``,
    ``callback``, ``push_async_callback`` and ``aclose`` (or ``async with``).
    """

    __slots__ = ("_exits",)

    def __init__(self) -> None:
        self._exits: list[_Exit] = []

    async def enter_async_context(self, cm: AbstractAsyncContextManager[T]) -> T:
        """Enter ``cm`` now; it is exited when the stack unwinds."""
        entered = await type(cm).__aenter__(cm)
        exit_ = type(cm).__aexit__

        async def exit_cm(
            exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
        ) -> bool | None:
            return await exit_(cm, exc_type, exc, tb)

        self._exits.append(exit_cm)
        return entered

    def callback(self, fn: Callable[..., object], *args: Any) -> None:
        """Call ``fn(*args)`` when the stack unwinds (it never suppresses an exception)."""

        async def call(*_: object) -> None:
            fn(*args)

        self._exits.append(call)

    def push_async_callback(self, fn: Callable[..., Awaitable[object]], *args: Any) -> None:
        """Await ``fn(*args)`` when the stack unwinds (it never suppresses an exception)."""

        async def call(*_: object) -> None:
            await fn(*args)

        self._exits.append(call)

    async def aclose(self) -> None:
        """Unwind now; an exception a callback raises propagates."""
        await self._unwind(None)

    async def __aenter__(self) -> ExitStack:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        return await self._unwind(exc) and exc is not None

    async def _unwind(self, exc: BaseException | None) -> bool:
        """Exit the rest, the newest first, each told of ``exc`` or of what an exit after it raised.

        Returns whether ``exc`` was suppressed. A new exception from an exit propagates; the exits
        still to run run inside its handler, as the enclosing blocks of nested ``async with`` would.
        """
        while self._exits:
            exit_ = self._exits.pop()
            try:
                if exc is None:
                    suppress = await exit_(None, None, None)
                else:
                    suppress = await exit_(type(exc), exc, exc.__traceback__)
            except BaseException as raised:
                if raised is exc:
                    continue  # it let ``exc`` through: nothing new
                if await self._unwind(raised):
                    return True  # an outer exit suppressed it, and with it everything before
                raise
            if suppress:
                exc = None
        return exc is None
