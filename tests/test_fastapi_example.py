"""The example service through a real ASGI app: lifespan loads config, requests follow etcd."""

from __future__ import annotations

import importlib
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
    codes = [(await http.get("/")).status_code for _ in range(5)]
    assert codes.count(429) >= 1  # at most 3 per second

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
