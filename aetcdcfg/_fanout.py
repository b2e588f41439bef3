"""Sharing one prefix watch among any number of subscribers, each with its own bounded buffer.

Policy for slow subscribers: a batch (one revision) is handed to each subscriber's memory stream
without waiting. When a subscriber's buffer is full it is cut off — never the stream, never the other
subscribers: it still receives every revision already buffered, then its iterator raises
:class:`SubscriberLagged` whose ``resume_revision`` is the first revision it did not get. Opening
``client.watch(prefix, start_revision=exc.resume_revision)`` continues gap-free: from the watch's
recent history in memory when it still holds that revision, otherwise from a private catch-up stream.

asyncio only, on purpose: a subscriber's task sleeps on a reusable :class:`~._wakeup.Sleeper` that the
hub wakes (one loop callback per round for all of them), not on an anyio primitive nor a fresh
future. grpc.aio, beneath every watch, runs only on asyncio anyway; anyio's ``receive()`` cost ~20 µs
per delivery, and a future per sleep left ~6 GC-tracked objects per subscriber per revision, which
at a thousand subscribers made the cyclic GC the p99 tail (see ``_wakeup``). The buffers themselves
are anyio memory object streams.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._connection import Connection
from ._keys import decode_key
from ._log import get_logger
from ._reads import list_keys
from ._resume import Batch, WatchState
from ._stream import WatchLoop
from ._wakeup import Sleeper, Waker
from .errors import AetcdcfgError, ClientClosedError, EtcdError, HistoryReplaced, SubscriberLagged
from .events import Event, Snapshot
from .status import WatchHealth, WatchStatus

__all__ = ["PrefixWatch", "Subscription", "WatchRegistry", "caught_up", "history_epoch", "leave"]

log = get_logger()

#: Events of recent revisions kept per prefix so a lagged subscriber can resume without etcd.
HISTORY_EVENTS = 10_000
#: Revisions held for a subscriber whose private catch-up has not finished, besides the history
#: replayed to it (at most HISTORY_EVENTS batches): it holds at most the sum; past it, it lags
#: (resuming later from where the catch-up got to) rather than holding memory without bound.
PENDING_LIMIT = 10_000


class Subscription:
    """Events of one prefix in revision order: ``async for event in subscription``.

    ``batches()`` yields one tuple per revision instead (all events of a transaction together).
    Iteration ends with :class:`SubscriberLagged` if this subscriber fell behind its buffer, or with
    the watch's unfixable error (e.g. :class:`PermissionDenied`); it never ends silently.
    """

    def __init__(
        self,
        prefix: str,
        receive: MemoryObjectReceiveStream[Batch],
        *,
        start_revision: int,
        snapshot: Snapshot | None,
        hub: PrefixWatch,
    ) -> None:
        self.prefix = prefix
        self._hub = hub
        #: The first revision this subscription can deliver (earlier changes are in ``snapshot``).
        self.start_revision = start_revision
        self.snapshot = snapshot
        self._receive = receive
        self._batch: Batch = ()
        self._index = 0
        self._error: BaseException | None = None
        self._available = 0  # revisions the hub put in the buffer and we have not taken yet
        self._ended = False
        #: The hub's side of this subscription (set by ``subscribe``).
        self._handle: _Subscriber | None = None
        self._sleeper = Sleeper(hub.waker.loop)

    def __repr__(self) -> str:
        return f"<Subscription {self.prefix!r} from revision {self.start_revision}>"

    @property
    def status(self) -> WatchStatus:
        """How current the shared watch behind this subscription is (taken now; see ``WatchStatus``)."""
        return self._hub.status()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        index = self._index
        batch = self._batch
        if index < len(batch):
            self._index = index + 1
            return batch[index]
        # The memory stream is the bounded buffer, and ``_available`` counts what the hub added to
        # it, so taking a revision neither raises WouldBlock nor yields when one is buffered (anyio's
        # receive() spends a checkpoint and a TaskInfo per call, ~20 us measured; the buffer bounds
        # how long this goes on without suspending, as asyncio.Queue.get() does).
        while not self._available and not self._ended:
            await self._sleeper  # the hub wakes it when it adds to the buffer or ends us
        if self._available:
            self._available -= 1
            batch = self._receive.receive_nowait()
        else:
            batch = self._after_end()
        self._batch = batch
        self._index = 1
        return batch[0]

    async def batches(self) -> AsyncIterator[Sequence[Event]]:
        """Yield the events of each revision together, in revision order."""
        if self._index < len(self._batch):
            rest, self._batch = self._batch[self._index :], ()
            yield rest
        while True:
            while not self._available and not self._ended:
                await self._sleeper
            if self._available:
                self._available -= 1
                yield self._receive.receive_nowait()
                continue
            try:
                batch = self._after_end()
            except StopAsyncIteration:
                return
            yield batch

    def _after_end(self) -> Batch:
        """What was buffered before this subscription ended; then its error, or the end."""
        try:
            return self._receive.receive_nowait()
        except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
            if self._error is not None:
                raise self._error from None
            raise StopAsyncIteration from None

    def _end(self) -> None:
        self._ended = True
        self._hub.waker.wake(self._sleeper)


def history_epoch(sub: Subscription) -> tuple[object, int]:
    """(the shared watch, how many times it found etcd's history replaced): a subscriber that
    resubscribes to the same watch and finds another count missed a replacement meanwhile."""
    return sub._hub, sub._hub.resets


def leave(sub: Subscription) -> None:
    """Stop handing ``sub`` revisions, before its ``watch()`` context ends (which it still must)."""
    if sub._handle is not None:
        sub._hub.discard(sub._handle)


def caught_up(sub: Subscription) -> bool:
    """``sub`` took everything the shared watch handed it (nothing buffered, no private catch-up)
    and is still handed the rest (not cut off: lagged, failed or left)."""
    return not (sub._available or sub._ended or sub._handle is None or sub._handle.catching_up)


class _Subscriber:
    """The hub's side of one subscription."""

    __slots__ = (
        "catch_up",
        "catching_up",
        "hub",
        "last_revision",
        "pending",
        "send",
        "size",
        "subscription",
    )

    def __init__(
        self, hub: PrefixWatch, send: MemoryObjectSendStream[Batch], size: int, last_revision: int
    ) -> None:
        self.hub = hub
        self.send = send
        self.size = size
        self.last_revision = last_revision
        self.catching_up = False
        self.pending: list[Batch] = []
        self.subscription: Subscription | None = None
        #: The private catch-up stream's scope, cancelled when this subscriber is discarded.
        self.catch_up: anyio.CancelScope | None = None

    def offer(self, batch: Batch) -> None:
        """Hand one revision over without waiting; a full buffer cuts this subscriber off.

        This runs once per revision per subscriber, so it is written flat on purpose.
        """
        revision = batch[0].revision
        if revision <= self.last_revision and (revision < self.last_revision or not batch[0].resync):
            # Handed over already. Except a re-list at the revision last handed over (a gap found
            # with nothing written since): it corrects what was delivered up to that revision.
            return
        if self.catching_up:
            # The history replayed into pending at subscribe (at most HISTORY_EVENTS batches)
            # does not count against the live revisions it may hold.
            if len(self.pending) >= PENDING_LIMIT + HISTORY_EVENTS:
                self.lag(self._first_missing())
                return
            self.pending.append(batch)
            return
        try:
            self.send.send_nowait(batch)
        except anyio.WouldBlock:
            self.lag(revision)
            return
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self.hub.discard(self)
            return
        self.last_revision = revision
        target = self.subscription
        if target is not None:
            target._available += 1
            self.hub.waker.wake(target._sleeper)

    def _first_missing(self) -> int:
        """The first revision not handed over: the last one, while a re-list of it waits in
        pending (a gap the shared watch found at the revision the catch-up reached), else the next."""
        last = self.last_revision
        for batch in self.pending:
            if batch[0].revision > last:
                break
            if batch[0].resync and batch[0].revision == last:
                return last
        return last + 1

    def lag(self, resume_revision: int) -> None:
        """Cut this subscriber off: it got everything before ``resume_revision``."""
        self.hub.health.lagged_subscribers += 1
        self.hub.log.warning(
            "watch.subscriber_lagged", resume_revision=resume_revision, buffer_size=self.size
        )
        self.fail(
            SubscriberLagged(prefix=self.hub.label, resume_revision=resume_revision, buffer_size=self.size)
        )

    def offer_caught_up(self, batches: tuple[Batch, ...]) -> None:
        """Deliver revisions from the private catch-up stream, ahead of the pending live ones."""
        self.catching_up = False  # for these only: live revisions meanwhile still go to pending
        try:
            for batch in batches:
                self.offer(batch)
        finally:
            self.catching_up = True

    def finish_catch_up(self) -> None:
        self.catching_up = False
        pending, self.pending = self.pending, []
        for batch in pending:
            self.offer(batch)

    def fail(self, error: BaseException) -> None:
        """End this subscription: buffered revisions are still delivered, then ``error`` is raised."""
        target = self.subscription
        if target is not None and target._error is None:
            target._error = error
        self.hub.discard(self)


class PrefixWatch:
    """One server watcher for one prefix, shared by every subscriber of it on one client.

    It lists the prefix once (so it knows the current state and can resync after compaction), then
    follows it from that revision + 1 with a :class:`WatchLoop`, publishing each revision to the
    subscribers and into a bounded in-memory history.
    """

    def __init__(self, conn: Connection, prefix: bytes, on_closed: Callable[[PrefixWatch], None]) -> None:
        self.conn = conn
        self.prefix = prefix
        self.label = decode_key(prefix)
        self._on_closed = on_closed
        self.health = WatchHealth(self.label)
        self.waker = Waker(asyncio.get_running_loop())
        self.log = log.bind(prefix=self.label)
        self.state: WatchState | None = None
        #: Replaced, never mutated: publishing iterates it while a lagging subscriber removes itself,
        #: and a list edited under that loop skipped the subscriber after the one removed.
        self.subscribers: tuple[_Subscriber, ...] = ()
        self.history: deque[Batch] = deque()
        self._history_events = 0
        self.floor = 0  # history holds every revision from floor to state.delivered
        self._scope: anyio.CancelScope | None = None
        self._started = anyio.Event()
        self._start_error: BaseException | None = None
        self._starting = False
        self.closed = False
        self._holders = 0  # open watch() contexts, lagged or not
        #: Times etcd's history was found replaced (a wiped or restored cluster): see ``_reset``.
        self.resets = 0

    async def ensure_started(self, task_group: anyio.abc.TaskGroup) -> None:
        """List the prefix and start following it; raises if etcd cannot be read (e.g. unreachable)."""
        if self._starting:
            await self._started.wait()
            if isinstance(self._start_error, Exception):
                raise self._start_error
            return  # the starter was cancelled: the hub is closed and the caller makes a new one
        self._starting = True
        try:
            await task_group.start(self._run)
        except BaseException as exc:
            self._start_error = exc
            self.closed = True
            raise
        finally:
            self._started.set()

    async def _run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        with anyio.CancelScope() as scope:
            self._scope = scope
            listing, revision = await list_keys(self.conn, self.prefix)
            self.health.confirm()  # the listing is etcd saying "this is all, as of revision"
            self.state = WatchState(self.prefix, revision, listing)
            self.floor = revision + 1
            task_status.started()
            error: BaseException = ClientClosedError("the EtcdClient was closed")
            try:
                loop = WatchLoop(
                    self.conn,
                    self.state,
                    self._publish,
                    label=self.label,
                    on_reset=self._reset,
                    health=self.health,
                )
                await loop.run()
            except asyncio.CancelledError:
                # release() cancelled our scope during a stream read: grpc.aio then raises a
                # CancelledError of its own, without anyio's message, which the scope does not
                # take for its own; escaping, it ended this task "cancelled", and anyio (4.16)
                # cancels the task group, i.e. the client and whoever opened it.
                if not scope.cancel_called:
                    raise
            except AetcdcfgError as exc:
                self.log.error("watch.failed", error=str(exc))
                self.health.failed(str(exc))
                error = exc
            except Exception as exc:  # a bug of ours: end this prefix's subscriptions, not the client
                self.log.exception("watch.crashed", error=repr(exc))
                error = EtcdError(f"the watch of {self.label!r} stopped on an internal error: {exc!r}")
                self.health.failed(str(error))
            finally:
                if self.health.state != "failed":
                    self.health.state = "closed"
                self.closed = True
                self._on_closed(self)
                for sub in self.subscribers:
                    sub.fail(error)

    def status(self) -> WatchStatus:
        """A snapshot of this watch's freshness, built only when asked for."""
        delivered = self.state.delivered if self.state is not None else 0
        fill = 0.0
        for sub in self.subscribers:
            stats = sub.send.statistics()
            fill = max(fill, stats.current_buffer_used / max(stats.max_buffer_size, 1))
        return self.health.snapshot(delivered, len(self.subscribers), fill)

    def _publish(self, batches: tuple[Batch, ...]) -> None:
        history = self.history
        health = self.health
        for batch in batches:
            history.append(batch)
            self._history_events += len(batch)
            health.events_delivered += len(batch)
            for sub in self.subscribers:
                sub.offer(batch)
        while self._history_events > HISTORY_EVENTS and len(history) > 1:
            dropped = history.popleft()
            self._history_events -= len(dropped)
            self.floor = dropped[0].revision + 1

    def _reset(self, revision: int) -> None:
        """etcd's history was replaced (a wiped cluster): forget revisions of the old one, so the
        resync at ``revision`` and what follows reach subscribers although they are lower.

        A subscriber still replaying the old history (a private catch-up) can be given neither: its
        replay and the live revisions it holds are of the old history, and the resync is relative
        to what the shared watch had delivered, not to where it got. It fails, to re-read.
        """
        self.resets += 1
        self.history.clear()
        self._history_events = 0
        self.floor = revision + 1
        for sub in self.subscribers:
            if sub.catching_up:
                sub.pending = []
                sub.fail(
                    HistoryReplaced(
                        prefix=self.label, requested_revision=sub.last_revision + 1, compact_revision=revision
                    )
                )
            else:
                sub.last_revision = min(sub.last_revision, revision - 1)

    def subscribe(
        self, start_revision: int | None, buffer_size: int, *, with_snapshot: bool
    ) -> tuple[Subscription, _Subscriber]:
        """Attach a subscriber. Everything it needs up to now is queued before this returns."""
        state = self.state
        assert state is not None
        delivered = state.delivered
        if start_revision is None:
            first = delivered + 1
            replay: list[Batch] = []
        else:
            first = start_revision
            replay = [b for b in self.history if b[0].revision >= first] if first <= delivered else []
        send, receive = anyio.create_memory_object_stream[Batch](buffer_size + len(replay))
        sub = _Subscriber(self, send, buffer_size, first - 1)
        # Older than the history: etcd replays [first, floor) first, and everything here waits.
        sub.catching_up = first < self.floor
        snapshot = None
        if with_snapshot:
            keys = state.keys or {}
            # decode_key, inlined: this runs once per key of the prefix.
            snapshot = Snapshot(
                delivered, {k.decode("utf-8", "surrogateescape"): v[0] for k, v in keys.items()}
            )
        subscription = Subscription(self.label, receive, start_revision=first, snapshot=snapshot, hub=self)
        sub.subscription = subscription
        subscription._handle = sub
        for batch in replay:
            sub.offer(batch)
        self.subscribers = (*self.subscribers, sub)
        self._holders += 1
        return subscription, sub

    async def catch_up(self, sub: _Subscriber, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Replay ``[sub.last_revision + 1, floor)`` from etcd on a private stream, then go live."""
        state = self.state
        assert state is not None
        until = self.floor - 1
        private = WatchState(self.prefix, sub.last_revision)
        with anyio.CancelScope() as scope:
            sub.catch_up = scope
            task_status.started()
            self.log.info("watch.catch_up", from_revision=sub.last_revision + 1, until=until)
            try:
                await WatchLoop(
                    self.conn, private, sub.offer_caught_up, label=self.label, stop_at=until
                ).run()
            except AetcdcfgError as exc:
                sub.fail(exc)
                return
            finally:
                sub.catch_up = None
            sub.finish_catch_up()

    def discard(self, sub: _Subscriber) -> None:
        """Stop publishing to a subscriber (it failed, lagged or left)."""
        if sub in self.subscribers:
            self.subscribers = tuple(other for other in self.subscribers if other is not sub)
        if sub.catch_up is not None:
            sub.catch_up.cancel()  # a private catch-up lives only as long as its subscription
        sub.send.close()
        if sub.subscription is not None:
            sub.subscription._end()

    def release(self, sub: _Subscriber) -> None:
        """A ``watch()`` context ended; the last one to end stops the server watcher."""
        self.discard(sub)
        if sub.subscription is not None:
            sub.subscription._receive.close()
        self._holders -= 1
        if self._holders == 0 and self._scope is not None and not self.closed:
            self.closed = True
            self._on_closed(self)
            self._scope.cancel()


class WatchRegistry:
    """The client's prefix watches: one :class:`PrefixWatch` per prefix, shared by its subscribers.

    Its watches run in the client's task group, so closing the client ends them all.
    """

    def __init__(self, conn: Connection, task_group: anyio.abc.TaskGroup) -> None:
        self._conn = conn
        self._task_group = task_group
        self._hubs: dict[bytes, PrefixWatch] = {}

    def _forget(self, hub: PrefixWatch) -> None:
        if self._hubs.get(hub.prefix) is hub:
            del self._hubs[hub.prefix]

    async def _hub(self, prefix: bytes) -> PrefixWatch:
        """The running watch of ``prefix``, started (listed) if there is none yet."""
        while True:
            hub = self._hubs.get(prefix)
            if hub is None or hub.closed:
                hub = PrefixWatch(self._conn, prefix, self._forget)
                self._hubs[prefix] = hub
            try:
                await hub.ensure_started(self._task_group)
            except anyio.get_cancelled_exc_class():
                raise
            except BaseException:
                self._forget(hub)
                raise
            if not hub.closed:
                return hub

    def statuses(self) -> list[WatchStatus]:
        """A status snapshot of every prefix watch running now."""
        return [hub.status() for hub in self._hubs.values()]

    @contextlib.asynccontextmanager
    async def subscribe(
        self, prefix: bytes, start_revision: int | None, buffer_size: int, *, with_snapshot: bool
    ) -> AsyncIterator[Subscription]:
        """One subscription for the length of the context (see ``EtcdClient.watch``)."""
        hub = await self._hub(prefix)
        subscription, sub = hub.subscribe(start_revision, buffer_size, with_snapshot=with_snapshot)
        try:
            if sub.catching_up:
                await self._task_group.start(hub.catch_up, sub)
            yield subscription
        finally:
            hub.release(sub)
