"""Leaving the library's context managers when the body fails or is cancelled.

``contextlib.AsyncExitStack`` set a cancellation's ``__context__`` to itself when the task group in
an EtcdClient or LiveSettings re-raised it while the body's own exception was being handled; the
next exit stack to walk that chain (the user's, FastAPI's lifespan, a test's) looped forever in the
event loop's thread. These tests cancel real clients and settings at several moments and check the
chain, then compare ``aetcdcfg._exits.ExitStack`` with nested ``async with`` blocks exactly.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from pydantic_settings import BaseSettings

from aetcdcfg import EtcdClient, LiveSettings
from aetcdcfg._exits import ExitStack
from aetcdcfg.fastapi import combine_lifespans
from aetcdcfg.testing import EtcdServer

pytestmark = pytest.mark.anyio


class Flags(BaseSettings):
    a: int = 0


def context_cycle(exc: BaseException | None) -> list[str] | None:
    """The exceptions of a ``__context__`` chain that loops back on itself (None: no loop)."""
    seen: list[BaseException] = []
    while exc is not None:
        if any(exc is each for each in seen):
            return [repr(each) for each in seen]
        seen.append(exc)
        exc = exc.__context__
    return None


@contextlib.asynccontextmanager
async def _app_lifespan_with_tasks(app: object) -> AsyncIterator[dict[str, Any]]:
    """An application's own lifespan that keeps a task running while the app serves."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.sleep_forever)
        yield {"started": True}
        tg.cancel_scope.cancel()


def opened(kind: str, server: EtcdServer, client: EtcdClient, prefix: str) -> Any:
    if kind == "client":
        return EtcdClient(endpoints=[server.endpoint])
    if kind == "settings":
        return LiveSettings(Flags, prefix=prefix, client=client)
    if kind == "watch":
        return client.watch(prefix, with_snapshot=True)
    if kind == "lifespan":
        live = LiveSettings(Flags, prefix=prefix, client=client)
        return combine_lifespans(live, _app_lifespan_with_tasks)(None)
    if kind == "layers":
        return LiveSettings(Flags, prefix=[prefix + "shared/", prefix], client=client)
    return LiveSettings(Flags, prefix=prefix)  # its own client, from AETCDCFG_ENDPOINTS


@pytest.mark.parametrize("kind", ["client", "watch", "settings", "layers", "settings_own_client", "lifespan"])
async def test_cancelled_while_opening_or_open_leaves_a_chain_without_loops(
    etcd_server: EtcdServer, etcd_prefix: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled (a deadline) at moments from inside ``__aenter__`` to well after it: the deadline's
    scope catches the cancellation, and no exception's context chain loops, in nested blocks or in
    the user's own ``AsyncExitStack`` (where a loop hung the event loop for good)."""
    monkeypatch.setenv("AETCDCFG_ENDPOINTS", etcd_server.endpoint)
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        for cut, stacked in itertools.product((0.0, 0.01, 0.05, 0.2, 0.5), (False, True)):
            caught: BaseException | None = None
            with anyio.move_on_after(cut) as deadline:
                try:
                    if stacked:
                        async with contextlib.AsyncExitStack() as stack:
                            await stack.enter_async_context(opened(kind, etcd_server, client, etcd_prefix))
                            await anyio.sleep(5)
                    else:
                        async with opened(kind, etcd_server, client, etcd_prefix):
                            await anyio.sleep(5)
                except BaseException as exc:
                    caught = exc
                    raise
            assert deadline.cancelled_caught, (cut, stacked, caught)
            assert context_cycle(caught) is None, (cut, stacked)
        assert (await client.get(etcd_prefix + "a")) is None  # the shared client still works


# -- ExitStack is exactly nested ``async with`` blocks ---------------------------------------------


class Exit:
    """A context manager whose exit does one thing: nothing, raise anew, re-raise, or suppress."""

    def __init__(self, name: str, does: str, log: list[str]) -> None:
        self.name, self.does, self.log = name, does, log

    async def __aenter__(self) -> str:
        self.log.append(f"enter {self.name}")
        return self.name

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        self.log.append(f"exit {self.name} seeing {exc!r}")
        await anyio.lowlevel.checkpoint()
        if self.does == "raise":
            raise RuntimeError(self.name)
        if self.does == "reraise" and exc is not None:
            raise exc
        return self.does == "suppress"


def outcome(exc: BaseException | None) -> list[str]:
    """An exception and its context chain, as comparable text."""
    chain = []
    while exc is not None:
        chain.append(repr(exc))
        exc = exc.__context__
    return chain


BODIES = ["ok", "fails"]
DOES = ["nothing", "raise", "reraise", "suppress"]


async def _nested(does: tuple[str, ...], body: str, log: list[str]) -> None:
    async with Exit("a", does[0], log), Exit("b", does[1], log), Exit("c", does[2], log):
        if body == "fails":
            raise KeyError("body")


async def _stacked(does: tuple[str, ...], body: str, log: list[str]) -> None:
    async with ExitStack() as stack:
        for name, each in zip("abc", does, strict=True):
            await stack.enter_async_context(Exit(name, each, log))
        if body == "fails":
            raise KeyError("body")


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("does", list(itertools.product(DOES, repeat=3)))
async def test_exit_stack_unwinds_as_nested_blocks_do(does: tuple[str, ...], body: str) -> None:
    """Same exits in the same order, each seeing the same exception; the same exception leaves,
    with the same context chain; and (contextlib's defect) never a chain that loops.

    After an exit suppressed an exception, what nested blocks chain to a later exit's exception
    depends on where the suppressed one came from (CPython keeps some handled, not others);
    ExitStack chains the body's exception. There only the exception that leaves is compared."""
    results = []
    for run in (_nested, _stacked):
        log: list[str] = []
        caught = None
        try:
            await run(does, body, log)
        except BaseException as exc:
            caught = exc
        results.append((log, outcome(caught)))
        assert context_cycle(caught) is None
    (nested_log, nested_chain), (log, chain) = results
    assert log == nested_log
    if "suppress" in does:
        assert chain[:1] == nested_chain[:1]
    else:
        assert chain == nested_chain


async def test_exit_stack_callbacks_run_last_in_first_out_and_aclose_raises() -> None:
    calls: list[str] = []

    async def closing(name: str) -> None:
        calls.append(name)
        if name == "first":
            raise ValueError(name)

    stack = ExitStack()
    stack.push_async_callback(closing, "first")
    stack.callback(calls.append, "second")
    with pytest.raises(ValueError, match="first"):
        await stack.aclose()
    assert calls == ["second", "first"]
    await stack.aclose()  # nothing left: nothing runs again
    assert calls == ["second", "first"]


@contextlib.asynccontextmanager
async def _yields() -> AsyncIterator[int]:
    yield 1


async def test_exit_stack_enters_and_returns_what_the_context_gives() -> None:
    async with ExitStack() as stack:
        assert await stack.enter_async_context(_yields()) == 1
