"""Shared test setup: asyncio only (the library is asyncio-native via grpc.aio), one loop per session."""

from __future__ import annotations

import asyncio
import functools
import inspect
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

if sys.version_info < (3, 11):  # pragma: no cover - Python 3.10
    from exceptiongroup import BaseExceptionGroup


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session", autouse=True)
async def _one_event_loop(anyio_backend: str) -> AsyncIterator[None]:
    """grpc.aio binds its completion queue to the first event loop it sees; a session-scoped async
    fixture keeps anyio's runner, and so a single loop, alive for every test."""
    yield  # noqa: PT022 (the fixture's lifetime is the point)


class StrayCancellation(AssertionError):
    """A test ended with a ``CancelledError`` that nobody requested of it (or a group holding one)."""


def _no_stray_cancel(test: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Turn a ``CancelledError`` out of an async test into that test's failure.

    Every async test runs in anyio's one runner task (see ``_one_event_loop``): a cancellation, or
    an exception group that is not an ``Exception`` (one holding a cancellation), that escapes a
    test ends that task, and every later test of the session fails with ``WouldBlock`` instead of
    the one at fault failing with its traceback. Nothing cancels the runner task on purpose, so
    such a cancellation is a stray one (from the library or a test's own tasks).
    """

    @functools.wraps(test)
    async def run(**kwargs: Any) -> Any:
        try:
            return await test(**kwargs)
        except (asyncio.CancelledError, BaseExceptionGroup) as exc:
            if isinstance(exc, Exception):
                raise  # an ExceptionGroup fails the test as it is
            task = asyncio.current_task()
            while task is not None and hasattr(task, "uncancel") and task.uncancel() > 0:
                pass  # leave the runner task as uncancelled as it was for the next test
            raise StrayCancellation(f"{test.__name__} ended with a stray {exc!r}") from exc

    return run


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> None:
    """Run async tests under :func:`_no_stray_cancel`; anyio's plugin runs them next."""
    if inspect.iscoroutinefunction(pyfuncitem.obj) and not hasattr(pyfuncitem.obj, "hypothesis"):
        pyfuncitem.obj = _no_stray_cancel(pyfuncitem.obj)
