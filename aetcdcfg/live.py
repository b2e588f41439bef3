"""LiveSettings: a validated settings object that follows an etcd prefix, swapped whole per revision."""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Generic, TypeVar

import anyio
import anyio.abc
from pydantic import BaseModel

from ._fanout import Subscription
from ._log import get_logger
from ._validate import build_model, lists_etcd_source
from .client import EtcdClient
from .errors import AetcdcfgError, ConfigRejected, SubscriberLagged
from .events import Event, EventType
from .settings import EtcdSettings
from .status import AppliedChange, SettingsStatus

__all__ = ["LiveSettings"]

log = get_logger()

ModelT = TypeVar("ModelT", bound=BaseModel)

#: Applied and rejected revisions kept for ``status.history`` (keys only, never values).
HISTORY = 50
#: The readiness bound used when none is given: older confirmation means not fresh.
DEFAULT_MAX_STALENESS = 30.0


class LiveSettings(Generic[ModelT]):
    """``model`` filled from the keys under ``prefix``, re-validated at every etcd revision.

    ``async with LiveSettings(Settings, prefix="/myservice/") as live:`` loads the prefix at one
    revision and follows it from the next. ``live.current`` is always a complete, valid object; a
    change that fails validation is rejected whole (``live.last_error``, log ``config.rejected``) and
    the last good object stays. Without ``client`` one is made from ``EtcdSettings()`` (``ETCD_*``).
    """

    def __init__(
        self,
        model: type[ModelT],
        *,
        prefix: str,
        client: EtcdClient | None = None,
        allow_defaults: bool = False,
        on_change: Callable[[ModelT], object] | None = None,
        init_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if not prefix:
            raise ValueError("prefix must not be empty (use e.g. '/myservice/')")
        #: Always ends with "/" so that "/app" never also matches "/apple/...".
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.model = model
        self._client = client
        self._allow_defaults = allow_defaults
        self._on_change = on_change
        self._init_kwargs = dict(init_kwargs or {})
        self._source_listed = lists_etcd_source(model)
        self._items: dict[str, bytes] = {}
        self._items_revision = 0  # the revision _items reflects (may be a rejected one)
        self._current: ModelT | None = None
        self._revision = 0
        self.last_error: ConfigRejected | None = None
        self._version = 0
        self._changed = anyio.Event()
        self._stack: contextlib.AsyncExitStack | None = None
        self._log = log.bind(prefix=self.prefix, model=model.__name__)
        self._sub: Subscription | None = None
        self._applied = 0
        self._rejected = 0
        self._last_rejected: AppliedChange | None = None
        self._history: deque[AppliedChange] = deque(maxlen=HISTORY)

    def __repr__(self) -> str:
        return f"<LiveSettings {self.model.__name__} from {self.prefix!r} @ revision {self._revision}>"

    # -- reading -----------------------------------------------------------------------------------

    @property
    def current(self) -> ModelT:
        """The settings in force: a new object after every applied change; treat it as read-only."""
        if self._current is None:
            raise RuntimeError("LiveSettings is not loaded yet: use `async with live:` first")
        return self._current

    @property
    def revision(self) -> int:
        """The etcd revision that ``current`` reflects."""
        return self._revision

    @property
    def status(self) -> SettingsStatus:
        """What this serves, from which revision, and how fresh it is (taken now, immutable).

        Raises ``RuntimeError`` before ``async with live:`` has started following etcd.
        """
        sub = self._sub
        if sub is None:
            raise RuntimeError("LiveSettings is not started: use `async with live:` first")
        return SettingsStatus(
            prefix=self.prefix,
            model=self.model.__name__,
            revision=self._revision,
            loaded=self._current is not None,
            watch=sub.status,
            applied=self._applied,
            rejected=self._rejected,
            last_rejected=self._last_rejected,
            history=tuple(self._history),
        )

    def is_fresh(self, max_staleness: float = DEFAULT_MAX_STALENESS) -> bool:
        """Loaded, and its watch confirmed current within the last ``max_staleness`` seconds."""
        return self._sub is not None and self.status.is_fresh(max_staleness)

    async def updates(self) -> AsyncIterator[ModelT]:
        """Yield each new valid settings object as it is applied, from now on.

        A consumer slower than the changes skips intermediate objects and gets the newest one (config
        is a state, not a log); it never misses the latest. Any number of tasks may iterate at once.
        """
        seen = self._version
        while True:
            if self._version == seen:
                await self._changed.wait()
            seen = self._version
            yield self.current

    async def wait_for(self, predicate: Callable[[ModelT], bool], timeout: float | None = None) -> ModelT:
        """Return the first settings (current or future) for which ``predicate`` is true.

        Raises ``TimeoutError`` after ``timeout`` seconds.
        """
        with anyio.fail_after(math.inf if timeout is None else timeout):
            if predicate(self.current):
                return self.current
            async for settings in self.updates():
                if predicate(settings):
                    return settings
        raise AssertionError("unreachable")  # pragma: no cover

    # -- lifecycle ---------------------------------------------------------------------------------

    async def __aenter__(self) -> LiveSettings[ModelT]:
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            client = self._client
            if client is None:
                client = await stack.enter_async_context(EtcdClient(EtcdSettings()))
            sub = await stack.enter_async_context(client.watch(self.prefix, with_snapshot=True))
            assert sub.snapshot is not None
            self._sub = sub
            stack.callback(setattr, self, "_sub", None)
            self._load(sub.snapshot.items, sub.snapshot.revision)
            task_group = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(task_group.cancel_scope.cancel)
            task_group.start_soon(self._follow, client, sub)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        stack, self._stack = self._stack, None
        if stack is not None:
            # Not handing the body's exception to our task group keeps it from being wrapped in an
            # ExceptionGroup: users see their own exception, unchanged.
            await stack.aclose()
        return None

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[dict[str, Any]]:
        """A FastAPI/Starlette lifespan: ``FastAPI(lifespan=live.lifespan)``; config loads before serving."""
        async with self:
            yield {"live_settings": self}

    async def _follow(self, client: EtcdClient, first: Subscription) -> None:
        """Apply every revision after the load; re-subscribes gap-free if it lags or the watch fails."""
        sub: Subscription | None = first
        while True:
            try:
                if sub is not None:
                    await self._consume(sub)
                else:
                    async with client.watch(self.prefix, start_revision=self._items_revision + 1) as resumed:
                        self._sub = resumed
                        await self._consume(resumed)
            except SubscriberLagged as exc:
                self._log.warning("config.lagged", resume_revision=exc.resume_revision)
            except AetcdcfgError as exc:
                # Unfixable for now (e.g. permission revoked): keep serving the last good settings.
                self._log.error("config.watch_failed", error=str(exc), revision=self._revision)
                await anyio.sleep(2.0)
            sub = None

    async def _consume(self, sub: Subscription) -> None:
        async for batch in sub.batches():
            self._apply(batch)

    def _load(self, items: Mapping[str, bytes], revision: int) -> None:
        self._items = {key[len(self.prefix) :]: value for key, value in items.items()}
        self._items_revision = revision
        try:
            settings = self._build(revision)
        except ConfigRejected as exc:
            if not self._allow_defaults:
                raise
            self._log.warning(
                "config.rejected", revision=revision, keys=list(exc.keys), problems=list(exc.problems)
            )
            self._record_rejection(exc, exc.keys)
            settings = self._build(revision, use_etcd=False)
        self._current = settings
        self._revision = revision
        self._log.info("config.loaded", revision=revision, keys=len(self._items))

    def _apply(self, batch: Sequence[Event]) -> None:
        """One revision: update the raw keys, validate the whole model, swap it in or reject it."""
        items = self._items
        cut = len(self.prefix)
        for event in batch:
            if event.type is EventType.PUT:
                items[event.key[cut:]] = event.value
            else:
                items.pop(event.key[cut:], None)
        revision = batch[-1].revision
        self._items_revision = revision
        try:
            settings = self._build(revision, changed=[e.key for e in batch])
        except ConfigRejected as exc:
            self._log.warning(
                "config.rejected", revision=revision, keys=list(exc.keys), problems=list(exc.problems)
            )
            self._record_rejection(exc, [e.key for e in batch])
            return
        self._current = settings
        self._revision = revision
        self.last_error = None
        self._applied += 1
        self._history.append(AppliedChange(revision, True, tuple(e.key for e in batch)))
        self._version += 1
        changed, self._changed = self._changed, anyio.Event()
        changed.set()
        self._log.info("config.applied", revision=revision, keys=[e.key for e in batch])
        if self._on_change is not None:
            try:
                self._on_change(settings)
            except Exception as exc:
                self._log.error("config.on_change_failed", error=repr(exc))

    def _record_rejection(self, exc: ConfigRejected, changed: Sequence[str]) -> None:
        self.last_error = exc
        self._rejected += 1
        rejected = AppliedChange(
            exc.revision, False, tuple(dict.fromkeys([*changed, *exc.keys])), exc.problems
        )
        self._last_rejected = rejected
        self._history.append(rejected)

    def _build(self, revision: int, *, use_etcd: bool = True, changed: Sequence[str] = ()) -> ModelT:
        """Validate the model from the current keys; raise ConfigRejected naming keys, never values."""
        return build_model(
            self.model,
            self.prefix,
            self._items if use_etcd else {},
            revision,
            init_kwargs=self._init_kwargs,
            source_listed=self._source_listed,
            changed=changed,
        )
