"""The Prometheus collector against real etcd: values from status, computed only when scraped."""

from __future__ import annotations

import anyio
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import SecretStr
from pydantic_settings import BaseSettings

from aetcdcfg import EtcdClient, LiveSettings
from aetcdcfg.metrics import AetcdcfgCollector
from aetcdcfg.testing import EtcdServer

pytestmark = pytest.mark.anyio

SECRET = "s3cr3t-never-in-metrics"


class Service(BaseSettings):
    rate_limit: int = 100
    token: SecretStr = SecretStr("")


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


async def test_collector_reports_watch_and_settings_values(etcd_server: EtcdServer, etcd_prefix: str) -> None:
    registry = CollectorRegistry()
    async with (
        EtcdClient(endpoints=[etcd_server.endpoint]) as client,
        LiveSettings(Service, prefix=etcd_prefix + "svc/", client=client) as live,
        client.watch(etcd_prefix + "raw/") as raw,
    ):
        registry.register(AetcdcfgCollector(live, clients=[client]))
        await client.put(etcd_prefix + "svc/token", SECRET)
        await client.put(etcd_prefix + "svc/rate_limit", "nope")  # rejected
        last = await client.put(etcd_prefix + "raw/a", "1")
        await anext(raw)
        with anyio.fail_after(5):
            while live.status.rejected == 0:
                await anyio.sleep(0.01)
        svc, raw_prefix = {"prefix": etcd_prefix + "svc/"}, {"prefix": etcd_prefix + "raw/"}
        model = {**svc, "model": "Service"}
        assert sample(registry, "aetcdcfg_watch_up", **svc) == 1.0
        assert sample(registry, "aetcdcfg_watch_revision", **raw_prefix) == last
        assert sample(registry, "aetcdcfg_watch_events_total", **raw_prefix) == 1.0
        assert sample(registry, "aetcdcfg_watch_subscribers", **raw_prefix) == 1.0
        assert sample(registry, "aetcdcfg_watch_reconnects_total", **svc) == 0.0
        staleness = sample(registry, "aetcdcfg_watch_staleness_seconds", **svc)
        assert staleness is not None and 0 <= staleness < 5
        assert sample(registry, "aetcdcfg_settings_loaded", **model) == 1.0
        assert sample(registry, "aetcdcfg_settings_applied_total", **model) == 1.0
        assert sample(registry, "aetcdcfg_settings_rejected_total", **model) == 1.0
        assert sample(registry, "aetcdcfg_settings_revision", **model) == live.revision
        text = generate_latest(registry).decode()
    assert SECRET not in text and "nope" not in text
    # after close, the client reports no watch and the settings nothing new
    assert client.watch_statuses() == []


def test_registering_reads_no_status() -> None:
    """describe() gives the families without touching a LiveSettings (not started here)."""
    live = LiveSettings(Service, prefix="/never/started/")
    registry = CollectorRegistry()
    registry.register(AetcdcfgCollector(live))
    text = generate_latest(registry).decode()
    assert "# TYPE aetcdcfg_watch_up gauge" in text and "aetcdcfg_watch_up{" not in text


async def test_every_layer_of_a_layered_live_settings_is_exported_on_every_scrape(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """Each layer has a watch of its own: all of them, every scrape (not the stalest one only, which
    made ``aetcdcfg_watch_*`` series of the other layers appear and vanish between scrapes)."""
    layers = [etcd_prefix + "shared/", etcd_prefix + "svc/", etcd_prefix + "svc/eu/"]
    registry = CollectorRegistry()
    async with (
        EtcdClient(endpoints=[etcd_server.endpoint]) as client,
        LiveSettings(Service, prefix=layers, client=client) as live,
    ):
        registry.register(AetcdcfgCollector(live))
        for n, layer in enumerate(layers):
            await client.put(layer + "rate_limit", str(n + 1))
        await live.wait_for(lambda s: s.rate_limit == len(layers), timeout=5)
        for _ in range(5):
            for layer in layers:
                assert sample(registry, "aetcdcfg_watch_up", prefix=layer) == 1.0, layer
                assert sample(registry, "aetcdcfg_watch_revision", prefix=layer) is not None, layer
        model = {"prefix": live.prefix, "model": "Service"}
        assert sample(registry, "aetcdcfg_settings_loaded", **model) == 1.0
