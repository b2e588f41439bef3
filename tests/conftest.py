"""Shared test setup: asyncio only (the library is asyncio-native via grpc.aio), one loop per session."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session", autouse=True)
async def _one_event_loop(anyio_backend: str) -> AsyncIterator[None]:
    """grpc.aio binds its completion queue to the first event loop it sees; a session-scoped async
    fixture keeps anyio's runner, and so a single loop, alive for every test."""
    yield  # noqa: PT022 (the fixture's lifetime is the point)
