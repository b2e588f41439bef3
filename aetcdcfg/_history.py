"""The prefix's past, from etcd's MVCC history: its state at a revision, and the revisions that changed it.

Part of the reads layer. History is read with ranges at revisions, not with a watch replayed from an
old start revision. A replaying watch is cheaper for etcd (it reads each revision once, ~7,500
revisions/s for a lagging watcher, where a range per revision reads the whole prefix), but etcd 3.5
cannot say when a replay has reached "now": its answer to a progress request does not wait for the
replay, and a watcher with nothing left to send sends nothing. Waiting for a quiet prefix's replay
to end would need a timeout. A range at revision R is exact: keys whose mod revision changed between
R-1 and R, and keys present at R-1 but not at R, are the change at R, deletes included. No revision
can be skipped (a key created and deleted in between leaves no trace at either end), so the scan is
bounded (``max_revisions``), reads keys only, 16 ranges in flight, and reads values only for the
revisions that changed: ~2,000 revisions/s for a 20-key prefix on a loaded 2-core machine (measured),
about a quarter of a watch replay's speed, in exchange for a result that is known to be complete.

etcd stores no time for a revision, so none is reported.
"""

from __future__ import annotations

import anyio

from ._connection import Connection
from ._diff import ConfigDiff, History, HistoryEntry
from ._grpc_errors import CompactedRead, FutureRead
from ._keys import decode_key
from ._reads import RawKV, cluster_revision, range_items
from .errors import FutureRevision, RevisionCompacted
from .events import Snapshot

__all__ = ["compact_revision", "scan_history", "snapshot_at"]

#: Revisions read per step of the history scan, and ranges in flight at once.
CHUNK = 128
CONCURRENCY = 16


async def _readable(conn: Connection, prefix: bytes, revision: int) -> bool:
    try:
        await range_items(conn, prefix, at_revision=revision, keys_only=True)
    except CompactedRead:
        return False
    return True


async def compact_revision(conn: Connection, prefix: bytes, below: int) -> int:
    """etcd's compact revision (its oldest readable revision), known to be above ``below``.

    etcd 3.5 says a range was compacted without saying where, so this bisects between ``below``
    (compacted) and the current revision (readable): a dozen-odd small reads, on the error path only.
    """
    lo, hi = below + 1, await cluster_revision(conn, prefix)
    while lo < hi:
        mid = (lo + hi) // 2
        if await _readable(conn, prefix, mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


async def snapshot_at(conn: Connection, prefix: bytes, revision: int, *, operation: str = "read") -> Snapshot:
    """The keys under ``prefix`` as of ``revision``.

    Raises :class:`RevisionCompacted` (with etcd's compact revision) or :class:`FutureRevision`.
    """
    if revision < 1:
        raise ValueError(f"revision must be >= 1, got {revision}")
    try:
        items, _ = await range_items(conn, prefix, at_revision=revision)
    except CompactedRead:
        compacted = await compact_revision(conn, prefix, revision)
        raise RevisionCompacted(
            prefix=decode_key(prefix),
            requested_revision=revision,
            compact_revision=compacted,
            operation=operation,
        ) from None
    except FutureRead:
        current = await cluster_revision(conn, prefix)
        raise FutureRevision(
            prefix=decode_key(prefix), requested_revision=revision, current_revision=current
        ) from None
    return Snapshot(revision=revision, items={decode_key(kv[0]): kv[1] for kv in items})


async def _entry(
    conn: Connection, prefix: bytes, revision: int, before: list[RawKV], after: list[RawKV]
) -> HistoryEntry | None:
    """The change at ``revision``, if the keys-only states at ``revision - 1`` and ``revision`` differ."""
    old_mods = {kv[0]: kv[2] for kv in before}
    new_mods = {kv[0]: kv[2] for kv in after}
    if old_mods == new_mods:
        return None
    old = await snapshot_at(conn, prefix, revision - 1, operation="history")
    new = await snapshot_at(conn, prefix, revision, operation="history")
    diff = ConfigDiff.between(old, new)
    rewritten = tuple(
        sorted(
            decode_key(k)
            for k, mod in new_mods.items()
            if k in old_mods and old_mods[k] != mod and decode_key(k) not in diff.changed
        )
    )
    return HistoryEntry(revision=revision, diff=diff, rewritten=rewritten)


async def scan_history(
    conn: Connection,
    prefix: bytes,
    *,
    limit: int,
    max_revisions: int,
    since_revision: int | None = None,
) -> History:
    """Up to ``limit`` revisions that changed ``prefix``, newest first, looking back from now.

    At most ``max_revisions`` revisions are checked, none older than ``since_revision``; the scan
    also stops where etcd compacted its history.
    """
    if limit < 1 or max_revisions < 1:
        raise ValueError("limit and max_revisions must be >= 1")
    end = await cluster_revision(conn, prefix)
    # A change at revision r is seen by comparing r - 1 and r; revision 1 is etcd's empty start.
    lowest = max(2, since_revision or 2, end - max_revisions + 1)
    states: dict[int, list[RawKV] | None] = {}
    limiter = anyio.CapacityLimiter(CONCURRENCY)

    async def read(revision: int) -> None:
        async with limiter:
            try:
                items, _ = await range_items(conn, prefix, at_revision=revision, keys_only=True)
                states[revision] = items
            except CompactedRead:
                states[revision] = None

    entries: list[HistoryEntry] = []
    compacted: int | None = None
    scanned_from = end + 1
    top = end
    while top >= lowest and len(entries) < limit and compacted is None:
        bottom = max(lowest, top - CHUNK + 1)
        async with anyio.create_task_group() as tg:
            for revision in range(bottom - 1, top + 1):
                if revision not in states:
                    tg.start_soon(read, revision)
        for revision in range(top, bottom - 1, -1):
            after, before = states[revision], states[revision - 1]
            if after is None or before is None:  # etcd's history ends here: readable iff >= compaction
                readable = [r for r, state in states.items() if state is not None]
                compacted = min(readable) if readable else revision + 1
                break
            scanned_from = revision
            entry = await _entry(conn, prefix, revision, before, after)
            if entry is not None:
                entries.append(entry)
                if len(entries) == limit:
                    break
        for revision in [r for r in states if r > bottom]:
            del states[revision]  # keep only what the next (older) chunk needs
        top = bottom - 1
    return History(
        prefix=decode_key(prefix),
        revision=end,
        scanned_from=min(scanned_from, end),
        entries=tuple(entries),
        compact_revision=compacted,
    )
