"""WatchLoop: the one I/O loop that keeps a server watcher alive for one WatchState.

It opens a gRPC ``Watch`` stream on a reachable member, creates the watcher at
``state.resume_revision`` and feeds every response to the state. Any failure — reset, member crash,
leader loss (require-leader metadata), a silent black hole or a stream alive but behind (found by the
session's watchdog) — ends the session; the loop backs off with jitter, prefers another member, and
resumes where the state says. Only errors that retrying cannot fix (permission, credentials,
compacted history for a stream that cannot re-list) leave ``run()``.

Two kinds of endpoint, told apart by etcd's own answer to a progress request (watch id -1), which
etcd sends and its gRPC proxy never does (``Endpoint.answers_progress``):

* **etcd itself.** After ``keepalive_time`` of silence the stream is asked for a progress
  notification; an answer within ``keepalive_timeout`` keeps it. Progress notifications advance the
  delivered revision. This costs etcd nothing and reads nothing.
* **Anything else** (etcd's gRPC proxy, or an endpoint not yet known). The proxy forwards etcd's
  progress notifications but can drop revisions of a watcher it is merging into a shared one (etcd
  issue 9988), so here notifications prove only that the stream is open, and only events advance the
  delivered revision. Every ``keepalive_time`` the watchdog *verifies* the watch with reads on the same
  channel (``_verify``): that what was delivered since the last check is etcd's history at that
  revision (else a gap: re-list), and that nothing etcd holds is left undelivered for longer than
  ``keepalive_timeout`` (else the stream is behind: replace it). A read answered also proves the path,
  the proxy and etcd alive. A watch more than ``PROXY_REPLAY_LIMIT`` revisions behind never replays
  through such an endpoint: it re-lists instead.

Fragmenting: watches are created with ``fragment=False``. etcd 3.5 splits large responses (from
``--max-request-bytes``) at a high CPU cost (~38x for a large replay, measured), and a response only
needs splitting when it is larger than this client's ``max_message_bytes``. When one is, the stream
fails with a receive-limit error; the next session asks for fragments until the revisions of that
response are delivered, then goes back to whole responses.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import grpc
from aetcd.rpc import rpc_pb2

from ._backoff import Backoff
from ._grpc_errors import (
    CompactedRead,
    Failure,
    classify,
    classify_cancel,
    describe,
    is_stray_cancel,
    own_cancellation,
    to_error,
)
from ._history import compact_revision
from ._keys import prefix_range_end
from ._log import Logger, get_logger
from ._reads import cluster_revision, history_matches, list_keys, readable_at
from ._resume import Batch, StepKind, WatchState
from .errors import (
    AuthenticationFailed,
    EtcdError,
    EtcdUnavailable,
    PermissionDenied,
    RevisionCompacted,
)
from .status import WatchHealth

if TYPE_CHECKING:
    from ._channel import Endpoint
    from ._connection import Connection

__all__ = ["PROXY_REPLAY_LIMIT", "WatchLoop"]

log = get_logger()


#: Revisions a watch may be behind when it resumes through an endpoint that is not known to be etcd;
#: further behind, it re-lists (see ``WatchLoop._check_proxy_backlog``). Half of etcd's 1,000
#: revisions per catch-up response, for the writes that land between the check and the creation.
PROXY_REPLAY_LIMIT = 500


class _StreamFailed(Exception):
    """The session ended for a reason that reconnecting can fix."""

    def __init__(self, cause: str, *, penalize: bool = True) -> None:
        super().__init__(cause)
        self.cause = cause
        self.penalize = penalize
        self.after_created = False  # the session had created its watcher (the stream worked)


class _Relist(Exception):
    """History is gone or the stream skipped some (compaction, a wiped cluster, a gap): re-list."""

    def __init__(self, reason: str, revision: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.revision = revision


@dataclass(eq=False)
class _Session:
    """One gRPC stream and everything known about it; its tasks share this, and nothing else."""

    endpoint: Endpoint
    call: grpc.aio.StreamStreamCall
    tg: anyio.abc.TaskGroup
    token: str | None
    last_rx: float  # when the stream (or a read on its channel) last answered
    answer_rx: float = 0.0  # when etcd last answered a progress request on this stream
    idle_probe: bool = False  # a progress request went out on a stream silent since before it
    created: bool = False
    created_event: anyio.Event = field(default_factory=anyio.Event)
    #: Why the watchdog ended the session (it cancels the session's task group after setting it).
    failure: Exception | None = None

    def fail(self, failure: Exception) -> None:
        if self.failure is None:
            self.failure = failure
        self.tg.cancel_scope.cancel()

    def spawn(self, task: Callable[[_Session], Awaitable[None]]) -> None:
        """Run one of the session's tasks; whatever it raises ends the session, never its group."""

        async def guarded() -> None:
            try:
                await task(self)
            except asyncio.CancelledError:
                if not is_stray_cancel(channel_closed=self.endpoint.closed):
                    await own_cancellation()
                    raise
                self.fail(_StreamFailed(f"the channel to {self.endpoint.url} was closed"))
            except Exception as exc:  # a typed outcome (_Relist, PermissionDenied, ...) or a bug of ours
                self.fail(exc)

        self.tg.start_soon(guarded)


class WatchLoop:
    """Keeps one watcher on ``state.prefix`` alive, handing complete revisions to ``on_batches``.

    ``on_batches`` is called synchronously, in revision order, never with a revision twice. With
    ``stop_at`` the loop returns once everything up to that revision has been delivered.
    """

    def __init__(
        self,
        conn: Connection,
        state: WatchState,
        on_batches: Callable[[tuple[Batch, ...]], None],
        *,
        label: str,
        stop_at: int | None = None,
        on_reset: Callable[[int], None] | None = None,
        health: WatchHealth | None = None,
    ) -> None:
        self._conn = conn
        #: Freshness as it happens (see ``status.py``); the shared watch's is read by its status.
        self.health = health if health is not None else WatchHealth(label)
        self._on_reset = on_reset
        self._state = state
        self._on_batches = on_batches
        self._label = label
        self._stop_at = stop_at
        #: With fragments until ``delivered`` passes this (a response was too large for us).
        self._fragment_past: int | None = None
        self._connected_once = False
        self._lost_at: float | None = None  # when the current outage began
        self._fresh_token = False  # the token was renewed after a refusal: the next one is final
        self._history_checked = False
        #: A revision at which the delivered state was known to equal etcd's (a listing, or a
        #: verification through a possible proxy); the next verification compares from there.
        self._checkpoint = state.delivered
        self.connected = anyio.Event()

    @property
    def _log(self) -> Logger:
        return log.bind(prefix=self._label)

    def _reached_stop(self) -> bool:
        return self._stop_at is not None and self._state.delivered >= self._stop_at

    async def run(self) -> None:
        """Watch until cancelled (or ``stop_at`` is reached); raises only unfixable errors."""
        backoff = Backoff(initial=0.05, maximum=2.0)
        settings = self._conn.settings
        while not self._reached_stop():
            try:
                endpoint = await self._conn.ready(settings.connect_timeout)
                resuming = self._lost_at is not None
                if resuming and not self._history_checked and self._state.tracks_state:
                    await self._check_history()
                if resuming or not self._state.tracks_state:  # behind: replay, or re-list?
                    if endpoint.answers_progress is None:
                        await self._identify(endpoint)
                    if endpoint.answers_progress is not True:
                        await self._check_proxy_backlog()
            except EtcdUnavailable as exc:
                self._note_lost(str(exc))
                await anyio.sleep(backoff.next_delay())
                continue
            except _Relist as relist:
                await self._relist(relist)
                backoff.reset()
                continue
            try:
                if await self._session(endpoint):
                    return
            except _StreamFailed as failure:
                if failure.after_created:
                    backoff.reset()  # the stream worked: this is a new failure, not the same one again
                if failure.penalize:
                    self._conn.mark_failed(endpoint, failure.cause)
                self._note_lost(failure.cause, endpoint=endpoint.url)
                self._state.stream_lost()
                await anyio.sleep(backoff.next_delay())
                continue
            except _Relist as relist:
                self._state.stream_lost()
                await self._relist(relist)
                backoff.reset()
                continue
            backoff.reset()

    async def _check_history(self) -> None:
        """After an outage, make sure etcd still has the history we delivered (not a wiped cluster)."""
        state = self._state
        assert state.keys is not None
        same = await history_matches(self._conn, state.prefix, state.delivered, state.keys)
        self._history_checked = True
        if same is None:
            # etcd compacted ``delivered``: its compact revision is at least ``resume_revision``, and
            # a watch from there would miss a delete written at exactly that revision.
            raise _Relist("compacted", 0)
        if same is False:
            self._log.error("watch.revision_reset", delivered=state.delivered, reason="history_changed")
            raise _Relist("history_changed", 0)

    def _note_lost(self, cause: str, endpoint: str | None = None) -> None:
        self.health.lost(cause)
        if self._lost_at is None:
            self._history_checked = False
            self._lost_at = anyio.current_time()
            self._log.warning(
                "watch.disconnected", endpoint=endpoint, cause=cause, revision=self._state.delivered
            )
        else:
            self._log.debug("watch.retry", endpoint=endpoint, cause=cause)

    async def _relist(self, relist: _Relist) -> None:
        state = self._state
        if not state.tracks_state:
            compacted = relist.revision or await compact_revision(self._conn, state.prefix, state.delivered)
            raise RevisionCompacted(
                prefix=self._label, requested_revision=state.resume_revision, compact_revision=compacted
            )
        if relist.reason == "compacted":
            self._log.warning(
                "watch.compacted",
                resume_revision=state.resume_revision,
                compact_revision=relist.revision or None,  # None: at least resume_revision
            )
        listing, revision = await list_keys(self._conn, state.prefix, retry_forever=True)
        if relist.reason in ("history_changed", "revision_reset") and self._on_reset is not None:
            self._on_reset(revision)  # a new history: revisions restart below what was delivered
        batch = state.resync(listing, revision)
        self._checkpoint = revision
        self.health.caught_up()
        self._log.warning("watch.resynced", reason=relist.reason, revision=revision, changes=len(batch))
        if batch:
            self._on_batches((batch,))

    async def _session(self, endpoint: Endpoint) -> bool:
        """One gRPC stream; True when ``stop_at`` was reached. Raises _StreamFailed or _Relist."""
        if self._fragment_past is not None and self._state.delivered > self._fragment_past:
            self._fragment_past = None  # the oversized response is through: whole responses again
        self._state.trust_progress = endpoint.answers_progress is True
        call = endpoint.watch.Watch(metadata=self._conn.metadata())
        outcome: bool | Exception = False
        try:
            async with anyio.create_task_group() as tg:
                session = _Session(endpoint, call, tg, self._conn.token, last_rx=anyio.current_time())
                session.spawn(self._watchdog)
                try:
                    outcome = await self._read_loop(session)
                except Exception as exc:  # carried out of the task group unwrapped
                    outcome = exc
                tg.cancel_scope.cancel()
        finally:
            call.cancel()
        if session.failure is not None:
            outcome = session.failure
        if isinstance(outcome, EtcdUnavailable):
            # e.g. re-authenticating or checking the revision on a member that just went away
            outcome = _StreamFailed(str(outcome))
        if isinstance(outcome, _StreamFailed):
            outcome.after_created = session.created
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    # -- the watchdog --------------------------------------------------------------------------------

    async def _watchdog(self, session: _Session) -> None:
        """Keep the session honest (see the module docstring); ``session.fail()`` ends it."""
        settings = self._conn.settings
        if session.endpoint.answers_progress is not True:
            with anyio.move_on_after(settings.keepalive_time + settings.keepalive_timeout):
                await session.created_event.wait()
            if not session.created:
                session.fail(self._stalled("no watch created"))
                return
        while session.endpoint.answers_progress is not True:
            # Not known to be etcd: verify by reads, now and every keepalive_time, events or not. A
            # tick starts keepalive_time after the last one started (or at once after a long one), so
            # a change left undelivered is found within keepalive_time + keepalive_timeout.
            began = anyio.current_time()
            await self._verify_tick(session)
            if session.failure is not None:
                return
            await anyio.sleep(max(began + settings.keepalive_time - anyio.current_time(), 0))
        self._state.trust_progress = True
        while True:  # etcd itself: a progress request after keepalive_time of silence
            idle = anyio.current_time() - session.last_rx
            if idle < settings.keepalive_time:
                await anyio.sleep(settings.keepalive_time - idle)
                continue
            probe_at = anyio.current_time()
            session.idle_probe = True
            await self._probe(session.call)
            await anyio.sleep(settings.keepalive_timeout)
            if session.last_rx < probe_at:
                session.fail(self._stalled())
                return

    def _stalled(self, what: str = "no answer") -> _StreamFailed:
        settings = self._conn.settings
        return _StreamFailed(
            f"{what} from the watch's endpoint within keepalive_time + keepalive_timeout "
            f"({settings.keepalive_time:g}s + {settings.keepalive_timeout:g}s)"
        )

    async def _verify_tick(self, session: _Session) -> None:
        """Ask for progress (does the endpoint answer: is it etcd?) and verify the watch by reads.

        An answer whenever it comes makes the endpoint etcd (the read loop sees it); only while
        nothing is known of the endpoint does the tick wait ``keepalive_timeout`` for one, to learn
        that it is not etcd.
        """
        asked = anyio.current_time()
        await self._probe(session.call)
        answered = await self._verify(session)  # a gap or a stream behind raises: the session ends
        if not answered:
            session.fail(self._stalled())
            return
        if session.endpoint.answers_progress is not None:
            return
        await anyio.sleep(max(asked + self._conn.settings.keepalive_timeout - anyio.current_time(), 0))
        # No answer while the path works: not etcd itself (silence on a dead path proves nothing).
        self._learn(session.endpoint, answered=session.answer_rx >= asked)

    async def _identify(self, endpoint: Endpoint) -> None:
        """Before resuming on an endpoint not known yet, ask it on a stream of its own whether it
        answers a progress request (etcd does, its gRPC proxy does not), within ``keepalive_timeout``.

        A watcher created but no answer: not etcd. Silence on a dead path leaves it unknown, and an
        unknown endpoint is treated as a proxy (a long backlog is re-listed, not replayed): this keeps
        a direct resume exact when etcd answers in time.
        """
        prefix = self._state.prefix
        call = endpoint.watch.Watch(metadata=self._conn.metadata())
        create = rpc_pb2.WatchCreateRequest(key=prefix)  # one key, from now: nothing to replay
        created = False
        try:
            with anyio.move_on_after(self._conn.settings.keepalive_timeout):
                await call.write(rpc_pb2.WatchRequest(create_request=create))
                await self._probe(call)
                while True:
                    response = await call.read()
                    if response is grpc.aio.EOF:
                        return
                    created = created or response.created
                    if response.watch_id == -1 and not response.events and not response.created:
                        self._learn(endpoint, answered=True)
                        return
            if created:  # the path works, yet no answer: not etcd itself
                self._learn(endpoint, answered=False)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return
        except asyncio.CancelledError:
            if not is_stray_cancel(channel_closed=endpoint.closed):
                await own_cancellation()
                raise
        finally:
            call.cancel()

    @staticmethod
    async def _probe(call: grpc.aio.StreamStreamCall) -> None:
        """Ask for a progress notification; a stream that already ended is the reader's to report."""
        request = rpc_pb2.WatchRequest(progress_request=rpc_pb2.WatchProgressRequest())
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await call.write(request)

    def _learn(self, endpoint: Endpoint, *, answered: bool) -> None:
        """Record whether ``endpoint`` answered a progress request; an answer is final, silence is
        believed only until one comes (an etcd member busy replaying may answer late)."""
        if answered:
            endpoint.answers_progress = True
        elif endpoint.answers_progress is None:
            endpoint.answers_progress = False
            self._log.info("watch.progress_unanswered", endpoint=endpoint.url, probe="range")

    async def _read(self, session: _Session, *, tokenless_retry: bool = True, **fields: Any) -> Any:
        """One range on the session's own channel, within ``keepalive_timeout``; None if unanswered."""
        prefix = self._state.prefix
        request = rpc_pb2.RangeRequest(key=prefix, range_end=prefix_range_end(prefix), **fields)
        endpoint = session.endpoint
        timeout = self._conn.settings.keepalive_timeout
        token = self._conn.token
        try:
            response = await endpoint.kv.Range(request, timeout=timeout, metadata=self._conn.metadata())
        except grpc.aio.AioRpcError as exc:
            failure = classify(exc)
            if failure is Failure.COMPACTED:
                raise CompactedRead(describe(exc), endpoint=endpoint.url) from None
            if (
                failure is Failure.AUTH_FAILED
                and token is None
                and self._conn.settings.username
                and tokenless_retry
            ):
                # No token sent: etcd had auth off when we connected, and an operator turned it on
                # since. Not a credentials problem (yet): authenticate once, as requests do, and read.
                await self._conn.reauthenticate(endpoint, None)
                return await self._read(session, tokenless_retry=False, **fields)
            if failure in (Failure.AUTH_FAILED, Failure.PERMISSION):
                raise to_error(exc, endpoint=endpoint.url, key=self._label) from None
            if failure is Failure.AUTH_EXPIRED and self._conn.settings.username:
                await self._conn.reauthenticate(endpoint, session.token)
            self._log.debug("watch.probe_failed", endpoint=endpoint.url, cause=describe(exc))
            return None
        session.last_rx = max(session.last_rx, anyio.current_time())
        return response

    async def _verify(self, session: _Session) -> bool:
        """Check the watch against etcd with reads on its own channel; False if they go unanswered.

        1. What was delivered since the last checkpoint is etcd's history: at ``delivered``, etcd's
           prefix holds as many keys as ours, and the keys it changed after the checkpoint are ours,
           at the same mod revisions (else the stream skipped revisions: re-list).
        2. Nothing etcd holds now is left undelivered: no key changed after ``delivered`` and the same
           number of keys; else the stream gets ``keepalive_timeout`` to bring it, and is replaced
           if it does not (alive but behind).
        Without the prefix's state (a private catch-up) only 2's key check is made.
        """
        state = self._state
        keys = state.keys
        delivered = state.delivered
        count = len(keys) if keys is not None else -1
        try:
            if keys is not None and delivered != self._checkpoint:
                since = self._checkpoint
                ours = {key: kv[1] for key, kv in keys.items() if kv[1] > since}
                past = await self._read(
                    session, revision=delivered, keys_only=True, min_mod_revision=since + 1
                )
                if past is None:
                    return False
                if past.count != count or {kv.key: kv.mod_revision for kv in past.kvs} != ours:
                    self._log.error("watch.gap_detected", revision=delivered, checkpoint=since)
                    raise _Relist("gap", 0)
                self._checkpoint = delivered
            now = await self._read(session, keys_only=True, limit=1, min_mod_revision=delivered + 1)
        except CompactedRead:
            raise _Relist("compacted", 0) from None  # cannot verify what etcd no longer holds
        if now is None:
            return False
        if not now.kvs and (keys is None or now.count == count):
            self.health.confirm()  # etcd's prefix is what we delivered: current as of now
            return True
        # etcd holds changes we have not delivered: in flight, or dropped on the way. Until they
        # come, the status says so (and nothing confirms the watch fresh).
        revision = int(now.header.revision)
        self.health.behind(int(now.kvs[0].mod_revision) if now.kvs else revision)
        await anyio.sleep(self._conn.settings.keepalive_timeout)
        if state.delivered >= revision:
            self.health.caught_up()
            return True  # they came (the next tick verifies them)
        delivered = state.delivered
        count = len(keys) if keys is not None else -1
        try:
            then = await self._read(
                session, revision=revision, keys_only=True, limit=1, min_mod_revision=delivered + 1
            )
        except CompactedRead:
            raise _Relist("compacted", 0) from None
        if then is None:
            return False
        if not then.kvs and (keys is None or then.count == count):
            self.health.caught_up()
            self.health.confirm()  # everything up to that revision is here
            return True
        self._log.warning("watch.behind", revision=delivered, etcd_revision=revision)
        raise self._stalled("events still missing")

    async def _check_proxy_backlog(self) -> None:
        """Through an endpoint not known to be etcd, refuse to replay a long backlog: re-list instead.

        etcd 3.5's proxy sends a catching-up watcher the first batch of its backlog (etcd replays
        1,000 revisions per response), then merges it into the live watch of the same range from
        that response's header revision on: the revisions in between are never sent (measured: 7 of
        9 storms of 200 clients lost some; etcd issue 9988). A watch that keeps the prefix's state
        re-lists and emits the difference (``resync``); a private catch-up stream cannot, and fails.
        """
        state = self._state
        current = await cluster_revision(self._conn, state.prefix)
        behind = current - state.delivered
        if behind < PROXY_REPLAY_LIMIT:
            return
        if not state.tracks_state:
            raise EtcdError(
                f"replaying {behind} revisions of {self._label!r} through etcd's gRPC proxy would skip "
                f"some (the proxy can lose revisions of a watcher {PROXY_REPLAY_LIMIT} or more behind); "
                "read old revisions from an etcd member directly"
            )
        self._log.warning(
            "watch.proxy_backlog", revision=state.delivered, etcd_revision=current, behind=behind
        )
        raise _Relist("proxy_backlog", current)

    # -- the stream ----------------------------------------------------------------------------------

    async def _read_loop(self, session: _Session) -> bool:
        state = self._state
        endpoint = session.endpoint
        call = session.call
        create = rpc_pb2.WatchCreateRequest(
            key=state.prefix,
            range_end=prefix_range_end(state.prefix),
            start_revision=state.resume_revision,
            progress_notify=True,
            fragment=self._fragment_past is not None,
        )
        try:
            try:
                await call.write(rpc_pb2.WatchRequest(create_request=create))
            except asyncio.InvalidStateError:
                raise _StreamFailed(f"{endpoint.url} ended the stream before the watch was created") from None
            # anyio.current_time() is this loop's time() behind a few Python frames (~7x the
            # cost, measured): read once per response, so the clock is taken from the loop itself.
            clock = asyncio.get_running_loop().time
            health = self.health
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    raise _StreamFailed(f"{endpoint.url} closed the watch stream")
                session.last_rx = clock()
                step = state.on_response(response)
                kind = step.kind
                if kind is StepKind.EMIT:  # the common case first: one revision or more of events
                    if state.trust_progress:
                        health.confirm()  # through a proxy, only a verification confirms
                    self._on_batches(step.batches)
                    if self._reached_stop():
                        return True
                    continue
                if kind is StepKind.PROGRESS:
                    health.confirm()
                    if self._reached_stop():
                        return True
                elif kind is StepKind.ALIVE:
                    if state.trust_progress:
                        health.confirm()  # etcd: nothing newer for this watcher
                elif kind is StepKind.ANSWER:
                    session.answer_rx = session.last_rx
                    endpoint.answers_progress = True  # only etcd itself answers a progress request
                    state.trust_progress = True
                    if session.idle_probe:
                        # etcd < 3.5.8 answers at once, synced or not; after keepalive_time of
                        # silence the watcher is synced (a lagging one is being sent events).
                        session.idle_probe = False
                        health.confirm()
                elif kind is StepKind.CREATED:
                    await self._on_created(session, step.revision)
                elif kind is StepKind.RELIST:
                    raise _Relist("compacted", step.revision)
                elif kind is StepKind.CHECK_REVISION:
                    await self._check_revision(step.revision, endpoint)
                elif kind is StepKind.CANCELED:
                    await self._on_canceled(step.reason, endpoint, session.token)
        except asyncio.CancelledError:
            if not is_stray_cancel(channel_closed=endpoint.closed):
                await own_cancellation()
                raise
            raise _StreamFailed(f"the channel to {endpoint.url} was closed under the watch") from None
        except grpc.aio.AioRpcError as exc:
            failure = classify(exc)
            if failure is Failure.TOO_LARGE:
                self._too_large(describe(exc))
            if failure is Failure.AUTH_EXPIRED and self._conn.settings.username:
                await self._conn.reauthenticate(endpoint, session.token)
                raise _StreamFailed("auth token expired; authenticated again", penalize=False) from None
            if failure in (Failure.AUTH_FAILED, Failure.PERMISSION):
                raise to_error(exc, endpoint=endpoint.url, key=self._label) from None
            raise _StreamFailed(describe(exc)) from None

    def _too_large(self, cause: str) -> None:
        """A response exceeded ``max_message_bytes``: ask for fragments next time, or give up if we did."""
        if self._fragment_past is not None:
            raise EtcdError(
                f"a watch response of {self._label!r} is larger than max_message_bytes even with "
                f"fragments requested ({cause}): etcd splits at its --max-request-bytes and etcd's "
                "gRPC proxy does not split at all; raise max_message_bytes above the largest revision"
            )
        self._fragment_past = self._state.delivered
        self._log.warning("watch.fragmenting", revision=self._state.delivered, cause=cause)
        raise _StreamFailed(cause, penalize=False)

    async def _on_created(self, session: _Session, revision: int) -> None:
        state = self._state
        endpoint = session.endpoint
        if revision > state.delivered and not await readable_at(self._conn, state.prefix, state.delivered):
            # etcd accepts a watch *at* its compact revision, but the delete tombstones written
            # there are gone: only a watch above it replays exactly.
            raise _Relist("compacted", 0)
        self._fresh_token = False
        session.created = True
        session.created_event.set()
        self.health.connected(endpoint.url)
        if revision <= state.delivered and state.trust_progress:
            self.health.confirm()  # etcd has nothing newer at all
        elif state.trust_progress:
            # Confirm as soon as etcd says nothing newer is pending, not a keepalive_time later.
            session.spawn(self._confirm_current)
        if self._conn.settings.credentials and self._conn.settings.permission_check_interval:
            session.spawn(self._check_permission)
        if self._lost_at is not None:
            self._log.info(
                "watch.resumed",
                endpoint=endpoint.url,
                revision=state.delivered,
                outage_s=round(anyio.current_time() - self._lost_at, 3),
                behind=max(revision - state.delivered, 0),
            )
            self._lost_at = None
        elif not self._connected_once:
            self._log.info("watch.connected", endpoint=endpoint.url, revision=state.delivered)
        self._connected_once = True
        self.connected.set()

    async def _check_permission(self, session: _Session) -> None:
        """etcd checks a watch's permission only when it is created: re-check it with a one-key read
        every ``permission_check_interval``, so a revoked role ends the watch with PermissionDenied."""
        while True:
            await anyio.sleep(self._conn.settings.permission_check_interval)
            try:
                await self._read(session, count_only=True, limit=1)
            except (PermissionDenied, AuthenticationFailed) as denied:
                self._log.error("watch.permission_revoked", endpoint=session.endpoint.url)
                session.fail(denied)
                return

    async def _confirm_current(self, session: _Session) -> None:
        """One read: confirmed current if no key under the prefix changed after ``delivered`` and
        it holds as many keys as delivered (a deletion leaves no key changed, one key fewer). If
        not, the watch brings the changes, and confirms then."""
        keys = self._state.keys
        count = len(keys) if keys is not None else -1
        response = await self._read(
            session, keys_only=True, limit=1, min_mod_revision=self._state.delivered + 1
        )
        if response is not None and not response.kvs and (keys is None or response.count == count):
            self.health.confirm()

    async def _check_revision(self, reported: int, endpoint: Endpoint) -> None:
        """A member reported a revision below what was delivered: lagging member, or a reset cluster?"""
        current = await cluster_revision(self._conn, self._state.prefix)
        if current < self._state.delivered:
            self._log.error(
                "watch.revision_reset",
                endpoint=endpoint.url,
                delivered=self._state.delivered,
                etcd_revision=current,
            )
            raise _Relist("revision_reset", current)
        self._log.info("watch.member_behind", endpoint=endpoint.url, member_revision=reported)

    async def _on_canceled(self, reason: str, endpoint: Endpoint, token: str | None) -> None:
        if classify_cancel(reason) is Failure.PERMISSION:
            # etcd 3.5 also says this when the stream's token expired: re-authenticate once first.
            if self._conn.settings.username and not self._fresh_token:
                self._fresh_token = True
                await self._conn.reauthenticate(endpoint, token)
                raise _StreamFailed("watch refused; authenticated again", penalize=False)
            raise PermissionDenied(
                "the etcd user's role does not permit watching", key=self._label, endpoint=endpoint.url
            )
        raise _StreamFailed(f"watch canceled by {endpoint.url}: {reason}")
