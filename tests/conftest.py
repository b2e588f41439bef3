"""Shared test setup: asyncio only (the library is asyncio-native via grpc.aio), one loop per session."""

from __future__ import annotations

import asyncio
import collections
import faulthandler
import functools
import inspect
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from typing import Any

import anyio
import pytest

if sys.version_info < (3, 11):  # pragma: no cover - Python 3.10
    from exceptiongroup import BaseExceptionGroup


@pytest.fixture(scope="session")
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return "asyncio", {"loop_factory": _new_loop}


@pytest.fixture(scope="session", autouse=True)
async def _one_event_loop(anyio_backend: object) -> AsyncIterator[None]:
    """grpc.aio binds its completion queue to the first event loop it sees; a session-scoped async
    fixture keeps anyio's runner, and so a single loop, alive for every test."""
    _LOOPS.append(asyncio.get_running_loop())
    yield
    runner = asyncio.current_task()  # the one running now: anyio's first, or one started after it
    if isinstance(runner, _TracedTask):  # the runner's own end at the session's end is no news
        runner.traced = False
        runner.remove_done_callback(_runner_ended)
    _LOOPS.remove(asyncio.get_running_loop())


_LOOPS: list[asyncio.AbstractEventLoop] = []


class _TracedTask(asyncio.Task):  # type: ignore[type-arg]
    """A task that, once marked, remembers where each ``cancel()`` of it came from.

    anyio runs every async test and fixture in one runner task. Whatever cancels that task outside
    a test's own cancel scopes (a scope left open past its test, a stray ``task.cancel()``) ends it,
    and every later test fails with ``ClosedResourceError``: the stacks say who did it.
    """

    traced = False

    def cancel(self, msg: Any = None) -> bool:
        if self.traced:
            stack = f"  msg={msg!r}{_scope_of(sys._getframe(1))}\n"
            stack += "".join(traceback.format_stack(limit=24)[:-1])
            _RUNNER_CANCELS.append((_CURRENT_TEST[0], time.monotonic(), stack))
        return super().cancel(msg)


def _scope_of(frame: Any) -> str:
    """The anyio cancel scope delivering a cancellation from ``frame`` (or a caller), described."""
    while frame is not None:
        if frame.f_code.co_name == "_deliver_cancellation":
            scope = frame.f_locals.get("origin")
            host = getattr(scope, "_host_task", None)
            return (
                f" scope={scope!r} active={getattr(scope, '_active', '?')}"
                f" deadline={getattr(scope, '_deadline', '?')} now={time.monotonic():.3f}"
                f" host={host.get_name() if host is not None else None}"
            )
        frame = frame.f_back
    return ""


def _new_loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    loop.set_task_factory(_new_task)
    return loop


def _new_task(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> _TracedTask:
    """Every task is traceable; anyio's runner task (the first, or one started after it ended) is
    traced from the start."""
    task = _TracedTask(coro, loop=loop, **kwargs)
    if getattr(coro, "__qualname__", "").endswith("._run_tests_and_fixtures"):
        task.traced = True
        task.add_done_callback(_runner_ended)
    return task


_RUNNER_CANCELS: collections.deque[tuple[str, float, str]] = collections.deque(maxlen=6)
_CURRENT_TEST = ["(session set-up)"]
_RUNNER_DEATHS: list[str] = []
_RUNNER_DEATHS_UNREPORTED: list[str] = []


def _recent_cancels() -> str:
    now = time.monotonic()
    lines = ["the runner task's last cancel() calls:"]
    for test, at, stack in _RUNNER_CANCELS:
        lines.append(f"-- {now - at:.2f} s ago, during {test}:\n{stack}")
    return "\n".join(lines)


def _runner_ended(task: asyncio.Task[Any]) -> None:
    how = "cancelled" if task.cancelled() else f"ended with {task.exception()!r}"
    _RUNNER_DEATHS.append(f"anyio's runner task {how} during {_CURRENT_TEST[0]}; {_recent_cancels()}")
    _RUNNER_DEATHS_UNREPORTED.append(_RUNNER_DEATHS[-1])


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A runner task that ended since the last test is replaced (no cascade of ``ClosedResourceError``
    through the rest of the session), and this test errors with the stacks of whoever cancelled it."""
    from anyio import pytest_plugin

    runner = pytest_plugin._current_runner
    task = getattr(runner, "_runner_task", None)
    if task is not None and task.done():
        runner._runner_task = None  # type: ignore[union-attr]  # anyio starts a new one on demand
    if _RUNNER_DEATHS_UNREPORTED:
        pytest.fail(_RUNNER_DEATHS_UNREPORTED.pop(), pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """A test during which the runner task ended fails, and its report says who cancelled the task."""
    outcome = yield
    report = outcome.get_result()
    if call.when == "call" and _RUNNER_DEATHS_UNREPORTED:
        report.outcome = "failed"
        report.sections.append(("anyio runner task", _RUNNER_DEATHS_UNREPORTED.pop()))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for death in _RUNNER_DEATHS:
        terminalreporter.write_sep("=", "anyio's runner task ended", red=True)
        terminalreporter.write_line(death)


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
    _CURRENT_TEST[0] = item.nodeid
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


class ScopeLeftOpen(AssertionError):
    """A test returned with an anyio cancel scope it entered still open in anyio's runner task."""


async def _no_scope_left_open(body: Awaitable[Any]) -> Any:
    """Await ``body``; fail if it left a cancel scope (a timeout, a task group) open in this task.

    Such a scope (entered in a generator or context manager never closed) stays in the runner task
    that runs every later test: its deadline or a failure in its task group would cancel whatever
    test runs then, or the runner itself between two tests.
    """
    from anyio._backends._asyncio import _task_states

    task = asyncio.current_task()
    state = _task_states.get(task) if task is not None else None
    before = state.cancel_scope if state is not None else None
    try:
        return await body
    finally:
        state = _task_states.get(task) if task is not None else None
        after = state.cancel_scope if state is not None else None
        if after is not before:
            raise ScopeLeftOpen(
                f"the test left {after!r} open in the runner task (deadline {after._deadline},"  # type: ignore[union-attr]
                f" cancelled {after.cancel_called}; the scope around the test: {before!r})"  # type: ignore[union-attr]
            )


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
                return await _no_scope_left_open(test(**kwargs))
            with anyio.fail_after(limit - _BODY_MARGIN):
                return await _no_scope_left_open(test(**kwargs))
        except (asyncio.CancelledError, BaseExceptionGroup) as exc:
            if isinstance(exc, Exception):
                raise  # an ExceptionGroup fails the test as it is
            task = asyncio.current_task()
            while task is not None and hasattr(task, "uncancel") and task.uncancel() > 0:
                pass  # leave the runner task as uncancelled as it was for the next test
            raise StrayCancellation(
                f"{test.__name__} ended with a stray {exc!r}; {_recent_cancels()}"
            ) from exc

    return run


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> None:
    """Run async tests under :func:`_no_stray_cancel`; anyio's plugin runs them next."""
    if inspect.iscoroutinefunction(pyfuncitem.obj) and not hasattr(pyfuncitem.obj, "hypothesis"):
        pyfuncitem.obj = _no_stray_cancel(pyfuncitem.obj, _time_limit(pyfuncitem))
