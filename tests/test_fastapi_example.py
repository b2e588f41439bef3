"""The example service through a real ASGI app: lifespan loads config, requests follow etcd."""

from __future__ import annotations

import importlib
import json
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest
import structlog

from aetcdcfg import EtcdClient
from aetcdcfg.testing import EtcdServer

pytestmark = pytest.mark.anyio


@pytest.fixture
async def service(
    etcd_server: EtcdServer, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[httpx.AsyncClient, EtcdClient, str]]:
    saved = structlog.get_config()  # the example configures structlog at import, as apps may
    monkeypatch.setenv("ETCD_ENDPOINTS", etcd_server.endpoint)
    monkeypatch.setenv("SERVICE_PREFIX", etcd_prefix)
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put_many({etcd_prefix + "rate_limit": "3", etcd_prefix + "maintenance": "false"})
        module = importlib.reload(importlib.import_module("examples.fastapi_app"))
        app = module.app
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://service") as http:
                yield http, client, etcd_prefix
    structlog.configure(**saved)  # keep the example's logging setup from leaking into other tests


async def test_lifespan_loads_config_before_serving(
    service: tuple[httpx.AsyncClient, EtcdClient, str],
) -> None:
    http, _, _ = service
    response = await http.get("/config")
    assert response.status_code == 200
    assert response.json()["rate_limit"] == 3


async def test_rate_limit_and_maintenance_follow_etcd(
    service: tuple[httpx.AsyncClient, EtcdClient, str],
) -> None:
    http, client, prefix = service
    # The limiter's clock stands still: what is measured is the limit, not this machine's speed (on
    # the real clock a burst that straddles a whole second saw no 429 under the old fixed window).
    window = importlib.import_module("examples.fastapi_app").window
    window.clock = lambda: 1000.0
    codes = [(await http.get("/")).status_code for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]  # at most 3 per second

    revision = await client.put(prefix + "rate_limit", "1000")
    with anyio.fail_after(5):
        while (await http.get("/config")).json()["revision"] < revision:
            await anyio.sleep(0.01)
    assert [(await http.get("/")).status_code for _ in range(20)] == [200] * 20

    await client.put(prefix + "maintenance", "on")
    with anyio.fail_after(5):
        while (await http.get("/")).status_code != 503:
            await anyio.sleep(0.01)
    await client.put(prefix + "maintenance", "off")
    with anyio.fail_after(5):
        while (await http.get("/")).status_code != 200:
            await anyio.sleep(0.01)


async def test_invalid_change_keeps_serving_last_good(
    service: tuple[httpx.AsyncClient, EtcdClient, str],
) -> None:
    http, client, prefix = service
    await client.put(prefix + "rate_limit", "zero")
    with anyio.fail_after(5):
        while (await http.get("/config")).json()["last_error"] is None:
            await anyio.sleep(0.01)
    body = (await http.get("/config")).json()
    assert body["rate_limit"] == 3
    assert prefix + "rate_limit" in body["last_error"]


async def test_probes_and_status_page(service: tuple[httpx.AsyncClient, EtcdClient, str]) -> None:
    http, client, prefix = service
    assert (await http.get("/livez")).json() == {"status": "alive"}
    ready = await http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    await client.put(prefix + "db/password", "hunter2-example")
    with anyio.fail_after(5):
        while (await http.get("/config")).json()["revision"] == 0:
            await anyio.sleep(0.01)
        while not (await http.get("/status")).json()["settings"][0]["history"]:
            await anyio.sleep(0.01)
    status = (await http.get("/status")).json()
    assert status["status"] == "fresh"
    fields = {f["field"]: f for f in status["settings"][0]["settings"]["fields"]}
    assert fields["rate_limit"]["value"] == 3 and fields["rate_limit"]["origin"] == prefix + "rate_limit"
    assert fields["db.password"]["value"] == "**********"
    page = await http.get("/status", headers={"accept": "text/html"})
    assert page.headers["content-type"].startswith("text/html")
    assert "hunter2-example" not in page.text + json.dumps(status)
    scraped = await http.get("/metrics")  # what a plain curl gets: no redirect to follow
    assert scraped.status_code == 200, scraped.status_code
    revision = (await http.get("/config")).json()["revision"]
    assert (
        f'aetcdcfg_settings_revision{{model="ServiceSettings",prefix="{prefix}"}} {float(revision)}'
        in scraped.text
    )


def test_rate_limit_holds_for_any_one_second_span() -> None:
    """A burst that straddles a whole second: a counter reset at whole seconds let all of it through
    (and up to 2 x limit within milliseconds); the limit holds for every span of one second."""
    saved = structlog.get_config()
    try:
        module = importlib.import_module("examples.fastapi_app")
    finally:
        structlog.configure(**saved)  # as in the fixture: importing it configures logging
    now = [41.992]

    def clock() -> float:
        return now[0]

    window = module._Window(clock)
    allowed = []
    for _ in range(10):  # 5 ms apart, across 42.000
        allowed.append(window.allow(3))
        now[0] += 0.005
    assert allowed == [True] * 3 + [False] * 7
    now[0] = 42.9925  # the first request's second has passed, the others' not yet
    assert window.allow(3) is True
    assert window.allow(3) is False
