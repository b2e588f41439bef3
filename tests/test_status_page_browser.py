"""The status page in a real browser: Debian's chromium, driven by Playwright, against the example
service (a uvicorn process) and real etcd. The page must follow etcd live over server-sent events.

Skipped where ``/usr/bin/chromium`` is missing, except in CI (``CI=true``), where that is a failure
(``.ci/run`` installs it). ``AETCDCFG_SCREENSHOT=docs/img/status.png`` saves a screenshot; the docs'
own is taken by ``docs/screenshots.py``.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest

from aetcdcfg import EtcdClient
from aetcdcfg.testing import EtcdServer

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SECRET = "hunter2-browser-secret"
TIMEOUT_MS = 10_000


@pytest.fixture
def chromium() -> Path:
    if not CHROMIUM.exists():
        why = f"{CHROMIUM} is missing (apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why}: CI must run the browser test")
        pytest.skip(why)
    return CHROMIUM


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def example_service(etcd_server: EtcdServer, etcd_prefix: str) -> AsyncIterator[tuple[str, EtcdClient]]:
    """examples.fastapi_app in a uvicorn process of its own, following ``etcd_prefix``."""
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put_many(
            {
                etcd_prefix + "rate_limit": "100",
                etcd_prefix + "db/url": "postgresql://db.internal/app",
                etcd_prefix + "db/password": SECRET,
            }
        )
        port = free_port()
        env = {
            **os.environ,
            "ETCD_ENDPOINTS": etcd_server.endpoint,
            "SERVICE_PREFIX": etcd_prefix,
            "LOG_LEVEL": "warning",
            "MYSERVICE_MAINTENANCE": "false",  # one value from the environment, for the page to show
        }
        command = [sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", "--port", str(port)]
        process = await anyio.open_process(
            [*command, "--log-level", "warning"], cwd=ROOT, env=env, stdout=None, stderr=None
        )
        url = f"http://127.0.0.1:{port}"
        try:
            async with httpx.AsyncClient() as http:
                with anyio.fail_after(60):
                    while True:
                        assert process.returncode is None, "the example service exited"
                        try:
                            if (await http.get(url + "/readyz")).status_code == 200:
                                break
                        except httpx.TransportError:
                            pass
                        await anyio.sleep(0.1)
            yield url, client
        finally:
            process.terminate()
            with anyio.fail_after(15):
                await process.wait()


async def test_status_page_shows_settings_and_follows_etcd_live(
    chromium: Path,
    example_service: tuple[str, EtcdClient],
    etcd_prefix: str,
    tmp_path: Path,
) -> None:
    from playwright.async_api import async_playwright, expect

    url, client = example_service
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh user-data-dir
            executable_path=str(chromium),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1200, "height": 900},
        )
        try:
            page = await browser.new_page()
            await page.goto(url + "/status")
            rate_limit = page.locator('tr[data-field="rate_limit"]')
            await expect(rate_limit.locator("td.val")).to_have_text("100", timeout=TIMEOUT_MS)
            await expect(rate_limit).to_contain_text(etcd_prefix + "rate_limit")
            await expect(page.locator("#overall")).to_have_attribute("data-badge", "fresh")
            await expect(page.locator("#conn")).to_have_class("conn up", timeout=TIMEOUT_MS)  # SSE open
            password = page.locator('tr[data-field="db.password"]')
            await expect(password.locator("td.val")).to_have_text("•••••• secret")
            await expect(password).to_contain_text(etcd_prefix + "db/password")
            await expect(page.locator('tr[data-field="maintenance"]')).to_contain_text(
                "MYSERVICE_MAINTENANCE"
            )
            await page.evaluate("window.notReloaded = true")

            # a change in etcd reaches the open page over its event stream, without a reload
            applied = await client.put(etcd_prefix + "rate_limit", "250")
            await expect(rate_limit.locator("td.val")).to_have_text("250", timeout=TIMEOUT_MS)
            await expect(page.locator("#revision-0")).to_have_text(str(applied))
            await expect(page.locator(f'#history-0 tr[data-revision="{applied}"]')).to_contain_text("applied")

            # a rejected change shows in the history and as an alert, without its value
            rejected = await client.put(etcd_prefix + "rate_limit", "-31337")
            row = page.locator(f'#history-0 tr[data-revision="{rejected}"]')
            await expect(row).to_contain_text("rejected", timeout=TIMEOUT_MS)
            await expect(row).to_contain_text("greater than or equal to 1")
            await expect(page.locator("#rejected-0")).to_contain_text(f"Revision {rejected} rejected")
            await expect(rate_limit.locator("td.val")).to_have_text("250")
            await expect(rate_limit).to_contain_text("newer value rejected")
            assert await page.evaluate("window.notReloaded") is True

            html = await page.content()
            assert SECRET not in html and "-31337" not in html
            screenshot = os.environ.get("AETCDCFG_SCREENSHOT")
            if screenshot:
                await page.screenshot(path=str(ROOT / screenshot))
        finally:
            await browser.close()
