"""The fleet view of the status page in the real browser (Debian's chromium, Playwright): the example
service (a uvicorn process) and two more real instances, against real etcd; a canary, a rejection
and an instance leaving reach the open page over its event stream.

``AETCDCFG_SCREENSHOT=docs/fleet-view.png`` saves a screenshot (``docs/img/status.png`` is the
other browser test's).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from pydantic import Field
from pydantic_settings import BaseSettings

from aetcdcfg import EtcdClient, LiveSettings, Selector, open_canary
from aetcdcfg.testing import EtcdServer

from .test_status_page_browser import CHROMIUM_ARGS, ROOT, SECRET, TIMEOUT_MS, chromium, example_service

pytestmark = pytest.mark.anyio
__all__ = ["chromium", "example_service"]  # fixtures shared with the status page's browser test


class Service(BaseSettings):
    """Another build of the service: reads the same keys, accepts at most 500."""

    rate_limit: int = Field(default=100, ge=1, le=500)


@pytest.fixture
def web_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example service's identity (it reads the environment when it starts)."""
    monkeypatch.setenv("AETCDCFG_INSTANCE", "web-1")
    monkeypatch.setenv("AETCDCFG_LABELS", "zone=a,version=1.4")


async def test_the_status_page_shows_the_fleet_live(
    web_identity: None,
    chromium: Path,
    example_service: tuple[str, EtcdClient],
    etcd_prefix: str,
    etcd_server: object,
    tmp_path: Path,
) -> None:
    from playwright.async_api import async_playwright, expect

    url, client = example_service
    endpoint = client.settings.endpoints[0]
    async with contextlib.AsyncExitStack() as stack:
        leaving = contextlib.AsyncExitStack()  # web-2, entered last so that it can leave first
        for name, labels in (
            ("web-3", {"zone": "b", "version": "1.3"}),
            ("web-2", {"zone": "b", "version": "1.4"}),
        ):
            into = stack if name == "web-3" else leaving
            own = await into.enter_async_context(EtcdClient(endpoints=[endpoint]))
            await into.enter_async_context(
                LiveSettings(Service, prefix=etcd_prefix, client=own, instance=name, labels=labels)
            )
        stack.push_async_callback(leaving.aclose)
        playwright = await stack.enter_async_context(async_playwright())
        browser = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(chromium),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1200, "height": 1300},
        )
        stack.push_async_callback(browser.close)
        page = await browser.new_page()
        await page.goto(url + "/status")
        rows = page.locator("#fleet-0 tr[data-instance]")
        await expect(rows).to_have_count(3, timeout=TIMEOUT_MS)
        await expect(page.locator('#fleet-0 tr[data-instance="web-1"]')).to_contain_text("(this one)")
        await expect(page.locator('#fleet-0 tr[data-instance="web-2"]')).to_contain_text("zone=b")
        await expect(page.locator("#conn")).to_have_class("conn up", timeout=TIMEOUT_MS)
        await page.evaluate("window.notReloaded = true")

        # a change only the example service accepts: web-2 and web-3 reject it, with the problem
        rejected = await client.put(etcd_prefix + "rate_limit", "900")
        row = page.locator('#fleet-0 tr[data-instance="web-3"]')
        await expect(row).to_have_attribute("data-state", "rejecting", timeout=TIMEOUT_MS)
        await expect(row).to_contain_text("less than or equal to 500")
        await expect(page.locator('#fleet-0 tr[data-instance="web-1"]')).to_contain_text(str(rejected))

        # a canary for zone=b (300, which they accept): its members are marked, and current again
        opened = await open_canary(client, etcd_prefix, {"rate_limit": b"300"}, Selector.parse("zone=b"))
        for name in ("web-2", "web-3"):
            row = page.locator(f'#fleet-0 tr[data-instance="{name}"]')
            await expect(row).to_have_attribute("data-canary", "true", timeout=TIMEOUT_MS)
            await expect(row).to_contain_text(str(opened))
            await expect(row).to_have_attribute("data-state", "current")
        await expect(page.locator('#fleet-0 tr[data-instance="web-1"]')).to_have_attribute(
            "data-canary", "false"
        )

        screenshot = os.environ.get("AETCDCFG_SCREENSHOT")
        if screenshot:
            await page.locator("#fleet-0").scroll_into_view_if_needed()
            await page.screenshot(path=str(ROOT / screenshot), full_page=True)

        # an instance that leaves disappears from the page (a clean exit revokes its lease)
        await leaving.aclose()
        await expect(page.locator('#fleet-0 tr[data-instance="web-2"]')).to_have_count(0, timeout=TIMEOUT_MS)
        await expect(rows).to_have_count(2)
        assert await page.evaluate("window.notReloaded") is True
        html = await page.content()
        assert SECRET not in html


async def test_the_status_page_shows_the_fleet_of_every_layer(
    chromium: Path, etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path
) -> None:
    """Two services layer a shared prefix: each one's page shows its own prefix's fleet and the
    shared prefix's (both services), each instance judged by the changes of that prefix."""
    from fastapi import FastAPI
    from playwright.async_api import async_playwright, expect

    from aetcdcfg.fastapi import status_router

    from .test_status_routes import serving

    shared, mine, theirs = etcd_prefix + "shared/", etcd_prefix + "a/", etcd_prefix + "b/"
    async with contextlib.AsyncExitStack() as stack:
        client = await stack.enter_async_context(EtcdClient(endpoints=[etcd_server.endpoint]))
        live = LiveSettings(Service, prefix=[shared, mine], client=client, instance="svc-a")
        await stack.enter_async_context(live)
        other = await stack.enter_async_context(EtcdClient(endpoints=[etcd_server.endpoint]))
        await stack.enter_async_context(
            LiveSettings(Service, prefix=[shared, theirs], client=other, instance="svc-b")
        )
        app = FastAPI()
        app.include_router(status_router(live))
        url = await stack.enter_async_context(serving(app))
        playwright = await stack.enter_async_context(async_playwright())
        browser = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True
        )
        stack.push_async_callback(browser.close)
        page = await browser.new_page()
        await page.goto(url + "/status")
        own, layer = page.locator("#fleet-0"), page.locator("#fleet-0-0")
        await expect(own.locator("tr[data-instance]")).to_have_count(1, timeout=TIMEOUT_MS)
        await expect(layer.locator("tr[data-instance]")).to_have_count(2, timeout=TIMEOUT_MS)
        await expect(own).to_have_attribute("data-prefix", mine)
        await expect(layer).to_have_attribute("data-prefix", shared)
        await expect(page.locator("h3", has_text=f"Fleet: 2 live instance(s) of {shared}")).to_have_count(1)

        # only svc-b reads b/: on the shared prefix svc-a is no less current for it
        changed = await client.put(theirs + "rate_limit", "7")
        row_b = layer.locator('tr[data-instance="svc-b"]')
        await expect(row_b).to_contain_text(str(changed), timeout=TIMEOUT_MS)
        await expect(layer.locator('tr[data-instance="svc-a"]')).to_have_attribute("data-state", "current")
        await expect(row_b).to_have_attribute("data-state", "current")
        # a change of the shared prefix reaches both rows, live
        changed = await client.put(shared + "rate_limit", "9")
        for name in ("svc-a", "svc-b"):
            row = layer.locator(f'tr[data-instance="{name}"]')
            await expect(row).to_contain_text(str(changed), timeout=TIMEOUT_MS)
            await expect(row).to_have_attribute("data-state", "current")
