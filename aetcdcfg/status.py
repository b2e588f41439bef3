"""Freshness as data: how current a prefix watch (and the settings built on it) is, measured.

``WatchHealth`` is the mutable record a watch loop keeps as it runs (a few attribute stores per
response, nothing more); :class:`WatchStatus` is the immutable snapshot taken from it when somebody
asks (``subscription.status``, ``live.status``, the metrics collector, the status route), so reading
it costs nothing on the per-event path.

*Confirmed current* means etcd said "nothing newer than what you have": an event or a progress
notification on the stream, an answered progress request, or (through etcd's gRPC proxy, which does
not answer those) a liveness read finding no key under the prefix modified after the delivered
revision. While the watch is healthy, staleness stays below ``keepalive_time + keepalive_timeout``;
during an outage it grows with the outage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "AppliedChange",
    "ReportStatus",
    "SettingsStatus",
    "WatchHealth",
    "WatchStateName",
    "WatchStatus",
]

#: ``live``: the stream is up and delivering; ``behind``: up, but a verification through an endpoint
#: that is not etcd itself (its gRPC proxy) found changes in etcd the stream has not delivered yet
#: (it is replaced if they do not come within ``keepalive_timeout``); ``reconnecting``: an outage.
WatchStateName = Literal["connecting", "live", "behind", "reconnecting", "failed", "closed"]


_monotonic = time.monotonic


@dataclass(frozen=True, slots=True)
class WatchStatus:
    """One prefix watch, as of ``taken_at`` (a ``time.time()``)."""

    prefix: str
    state: WatchStateName
    endpoint: str | None
    #: Every change up to this etcd revision has been delivered.
    revision: int
    #: When etcd last confirmed there was nothing newer than ``revision`` (``time.time()``), or None.
    confirmed_at: float | None
    #: Seconds since ``confirmed_at`` (infinite if never confirmed).
    staleness: float
    #: When the current outage began (``time.time()``), None while live.
    outage_started_at: float | None
    #: Seconds of the current outage (0 while live) and of all outages so far, this one included.
    outage_seconds: float
    total_outage_seconds: float
    reconnects: int
    last_error: str | None
    events_delivered: int
    subscribers: int
    #: Subscribers cut off so far for falling a whole buffer behind (``SubscriberLagged``).
    lagged_subscribers: int
    #: The fullest subscriber buffer, as a fraction of its size (0 with no subscriber).
    max_buffer_fill: float
    taken_at: float

    def is_fresh(self, max_staleness: float) -> bool:
        """Confirmed current within the last ``max_staleness`` seconds.

        Deliberately not "connected right now": a blip shorter than the bound leaves the data as
        current as it was, and a readiness probe should not take every pod out of rotation for it.
        """
        return self.staleness <= max_staleness


@dataclass
class WatchHealth:
    """What a watch loop records as it runs; :meth:`snapshot` turns it into a :class:`WatchStatus`.

    Times are ``time.monotonic()``; they become wall-clock times only in the snapshot.
    """

    prefix: str
    state: WatchStateName = "connecting"
    endpoint: str | None = None
    confirmed: float | None = None
    outage_started: float | None = None
    past_outages: float = 0.0
    reconnects: int = 0
    last_error: str | None = None
    events_delivered: int = 0
    lagged_subscribers: int = 0
    #: A revision a verification found in etcd and not delivered (0: none); see ``behind``.
    missing: int = 0

    def confirm(self) -> None:
        """etcd said there is nothing newer than what was delivered (called once per response)."""
        self.confirmed = _monotonic()

    def connected(self, endpoint: str) -> None:
        """A watcher was created on ``endpoint``; ends an outage if there was one."""
        now = _monotonic()
        if self.outage_started is not None:
            self.past_outages += now - self.outage_started
            self.outage_started = None
            self.reconnects += 1
        self.state = "live"
        self.endpoint = endpoint

    def behind(self, revision: int) -> None:
        """A verification found a change at ``revision`` in etcd that the stream has not delivered:
        until it is, a live watch is reported ``behind``."""
        self.missing = revision

    def caught_up(self) -> None:
        """Nothing found undelivered is missing any longer (checked, or the prefix re-listed)."""
        self.missing = 0

    def lost(self, cause: str) -> None:
        """The stream failed; starts an outage unless one is going on."""
        self.last_error = cause
        if self.outage_started is None:
            self.outage_started = _monotonic()
        if self.state != "failed":
            self.state = "reconnecting"

    def failed(self, error: str) -> None:
        self.last_error = error
        self.state = "failed"
        if self.outage_started is None:
            self.outage_started = _monotonic()

    def snapshot(self, revision: int, subscribers: int, max_buffer_fill: float = 0.0) -> WatchStatus:
        now = _monotonic()
        wall = time.time()
        outage = now - self.outage_started if self.outage_started is not None else 0.0
        confirmed = self.confirmed
        state = self.state
        if state == "live" and revision < self.missing:
            state = "behind"
        return WatchStatus(
            prefix=self.prefix,
            state=state,
            endpoint=self.endpoint,
            revision=revision,
            confirmed_at=None if confirmed is None else wall - (now - confirmed),
            staleness=float("inf") if confirmed is None else now - confirmed,
            outage_started_at=None if self.outage_started is None else wall - outage,
            outage_seconds=outage,
            total_outage_seconds=self.past_outages + outage,
            reconnects=self.reconnects,
            last_error=self.last_error,
            events_delivered=self.events_delivered,
            subscribers=subscribers,
            lagged_subscribers=self.lagged_subscribers,
            max_buffer_fill=max_buffer_fill,
            taken_at=wall,
        )


@dataclass(frozen=True, slots=True)
class AppliedChange:
    """One revision LiveSettings applied or rejected: which keys changed, never their values."""

    revision: int
    applied: bool
    keys: tuple[str, ...]
    #: For a rejected revision: the validation problems (field and message, never the value).
    problems: tuple[str, ...] = ()
    at: float = field(default_factory=time.time)


@dataclass(frozen=True, slots=True)
class ReportStatus:
    """A LiveSettings' own instance record: is it in etcd, and what it took to keep it there."""

    instance: str
    labels: tuple[tuple[str, str], ...]
    #: The records were written under the current lease and etcd confirmed that lease within its
    #: TTL (refreshes failing for a whole TTL turn it false).
    in_etcd: bool
    lease: int | None
    writes: int
    leases_lost: int
    failures: int
    last_error: str | None


@dataclass(frozen=True, slots=True)
class SettingsStatus:
    """A LiveSettings, as of ``watch.taken_at``: what it serves, since when, and how fresh it is."""

    prefix: str
    model: str
    #: The etcd revision the settings in force reflect.
    revision: int
    loaded: bool
    #: The watch of the only layer, or of the stalest layer when there are several.
    watch: WatchStatus
    #: Each layer's watch, in layer order (one element for a single prefix).
    layers: tuple[WatchStatus, ...]
    applied: int
    rejected: int
    #: The latest rejected revision (keys and problems, never values), or None.
    last_rejected: AppliedChange | None
    #: The most recent applied and rejected revisions, oldest first.
    history: tuple[AppliedChange, ...]
    #: Its instance record (None when it does not report: ``report=False``).
    report: ReportStatus | None = None

    @property
    def staleness(self) -> float:
        return self.watch.staleness

    def is_fresh(self, max_staleness: float) -> bool:
        """Loaded, and its watch confirmed current within the last ``max_staleness`` seconds."""
        return self.loaded and self.watch.is_fresh(max_staleness)
