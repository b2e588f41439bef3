"""Freshness you can see, against real etcd: status objects, staleness through an outage, rejections.

The watcher probes a silent stream after 1 s and gives up 1 s later (``WATCHER_OPTIONS``), so while
healthy a watch is confirmed current at least every ~2 s, and an outage shows within that.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import anyio
import pytest
from pydantic import SecretStr
from pydantic_settings import BaseSettings
from structlog.testing import capture_logs

from aetcdcfg import EtcdClient, LiveSettings, SettingsStatus, WatchStatus
from aetcdcfg.testing import EtcdServer

from .harness import MEMBER_OPTIONS, RECOVERY_BOUND, WATCHER_OPTIONS, wait_logged

pytestmark = pytest.mark.anyio

WINDOW = WATCHER_OPTIONS["keepalive_time"] + WATCHER_OPTIONS["keepalive_timeout"]
SECRET = "hunter2-do-not-show"


class Service(BaseSettings):
    rate_limit: int = 100
    token: SecretStr = SecretStr("")


@pytest.fixture
def server() -> Iterator[EtcdServer]:
    """A member of this test's own, which the test kills."""
    with EtcdServer(**MEMBER_OPTIONS) as private:
        yield private


async def test_subscription_status_reports_a_live_confirmed_watch(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with EtcdClient(endpoints=[etcd_server.endpoint], **WATCHER_OPTIONS) as client:
        async with client.watch(etcd_prefix) as sub, client.watch(etcd_prefix):
            revision = await client.put(etcd_prefix + "a", "1")
            await anext(sub)
            status = sub.status
            assert isinstance(status, WatchStatus)
            assert (status.state, status.endpoint, status.revision) == (
                "live",
                etcd_server.endpoint,
                revision,
            )
            assert status.subscribers == 2 and status.events_delivered == 1
            assert status.reconnects == 0 and status.outage_started_at is None and status.outage_seconds == 0
            assert status.confirmed_at is not None and status.confirmed_at <= time.time()
            # idle for three windows: the probes keep confirming it
            await anyio.sleep(3 * WINDOW)
            assert sub.status.staleness < WINDOW + 0.5
            assert sub.status.is_fresh(WINDOW + 0.5)


async def test_staleness_grows_through_an_outage_and_recovers(server: EtcdServer, etcd_prefix: str) -> None:
    """Every endpoint killed: staleness rises, is_fresh turns false within the bound plus a window,
    settings keep serving; etcd back: fresh again right after the watch resumes."""
    bound = 3.0
    with capture_logs() as logs, anyio.fail_after(60):
        async with (
            EtcdClient(endpoints=[server.endpoint], **WATCHER_OPTIONS) as client,
            LiveSettings(Service, prefix=etcd_prefix, client=client) as live,
        ):
            await client.put(etcd_prefix + "rate_limit", "7")
            await live.wait_for(lambda s: s.rate_limit == 7, timeout=5)
            assert live.is_fresh(bound)
            server.kill()
            killed = time.monotonic()
            while live.is_fresh(bound):
                await anyio.sleep(0.05)
            went_stale = time.monotonic() - killed
            # the last confirmation came at most a window before the kill: a blip shorter than the
            # bound does not make the settings stale
            assert bound - WINDOW <= went_stale <= bound + 0.5, went_stale
            status = live.status
            assert status.watch.state == "reconnecting" and status.watch.last_error
            assert status.watch.outage_started_at is not None
            await anyio.sleep(1.0)
            later = live.status
            assert later.staleness > status.staleness and later.watch.outage_seconds > 1.0
            assert live.current.rate_limit == 7  # still serving the last good settings

            await anyio.to_thread.run_sync(server.restart)
            restarted = time.monotonic()
            await wait_logged(logs, "watch.resumed", etcd_prefix, timeout=RECOVERY_BOUND)
            resumed = time.monotonic()
            while not live.is_fresh(bound):
                await anyio.sleep(0.02)
            fresh = time.monotonic()
            assert fresh - resumed <= 1.0, (fresh - resumed, resumed - restarted)
            status = live.status
            assert status.watch.state == "live" and status.watch.reconnects == 1
            assert status.watch.outage_started_at is None and status.watch.total_outage_seconds > 1.0
    print(f"\nSTALE after {went_stale:.2f}s (bound {bound}s); FRESH {fresh - restarted:.2f}s after restart")


async def test_rejected_change_shows_keys_and_problems_never_values(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with (
        EtcdClient(endpoints=[etcd_server.endpoint]) as client,
        LiveSettings(Service, prefix=etcd_prefix, client=client) as live,
    ):
        good = await client.put_many({etcd_prefix + "rate_limit": "5", etcd_prefix + "token": SECRET})
        await live.wait_for(lambda s: s.rate_limit == 5, timeout=5)
        bad = await client.put_many(
            {etcd_prefix + "rate_limit": "not-a-number", etcd_prefix + "token": "x" + SECRET}
        )
        with anyio.fail_after(5):
            while live.status.rejected == 0:
                await anyio.sleep(0.01)
        status = live.status
    assert isinstance(status, SettingsStatus)
    assert (status.revision, status.applied, status.rejected) == (good, 1, 1)
    assert status.last_rejected is not None
    assert status.last_rejected.revision == bad and not status.last_rejected.applied
    assert set(status.last_rejected.keys) == {etcd_prefix + "rate_limit", etcd_prefix + "token"}
    assert any("rate_limit" in problem for problem in status.last_rejected.problems)
    assert [(c.revision, c.applied) for c in status.history] == [(good, True), (bad, False)]
    assert SECRET not in repr(status) and "not-a-number" not in repr(status)
