"""LiveSettings: a validated settings object that follows etcd prefixes, swapped whole per revision.

Layers: ``prefix=["/shared/", "/myservice/"]`` merges several prefixes, later ones overriding earlier
ones field by field. Each layer has its own shared watch, so a transaction touching two layers reaches
this object as two batches at one revision, on two streams, in no particular order. To never apply
it half, every validation uses all layers *as of the same revision*: a batch at revision R for one
layer is applied to that layer, every other layer is read as of R (a paginated range at revision R),
and the streams' later copies of revisions up to R are skipped. With one layer no read happens.

Two cases read every layer afresh instead, all at one revision (the current one), and skip the
streams' batches up to it: a re-listing (a ``resync`` batch, after compaction, a gap or from a wiped
etcd, even at a revision already applied), whose changes are relative to what that stream had
delivered rather than to these layers' keys; and a read "as of R" that etcd compacted within
moments of the write. No state older than one applied is ever applied, except that a wiped etcd (a
resync below the revision the layers reflected) is followed from its own, lower, revisions.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, TypeVar

import anyio
from pydantic import BaseModel

from ._exits import ExitStack
from ._fanout import Subscription, caught_up, history_epoch, leave
from ._fleetview import FleetView
from ._layers import Layer, canaries_followed, in_canary, layers_of, read_all, read_at, subscribe_all
from ._log import get_logger
from ._names import field_path
from ._presence import DEFAULT_TTL, Presence
from ._records import Identity, InstanceRecord
from ._reporter import Reporter
from ._validate import ReadSources, lists_etcd_source, validate_layered
from ._wakeup import Sleeper, Waker
from .client import EtcdClient
from .errors import (
    AetcdcfgError,
    AuthenticationFailed,
    ConfigRejected,
    FutureRevision,
    PermissionDenied,
    RevisionCompacted,
    SettingsClosed,
    SubscriberLagged,
)
from .events import Event, EventType
from .source import leaf_paths
from .status import AppliedChange, SettingsStatus, WatchStatus

__all__ = ["LiveSettings"]

log = get_logger()

ModelT = TypeVar("ModelT", bound=BaseModel)

#: Applied and rejected revisions kept for ``status.history`` (keys only, never values).
HISTORY = 50
#: The readiness bound used when none is given: older confirmation means not fresh.
DEFAULT_MAX_STALENESS = 30.0


@dataclass(eq=False)
class _Waiter(Generic[ModelT]):
    """One ``wait_for()`` call: the objects applied since it last looked, and where it sleeps."""

    sleeper: Sleeper
    applied: deque[ModelT] = field(default_factory=deque)


class LiveSettings(Generic[ModelT]):
    """``model`` filled from the keys under ``prefix``, re-validated at every etcd revision.

    ``async with LiveSettings(Settings, prefix="/myservice/") as live:`` loads the prefix at one
    revision and follows it from the next. ``live.current`` is always a complete, valid object; a
    change that fails validation is rejected whole (``live.last_error``, log ``config.rejected``) and
    the last good object stays. Without ``client`` one is made from ``EtcdSettings()`` (``ETCD_*``).

    ``prefix`` may be a list of layers, e.g. ``["/shared/", "/myservice/", "/myservice/regions/eu/"]``:
    later layers override earlier ones field by field, and the object is still validated once per
    etcd revision, never with a transaction across layers half applied (see the module docstring).
    A layer that does not exist yet is simply empty. ``live.prefix`` is the last (most specific) layer.

    While it runs it keeps an *instance record* in etcd under every prefix it reads, at
    ``/aetcdcfg/instances<prefix><instance>``, bound to a lease of ``report_ttl`` seconds (gone that
    long after the process dies): ``instance`` and ``labels`` (default ``AETCDCFG_INSTANCE``, else
    ``hostname-pid``, and ``AETCDCFG_LABELS``, e.g. ``zone=b,version=1.4``), the revision applied, the
    last rejected one with its keys and problems (never values), freshness. ``report=False`` (or
    ``AETCDCFG_REPORT=0``) opts out. Reporting never blocks or fails the settings (``fleet.*`` logs).

    ``canary`` (on by default, so that any instance can be given a canary without a redeploy): each
    prefix also gets its canary layer, ``/aetcdcfg/canary<prefix>``, and so one more watch. It is
    an ordinary watch of the client's registry: LiveSettings of one prefix on one client share it,
    it is one more stream on the connection the client already has (and one etcd watcher), and idle
    it costs what any idle watch costs (a progress request after ``keepalive_time`` of silence).
    ``canary=False`` drops it, for an instance that must only ever run the prefix's config, or to
    spare the watcher on a large fleet: its record says so, no canary selects it, and waits for a
    canary's revision do not wait for it.
    """

    def __init__(
        self,
        model: type[ModelT],
        *,
        prefix: str | Sequence[str],
        client: EtcdClient | None = None,
        allow_defaults: bool = False,
        on_change: Callable[[ModelT], object] | None = None,
        init_kwargs: Mapping[str, Any] | None = None,
        instance: str | None = None,
        labels: Mapping[str, str] | None = None,
        report: bool | None = None,
        report_ttl: int = DEFAULT_TTL,
        canary: bool = True,
    ) -> None:
        prefixes = [prefix] if isinstance(prefix, str) else list(prefix)
        if not prefixes or not all(prefixes):
            raise ValueError("prefix must not be empty (use e.g. '/myservice/' or a list of layers)")
        #: Each ends with "/" so that "/app" never also matches "/apple/...".
        self.prefixes = tuple(p if p.endswith("/") else p + "/" for p in prefixes)
        if len(set(self.prefixes)) != len(self.prefixes):
            raise ValueError(f"a prefix appears twice among the layers {list(self.prefixes)}")
        self.prefix = self.prefixes[-1]
        self.model = model
        self._client = client
        self._allow_defaults = allow_defaults
        self._on_change = on_change
        self._init_kwargs = dict(init_kwargs or {})
        self._source_listed = lists_etcd_source(model)
        self._layers = layers_of(model, self.prefixes, canary=canary)
        self._sources: ReadSources | None = None  # env, dotenv and secrets, read at each load
        self._known = 0  # every layer's items reflect this revision (it may be a rejected one)
        self._apply_lock = anyio.Lock()
        self._current: ModelT | None = None
        self._revision = 0
        self.last_error: ConfigRejected | None = None
        self._version = 0
        # updates() iterators sleep on a Sleeper each and are woken in one loop callback per change
        # (see _wakeup: an anyio.Event left a future per waiter for the GC, a Handle per wake-up).
        self._waker: Waker | None = None
        self._sleepers: list[Sleeper] = []
        self._waiters: list[_Waiter[ModelT]] = []  # wait_for() calls: each gets every applied object
        self._closed = False
        self._stack: ExitStack | None = None
        #: How logs and the repr name it: the prefix, or the list of layers.
        self._where: str | list[str] = self.prefix if len(self.prefixes) == 1 else list(self.prefixes)
        self._log = log.bind(prefix=self._where, model=model.__name__)
        self._applied = 0
        self._rejected = 0
        self._last_rejected: AppliedChange | None = None
        self._history: deque[AppliedChange] = deque(maxlen=HISTORY)
        self._loaded_without_etcd = False
        self._presence = Presence(
            model, self.prefixes, instance=instance, labels=labels, report=report, report_ttl=report_ttl
        )
        #: Who this instance is among the fleet (its id and labels; see the class docstring).
        self.identity: Identity = self._presence.identity

    def __repr__(self) -> str:
        return f"<LiveSettings {self.model.__name__} from {self._where!r} @ revision {self._revision}>"

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
        watches = [
            (layer.canary, self._layer_status(layer)) for layer in self._layers if layer.sub is not None
        ]
        if not watches:
            raise RuntimeError("LiveSettings is not started: use `async with live:` first")
        watch = max((watch for _, watch in watches), key=lambda watch: watch.staleness)
        behind = [watch for _, watch in watches if watch.state == "behind"]
        if behind and watch.state != "behind":  # the stalest layer's staleness, a behind one's state
            watch = dataclasses.replace(
                max(behind, key=lambda watch: watch.staleness), staleness=watch.staleness
            )
        return SettingsStatus(
            prefix=self.prefix,
            model=self.model.__name__,
            revision=self._revision,
            loaded=self._current is not None,
            watch=watch,
            layers=tuple(watch for canary, watch in watches if not canary),
            applied=self._applied,
            rejected=self._rejected,
            last_rejected=self._last_rejected,
            history=tuple(self._history),
            report=self._presence.status(),
        )

    def _layer_status(self, layer: Layer) -> WatchStatus:
        """The layer's watch as it serves this object: a layer off its watch (lagged, or its resume
        failing) is behind, and stale since then at least, however healthy the shared watch is."""
        assert layer.sub is not None
        watch = layer.sub.status
        if layer.behind_since is not None:
            self._following(layer)  # a catch-up that handed over nothing wakes no consumer
        if layer.behind_since is None:
            return watch
        off = anyio.current_time() - layer.behind_since
        return dataclasses.replace(
            watch, state="behind", revision=self._known, staleness=max(watch.staleness, off)
        )

    def _following(self, layer: Layer) -> None:
        """Off its watch no more once it took all its resumed watch held (nothing buffered, no
        private catch-up left): it is where the shared watch is."""
        if layer.behind_since is not None and layer.sub is not None and caught_up(layer.sub):
            layer.behind_since = None

    def etcd_fields(self) -> dict[tuple[str, ...], str]:
        """Which etcd key (full name) fills each field path, e.g. ``("db", "url")``; names, never values.

        Worked out when called, from the keys of the newest revision seen: while a rejected change is
        pending (``last_error``), a key it added or changed is named although the value in force is
        still the last good one (``status.history`` says which keys those are). Empty while the
        settings in force were built without etcd (``allow_defaults`` after an invalid start).
        """
        if self._loaded_without_etcd and self._applied == 0:
            return {}
        fields: dict[tuple[str, ...], str] = {}
        for layer in self._layers:  # a later layer's key wins, as its value does
            label, items = layer.effective(self.identity)
            decoded = layer.decoder.decode(items)
            found: dict[tuple[str, ...], str] = {}
            for leaf in leaf_paths(decoded.data):  # as pydantic reads them: aliases
                path = field_path(self.model, leaf)
                for depth in range(len(path), 0, -1):
                    key = decoded.origins.get(path[:depth])
                    if key is not None:
                        found[path] = label + key
                        break
            # A field read inside a structure under another name (an AliasPath) has no leaf of
            # its own: named by its origin, unless a leaf below it is named already.
            named = {path[:depth] for path in found for depth in range(1, len(path) + 1)}
            for path, key in decoded.origins.items():
                if path not in named:
                    found[path] = label + key
            fields.update(found)
        return fields

    @property
    def in_canary(self) -> bool:
        """A canary is open on one of its prefixes and its selector matches this instance."""
        return in_canary(self._layers, self.identity)

    def init_fields(self) -> list[tuple[str, ...]]:
        """The field paths given as ``init_kwargs`` (names, never values; an alias as its field)."""
        return [field_path(self.model, path) for path in leaf_paths(self._init_kwargs)]

    def is_fresh(self, max_staleness: float = DEFAULT_MAX_STALENESS) -> bool:
        """Loaded, and its watch confirmed current within the last ``max_staleness`` seconds."""
        return self._layers[0].sub is not None and self.status.is_fresh(max_staleness)

    async def updates(self) -> AsyncIterator[ModelT]:
        """Yield the newest valid settings object each time this iterator wakes after a change.

        Conflating: it yields the object current when it gets to run, not every one applied. Several
        revisions applied before it runs again (a burst of writes, or the catch-up after an outage,
        which applies every missed revision at once) are yielded as one, the newest; an object
        applied and replaced in between is never yielded (config is a state, not a log). It never
        misses the latest. For every applied object use ``on_change``; to wait for a state that
        may be brief use :meth:`wait_for`, which sees each applied one (not every state etcd held:
        see there). Ends when the LiveSettings closes. Any number of tasks may iterate at once.
        """
        seen = self._version
        sleeper = Sleeper(self._wake_loop())
        self._sleepers.append(sleeper)
        try:
            while True:
                while self._version == seen:
                    if self._closed:
                        return
                    await sleeper
                seen = self._version
                yield self.current
        finally:
            self._sleepers.remove(sleeper)

    async def wait_for(self, predicate: Callable[[ModelT], bool], timeout: float | None = None) -> ModelT:
        """Return the first settings, current or applied from now on, for which ``predicate`` is true.

        Every object applied while it waits is checked, in order, even one replaced before this task
        ran again (unlike :meth:`updates`, which conflates). Raises ``TimeoutError`` after
        ``timeout`` seconds, and :class:`SettingsClosed` if the LiveSettings closes (or has closed)
        before a matching object is applied.

        Only applied objects are checked, and not every state etcd held is applied. Never seen here
        is a state that existed only in history etcd compacted before the watch replayed it (the
        re-listing is applied as one object, the current state), or only between two layers'
        revisions: each object holds every layer as of one revision, so a layer's revision that
        arrives after another layer's newer one was applied is folded into that one, and a re-read
        of every layer at one current revision skips the states in between (docs/live-settings.md).
        """
        with anyio.fail_after(math.inf if timeout is None else timeout):
            current = self.current
            if predicate(current):
                return current
            waiter: _Waiter[ModelT] = _Waiter(Sleeper(self._wake_loop()))
            self._waiters.append(waiter)
            try:
                while True:
                    while waiter.applied:
                        settings = waiter.applied.popleft()
                        if predicate(settings):
                            return settings
                    if self._closed:
                        raise SettingsClosed(prefix=self.prefix)
                    await waiter.sleeper
            finally:
                self._waiters.remove(waiter)

    def _wake_loop(self) -> asyncio.AbstractEventLoop:
        if self._waker is None:
            self._waker = Waker(asyncio.get_running_loop())
        return self._waker.loop

    def _wake_all(self) -> None:
        """Wake every ``updates()`` iterator and ``wait_for()`` (one loop callback for them all)."""
        waker = self._waker
        if waker is None:
            return
        for sleeper in self._sleepers:
            waker.wake(sleeper)
        for waiter in self._waiters:
            waker.wake(waiter.sleeper)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def __aenter__(self) -> LiveSettings[ModelT]:
        self._closed = False
        stack = ExitStack()
        try:
            client = self._client
            if client is None:
                client = await stack.enter_async_context(EtcdClient())
            revisions = await subscribe_all(stack, client, self._layers, self._log)
            stack.callback(self._detach)
            revision = max(revisions)
            try:
                for layer, listed in zip(self._layers, revisions, strict=True):
                    if listed < revision:  # one state, at one revision, for every layer
                        layer.items = await read_at(client, layer, revision, self._log)
            except (RevisionCompacted, FutureRevision):  # compacted at once: all at a newer one
                revision, states = await read_all(client, self._layers, self._log)
                for layer in self._layers:
                    layer.items = states[layer.prefix]
            self._known = revision
            self._load(revision)
            # Its records and fleet views: their task group stops after the layers' (LIFO).
            await self._presence.start(stack, client, self.instance_record, self.is_fresh, self._log)
            task_group = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(task_group.cancel_scope.cancel)
            for layer in self._layers:
                task_group.start_soon(self._follow, client, layer)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    def instance_record(self) -> InstanceRecord:
        """This instance's record as it would be written now (see the class docstring)."""
        try:
            fresh = self.is_fresh()
        except RuntimeError:
            fresh = False
        return self._presence.record(
            applied_revision=self._revision,
            last_rejected=self._last_rejected,
            fresh=fresh,
            canary=self.in_canary,
            follows_canary=canaries_followed(self._layers),
        )

    @property
    def reporter(self) -> Reporter | None:
        """What keeps its records in etcd while it runs (None: not running, or ``report=False``)."""
        return self._presence.reporter

    def fleet(self, prefix: str | None = None) -> FleetView:
        """The live instances of one of its prefixes (default: the last layer), followed from now on
        while it runs: ``live.fleet().records``. The first call for a prefix starts one watch of its
        records; later calls return the same view. Raises ``RuntimeError`` outside ``async with
        live:``, ``ValueError`` for a prefix it does not read."""
        if prefix is None:
            prefix = self.prefix
        if prefix not in self.prefixes:
            raise ValueError(f"{prefix!r} is not one of its prefixes {list(self.prefixes)}")
        return self._presence.fleet(prefix)

    def fleets(self) -> dict[str, FleetView]:
        """:meth:`fleet` of every layer, by prefix in layer order: with layers, every service that
        reads ``/shared/`` is an instance of it, and a change there is rolled out to them all."""
        return {prefix: self.fleet(prefix) for prefix in self.prefixes}

    @property
    def fleet_views(self) -> dict[str, FleetView]:
        """The views :meth:`fleet` started, by prefix in layer order (no I/O, for status pages)."""
        views = self._presence.views
        return {prefix: views[prefix] for prefix in self.prefixes if prefix in views}

    def _detach(self) -> None:
        for layer in self._layers:
            layer.sub = None

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        stack, self._stack = self._stack, None
        try:
            if stack is not None:
                # Not handing the body's exception to our task group keeps it from being wrapped in
                # an ExceptionGroup: users see their own exception, unchanged.
                await stack.aclose()
        finally:
            self._closed = True  # no change will come: updates() end, wait_for() raises
            self._wake_all()
        return None

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[dict[str, Any]]:
        """A FastAPI/Starlette lifespan: ``FastAPI(lifespan=live.lifespan)``; config loads before serving."""
        async with self:
            yield {"live_settings": self}

    async def _follow(self, client: EtcdClient, layer: Layer) -> None:
        """Apply every revision of one layer; re-subscribes gap-free if it lags or the watch fails."""
        sub = layer.sub
        reread = False
        pause = 0.0  # after a failure: before the next attempt
        while True:
            try:
                if reread:
                    async with self._apply_lock:
                        await self._read_afresh(client)
                    reread = False
                if sub is not None:
                    await self._consume(client, layer, sub)
                else:
                    async with client.watch(layer.prefix, start_revision=self._known + 1) as resumed:
                        layer.sub = resumed
                        if resumed.start_revision > self._known + 1:
                            # Another layer's re-read (a replaced history: lower revisions) ran while
                            # this one subscribed: from where that read left every layer, instead.
                            continue
                        epoch, seen = history_epoch(resumed), layer.epoch
                        if seen is not None and (
                            (seen[0] is epoch[0] and seen != epoch)
                            # another shared watch (the old one failed): its listing is etcd's
                            # revision then, below ours only if etcd's history was replaced
                            or (seen[0] is not epoch[0] and resumed.status.revision < self._known)
                        ):
                            # The shared watch re-listed a replaced etcd (wiped, restored) while this
                            # layer was off it: the new history's revisions up to ours never come.
                            # (The epoch is taken once the re-read succeeded.)
                            reread = self._reread_for(layer, "history_replaced")
                            continue
                        layer.epoch = epoch
                        self._following(layer)
                        await self._consume(client, layer, resumed)
            except RevisionCompacted:
                # Lagged further back than the shared watch remembers, and etcd compacted those
                # revisions meanwhile: resuming there can never work (it was retried for good), so
                # every layer is read afresh at one revision and followed from there.
                reread = self._reread_for(layer, "RevisionCompacted")
            except SubscriberLagged as exc:
                self._log.warning("config.lagged", layer=layer.prefix, resume_revision=exc.resume_revision)
                # What it missed is at a revision already applied: only a re-list of that revision
                # (a gap found with nothing written since) is, and no replay holds it: read afresh.
                reread = exc.resume_revision <= self._known
            except AetcdcfgError as exc:
                # Keep serving the last good settings. The retry reads afresh, for resuming where
                # this failed may never work (a catch-up etcd's gRPC proxy refuses to replay only
                # grows); not after a refused permission or credentials, which no read fixes (and a
                # layer of many keys would be read every 2 s while it lasts).
                self._log.error(
                    "config.watch_failed", layer=layer.prefix, error=str(exc), revision=self._revision
                )
                reread = reread or not isinstance(exc, (PermissionDenied, AuthenticationFailed))
                pause = 2.0
            if layer.behind_since is None:
                layer.behind_since = anyio.current_time()
            if layer.sub is not None:
                # Off it now (a read inside it failed, say): not handed more to overflow with, and
                # never taken for caught up while nothing consumes it.
                leave(layer.sub)
            sub = None
            if pause:
                await anyio.sleep(pause)
                pause = 0.0

    def _reread_for(self, layer: Layer, reason: str) -> bool:
        """Log why every layer is about to be read afresh (``config.layers_reread``); True."""
        self._log.warning("config.layers_reread", layer=layer.prefix, reason=reason, revision=self._known)
        return True

    async def _consume(self, client: EtcdClient, layer: Layer, sub: Subscription) -> None:
        if len(self._layers) == 1:
            async for batch in sub.batches():
                self._apply(layer, batch, {})
                if layer.behind_since is not None:
                    self._following(layer)
            return
        async for batch in sub.batches():
            async with self._apply_lock:
                if history_epoch(sub) != layer.epoch:
                    # etcd's history was replaced under this watch; if its re-listing changed
                    # nothing here (an empty prefix, the canary layer) no resync came, and this
                    # batch's lower revision would be skipped as applied: read afresh.
                    self._reread_for(layer, "history_replaced")
                    await self._read_afresh(client)
                else:
                    await self._apply_layered(client, layer, batch)
            if layer.behind_since is not None:
                self._following(layer)

    async def _read_afresh(self, client: EtcdClient) -> None:
        """Every layer read at one revision (the caller holds the apply lock). Each layer's watch
        epoch is taken before the read, so a replacement found after it is still noticed; a layer
        off its watch stays behind until it has caught up on it again."""
        epochs = [history_epoch(each.sub) if each.sub is not None else None for each in self._layers]
        self._apply_state(*await read_all(client, self._layers, self._log))
        for each, epoch in zip(self._layers, epochs, strict=True):
            each.epoch = epoch
            self._following(each)

    async def _apply_layered(self, client: EtcdClient, layer: Layer, batch: Sequence[Event]) -> None:
        """One revision of one layer of several: the others are read as of that revision."""
        revision = batch[-1].revision
        resync = batch[0].resync
        if revision <= self._known and not resync:
            return  # already read as part of another layer's revision
        if resync:
            # The stream re-listed its prefix (after compaction, a gap, or from a wiped etcd
            # whose revisions restart below ours): its changes are relative to what the
            # stream had delivered, not to these layers' keys, so every layer is read afresh,
            # even at the revision they reflect (a gap found with nothing written since).
            self._log.warning("config.layers_reread", layer=layer.prefix, reason="resync", revision=revision)
            await self._read_afresh(client)
            return
        try:
            others = {
                other.prefix: await read_at(client, other, revision, self._log)
                for other in self._layers
                if other is not layer
            }
        except (RevisionCompacted, FutureRevision) as exc:
            # Compacted within moments of the write (or etcd was replaced): reading the other
            # layers "as they are now" would combine two revisions, and the streams' older
            # batches would then go backwards; all layers are read at one newer revision.
            event = (
                "config.layer_read_compacted"
                if isinstance(exc, RevisionCompacted)
                else "config.layers_reread"
            )
            self._log.warning(event, layer=layer.prefix, reason=type(exc).__name__, revision=revision)
            await self._read_afresh(client)
            return
        self._apply(layer, batch, others)

    def _load(self, revision: int) -> None:
        """The first object: built by pydantic-settings itself, which reads env, dotenv and secrets
        files, as ``_sources`` does now for the revisions to come (see ReadSources)."""
        self._loaded_without_etcd = False
        self._sources = ReadSources.read(self.model)
        try:
            settings = self._build(revision, sources=None)
        except ConfigRejected as exc:
            if not self._allow_defaults:
                raise
            self._log.warning(
                "config.rejected", revision=revision, keys=list(exc.keys), problems=list(exc.problems)
            )
            self._record_rejection(exc, exc.keys)
            settings = self._build(revision, use_etcd=False, sources=None)
            self._loaded_without_etcd = True
        self._current = settings
        self._revision = revision
        keys = sum(len(layer.items) for layer in self._layers)
        self._log.info("config.loaded", revision=revision, keys=keys)

    def _apply(self, layer: Layer, batch: Sequence[Event], others: Mapping[str, dict[str, bytes]]) -> None:
        """One revision: update the layers' keys, validate the whole model, swap it in or reject it.

        ``others`` holds the other layers' keys as of this revision (read by the caller).
        """
        items = layer.items
        cut = len(layer.prefix)
        changed = [event.key for event in batch]
        for event in batch:
            if event.type is EventType.PUT:
                items[event.key[cut:]] = event.value
            else:
                items.pop(event.key[cut:], None)
        changed += self._replace_items(others)
        self._swap(batch[-1].revision, changed)

    def _apply_state(self, revision: int, states: Mapping[str, dict[str, bytes]]) -> None:
        """Every layer's keys as read at ``revision`` (one consistent state), applied as one change.

        ``revision`` is at least the one the layers reflected, except after etcd was replaced (a
        wiped cluster restarts its revisions): then the layers simply follow the new history.
        """
        if revision < self._known:
            self._log.warning("config.history_reset", revision=revision, known=self._known)
        changed = self._replace_items(states)
        if changed:
            self._swap(revision, changed)
            return
        self._known = revision  # nothing changed: no new object, and later batches go on from here
        if revision < self._revision:
            self._revision = revision
            self._report_changed()

    def _replace_items(self, states: Mapping[str, dict[str, bytes]]) -> list[str]:
        """Put the layers' keys in ``states`` in place; the full keys that changed."""
        changed: list[str] = []
        for layer in self._layers:
            fresh = states.get(layer.prefix)
            if fresh is None:
                continue
            old = layer.items
            changed += [layer.prefix + k for k in old.keys() | fresh.keys() if old.get(k) != fresh.get(k)]
            layer.items = fresh
        return changed

    def _swap(self, revision: int, changed: list[str]) -> None:
        """Validate the model from the layers' keys as of ``revision``; swap it in or reject it."""
        self._known = revision
        try:
            settings = self._build(revision, changed=changed, sources=self._sources)
        except ConfigRejected as exc:
            self._log.warning(
                "config.rejected", revision=revision, keys=list(exc.keys), problems=list(exc.problems)
            )
            self._record_rejection(exc, changed)
            self._report_changed()
            return
        self._current = settings
        self._revision = revision
        self.last_error = None
        self._applied += 1
        self._history.append(AppliedChange(revision, True, tuple(changed)))
        self._version += 1
        self._report_changed()
        for waiter in self._waiters:
            waiter.applied.append(settings)
        self._wake_all()
        self._log.info("config.applied", revision=revision, keys=changed)
        if self._on_change is not None:
            try:
                self._on_change(settings)
            except Exception as exc:  # its message may quote a value: the type only
                self._log.error("config.on_change_failed", revision=revision, error_type=type(exc).__name__)

    def _report_changed(self) -> None:
        self._presence.changed()

    def _record_rejection(self, exc: ConfigRejected, changed: Sequence[str]) -> None:
        self.last_error = exc
        self._rejected += 1
        rejected = AppliedChange(
            exc.revision, False, tuple(dict.fromkeys([*changed, *exc.keys])), exc.problems
        )
        self._last_rejected = rejected
        self._history.append(rejected)

    def _build(
        self,
        revision: int,
        *,
        use_etcd: bool = True,
        changed: Sequence[str] | None = None,
        sources: ReadSources | None,
    ) -> ModelT:
        """Validate the model from the layers' keys; raise ConfigRejected naming keys, never values.

        ``changed``: the full keys changed since the last build (None: decode every key). Each layer's
        keys go through its KeyDecoder, which decodes again only the fields those keys fill.
        """
        try:
            decoded = [layer.decode(self.identity, changed) for layer in (self._layers if use_etcd else [])]
        except Exception as exc:  # a value our decoding does not survive: a bug of ours, never fatal
            self._log.error("config.decode_crashed", revision=revision, error_type=type(exc).__name__)
            raise ConfigRejected(
                prefix=self.prefix,
                revision=revision,
                keys=changed or (),
                problems=[f"could not decode the keys ({type(exc).__name__}, a bug of aetcdcfg's)"],
            ) from None
        return validate_layered(
            self.model,
            decoded,
            revision,
            init_kwargs=self._init_kwargs,
            source_listed=self._source_listed,
            changed=changed or (),
            sources=sources,
        )
