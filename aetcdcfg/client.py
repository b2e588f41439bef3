"""EtcdClient: endpoints with failover, authentication with token refresh, KV helpers and watch()."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping
from types import TracebackType
from typing import Any

import anyio
import grpc
import structlog
from aetcd.rpc import rpc_pb2
from pydantic import ValidationError

from ._backoff import Backoff
from ._channel import Endpoint, EndpointPool
from ._fanout import PrefixWatch, Subscription
from ._grpc_errors import Failure, classify, describe, to_error
from ._resume import KeyState
from .errors import (
    ClientClosedError,
    ConfigurationError,
    EtcdError,
    EtcdUnavailable,
    TxnConflict,
)
from .events import Snapshot
from .settings import EtcdSettings

__all__ = ["EtcdClient", "prefix_range_end"]

log = structlog.get_logger("aetcdcfg")

KeyLike = str | bytes
#: Mapping is invariant in its key type, so spell out the shapes callers actually have.
Items = Mapping[str, str] | Mapping[str, bytes] | Mapping[bytes, bytes] | Mapping[KeyLike, KeyLike]
_RawKV = tuple[bytes, bytes, int, int, int]

#: etcd's metadata key asking a member to refuse requests while it has no leader.
REQUIRE_LEADER = ("hasleader", "true")
#: Keys read per page by ``get_prefix``; halved whenever a page exceeds the message limit.
PAGE_SIZE = 10_000


def _b(value: KeyLike) -> bytes:
    return value.encode() if isinstance(value, str) else value


def decode_key(key: bytes) -> str:
    """Keys become ``str``; bytes that are not UTF-8 survive the round trip via surrogateescape."""
    return key.decode("utf-8", "surrogateescape")


def prefix_range_end(prefix: bytes) -> bytes:
    """The etcd ``range_end`` that selects every key starting with ``prefix``."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return b"\0"  # every key
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


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
        raise ConfigurationError(setting, first["msg"]) from None


class EtcdClient:
    """An asyncio etcd v3 client for configuration: ``async with EtcdClient(endpoints=[...]) as c:``.

    Requests go to one member at a time; when it fails the next reachable endpoint is used. Reads are
    retried on another member until ``request_timeout``; writes are retried only when etcd certainly did
    not apply them (the member had no leader, or the request was never sent), otherwise they raise
    :class:`EtcdUnavailable` saying the outcome is unknown.
    """

    def __init__(self, settings: EtcdSettings | None = None, **overrides: Any) -> None:
        self.settings = _settings_from(settings, overrides)
        self._pool: EndpointPool | None = None
        self._token: str | None = None
        self._auth_lock = anyio.Lock()
        self._stack: contextlib.AsyncExitStack | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._watches: dict[bytes, Any] = {}

    def __repr__(self) -> str:
        user = f", user={self.settings.username!r}" if self.settings.username else ""
        state = "open" if self._pool is not None else "closed"
        return f"<EtcdClient {','.join(self.settings.endpoints)}{user} {state}>"

    # -- lifecycle ---------------------------------------------------------------------------------

    async def __aenter__(self) -> EtcdClient:
        if self._stack is not None:
            raise RuntimeError("EtcdClient is already open")
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            self._pool = EndpointPool(self.settings)
            stack.push_async_callback(self._close_pool)
            self._task_group = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(self._task_group.cancel_scope.cancel)
            await self._connect()
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

    async def _close_pool(self) -> None:
        pool, self._pool = self._pool, None
        self._task_group = None
        if pool is not None:
            await pool.aclose()

    async def _connect(self) -> None:
        pool = self._open_pool()
        endpoint = await pool.ready(self.settings.connect_timeout)
        if self.settings.username is not None:
            with anyio.fail_after(self.settings.request_timeout):
                await self._authenticate(endpoint)
        if self.settings.discover_endpoints:
            await self.sync_endpoints()
            assert self._task_group is not None
            self._task_group.start_soon(self._discover_forever)

    async def sync_endpoints(self) -> list[str]:
        """Read the cluster's member list and use every started member's client URLs too.

        Only URLs with the configured scheme are taken (a cluster advertising http to an https
        client is a misconfiguration we do not follow). Returns the endpoints now in use.
        """
        pool = self._open_pool()
        response = await self._unary("cluster", "MemberList", rpc_pb2.MemberListRequest(), idempotent=True)
        scheme = self.settings.endpoints[0].split("://", 1)[0] + "://"
        urls = [
            url.rstrip("/")
            for member in response.members
            if not member.isLearner
            for url in member.clientURLs
            if url.startswith(scheme)
        ]
        await pool.update(urls)
        return [ep.url for ep in pool.endpoints]

    async def _discover_forever(self) -> None:
        while True:
            await anyio.sleep(self.settings.discovery_interval)
            try:
                await self.sync_endpoints()
            except EtcdError as exc:
                log.warning("etcd.discovery_failed", error=str(exc))

    def _open_pool(self) -> EndpointPool:
        if self._pool is None:
            raise ClientClosedError("EtcdClient is not open: use `async with EtcdClient(...) as client:`")
        return self._pool

    @property
    def endpoint(self) -> str | None:
        """The URL of the member currently in use (``None`` before connecting or after a failure)."""
        current = self._pool.current if self._pool is not None else None
        return current.url if current is not None else None

    # -- authentication ----------------------------------------------------------------------------

    async def _authenticate(self, endpoint: Endpoint) -> None:
        assert self.settings.username is not None
        assert self.settings.password is not None
        request = rpc_pb2.AuthenticateRequest(
            name=self.settings.username, password=self.settings.password.get_secret_value()
        )
        try:
            response = await endpoint.auth.Authenticate(request, timeout=self.settings.request_timeout)
        except grpc.aio.AioRpcError as exc:
            if "authentication is not enabled" in (exc.details() or ""):
                log.warning("etcd.auth_not_enabled", endpoint=endpoint.url, user=self.settings.username)
                self._token = None
                return
            kind = classify(exc)
            if kind in (Failure.TRANSPORT, Failure.NOT_APPLIED):
                self._open_pool().mark_failed(endpoint, describe(exc))
                raise EtcdUnavailable(
                    "could not authenticate", endpoints=[endpoint.url], cause=describe(exc)
                ) from None
            raise to_error(exc, endpoint=endpoint.url) from None
        self._token = str(response.token)

    async def _reauthenticate(self, endpoint: Endpoint, stale: str | None) -> None:
        """Get a new token unless another task already replaced ``stale``."""
        async with self._auth_lock:
            if self._token != stale:
                return
            await self._authenticate(endpoint)
            log.info("etcd.reauthenticated", endpoint=endpoint.url, user=self.settings.username)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        if self._token is None:
            return (REQUIRE_LEADER,)
        return (REQUIRE_LEADER, ("token", self._token))

    # -- the request loop --------------------------------------------------------------------------

    async def _unary(
        self, service: str, method: str, request: Any, *, idempotent: bool, key: str | None = None
    ) -> Any:
        """Send one unary request, failing over and re-authenticating as the failure allows."""
        pool = self._open_pool()
        timeout = self.settings.request_timeout
        deadline = anyio.current_time() + timeout
        backoff = Backoff(initial=0.05, maximum=1.0)
        tried: list[str] = []
        cause: str | None = None
        reauthenticated = False
        while True:
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                raise EtcdUnavailable(
                    f"{method} did not complete within {timeout:.3g}s (request_timeout)",
                    endpoints=tried or [ep.url for ep in pool.endpoints],
                    cause=cause,
                )
            endpoint = await pool.ready(min(remaining, self.settings.connect_timeout))
            if endpoint.url not in tried:
                tried.append(endpoint.url)
            token = self._token
            call = getattr(getattr(endpoint, service), method)
            attempt = remaining
            if idempotent and len(pool.endpoints) > 1:
                # A frozen member answers nothing; keep half the budget to try another one.
                attempt = max(remaining / 2, min(remaining, 1.0))
            try:
                return await call(request, timeout=attempt, metadata=self._metadata())
            except grpc.aio.AioRpcError as exc:
                kind = classify(exc)
                cause = describe(exc)
                if kind is Failure.AUTH_EXPIRED and self.settings.username and not reauthenticated:
                    reauthenticated = True
                    await self._reauthenticate(endpoint, token)
                    continue
                if kind is Failure.NOT_APPLIED or (kind is Failure.TRANSPORT and idempotent):
                    pool.mark_failed(endpoint, cause)
                    log.debug("etcd.retry", method=method, endpoint=endpoint.url, cause=cause)
                    await anyio.sleep(min(backoff.next_delay(), max(deadline - anyio.current_time(), 0)))
                    continue
                if kind is Failure.TRANSPORT:
                    pool.mark_failed(endpoint, cause)
                    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        what = f"{method} timed out after {timeout:.3g}s (request_timeout)"
                    else:
                        what = f"connection lost during {method}"
                    raise EtcdUnavailable(
                        f"{what}; the write may or may not have been applied", endpoints=tried, cause=cause
                    ) from None
                raise to_error(exc, endpoint=endpoint.url, key=key) from None

    # -- KV helpers --------------------------------------------------------------------------------

    async def get(self, key: KeyLike) -> bytes | None:
        """The value of ``key``, or ``None`` if it does not exist."""
        response = await self._unary(
            "kv", "Range", rpc_pb2.RangeRequest(key=_b(key)), idempotent=True, key=str(key)
        )
        return bytes(response.kvs[0].value) if response.kvs else None

    async def get_prefix(self, prefix: KeyLike) -> Snapshot:
        """Every key under ``prefix`` at one revision, read in pages so any number of keys fits."""
        raw = _b(prefix)
        items, revision = await self._range_pages(raw)
        return Snapshot(revision=revision, items={decode_key(item[0]): item[1] for item in items})

    async def _range_pages(
        self, prefix: bytes, *, at_revision: int = 0, keys_only: bool = False
    ) -> tuple[list[_RawKV], int]:
        """(key, value, mod, create, version) of every key under ``prefix``, all at one revision
        (the current one, or ``at_revision``)."""
        end = prefix_range_end(prefix)
        while True:  # starts over if the pinned revision is compacted mid-way
            items: list[_RawKV] = []
            revision = at_revision
            start = prefix
            limit = PAGE_SIZE
            try:
                while True:
                    request = rpc_pb2.RangeRequest(
                        key=start, range_end=end, limit=limit, revision=revision, keys_only=keys_only
                    )
                    try:
                        response = await self._unary(
                            "kv", "Range", request, idempotent=True, key=decode_key(prefix)
                        )
                    except EtcdError as exc:
                        if "larger than" in str(exc) and limit > 1:
                            limit = max(1, limit // 4)
                            continue
                        raise
                    if revision == 0:
                        revision = int(response.header.revision)
                    items.extend(
                        (bytes(kv.key), bytes(kv.value), kv.mod_revision, kv.create_revision, kv.version)
                        for kv in response.kvs
                    )
                    if not response.more or not response.kvs:
                        return items, revision
                    start = bytes(response.kvs[-1].key) + b"\0"
            except EtcdError as exc:
                if "has been compacted" in str(exc) and not at_revision:
                    continue
                raise

    async def _history_matches(
        self, prefix: bytes, revision: int, keys: Mapping[bytes, KeyState]
    ) -> bool | None:
        """Does etcd's prefix at ``revision`` hold exactly these keys at these mod revisions?

        A watch asks this before resuming after an outage: a cluster restarted on an empty data dir
        has a different history, even once its revision has caught up. None when etcd can no longer
        tell (compacted; the watch itself will then report the compaction).
        """
        try:
            items, _ = await self._range_pages(prefix, at_revision=revision, keys_only=True)
        except EtcdError as exc:
            if "has been compacted" in str(exc):
                return None
            if "future revision" in str(exc):
                return False
            raise
        return {item[0]: item[2] for item in items} == {k: v.mod_revision for k, v in keys.items()}

    async def _list_keys(
        self, prefix: bytes, *, retry_forever: bool = False
    ) -> tuple[dict[bytes, KeyState], int]:
        """The prefix's keys with their revisions, for a watch to start from or resync to."""
        backoff = Backoff(initial=0.1, maximum=2.0)
        while True:
            try:
                items, revision = await self._range_pages(prefix)
            except EtcdUnavailable as exc:
                if not retry_forever:
                    raise
                log.warning("watch.relist_retry", prefix=decode_key(prefix), cause=str(exc))
                await anyio.sleep(backoff.next_delay())
                continue
            return {k: KeyState(v, mod, create, version) for k, v, mod, create, version in items}, revision

    async def _cluster_revision(self, prefix: bytes) -> int:
        """etcd's current revision, read linearizably (through the leader), within ``prefix``'s permission."""
        request = rpc_pb2.RangeRequest(key=prefix, range_end=prefix_range_end(prefix), count_only=True)
        response = await self._unary("kv", "Range", request, idempotent=True, key=decode_key(prefix))
        return int(response.header.revision)

    # -- hooks for the watch machinery -------------------------------------------------------------

    async def _pool_ready(self, timeout: float) -> Endpoint:
        return await self._open_pool().ready(timeout)

    def _mark_failed(self, endpoint: Endpoint, cause: str) -> None:
        if self._pool is not None:
            self._pool.mark_failed(endpoint, cause)

    @staticmethod
    def _range_end(prefix: bytes) -> bytes:
        return prefix_range_end(prefix)

    def _forget_watch(self, hub: PrefixWatch) -> None:
        if self._watches.get(hub.prefix) is hub:
            del self._watches[hub.prefix]

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
        self._open_pool()
        task_group = self._task_group
        assert task_group is not None
        raw = _b(prefix)
        while True:
            hub = self._watches.get(raw)
            if hub is None or hub.closed:
                hub = PrefixWatch(self, raw)
                self._watches[raw] = hub
            try:
                await hub.ensure_started(task_group)
            except anyio.get_cancelled_exc_class():
                raise
            except BaseException:
                self._forget_watch(hub)
                raise
            if not hub.closed:
                break
        subscription, sub = hub.subscribe(start_revision, buffer_size, with_snapshot=with_snapshot)
        try:
            if sub.catching_up:
                await task_group.start(hub.catch_up, sub)
            yield subscription
        finally:
            hub.release(sub)
            subscription._receive.close()

    async def put(self, key: KeyLike, value: KeyLike) -> int:
        """Set ``key`` to ``value``; returns the new revision."""
        response = await self._unary(
            "kv", "Put", rpc_pb2.PutRequest(key=_b(key), value=_b(value)), idempotent=False, key=str(key)
        )
        return int(response.header.revision)

    async def put_many(self, items: Items) -> int:
        """Set several keys in one transaction, so watchers see them at one revision; returns it."""
        ops = [
            rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=_b(k), value=_b(v)))
            for k, v in items.items()
        ]
        response = await self._unary("kv", "Txn", rpc_pb2.TxnRequest(success=ops), idempotent=False)
        return int(response.header.revision)

    async def apply_if_unchanged(
        self,
        prefix: KeyLike,
        puts: Items,
        deletes: Iterable[KeyLike] = (),
        *,
        since_revision: int,
    ) -> int:
        """Write ``puts`` and ``deletes`` in one transaction, only if ``prefix`` is as it was.

        Refused with :class:`TxnConflict`, writing nothing, if any key under ``prefix`` was created
        or changed after ``since_revision``, or a key this call changes was deleted since. (A
        deletion of another key under the prefix is not detected: etcd cannot compare a count.)
        One transaction holds at most etcd's ``--max-txn-ops`` (128 by default) operations.
        """
        raw = _b(prefix)
        compare = [
            rpc_pb2.Compare(
                target=rpc_pb2.Compare.MOD,
                result=rpc_pb2.Compare.LESS,
                key=raw,
                range_end=prefix_range_end(raw),
                mod_revision=since_revision + 1,
            )
        ]
        delete_keys = [_b(k) for k in deletes]
        ops = [
            rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=_b(k), value=_b(v))) for k, v in puts.items()
        ]
        ops += [
            rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=k)) for k in delete_keys
        ]
        for key in delete_keys:  # still there, as it was when the caller read it
            compare.append(
                rpc_pb2.Compare(
                    target=rpc_pb2.Compare.VERSION, result=rpc_pb2.Compare.GREATER, key=key, version=0
                )
            )
        request = rpc_pb2.TxnRequest(compare=compare, success=ops)
        response = await self._unary("kv", "Txn", request, idempotent=False, key=decode_key(raw))
        if not response.succeeded:
            raise TxnConflict(prefix=decode_key(raw), expected_revision=since_revision)
        return int(response.header.revision)

    async def delete(self, key: KeyLike) -> int:
        """Delete ``key`` (no error if absent); returns the revision after the delete."""
        response = await self._unary(
            "kv", "DeleteRange", rpc_pb2.DeleteRangeRequest(key=_b(key)), idempotent=False, key=str(key)
        )
        return int(response.header.revision)

    async def delete_prefix(self, prefix: KeyLike) -> int:
        """Delete every key under ``prefix`` in one revision; returns the revision after it."""
        raw = _b(prefix)
        request = rpc_pb2.DeleteRangeRequest(key=raw, range_end=prefix_range_end(raw))
        response = await self._unary("kv", "DeleteRange", request, idempotent=False, key=str(prefix))
        return int(response.header.revision)
