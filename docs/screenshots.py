"""Take the docs' screenshots: ``python docs/screenshots.py`` writes ``docs/img/status.png``.

The status page of ``examples/fastapi_app.py`` (a uvicorn process) following a real etcd, in Debian's
chromium driven by Playwright, as ``tests/test_status_page_browser.py`` does (never Playwright's own
browser downloads). The page shows values from etcd, the environment and defaults, a secret masked,
one applied and one rejected change. Run it after a change to the page, then look at the image.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import httpx

from aetcdcfg import EtcdClient
from aetcdcfg.testing import EtcdServer

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "img" / "status.png"
CHROMIUM = "/usr/bin/chromium"
PREFIX = "/myservice/"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def shoot(endpoint: str) -> None:
    from playwright.async_api import async_playwright, expect

    async with EtcdClient(endpoints=[endpoint]) as client:
        await client.put_many(
            {
                PREFIX + "rate_limit": "100",
                PREFIX + "db/url": "postgresql://db.internal/app",
                PREFIX + "db/password": "hunter2",
            }
        )
        port = free_port()
        env = {
            **os.environ,
            "ETCD_ENDPOINTS": endpoint,
            "SERVICE_PREFIX": PREFIX,
            "LOG_LEVEL": "warning",
            "MYSERVICE_MAINTENANCE": "false",
        }
        command = [sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", "--port", str(port)]
        service = subprocess.Popen([*command, "--log-level", "warning"], cwd=ROOT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            async with httpx.AsyncClient() as http:
                with anyio.fail_after(60):
                    while True:
                        try:
                            if (await http.get(url + "/readyz")).status_code == 200:
                                break
                        except httpx.TransportError:
                            pass
                        await anyio.sleep(0.1)
            async with async_playwright() as playwright, anyio.TemporaryDirectory() as profile:
                browser = await playwright.chromium.launch_persistent_context(
                    profile,
                    executable_path=CHROMIUM,
                    args=CHROMIUM_ARGS,
                    headless=True,
                    viewport={"width": 1200, "height": 860},
                )
                try:
                    page = await browser.new_page()
                    await page.goto(url + "/status")
                    rate_limit = page.locator('tr[data-field="rate_limit"] td.val')
                    await expect(rate_limit).to_have_text("100", timeout=10_000)
                    await client.put(PREFIX + "rate_limit", "250")
                    await expect(rate_limit).to_have_text("250", timeout=10_000)
                    rejected = await client.put(PREFIX + "rate_limit", "0")
                    row = page.locator(f'#history-0 tr[data-revision="{rejected}"]')
                    await expect(row).to_contain_text("rejected", timeout=10_000)
                    await anyio.sleep(1)  # let the staleness counter tick
                    await page.screenshot(path=str(OUT), full_page=True)
                finally:
                    await browser.close()
        finally:
            service.terminate()
            service.wait(timeout=15)


def main() -> None:
    with EtcdServer() as etcd:
        anyio.run(shoot, etcd.endpoint)
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
