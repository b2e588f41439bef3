"""Shared fixtures: the anyio backend (asyncio only; the library is asyncio-native via grpc.aio)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"
