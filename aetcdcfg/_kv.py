"""The KV API: reads and writes of keys and prefixes over a :class:`Connection`.

``EtcdClient`` inherits these methods; they are kept here so the client module is only lifecycle
and watch wiring.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from aetcd.rpc import rpc_pb2
from pydantic import BaseModel

from ._connection import Connection, LeaseKeeper
from ._diff import ConfigDiff, History
from ._grpc_errors import LeaseNotFound
from ._history import scan_history, snapshot_at
from ._keys import KeyLike, as_bytes, decode_key, prefix_range_end
from ._reads import range_pages
from ._validate import build_model
from .errors import RequestTooLarge, TxnConflict
from .events import Snapshot

__all__ = ["KV", "Items", "MAX_TXN_OPS", "StoredKey", "unchanged_keys"]

#: etcd's default ``--max-txn-ops``: at most this many operations (and compares) in one transaction.
MAX_TXN_OPS = 128

#: Mapping is invariant in its key type, so spell out the shapes callers actually have.
Items = Mapping[str, str] | Mapping[str, bytes] | Mapping[bytes, bytes] | Mapping[KeyLike, KeyLike]


def unchanged_keys(base: Snapshot, diff: ConfigDiff, max_txn_ops: int = MAX_TXN_OPS) -> list[str]:
    """The keys of ``base`` (the state ``diff`` was computed from) that the diff leaves alone, for
    :meth:`KV.apply_diff` to refuse the write if one was deleted meanwhile; empty when guarding them
    all would pass etcd's compare limit (then such a deletion goes undetected)."""
    kept = [key for key in base.items if key not in diff.changed and key not in diff.removed]
    compares = 1 + len(diff.changed) + len(diff.removed) + len(kept)
    return kept if compares <= max_txn_ops else []


def _put(key: KeyLike, value: KeyLike, lease: int = 0) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(
        request_put=rpc_pb2.PutRequest(key=as_bytes(key), value=as_bytes(value), lease=lease)
    )


@dataclass(frozen=True, slots=True)
class StoredKey:
    """One key as etcd stores it: value, the revision that last modified it, its lease (0: none)."""

    key: str
    value: bytes
    mod_revision: int
    lease: int


class KV:
    """Key-value requests; reads fail over between members, writes only when certainly not applied."""

    def __init__(self, connection: Connection) -> None:
        self._conn = connection

    async def get(self, key: KeyLike) -> bytes | None:
        """The value of ``key``, or ``None`` if it does not exist."""
        request = rpc_pb2.RangeRequest(key=as_bytes(key))
        response = await self._conn.unary("kv", "Range", request, idempotent=True, key=str(key))
        return bytes(response.kvs[0].value) if response.kvs else None

    async def get_prefix(self, prefix: KeyLike, *, revision: int | None = None) -> Snapshot:
        """Every key under ``prefix`` at one revision, read in pages so any number of keys fits.

        With ``revision`` the prefix is read as it was at that revision (all pages at it). etcd keeps
        history only until compaction: an older revision raises :class:`RevisionCompacted` (its
        ``compact_revision`` is the oldest one that can be read), one not reached yet
        :class:`FutureRevision`.
        """
        if revision is not None:
            return await snapshot_at(self._conn, as_bytes(prefix), revision)
        pages, current = await range_pages(self._conn, as_bytes(prefix))
        # decode_key, inlined: this runs once per key of the prefix.
        items = {kv.key.decode("utf-8", "surrogateescape"): kv.value for page in pages for kv in page}
        return Snapshot(revision=current, items=items)

    async def get_stored(self, prefix: KeyLike, *, keys_only: bool = False) -> tuple[int, list[StoredKey]]:
        """(revision, every key under ``prefix`` with its mod revision and lease), at one revision.

        ``keys_only``: without the values (each ``value`` is empty).
        """
        pages, current = await range_pages(self._conn, as_bytes(prefix), keys_only=keys_only)
        stored = [
            StoredKey(decode_key(kv.key), bytes(kv.value), int(kv.mod_revision), int(kv.lease))
            for page in pages
            for kv in page
        ]
        return current, stored

    async def count(self, prefix: KeyLike, *, end: KeyLike | None = None) -> int:
        """How many keys are under ``prefix`` (etcd counts them; no key is sent).
        ``end``: the keys from ``prefix`` up to ``end`` (excluded) instead."""
        raw = as_bytes(prefix)
        range_end = prefix_range_end(raw) if end is None else as_bytes(end)
        request = rpc_pb2.RangeRequest(key=raw, range_end=range_end, count_only=True)
        response = await self._conn.unary("kv", "Range", request, idempotent=True, key=decode_key(raw))
        return int(response.count)

    async def newest_revision(self, prefix: KeyLike, *, end: KeyLike | None = None) -> tuple[int, int]:
        """(etcd's revision, the newest mod revision among the keys under ``prefix``; 0 if none).

        A deletion is not a key: a prefix whose newest change deleted a key reports the change
        before it (aetcdcfg's own writes also leave an audit record, which callers may consult).
        ``end``: the keys from ``prefix`` up to ``end`` (excluded) instead.
        """
        raw = as_bytes(prefix)
        request = rpc_pb2.RangeRequest(
            key=raw,
            range_end=prefix_range_end(raw) if end is None else as_bytes(end),
            limit=1,
            keys_only=True,
            sort_order=rpc_pb2.RangeRequest.DESCEND,
            sort_target=rpc_pb2.RangeRequest.MOD,
        )
        response = await self._conn.unary("kv", "Range", request, idempotent=True, key=decode_key(raw))
        newest = int(response.kvs[0].mod_revision) if response.kvs else 0
        return int(response.header.revision), newest

    # -- leases ------------------------------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> tuple[int, int]:
        """A new lease of ``ttl`` seconds: (its id, the TTL etcd granted)."""
        request = rpc_pb2.LeaseGrantRequest(TTL=ttl)
        response = await self._conn.unary("lease", "LeaseGrant", request, idempotent=False)
        return int(response.ID), int(response.TTL)

    def lease_keeper(self, lease_id: int) -> LeaseKeeper:
        """What refreshes a lease (``await keeper.refresh()``: its TTL again, 0 if etcd no longer
        holds it) over one stream kept open between refreshes; ``keeper.close()`` ends it."""
        return self._conn.lease_keeper(lease_id)

    async def revoke_lease(self, lease_id: int) -> None:
        """Revoke a lease: every key bound to it is deleted (no error if it is already gone)."""
        request = rpc_pb2.LeaseRevokeRequest(ID=lease_id)
        try:
            await self._conn.unary("lease", "LeaseRevoke", request, idempotent=True)
        except LeaseNotFound:
            return

    async def lease_remaining(self, lease_id: int) -> tuple[int, int]:
        """(granted TTL, seconds left) of a lease; (0, -1) if etcd no longer holds it."""
        request = rpc_pb2.LeaseTimeToLiveRequest(ID=lease_id)
        response = await self._conn.unary("lease", "LeaseTimeToLive", request, idempotent=True)
        if response.TTL < 0:
            return 0, -1
        return int(response.grantedTTL), int(response.TTL)

    async def put_leased(self, items: Items, lease_id: int) -> int:
        """Set several keys, each bound to ``lease_id``, in one transaction; returns the revision.

        Raises :class:`~aetcdcfg._grpc_errors.LeaseNotFound` if etcd no longer holds the lease.
        """
        request = rpc_pb2.TxnRequest(success=[_put(k, v, lease_id) for k, v in items.items()])
        response = await self._conn.unary("kv", "Txn", request, idempotent=False)
        return int(response.header.revision)

    async def history(
        self,
        prefix: KeyLike,
        *,
        limit: int = 10,
        since_revision: int | None = None,
        max_revisions: int = 10_000,
    ) -> History:
        """The last ``limit`` revisions that changed ``prefix``, newest first, from etcd's MVCC history.

        Each entry is a :class:`ConfigDiff` from the revision before it (values included: mask
        secrets before showing them). The scan reads the prefix at each revision going back from
        now, at most ``max_revisions`` of them and none before ``since_revision``; it stops early
        where etcd compacted its history (``History.compact_revision``). etcd does not record when
        a revision was written, so entries carry no time.
        """
        return await scan_history(
            self._conn,
            as_bytes(prefix),
            limit=limit,
            max_revisions=max_revisions,
            since_revision=since_revision,
        )

    async def diff(self, prefix: KeyLike, from_revision: int, to_revision: int | None = None) -> ConfigDiff:
        """How ``prefix`` changed from ``from_revision`` to ``to_revision`` (default: now)."""
        old = await snapshot_at(self._conn, as_bytes(prefix), from_revision, operation="diff")
        if to_revision is None:
            new = await self.get_prefix(prefix)
        else:
            new = await snapshot_at(self._conn, as_bytes(prefix), to_revision, operation="diff")
        return ConfigDiff.between(old, new)

    async def plan_rollback(
        self, prefix: KeyLike, to_revision: int, *, at_revision: int | None = None
    ) -> tuple[Snapshot, Snapshot]:
        """``(current, target)``: the prefix now (or at ``at_revision``, a reviewed plan's), and as it
        was at ``to_revision``.

        ``ConfigDiff.between(current, target)`` is what a rollback writes (its ``puts`` and
        ``deletes``); apply it with :meth:`apply_diff`, which refuses if the prefix changed after
        ``current.revision``. A compacted ``to_revision`` raises :class:`RevisionCompacted`.
        """
        target = await snapshot_at(self._conn, as_bytes(prefix), to_revision, operation="rollback")
        if at_revision is not None:
            current = await snapshot_at(self._conn, as_bytes(prefix), at_revision, operation="rollback")
        else:
            current = await self.get_prefix(prefix)
        return current, target

    async def apply_diff(
        self,
        prefix: KeyLike,
        diff: ConfigDiff,
        *,
        since_revision: int | None = None,
        unchanged: Iterable[KeyLike] = (),
        max_txn_ops: int = MAX_TXN_OPS,
        also: Items | None = None,
        prune: Iterable[KeyLike] = (),
    ) -> int:
        """Write ``diff`` (its puts and deletes) in one transaction, only if ``prefix`` is still as it
        was at ``diff.old_revision``, so that what is written is exactly the diff that was shown.

        Refused with :class:`TxnConflict`, writing nothing, if since then a key under ``prefix`` was
        created or changed, a key the diff changes or deletes was deleted, or a key of
        ``unchanged`` was deleted (the old state's keys the diff leaves alone: pass them, e.g.
        :func:`unchanged_keys`, to have their deletion refuse it too). ``since_revision``, if given,
        must be ``diff.old_revision``: a diff computed from one state and guarded at another
        revision could write what was never shown (``ValueError``). Returns the new revision (the
        current one, with nothing written, for an empty diff). ``also``: keys outside ``prefix``
        put in the same transaction, unguarded (e.g. an audit record of who made the change);
        ``prune``: keys outside ``prefix`` deleted in it, unguarded, as many as fit (old audit records).
        """
        if since_revision is not None and since_revision != diff.old_revision:
            raise ValueError(
                f"the diff was computed at revision {diff.old_revision}, not {since_revision}: compute "
                f"it from the prefix as of revision {since_revision} (get_prefix(prefix, revision=...))"
            )
        if not diff:
            return (await self.get_prefix(prefix)).revision
        return await self.apply_if_unchanged(
            prefix,
            diff.puts,
            diff.deletes,
            since_revision=diff.old_revision,
            existing=[*diff.changed, *unchanged],
            max_txn_ops=max_txn_ops,
            also=also,
            prune=prune,
        )

    async def rollback(
        self,
        prefix: KeyLike,
        to_revision: int,
        *,
        model: type[BaseModel] | None = None,
        expect_revision: int | None = None,
        max_txn_ops: int = MAX_TXN_OPS,
    ) -> tuple[ConfigDiff, int]:
        """Restore ``prefix`` to its state at ``to_revision`` as one new revision; returns (diff, revision).

        With ``model`` the restored state is validated first (:class:`ConfigRejected` names the
        keys, nothing is written). The diff is computed from the prefix as of ``expect_revision``
        (a reviewed plan's revision) or now, and written in one transaction guarded by that
        revision (see :meth:`apply_diff`): a change made since, deletions included, refuses it
        with :class:`TxnConflict`. Watchers see the rollback as an ordinary change.
        """
        current, target = await self.plan_rollback(prefix, to_revision, at_revision=expect_revision)
        diff = ConfigDiff.between(current, target)
        if model is not None:
            label = decode_key(as_bytes(prefix))
            items = {k[len(label) :]: v for k, v in target.items.items()}
            build_model(model, label, items, to_revision)
        revision = await self.apply_diff(
            prefix, diff, unchanged=unchanged_keys(current, diff, max_txn_ops), max_txn_ops=max_txn_ops
        )
        return diff, revision

    async def put(self, key: KeyLike, value: KeyLike) -> int:
        """Set ``key`` to ``value``; returns the new revision."""
        request = rpc_pb2.PutRequest(key=as_bytes(key), value=as_bytes(value))
        response = await self._conn.unary("kv", "Put", request, idempotent=False, key=str(key))
        return int(response.header.revision)

    async def put_many(self, items: Items) -> int:
        """Set several keys in one transaction, so watchers see them at one revision; returns it."""
        request = rpc_pb2.TxnRequest(success=[_put(k, v) for k, v in items.items()])
        response = await self._conn.unary("kv", "Txn", request, idempotent=False)
        return int(response.header.revision)

    async def apply_if_unchanged(
        self,
        prefix: KeyLike,
        puts: Items,
        deletes: Iterable[KeyLike] = (),
        *,
        since_revision: int,
        existing: Iterable[KeyLike] = (),
        max_txn_ops: int = MAX_TXN_OPS,
        also: Items | None = None,
        absent: Iterable[KeyLike] = (),
        mod_revisions: Mapping[str, int] | None = None,
        delete_prefixes: Iterable[KeyLike] = (),
        prune: Iterable[KeyLike] = (),
    ) -> int:
        """Write ``puts`` and ``deletes`` in one transaction, only if ``prefix`` is as it was.

        Refused with :class:`TxnConflict`, writing nothing, if any key under ``prefix`` was created
        or changed after ``since_revision``, or a key of ``deletes`` or ``existing`` (keys that
        existed then) was deleted since. (A deletion of any other key under the prefix is not
        detected: etcd cannot compare a count; list such keys in ``existing``.) One transaction
        holds at most etcd's ``--max-txn-ops`` operations and compares (128 by default; pass the
        server's value as ``max_txn_ops``): a larger change raises :class:`RequestTooLarge` before
        anything is sent. ``also``: more puts in the same transaction, outside the guard (keys
        elsewhere, such as an audit record; written only if the guarded change is). Further
        guards: keys of ``absent`` must not exist, keys of ``mod_revisions`` must still have been
        last modified at the revision given; ``delete_prefixes`` are deleted whole. ``prune``: keys
        elsewhere deleted in the same transaction, unguarded and best effort: as many as fit in
        ``max_txn_ops`` beside the rest (the others are left for a later write).
        """
        raw = as_bytes(prefix)
        delete_keys = [as_bytes(k) for k in deletes]
        must_exist = list(dict.fromkeys([*delete_keys, *(as_bytes(k) for k in existing)]))
        extra = dict(also or {})
        absent_keys = [as_bytes(k) for k in absent]
        at_revisions = {as_bytes(k): r for k, r in (mod_revisions or {}).items()}
        wiped = [as_bytes(p) for p in delete_prefixes]
        operations = len(puts) + len(delete_keys) + len(extra) + len(wiped)
        guards = 1 + len(must_exist) + len(absent_keys) + len(at_revisions)
        pruned = [as_bytes(k) for k in prune][: max(0, max_txn_ops - operations)]
        if max(operations, guards) > max_txn_ops:
            raise RequestTooLarge(
                f"{len(puts)} put(s) and {len(delete_keys)} delete(s) under {decode_key(raw)!r}, with "
                f"{len(must_exist)} key(s) guarded against deletion, do not fit one transaction: etcd's "
                f"--max-txn-ops allows {max_txn_ops} operations (and {max_txn_ops} compares); nothing "
                "was written. Split the change, or raise the server's limit and pass max_txn_ops"
            )
        compare = [
            rpc_pb2.Compare(
                target=rpc_pb2.Compare.MOD,
                result=rpc_pb2.Compare.LESS,
                key=raw,
                range_end=prefix_range_end(raw),
                mod_revision=since_revision + 1,
            )
        ]
        ops = [_put(k, v) for k, v in [*puts.items(), *extra.items()]]
        ops += [
            rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=k)) for k in delete_keys
        ]
        for key in must_exist:  # still there, as it was when the caller read it
            compare.append(
                rpc_pb2.Compare(
                    target=rpc_pb2.Compare.VERSION, result=rpc_pb2.Compare.GREATER, key=key, version=0
                )
            )
        compare += [
            rpc_pb2.Compare(target=rpc_pb2.Compare.VERSION, result=rpc_pb2.Compare.EQUAL, key=k, version=0)
            for k in absent_keys
        ]
        compare += [
            rpc_pb2.Compare(target=rpc_pb2.Compare.MOD, result=rpc_pb2.Compare.EQUAL, key=k, mod_revision=r)
            for k, r in at_revisions.items()
        ]
        ops += [
            rpc_pb2.RequestOp(
                request_delete_range=rpc_pb2.DeleteRangeRequest(key=p, range_end=prefix_range_end(p))
            )
            for p in wiped
        ]
        ops += [rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=k)) for k in pruned]
        request = rpc_pb2.TxnRequest(compare=compare, success=ops)
        response = await self._conn.unary("kv", "Txn", request, idempotent=False, key=decode_key(raw))
        if not response.succeeded:
            raise TxnConflict(prefix=decode_key(raw), expected_revision=since_revision)
        return int(response.header.revision)

    async def delete(self, key: KeyLike) -> int:
        """Delete ``key`` (no error if absent); returns the revision after the delete."""
        request = rpc_pb2.DeleteRangeRequest(key=as_bytes(key))
        response = await self._conn.unary("kv", "DeleteRange", request, idempotent=False, key=str(key))
        return int(response.header.revision)

    async def delete_prefix(self, prefix: KeyLike) -> int:
        """Delete every key under ``prefix`` in one revision; returns the revision after it."""
        raw = as_bytes(prefix)
        request = rpc_pb2.DeleteRangeRequest(key=raw, range_end=prefix_range_end(raw))
        response = await self._conn.unary("kv", "DeleteRange", request, idempotent=False, key=str(prefix))
        return int(response.header.revision)
