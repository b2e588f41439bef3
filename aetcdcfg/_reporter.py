"""Reporter: keeps a LiveSettings' instance records in etcd, bound to one lease.

One task per LiveSettings (in its task group). It grants a lease, puts one record per layer prefix
in one transaction bound to it, refreshes the lease every TTL/3 (over one LeaseKeepAlive stream
kept open), and writes again when something
changed (coalesced by ``_records.WriteSchedule``: at most one write per 0.25 s) or when freshness
flips. A lease etcd no longer holds (expired during a partition, etcd restarted empty) is granted
again and the records re-put under the same keys. Reporting never blocks or fails the settings:
errors are logged (``fleet.*``) and retried with backoff. On a clean exit the lease is revoked, so
the records disappear at once instead of after the TTL.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import anyio

from ._backoff import Backoff
from ._connection import LeaseKeeper
from ._grpc_errors import LeaseNotFound
from ._log import Logger
from ._records import InstanceRecord, WriteSchedule, record_key
from .client import EtcdClient
from .errors import AetcdcfgError, PermissionDenied
from .status import ReportStatus

__all__ = ["DEFAULT_TTL", "Reporter"]

#: Seconds a record outlives its process (the lease's TTL).
DEFAULT_TTL = 10
#: How often freshness is looked at between writes (a flip is written within this).
FRESHNESS_CHECK = 1.0


class Reporter:
    """Writes ``build()``'s record under every prefix in ``prefixes`` while :meth:`run` runs."""

    def __init__(
        self,
        client: EtcdClient,
        instance: str,
        prefixes: Sequence[str],
        build: Callable[[], InstanceRecord],
        fresh: Callable[[], bool],
        log: Logger,
        *,
        ttl: int = DEFAULT_TTL,
        interval: float = 0.25,
    ) -> None:
        self._client = client
        self._keys = [record_key(prefix, instance) for prefix in prefixes]
        self._build = build
        self._fresh = fresh
        self._instance = instance
        self._log = log.bind(instance=instance)
        self._ttl = ttl
        self._schedule = WriteSchedule(interval=interval)
        self._wake = anyio.Event()
        self.lease: int | None = None
        self._keeper: LeaseKeeper | None = None
        self._granted = float(ttl)  # the TTL etcd granted (again) last
        self._leased = anyio.Event()  # set while there is a lease
        self.writes = 0
        self.last_fresh: bool | None = None
        self._written = False  # the records were put under the current lease
        # etcd holds the lease at most until then: the granted TTL after the last grant or refresh
        # it confirmed (time.monotonic(); metrics read it from a scrape thread).
        self._held_until = 0.0
        # One slot per task, so that one task's success never hides the other's failure.
        self._write_error: str | None = None
        self._refresh_error: str | None = None
        self.leases_lost = 0
        self.failures = 0
        self.refreshes = 0

    @property
    def in_etcd(self) -> bool:
        """The records were written under the current lease, and etcd confirmed that lease within
        its TTL: refreshes that keep failing turn it false once the lease must have expired."""
        return self._written and time.monotonic() < self._held_until

    @property
    def last_error(self) -> str | None:
        """The latest failure of the lease refresh, else of the record write, while it lasts."""
        return self._refresh_error or self._write_error

    def _confirmed(self, ttl: float) -> None:
        self._granted = ttl
        self._held_until = time.monotonic() + ttl

    def status(self, labels: tuple[tuple[str, str], ...] = ()) -> ReportStatus:
        return ReportStatus(
            instance=self._instance,
            labels=labels,
            in_etcd=self.in_etcd,
            lease=self.lease,
            writes=self.writes,
            leases_lost=self.leases_lost,
            failures=self.failures,
            last_error=self.last_error,
        )

    def changed(self) -> None:
        """Something in the record changed: write it soon (coalesced)."""
        self._schedule.changed()
        self._wake.set()

    async def run(self) -> None:
        """Write the records (and keep the lease) until cancelled; returns if etcd denies it."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._keep_lease)
            await self._write_records()
            tg.cancel_scope.cancel()

    async def _write_records(self) -> None:
        """Grant a lease when there is none, and write whenever the schedule says."""
        backoff = Backoff(initial=0.2, maximum=5.0)
        while True:
            try:
                if self.lease is None:
                    self.lease, granted = await self._client.grant_lease(self._ttl)
                    self._confirmed(granted)
                    self._keeper = self._client.lease_keeper(self.lease)
                    self._leased.set()
                    self._schedule.changed()
                    self._log.info("fleet.lease_granted", lease=self.lease, ttl=self._granted)
                now = anyio.current_time()
                if self._schedule.should_write(now):
                    await self._write(now)
                backoff.reset()
                self._write_error = None
            except LeaseNotFound:
                self._lost(self.lease)
                continue
            except PermissionDenied as exc:
                # Retrying cannot fix it: say so once (the role, README "Fleet rollout") and stop.
                self._write_error = str(exc)
                self.failures += 1
                self._log.error("fleet.report_denied", error=str(exc))
                return
            except AetcdcfgError as exc:
                self._write_error = str(exc)
                self.failures += 1
                self._log.warning("fleet.report_failed", error=str(exc), lease=self.lease)
                await anyio.sleep(backoff.next_delay())
                continue
            due = self._schedule.due_at()
            wake_at = due if due is not None else math.inf
            with anyio.move_on_after(max(0.0, min(wake_at - anyio.current_time(), FRESHNESS_CHECK))):
                await self._wake.wait()
            self._wake = anyio.Event()
            self._check_freshness()

    async def _keep_lease(self) -> None:
        """Refresh the lease every TTL/3, in a task of its own: a refresh may take seconds (etcd's
        gRPC proxy answers a keepalive at its own next tick, up to TTL/3 later), and a record write
        must never wait for it."""
        backoff = Backoff(initial=0.2, maximum=2.0)
        retrying = False  # the last refresh failed: try again after the backoff, not after TTL/3
        while True:
            lease, keeper = self.lease, self._keeper
            if lease is None or keeper is None:
                retrying = False
                await self._leased.wait()
                continue
            if not retrying:
                await anyio.sleep(self._granted / 3)
                if self.lease != lease:
                    continue  # lost and granted again meanwhile: refresh the new one
            try:
                ttl = await keeper.refresh()
            except LeaseNotFound:
                self._lost(lease)
                continue
            except AetcdcfgError as exc:
                self._refresh_error = str(exc)
                self.failures += 1
                self._log.warning("fleet.lease_refresh_failed", error=str(exc), lease=lease)
                await anyio.sleep(backoff.next_delay())
                retrying = True
                continue
            retrying = False
            if ttl <= 0:
                self._lost(lease)
                continue
            backoff.reset()
            self._refresh_error = None
            self._confirmed(ttl)
            self.refreshes += 1

    def _lost(self, lease: int | None) -> None:
        """etcd no longer holds ``lease``: the writer grants another and writes the records again."""
        if lease is None or self.lease != lease:
            return  # already replaced
        self._log.warning("fleet.lease_lost", lease=lease)
        self.leases_lost += 1
        self._drop_lease()
        self._wake.set()

    def _drop_lease(self) -> None:
        self.lease = None
        self._leased = anyio.Event()
        self._written = False
        self._refresh_error = None
        if self._keeper is not None:
            self._keeper.close()
            self._keeper = None

    def _check_freshness(self) -> None:
        fresh = self._fresh()
        if self.last_fresh is not None and fresh != self.last_fresh:
            self._schedule.changed()

    async def _write(self, now: float) -> None:
        lease = self.lease
        assert lease is not None
        self._schedule.wrote(now)  # a change during the put dirties it again
        record = self._build()
        value = record.to_json()
        try:
            await self._client.put_leased(dict.fromkeys(self._keys, value), lease)
        except LeaseNotFound:
            self._schedule.changed()
            self._lost(lease)
            raise
        except BaseException:
            self._schedule.changed()
            raise
        self.writes += 1
        self._written = self.lease == lease
        if record.fresh != self.last_fresh:
            self._log.info("fleet.reported", applied_revision=record.applied_revision, fresh=record.fresh)
        self.last_fresh = record.fresh

    async def aclose(self) -> None:
        """Revoke the lease (the records go with it); errors logged, bounded by a short timeout."""
        lease = self.lease
        self._drop_lease()
        if lease is None:
            return
        with anyio.move_on_after(2.0, shield=True):
            try:
                await self._client.revoke_lease(lease)
            except AetcdcfgError as exc:
                self._log.warning("fleet.revoke_failed", lease=lease, error=str(exc))
