"""A rate-limited FastAPI service whose limits and maintenance switch live in etcd.

Run it with ``ETCD_ENDPOINTS=http://127.0.0.1:2379 uvicorn examples.fastapi_app:app
--timeout-graceful-shutdown 30`` (at least ``STREAM_LIFETIME``: else a status page client that stops
reading holds uvicorn's shutdown without limit, see docs/production.md#probes); change
``/myservice/rate_limit`` or ``/myservice/maintenance`` in etcd and every copy follows within
milliseconds, without a restart.

Operations, by Kubernetes' convention: ``GET /livez`` (the process serves), ``GET /readyz`` (503 until
the config is loaded, and while etcd has not confirmed it current for 30 s), ``GET /status`` (JSON;
in a browser, a page that follows the config live: values with their sources, secrets masked,
freshness, and the recent applied and rejected revisions), and ``GET /metrics`` (Prometheus).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from typing import Annotated, Any

import structlog
from fastapi import Depends, FastAPI, HTTPException, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from aetcdcfg import LiveSettings
from aetcdcfg.fastapi import probes_router, settings_dependency, status_router
from aetcdcfg.metrics import AetcdcfgCollector

# Logging is the application's choice (the library never configures it): LOG_LEVEL=warning quiets it.
structlog.configure(
    wrapper_class=structlog.make_filtering_bound_logger(
        # a level's name to its number (getLevelNamesMapping() would need Python 3.11)
        logging.getLevelName(os.environ.get("LOG_LEVEL", "info").upper())
    )
)


class Database(BaseModel):
    url: str = "sqlite:///service.db"
    password: SecretStr = SecretStr("")


class ServiceSettings(BaseSettings):
    """What operators may change at run time, under /myservice/ in etcd."""

    model_config = SettingsConfigDict(env_prefix="MYSERVICE_")

    rate_limit: int = Field(default=100, ge=1, description="Requests per second this copy serves.")
    maintenance: bool = False
    db: Database = Database()


#: When each revision was applied in this process (wall clock), so a demo can measure propagation.
applied: list[dict[str, Any]] = []


def record(settings: ServiceSettings) -> None:
    applied.append(
        {
            "revision": live.revision,
            "at": time.time(),
            "rate_limit": settings.rate_limit,
            "maintenance": settings.maintenance,
        }
    )
    del applied[:-100]


#: How long one status page event stream lasts before the browser reconnects; uvicorn's
#: ``--timeout-graceful-shutdown`` must be at least this (every launch in the repository sets 30).
STREAM_LIFETIME = 30.0

live = LiveSettings(ServiceSettings, prefix=os.environ.get("SERVICE_PREFIX", "/myservice/"), on_change=record)
app = FastAPI(lifespan=live.lifespan)
app.include_router(probes_router(live, max_staleness=30))  # GET /livez, GET /readyz
# operators only: keep it off the public ingress
app.include_router(status_router(live, path="/status", stream_lifetime=STREAM_LIFETIME))
metrics = CollectorRegistry()  # a registry of its own, so importing this module twice never clashes
metrics.register(AetcdcfgCollector(live))
Settings = Annotated[ServiceSettings, Depends(settings_dependency(live))]


@app.get("/metrics", include_in_schema=False)
async def scrape() -> Response:
    """Prometheus: computed when scraped, nothing per event (a route, so /metrics answers 200, no 307)."""
    return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)


class _Window:
    """At most ``limit`` requests in any one-second span: a log of the recent ones, not a counter reset
    at whole seconds (that lets 2 x limit through around a boundary, and a burst that straddles one
    may see no refusal at all)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.served: deque[float] = deque()

    def allow(self, limit: int) -> bool:
        now = self.clock()
        served = self.served
        while served and served[0] <= now - 1.0:
            served.popleft()
        if len(served) >= limit:
            return False
        served.append(now)
        return True


window = _Window()


@app.get("/")
async def index(settings: Settings) -> dict[str, Any]:
    if settings.maintenance:
        raise HTTPException(status_code=503, detail="down for maintenance")
    if not window.allow(settings.rate_limit):
        raise HTTPException(status_code=429, detail=f"over {settings.rate_limit} requests per second")
    return {"ok": True, "rate_limit": settings.rate_limit}


@app.get("/config")
async def config(settings: Settings) -> dict[str, Any]:
    return {
        "rate_limit": settings.rate_limit,
        "maintenance": settings.maintenance,
        "db_url": settings.db.url,
        "revision": live.revision,
        "last_error": str(live.last_error) if live.last_error else None,
        "applied": applied,
    }
