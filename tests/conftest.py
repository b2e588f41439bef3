"""Shared test setup: asyncio only (the library is asyncio-native via grpc.aio), one loop per session."""

from __future__ import annotations

import asyncio
import faulthandler
import functools
import inspect
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from typing import Any

import anyio
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
    _LOOPS.append(asyncio.get_running_loop())
    yield
    _LOOPS.remove(asyncio.get_running_loop())


_LOOPS: list[asyncio.AbstractEventLoop] = []
#: A test body gets this much less than pytest-timeout's limit, and the watchdog fires this much
#: before it: see :func:`_no_stray_cancel` and :func:`pytest_runtest_protocol`.
_BODY_MARGIN, _WATCHDOG_MARGIN = 20.0, 8.0


def _time_limit(item: pytest.Item) -> float | None:
    """pytest-timeout's limit for ``item`` (its ``timeout`` marker, else the ini setting)."""
    marker = item.get_closest_marker("timeout")
    value = marker.args[0] if marker is not None and marker.args else item.config.getini("timeout")
    return float(value) if value else None


def _await_chain(task: asyncio.Task[Any]) -> list[str]:
    """Where a suspended task waits: each coroutine (or generator) it awaits, outermost first."""
    lines, awaited = [], task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        frame = frame or getattr(awaited, "ag_frame", None)
        if frame is None:
            lines.append(f"  awaiting {awaited!r}")
            break
        lines.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return lines


def _dump_stacks(config: pytest.Config, nodeid: str, after: float) -> None:
    """Print every thread's stack and where every asyncio task waits, past pytest's capture."""
    capman = config.pluginmanager.getplugin("capturemanager")
    out = sys.__stderr__
    if out is None or capman is None:  # pragma: no cover - no stderr at all
        return
    with capman.global_and_fixture_disabled():
        print(f"\n== watchdog: {nodeid} still running after {after:.0f} s; threads:", file=out)
        out.flush()
        faulthandler.dump_traceback(file=out, all_threads=True)
        for loop in list(_LOOPS):
            try:
                tasks = asyncio.all_tasks(loop)
            except RuntimeError:  # pragma: no cover - the task set kept changing
                continue
            print(f"== watchdog: {len(tasks)} asyncio tasks:", file=out)
            for task in tasks:
                print(f"-- {task.get_name()}", *_await_chain(task), sep="\n", file=out)
        out.flush()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, None, None]:
    """A test still running shortly before pytest-timeout ends it prints where every task waits.

    pytest-timeout's SIGALRM lands in the event loop, not in the test's task: the hung coroutine
    stays in anyio's runner and every later test of the session fails behind it. The dump says
    where the first one hung (a shielded close, a blocking call in the loop's thread).
    """
    limit = _time_limit(item)
    timer = None
    if limit is not None and limit > _WATCHDOG_MARGIN:
        timer = threading.Timer(
            limit - _WATCHDOG_MARGIN, _dump_stacks, (item.config, item.nodeid, limit - _WATCHDOG_MARGIN)
        )
        timer.daemon = True
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()


class StrayCancellation(AssertionError):
    """A test ended with a ``CancelledError`` that nobody requested of it (or a group holding one)."""


def _no_stray_cancel(
    test: Callable[..., Awaitable[Any]], limit: float | None
) -> Callable[..., Awaitable[Any]]:
    """Turn a ``CancelledError`` out of an async test into that test's failure; bound its body.

    Every async test runs in anyio's one runner task (see ``_one_event_loop``): a cancellation, or
    an exception group that is not an ``Exception`` (one holding a cancellation), that escapes a
    test ends that task, and every later test of the session fails with ``WouldBlock`` instead of
    the one at fault failing with its traceback. Nothing cancels the runner task on purpose, so
    such a cancellation is a stray one (from the library or a test's own tasks).

    The body gets ``limit`` less a margin (anyio's ``fail_after``): a hung test then fails alone,
    with a ``TimeoutError`` whose traceback shows where it waited, before pytest-timeout's signal
    would leave its coroutine stuck in the runner for the next test to queue behind.
    """

    @functools.wraps(test)
    async def run(**kwargs: Any) -> Any:
        try:
            if limit is None or limit <= _BODY_MARGIN:
                return await test(**kwargs)
            with anyio.fail_after(limit - _BODY_MARGIN):
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
        pyfuncitem.obj = _no_stray_cancel(pyfuncitem.obj, _time_limit(pyfuncitem))
