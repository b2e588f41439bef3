"""Prometheus metrics (the ``metrics`` extra): a collector that reads status only when scraped.

::

    from fastapi import Response
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
    from aetcdcfg.metrics import AetcdcfgCollector

    REGISTRY.register(AetcdcfgCollector(live, clients=[client]))

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:  # a route: a mounted app would answer /metrics with a 307
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

Why ``prometheus_client`` and a custom collector rather than the OpenTelemetry metrics API: it is what
a Python service exposing ``/metrics`` already has, and a collector computes every value from
``WatchStatus``/``SettingsStatus`` at scrape time, so the per-event path pays nothing for metrics —
not even a counter increment — whether or not anybody scrapes. OpenTelemetry users can scrape it with
the collector's Prometheus receiver. Labels are the prefix and the model's name: never a key's value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .client import EtcdClient
from .live import LiveSettings
from .status import ReportStatus, SettingsStatus, WatchStatus

try:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("aetcdcfg.metrics needs prometheus_client: pip install 'aetcdcfg[metrics]'") from exc

__all__ = ["AetcdcfgCollector"]


Family = type[GaugeMetricFamily] | type[CounterMetricFamily]

#: (kind, name, help, value) of each metric labelled by prefix (counters get ``_total`` appended).
WATCH_METRICS: list[tuple[Family, str, str, Callable[[WatchStatus], float]]] = [
    (
        GaugeMetricFamily,
        "aetcdcfg_watch_up",
        "1 while the prefix watch is connected",
        lambda w: w.state in ("live", "behind"),
    ),
    (
        GaugeMetricFamily,
        "aetcdcfg_watch_staleness_seconds",
        "Seconds since etcd last confirmed the watch current",
        lambda w: w.staleness,
    ),
    (GaugeMetricFamily, "aetcdcfg_watch_revision", "etcd revision delivered up to", lambda w: w.revision),
    (
        CounterMetricFamily,
        "aetcdcfg_watch_reconnects",
        "Streams re-established after a failure",
        lambda w: w.reconnects,
    ),
    (
        CounterMetricFamily,
        "aetcdcfg_watch_outage_seconds",
        "Seconds spent disconnected, the current outage included",
        lambda w: w.total_outage_seconds,
    ),
    (
        CounterMetricFamily,
        "aetcdcfg_watch_events",
        "Events delivered by the watch",
        lambda w: w.events_delivered,
    ),
    (
        GaugeMetricFamily,
        "aetcdcfg_watch_subscribers",
        "Subscriptions sharing the watch",
        lambda w: w.subscribers,
    ),
    (
        GaugeMetricFamily,
        "aetcdcfg_watch_subscriber_buffer_fill_ratio",
        "The fullest subscriber buffer, as a fraction of its size",
        lambda w: w.max_buffer_fill,
    ),
    (
        CounterMetricFamily,
        "aetcdcfg_watch_lagged_subscribers",
        "Subscribers cut off for falling a whole buffer behind",
        lambda w: w.lagged_subscribers,
    ),
]
#: The same for each LiveSettings, labelled by prefix and model.
SETTINGS_METRICS: list[tuple[Family, str, str, Callable[[SettingsStatus], float]]] = [
    (GaugeMetricFamily, "aetcdcfg_settings_loaded", "1 once the settings loaded", lambda s: s.loaded),
    (
        GaugeMetricFamily,
        "aetcdcfg_settings_revision",
        "etcd revision of the settings in force",
        lambda s: s.revision,
    ),
    (
        CounterMetricFamily,
        "aetcdcfg_settings_applied",
        "Config revisions validated and applied",
        lambda s: s.applied,
    ),
    (
        CounterMetricFamily,
        "aetcdcfg_settings_rejected",
        "Config revisions rejected by validation",
        lambda s: s.rejected,
    ),
]

#: The instance record of each reporting LiveSettings, labelled by prefix, model and instance id.
RECORD_METRICS: list[tuple[Family, str, str, Callable[[ReportStatus], float]]] = [
    (
        GaugeMetricFamily,
        "aetcdcfg_instance_record_up",
        "1 while this instance's record is in etcd (as of its last write or lease refresh)",
        lambda r: r.in_etcd,
    ),
    (
        CounterMetricFamily,
        "aetcdcfg_instance_record_writes",
        "Writes of this instance's record (coalesced: at most 4 per second)",
        lambda r: r.writes,
    ),
    (
        CounterMetricFamily,
        "aetcdcfg_instance_record_leases_lost",
        "Times etcd no longer held the record's lease (a new one was granted)",
        lambda r: r.leases_lost,
    ),
    (
        CounterMetricFamily,
        "aetcdcfg_instance_record_failures",
        "Failed writes or lease refreshes of the record (retried)",
        lambda r: r.failures,
    ),
]


class AetcdcfgCollector(Collector):
    """Watch and settings metrics of the given LiveSettings and clients, computed when collected.

    A prefix watched by two of the given clients is reported once (the first one given). A layered
    LiveSettings reports the watch of each of its layers.
    """

    def __init__(self, *settings: LiveSettings[Any], clients: Iterable[EtcdClient] = ()) -> None:
        self._settings = settings
        self._clients = tuple(clients)

    def describe(self) -> Iterable[Metric]:
        """The metric families without samples (so registering never reads a status)."""
        return self._collect({}, [])

    def collect(self) -> Iterable[Metric]:
        watches: dict[str, WatchStatus] = {}
        for client in self._clients:
            for watch in client.watch_statuses():
                watches.setdefault(watch.prefix, watch)
        rows: list[SettingsStatus] = []
        for live in self._settings:
            try:
                row = live.status
            except RuntimeError:  # not started yet: nothing to report
                continue
            for watch in row.layers:  # every layer's watch (row.watch is only the stalest)
                watches.setdefault(watch.prefix, watch)
            rows.append(row)
        return self._collect(watches, rows)

    @staticmethod
    def _collect(watches: dict[str, WatchStatus], rows: list[SettingsStatus]) -> list[Metric]:
        families: list[Metric] = []
        for kind, name, text, watch_value in WATCH_METRICS:
            family = kind(name, text, labels=["prefix"])
            for prefix, watch in watches.items():
                family.add_metric([prefix], float(watch_value(watch)))
            families.append(family)
        for kind, name, text, settings_value in SETTINGS_METRICS:
            family = kind(name, text, labels=["prefix", "model"])
            for row in rows:
                family.add_metric([row.prefix, row.model], float(settings_value(row)))
            families.append(family)
        for kind, name, text, record_value in RECORD_METRICS:
            family = kind(name, text, labels=["prefix", "model", "instance"])
            for row in rows:
                if row.report is not None:
                    family.add_metric(
                        [row.prefix, row.model, row.report.instance], float(record_value(row.report))
                    )
            families.append(family)
        return families
