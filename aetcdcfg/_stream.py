"""WatchLoop: the one I/O loop that keeps a server watcher alive for one WatchState.

It opens a gRPC ``Watch`` stream on a reachable member, creates the watcher at
``state.resume_revision`` and feeds every response to the state. Any failure — reset, member crash,
leader loss (require-leader metadata), a silent black hole (found by its own probe, see ``_watchdog``)
— ends the session; the loop backs off with jitter, prefers another member, and resumes where the
state says. Only errors that retrying cannot fix (permission, credentials, compacted history for a
stream that cannot re-list) leave ``run()``.

Liveness probe: after ``keepalive_time`` of silence the stream is asked for a progress notification.
etcd's gRPC proxy never answers that request, so on an endpoint not yet known to answer it the probe
also sends a linearizable read of the prefix on the same channel (``_probe_read``): the proxy forwards
it to etcd, so an answer proves the proxy, its connection and etcd behind it alive. Either answer within
``keepalive_timeout`` keeps the stream; an endpoint that answered a progress request is then probed
with progress requests only (etcd answers them for free).
Both unanswered means the stream is dead. What a read cannot prove through a proxy is that the
proxy's own upstream watch still delivers; etcd's proxy re-creates that watch itself.

Fragmenting: watches are created with ``fragment=False``. etcd 3.5 splits large responses (from
``--max-request-bytes``) at a high CPU cost (~38x for a large replay, measured), and a response only
needs splitting when it is larger than this client's ``max_message_bytes``. When one is, the stream
fails with a receive-limit error; the next session asks for fragments until the revisions of that
response are delivered, then goes back to whole responses.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import grpc
from aetcd.rpc import rpc_pb2

from ._backoff import Backoff
from ._grpc_errors import Failure, classify, describe, to_error
from ._history import compact_revision
from ._keys import prefix_range_end
from ._log import Logger, get_logger
from ._reads import cluster_revision, history_matches, list_keys, readable_at
from ._resume import Batch, StepKind, WatchState
from .errors import EtcdError, EtcdUnavailable, PermissionDenied, RevisionCompacted
from .status import WatchHealth

if TYPE_CHECKING:
    from ._channel import Endpoint
    from ._connection import Connection

__all__ = ["WatchLoop"]

log = get_logger()


#: Revisions a watch may be behind when it resumes through etcd's gRPC proxy; further behind, it
#: re-lists (see ``WatchLoop._check_proxy_backlog``). Half of etcd's 1,000 revisions per catch-up
#: response, for the writes that land between the check and the watcher's creation.
PROXY_REPLAY_LIMIT = 500


class _StreamFailed(Exception):
    """The session ended for a reason that reconnecting can fix."""

    def __init__(self, cause: str, *, penalize: bool = True) -> None:
        super().__init__(cause)
        self.cause = cause
        self.penalize = penalize


class _Relist(Exception):
    """History is gone (compaction, or etcd's revision went backwards): re-list the prefix."""

    def __init__(self, reason: str, revision: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.revision = revision


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
        self._last_rx = 0.0  # a response on the stream, or a liveness read answered
        self._progress_rx = 0.0  # an event-less progress notification on the stream
        self._idle_probe = False  # a progress request went out on a stream silent since before it
        self._session_tg: anyio.abc.TaskGroup | None = None
        self._call: grpc.aio.StreamStreamCall | None = None
        #: With fragments until ``delivered`` passes this (a response was too large for us).
        self._fragment_past: int | None = None
        self._fragmented = False
        self._stalled = False
        self._connected_once = False
        self._lost_at: float | None = None
        self._lost_revision = 0
        self._fresh_token = False
        self._history_checked = False
        self._created_in_session = False
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
                if self._lost_at is not None and not self._history_checked and self._state.tracks_state:
                    await self._check_history()
                if endpoint.answers_progress is False:
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
                if self._created_in_session:
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
            self._lost_revision = self._state.delivered
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
        self._log.warning("watch.resynced", reason=relist.reason, revision=revision, changes=len(batch))
        if batch:
            self._on_batches((batch,))

    async def _session(self, endpoint: Endpoint) -> bool:
        """One gRPC stream; True when ``stop_at`` was reached. Raises _StreamFailed or _Relist."""
        token = self._conn.token
        self._created_in_session = False
        if self._fragment_past is not None and self._state.delivered > self._fragment_past:
            self._fragment_past = None  # the oversized response is through: whole responses again
        self._fragmented = self._fragment_past is not None
        call = endpoint.watch.Watch(metadata=self._conn.metadata())
        self._last_rx = anyio.current_time()
        self._stalled = False
        outcome: bool | Exception = False
        try:
            async with anyio.create_task_group() as tg:
                self._session_tg = tg
                self._call = call
                tg.start_soon(self._watchdog, call, endpoint, tg)
                try:
                    outcome = await self._read_loop(call, endpoint, token)
                except Exception as exc:  # carried out of the task group unwrapped
                    outcome = exc
                tg.cancel_scope.cancel()
        finally:
            call.cancel()
        if self._stalled:
            raise _StreamFailed(
                f"no answer from {endpoint.url} within keepalive_time + keepalive_timeout "
                f"({self._conn.settings.keepalive_time:g}s + {self._conn.settings.keepalive_timeout:g}s)"
            )
        if isinstance(outcome, EtcdUnavailable):
            # e.g. re-authenticating or checking the revision on a member that just went away
            raise _StreamFailed(str(outcome))
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def _watchdog(
        self, call: grpc.aio.StreamStreamCall, endpoint: Endpoint, tg: anyio.abc.TaskGroup
    ) -> None:
        """Probe a silent stream (see the module docstring); give up on it if nothing answers."""
        settings = self._conn.settings
        while True:
            idle = anyio.current_time() - self._last_rx
            if idle < settings.keepalive_time:
                await anyio.sleep(settings.keepalive_time - idle)
                continue
            probe_at = anyio.current_time()
            known = endpoint.answers_progress
            self._idle_probe = True
            tg.start_soon(self._probe, call)
            if not known:
                tg.start_soon(self._probe_read, endpoint, settings.keepalive_timeout)
            await anyio.sleep(settings.keepalive_timeout)
            if self._last_rx < probe_at:
                self._stalled = True
                tg.cancel_scope.cancel()
                return
            if not known:
                self._learn(endpoint, answered=self._progress_rx >= probe_at)

    @staticmethod
    async def _probe(call: grpc.aio.StreamStreamCall) -> None:
        """Ask for a progress notification; a stream that already ended is the reader's to report."""
        request = rpc_pb2.WatchRequest(progress_request=rpc_pb2.WatchProgressRequest())
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await call.write(request)

    async def _learn_progress(self, call: grpc.aio.StreamStreamCall, endpoint: Endpoint) -> None:
        """On a new endpoint, find out at once whether it answers progress requests (etcd does, its
        gRPC proxy does not), so that a resume after an outage knows whether it goes through a proxy."""
        timeout = self._conn.settings.keepalive_timeout
        asked = anyio.current_time()
        await self._probe(call)
        alive = await self._probe_read(endpoint, timeout)
        await anyio.sleep(max(asked + timeout - anyio.current_time(), 0))
        if self._progress_rx >= asked:
            self._learn(endpoint, answered=True)
        elif alive:  # the path works, yet no answer: not etcd itself (silence on a dead path proves nothing)
            self._learn(endpoint, answered=False)

    def _learn(self, endpoint: Endpoint, *, answered: bool) -> None:
        """Record whether ``endpoint`` answered a progress request; an answer is final, silence is
        believed only until one comes (an etcd member busy replaying may answer late)."""
        if answered:
            endpoint.answers_progress = True
        elif endpoint.answers_progress is None:
            endpoint.answers_progress = False
            self._log.info("watch.progress_unanswered", endpoint=endpoint.url, probe="range")

    async def _check_proxy_backlog(self) -> None:
        """Through etcd's gRPC proxy, refuse to replay a long backlog: re-list instead.

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
                f"some (the proxy loses revisions of a watcher more than {PROXY_REPLAY_LIMIT} behind); "
                "read old revisions from an etcd member directly"
            )
        self._log.warning(
            "watch.proxy_backlog", revision=state.delivered, etcd_revision=current, behind=behind
        )
        raise _Relist("proxy_backlog", current)

    async def _probe_read(self, endpoint: Endpoint, timeout: float) -> bool:
        """A linearizable read on ``endpoint`` of any key under the prefix changed after ``delivered``.

        An answer proves the endpoint and etcd (behind any proxy) alive; an empty one also confirms
        the watch current (a deletion after ``delivered`` is not visible to it: the watch brings it).
        etcd reads the prefix's keys to filter them, so through a proxy an idle watch of a very large
        prefix costs etcd that read once per ``keepalive_time``.
        """
        prefix = self._state.prefix
        request = rpc_pb2.RangeRequest(
            key=prefix,
            range_end=prefix_range_end(prefix),
            keys_only=True,
            limit=1,
            min_mod_revision=self._state.delivered + 1,
        )
        try:
            response = await endpoint.kv.Range(request, timeout=timeout, metadata=self._conn.metadata())
        except grpc.aio.AioRpcError as exc:
            self._log.debug("watch.probe_failed", endpoint=endpoint.url, cause=describe(exc))
            return False
        self._last_rx = max(self._last_rx, anyio.current_time())
        if not response.kvs:
            self.health.confirm()
        return True

    async def _read_loop(
        self, call: grpc.aio.StreamStreamCall, endpoint: Endpoint, token: str | None
    ) -> bool:
        state = self._state
        create = rpc_pb2.WatchCreateRequest(
            key=state.prefix,
            range_end=prefix_range_end(state.prefix),
            start_revision=state.resume_revision,
            progress_notify=True,
            fragment=self._fragmented,
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
                self._last_rx = clock()
                step = state.on_response(response)
                kind = step.kind
                if kind is StepKind.EMIT:  # the common case first: one revision or more of events
                    health.confirm()
                    self._on_batches(step.batches)
                    if self._reached_stop():
                        return True
                    continue
                if not response.events and not (response.created or response.canceled or response.fragment):
                    self._progress_rx = self._last_rx
                    if response.watch_id == -1:  # etcd's own answer to a progress request: not a proxy
                        endpoint.answers_progress = True
                    if self._idle_probe:
                        # etcd < 3.5.8 answers at once, synced or not; after keepalive_time of
                        # silence the watcher is synced (a lagging one is being sent events).
                        self._idle_probe = False
                        health.confirm()
                if kind is StepKind.PROGRESS:
                    health.confirm()
                    if self._reached_stop():
                        return True
                elif kind is StepKind.CREATED:
                    if step.revision > state.delivered and not await readable_at(
                        self._conn, state.prefix, state.delivered
                    ):
                        # etcd accepts a watch *at* its compact revision, but the delete tombstones
                        # written there are gone: only a watch above it replays exactly.
                        raise _Relist("compacted", 0)
                    self._on_created(endpoint, step.revision)
                elif kind is StepKind.RELIST:
                    raise _Relist("compacted", step.revision)
                elif kind is StepKind.CHECK_REVISION:
                    await self._check_revision(step.revision, endpoint)
                elif kind is StepKind.CANCELED:
                    await self._on_canceled(step.reason, endpoint, token)
        except grpc.aio.AioRpcError as exc:
            kind_ = classify(exc)
            if kind_ is Failure.TOO_LARGE:
                self._too_large(describe(exc))
            if kind_ is Failure.AUTH_EXPIRED and self._conn.settings.username:
                await self._conn.reauthenticate(endpoint, token)
                raise _StreamFailed("auth token expired; authenticated again", penalize=False) from None
            if kind_ in (Failure.AUTH_FAILED, Failure.PERMISSION):
                raise to_error(exc, endpoint=endpoint.url, key=self._label) from None
            raise _StreamFailed(describe(exc)) from None

    def _too_large(self, cause: str) -> None:
        """A response exceeded ``max_message_bytes``: ask for fragments next time, or give up if we did."""
        if self._fragmented:
            raise EtcdError(
                f"a watch response of {self._label!r} is larger than max_message_bytes even with "
                f"fragments requested ({cause}): etcd splits at its --max-request-bytes and etcd's "
                "gRPC proxy does not split at all; raise max_message_bytes above the largest revision"
            )
        self._fragment_past = self._state.delivered
        self._log.warning("watch.fragmenting", revision=self._state.delivered, cause=cause)
        raise _StreamFailed(cause, penalize=False)

    def _on_created(self, endpoint: Endpoint, revision: int) -> None:
        self._fresh_token = False
        self._created_in_session = True
        state = self._state
        self.health.connected(endpoint.url)
        if revision <= state.delivered:
            self.health.confirm()  # etcd has nothing newer at all
        tg, call = self._session_tg, self._call
        assert tg is not None  # both set by _session before its read loop runs
        assert call is not None
        if endpoint.answers_progress is None:
            # Its read also confirms the watch current, as the one below would.
            tg.start_soon(self._learn_progress, call, endpoint)
        elif revision > state.delivered:
            # Confirm as soon as etcd says nothing newer is pending, not a keepalive_time later.
            tg.start_soon(self._probe_read, endpoint, self._conn.settings.keepalive_timeout)
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
        if "permission denied" in reason.lower():
            # etcd 3.5 also says this when the stream's token expired: re-authenticate once first.
            if self._conn.settings.username and not self._fresh_token:
                self._fresh_token = True
                await self._conn.reauthenticate(endpoint, token)
                raise _StreamFailed("watch refused; authenticated again", penalize=False)
            raise PermissionDenied(
                "the etcd user's role does not permit watching", key=self._label, endpoint=endpoint.url
            )
        raise _StreamFailed(f"watch canceled by {endpoint.url}: {reason}")
