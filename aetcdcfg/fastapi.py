"""FastAPI glue (the ``fastapi`` extra): load settings before serving, hand each request a snapshot.

``app = FastAPI(lifespan=live.lifespan)`` is all the lifespan needs; :func:`settings_dependency`
gives route handlers the settings object current when the request started, so one request never sees
two different configurations.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from pydantic import BaseModel

from .live import LiveSettings

try:
    import fastapi as _fastapi  # noqa: F401  (only to fail early with a clear message)
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("aetcdcfg.fastapi needs FastAPI: pip install 'aetcdcfg[fastapi]'") from exc

__all__ = ["combine_lifespans", "settings_dependency"]

ModelT = TypeVar("ModelT", bound=BaseModel)
Lifespan = Callable[[Any], contextlib.AbstractAsyncContextManager[Any]]


def settings_dependency(live: LiveSettings[ModelT]) -> Callable[[], ModelT]:
    """A dependency for ``Depends(...)`` returning the settings current when the request started."""

    def current_settings() -> ModelT:
        return live.current

    return current_settings


def combine_lifespans(live: LiveSettings[Any], app_lifespan: Lifespan | None = None) -> Lifespan:
    """A lifespan that loads ``live`` first, then runs the application's own lifespan inside it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
        async with live.lifespan(app) as state:
            if app_lifespan is None:
                yield state
                return
            async with app_lifespan(app) as more:
                yield {**state, **(more or {})}

    return lifespan
