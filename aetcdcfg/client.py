"""EtcdClient: the public facade over the connection, the KV API and the shared prefix watches."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import anyio
from pydantic import ValidationError

from ._connection import NOT_OPEN, Connection
from ._exits import ExitStack
from ._fanout import Subscription, WatchRegistry
from ._keys import KeyLike, as_bytes, prefix_range_end
from ._kv import KV
from ._validate import describe
from .errors import ClientClosedError, ConfigurationError
from .settings import EtcdSettings, SettingsProblem
from .status import WatchStatus

__all__ = ["EtcdClient", "prefix_range_end"]


def _settings_from(settings: EtcdSettings | None, overrides: dict[str, Any]) -> EtcdSettings:
    try:
        if settings is None:
            return EtcdSettings(**overrides)
        if not overrides:
            return settings
        return EtcdSettings.model_validate({**settings.model_dump(), **overrides})
    except ValidationError as exc:
        first = exc.errors()[0]
        setting = ".".join(str(part) for part in first["loc"]) or "settings"
        # pydantic's message may quote the input (a validator's text, a tag): ours never do, and
        # describe() renders pydantic's own from its template without the input
        raised = (first.get("ctx") or {}).get("error")
        message = str(raised) if isinstance(raised, SettingsProblem) else describe(first)
        raise ConfigurationError(setting, message) from None


class EtcdClient(KV):
    """An asyncio etcd v3 client for configuration: ``async with EtcdClient(endpoints=[...]) as c:``.

    Requests go to one member at a time; when it fails the next reachable endpoint is used. Reads are
    retried on another member until ``request_timeout``; writes are retried only when etcd certainly did
    not apply them (the member had no leader, or the request was never sent), otherwise they raise
    :class:`EtcdUnavailable` saying the outcome is unknown.
    """

    def __init__(self, settings: EtcdSettings | None = None, **overrides: Any) -> None:
        self.settings = _settings_from(settings, overrides)
        super().__init__(Connection(self.settings))
        self._stack: ExitStack | None = None
        self._watches: WatchRegistry | None = None

    def __repr__(self) -> str:
        user = f", user={self.settings.username!r}" if self.settings.username else ""
        state = "open" if self._conn.is_open else "closed"
        return f"<EtcdClient {','.join(self.settings.endpoints)}{user} {state}>"

    # -- lifecycle ---------------------------------------------------------------------------------

    async def __aenter__(self) -> EtcdClient:
        if self._stack is not None:
            raise RuntimeError("EtcdClient is already open")
        stack = ExitStack()
        try:
            stack.push_async_callback(self._conn.aclose)
            task_group = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(task_group.cancel_scope.cancel)
            stack.callback(setattr, self, "_watches", None)
            await self._conn.open(task_group)
            self._watches = WatchRegistry(self._conn, task_group)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        stack, self._stack = self._stack, None
        if stack is not None:
            # Not handing the body's exception to our task group keeps it from being wrapped in an
            # ExceptionGroup: users see their own exception, unchanged.
            await stack.aclose()
        return None

    @property
    def endpoint(self) -> str | None:
        """The URL of the member currently in use (``None`` before connecting or after a failure)."""
        return self._conn.endpoint

    async def sync_endpoints(self) -> list[str]:
        """Read the cluster's member list and use every started member's client URLs too.

        Only URLs with the configured scheme are taken (a cluster advertising http to an https
        client is a misconfiguration we do not follow). Returns the endpoints now in use.
        """
        return await self._conn.sync_endpoints()

    def watch_statuses(self) -> list[WatchStatus]:
        """How current each prefix watch of this client is (empty when closed); see ``WatchStatus``."""
        return [] if self._watches is None else self._watches.statuses()

    # -- watch -------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def watch(
        self,
        prefix: KeyLike,
        *,
        start_revision: int | None = None,
        buffer_size: int = 1024,
        with_snapshot: bool = False,
    ) -> AsyncIterator[Subscription]:
        """Subscribe to every change under ``prefix``: ``async with client.watch("/app/") as events:``.

        Once entered, every change committed afterwards is delivered, in revision order, exactly once,
        across reconnects and failovers. With ``start_revision`` every change from that revision on is
        delivered (raises :class:`RevisionCompacted` from the iterator if etcd no longer has it).
        All subscriptions of one prefix share one server watcher. ``buffer_size`` is in revisions; a
        subscriber that falls further behind gets :class:`SubscriberLagged` (see its resume_revision).
        ``with_snapshot`` fills ``subscription.snapshot`` with the prefix's contents just before
        ``subscription.start_revision``.
        """
        if start_revision is not None and start_revision < 1:
            raise ValueError(f"start_revision must be >= 1, got {start_revision}")
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        watches = self._watches
        if watches is None:
            raise ClientClosedError(NOT_OPEN)
        raw = as_bytes(prefix)
        async with watches.subscribe(raw, start_revision, buffer_size, with_snapshot=with_snapshot) as sub:
            yield sub
