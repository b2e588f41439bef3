"""Paginated prefix reads on a :class:`Connection`, and the revision/history checks a watch needs.

Part of the connection layer: ``get_prefix`` of the KV API and the watch's listing, resync and
wiped-cluster checks all read a prefix the same way, at one revision, in pages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import anyio
from aetcd.rpc import rpc_pb2

from ._backoff import Backoff
from ._connection import Connection
from ._grpc_errors import CompactedRead, FutureRead
from ._keys import decode_key, prefix_range_end
from ._log import get_logger
from ._resume import KeyState
from .errors import EtcdUnavailable, RequestTooLarge

__all__ = [
    "PAGE_SIZE",
    "RawKV",
    "cluster_revision",
    "history_matches",
    "list_keys",
    "range_items",
    "range_pages",
    "readable_at",
]

log = get_logger()

#: Keys read per page; divided by four whenever a page exceeds the message limit.
PAGE_SIZE = 10_000
#: (key, value, mod revision, create revision, version) as etcd returned it.
RawKV = tuple[bytes, bytes, int, int, int]


async def range_pages(
    conn: Connection, prefix: bytes, *, at_revision: int = 0, keys_only: bool = False
) -> tuple[list[Sequence[Any]], int]:
    """Every key under ``prefix``, all at one revision (the current one, or ``at_revision``).

    Returns the pages as etcd sent them (``mvccpb.KeyValue`` messages) and the revision: each
    caller builds what it needs straight from them, in one pass (a prefix can hold many keys).
    """
    end = prefix_range_end(prefix)
    label = decode_key(prefix)
    while True:  # starts over if the pinned revision is compacted mid-way
        pages: list[Sequence[Any]] = []
        revision = at_revision
        start = prefix
        limit = PAGE_SIZE
        try:
            while True:
                request = rpc_pb2.RangeRequest(
                    key=start, range_end=end, limit=limit, revision=revision, keys_only=keys_only
                )
                try:
                    response = await conn.unary("kv", "Range", request, idempotent=True, key=label)
                except RequestTooLarge:
                    if limit > 1:  # a page over max_message_bytes: smaller pages
                        limit = max(1, limit // 4)
                        continue
                    raise
                if revision == 0:
                    revision = int(response.header.revision)
                kvs = response.kvs
                if kvs:
                    pages.append(kvs)
                if not response.more or not kvs:
                    return pages, revision
                start = kvs[-1].key + b"\0"
        except CompactedRead:
            if not at_revision:
                continue
            raise


async def range_items(
    conn: Connection, prefix: bytes, *, at_revision: int = 0, keys_only: bool = False
) -> tuple[list[RawKV], int]:
    """:func:`range_pages` flattened into ``RawKV`` tuples, for callers that compare states."""
    pages, revision = await range_pages(conn, prefix, at_revision=at_revision, keys_only=keys_only)
    items = [
        (kv.key, kv.value, kv.mod_revision, kv.create_revision, kv.version) for page in pages for kv in page
    ]
    return items, revision


async def list_keys(
    conn: Connection, prefix: bytes, *, retry_forever: bool = False
) -> tuple[dict[bytes, KeyState], int]:
    """The prefix's keys with their revisions, for a watch to start from or resync to."""
    backoff = Backoff(initial=0.1, maximum=2.0)
    while True:
        try:
            pages, revision = await range_pages(conn, prefix)
        except EtcdUnavailable as exc:
            if not retry_forever:
                raise
            log.warning("watch.relist_retry", prefix=decode_key(prefix), cause=str(exc))
            await anyio.sleep(backoff.next_delay())
            continue
        listing = {
            kv.key: (kv.value, kv.mod_revision, kv.create_revision, kv.version)
            for page in pages
            for kv in page
        }
        return listing, revision


async def history_matches(
    conn: Connection, prefix: bytes, revision: int, keys: Mapping[bytes, KeyState]
) -> bool | None:
    """Does etcd's prefix at ``revision`` hold exactly these keys at these mod revisions?

    A watch asks this before resuming after an outage: a cluster restarted on an empty data dir
    has a different history, even once its revision has caught up. None when etcd can no longer
    tell: it compacted ``revision``, so its compact revision is at least ``revision + 1``, and a
    watch resumed there may have lost a delete (etcd drops the tombstones at its compact revision
    yet accepts a watch from it): the caller must re-list.
    """
    try:
        pages, _ = await range_pages(conn, prefix, at_revision=revision, keys_only=True)
    except CompactedRead:
        return None
    except FutureRead:
        return False
    found = {kv.key: kv.mod_revision for page in pages for kv in page}
    return found == {k: v[1] for k, v in keys.items()}  # KeyState: (value, mod_revision, ...)


async def readable_at(conn: Connection, prefix: bytes, revision: int) -> bool:
    """Whether etcd still holds ``revision`` (not compacted): one count-only read, nothing listed."""
    if revision < 1:
        return True  # revision 1 is etcd's empty start: nothing to lose before it
    request = rpc_pb2.RangeRequest(
        key=prefix, range_end=prefix_range_end(prefix), count_only=True, revision=revision
    )
    try:
        await conn.unary("kv", "Range", request, idempotent=True, key=decode_key(prefix))
    except CompactedRead:
        return False
    return True


async def cluster_revision(conn: Connection, prefix: bytes) -> int:
    """etcd's current revision, read linearizably (through the leader), within ``prefix``'s permission."""
    request = rpc_pb2.RangeRequest(key=prefix, range_end=prefix_range_end(prefix), count_only=True)
    response = await conn.unary("kv", "Range", request, idempotent=True, key=decode_key(prefix))
    return int(response.header.revision)
