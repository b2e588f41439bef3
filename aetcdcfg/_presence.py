"""Presence: a LiveSettings' part in the fleet, its instance record and its view of the others.

Who it is (``Identity``), the record it keeps in etcd under every prefix it reads (built from what
the LiveSettings applied, written by one ``Reporter`` bound to one lease), and the fleet views
(``FleetView``) it follows on request. It owns one task group while the LiveSettings runs: the
reporter's task and the views' watches run there; on exit the lease is revoked once they stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import anyio
import anyio.abc
from pydantic import BaseModel

from ._exits import ExitStack
from ._fleetview import FleetView
from ._log import Logger
from ._records import Identity, InstanceRecord, library_version, report_enabled, schema_fingerprint
from ._reporter import DEFAULT_TTL, Reporter
from .client import EtcdClient
from .status import AppliedChange, ReportStatus

__all__ = ["DEFAULT_TTL", "Presence"]


class Presence:
    """This instance among the instances of ``prefixes``: its record, its reporter, its views."""

    def __init__(
        self,
        model: type[BaseModel],
        prefixes: Sequence[str],
        *,
        instance: str | None,
        labels: Mapping[str, str] | None,
        report: bool | None,
        report_ttl: int,
    ) -> None:
        if report_ttl < 2:
            raise ValueError(f"report_ttl must be at least 2 seconds, got {report_ttl}")
        self.identity = Identity.resolve(instance, labels)
        self.reports = report_enabled(report)
        self._model = model
        self._prefixes = tuple(prefixes)
        self._ttl = report_ttl
        self._schema: str | None = None
        self._started_at = time.time()
        self.reporter: Reporter | None = None
        self._views: dict[str, FleetView] = {}
        self._running: tuple[EtcdClient, anyio.abc.TaskGroup] | None = None

    def record(
        self,
        *,
        applied_revision: int,
        last_rejected: AppliedChange | None,
        fresh: bool,
        canary: bool,
        follows_canary: tuple[str, ...],
    ) -> InstanceRecord:
        """The record of this instance given what it applied (see ``_records.InstanceRecord``)."""
        if self._schema is None:
            self._schema = schema_fingerprint(self._model)
        rejected = last_rejected  # names and problems only: an AppliedChange holds no value
        return InstanceRecord(
            id=self.identity.instance,
            labels=self.identity.labels,
            model=self._model.__name__,
            schema=self._schema,
            prefixes=self._prefixes,
            applied_revision=applied_revision,
            rejected_revision=None if rejected is None else rejected.revision,
            rejected_keys=() if rejected is None else rejected.keys,
            problems=() if rejected is None else rejected.problems,
            fresh=fresh,
            canary=canary,
            follows_canary=follows_canary,
            version=library_version(),
            started_at=self._started_at,
            updated_at=time.time(),
        )

    async def start(
        self,
        stack: ExitStack,
        client: EtcdClient,
        build: Callable[[], InstanceRecord],
        fresh: Callable[[], bool],
        log: Logger,
    ) -> None:
        """Report ``build()``'s record (unless opted out) and allow views until ``stack`` closes;
        on close the task group stops first, then the lease is revoked (the records go at once)."""
        reporter = None
        if self.reports:
            reporter = Reporter(
                client, self.identity.instance, self._prefixes, build, fresh, log, ttl=self._ttl
            )
            stack.push_async_callback(reporter.aclose)  # after the task group ends: revoke
        task_group = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(task_group.cancel_scope.cancel)
        if reporter is not None:
            self.reporter = reporter
            stack.callback(setattr, self, "reporter", None)
            task_group.start_soon(reporter.run)
        self._running = (client, task_group)
        stack.callback(self._stopped)

    def _stopped(self) -> None:
        self._running = None
        self._views = {}

    def changed(self) -> None:
        """Something in the record changed: the reporter writes it soon (coalesced)."""
        if self.reporter is not None:
            self.reporter.changed()

    def status(self) -> ReportStatus | None:
        """The reporter's state for ``status`` (None when not reporting)."""
        if self.reporter is None:
            return None
        return self.reporter.status(tuple(self.identity.labels.items()))

    def fleet(self, prefix: str) -> FleetView:
        """The view of ``prefix``'s instance records; the first call for a prefix starts its watch."""
        if self._running is None:
            raise RuntimeError("LiveSettings is not started: use `async with live:` first")
        view = self._views.get(prefix)
        if view is None:
            client, task_group = self._running
            view = self._views[prefix] = FleetView(client, prefix)
            task_group.start_soon(view.run)
        return view

    @property
    def views(self) -> dict[str, FleetView]:
        """The views started so far, by prefix (no I/O)."""
        return dict(self._views)
