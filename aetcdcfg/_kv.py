"""The KV API: reads and writes of keys and prefixes over a :class:`Connection`.

``EtcdClient`` inherits these methods; they are kept here so the client module is only lifecycle
and watch wiring.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from aetcd.rpc import rpc_pb2

from ._connection import Connection
from ._keys import KeyLike, as_bytes, decode_key, prefix_range_end
from ._reads import range_pages
from .errors import TxnConflict
from .events import Snapshot

__all__ = ["KV", "Items"]

#: Mapping is invariant in its key type, so spell out the shapes callers actually have.
Items = Mapping[str, str] | Mapping[str, bytes] | Mapping[bytes, bytes] | Mapping[KeyLike, KeyLike]


def _put(key: KeyLike, value: KeyLike) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=as_bytes(key), value=as_bytes(value)))


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
        """Every key under ``prefix`` at one revision (the current one, or ``revision``), read in
        pages so any number of keys fits."""
        items, revision = await range_pages(self._conn, as_bytes(prefix), at_revision=revision or 0)
        return Snapshot(revision=revision, items={decode_key(item[0]): item[1] for item in items})

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
    ) -> int:
        """Write ``puts`` and ``deletes`` in one transaction, only if ``prefix`` is as it was.

        Refused with :class:`TxnConflict`, writing nothing, if any key under ``prefix`` was created
        or changed after ``since_revision``, or a key this call changes was deleted since. (A
        deletion of another key under the prefix is not detected: etcd cannot compare a count.)
        One transaction holds at most etcd's ``--max-txn-ops`` (128 by default) operations.
        """
        raw = as_bytes(prefix)
        compare = [
            rpc_pb2.Compare(
                target=rpc_pb2.Compare.MOD,
                result=rpc_pb2.Compare.LESS,
                key=raw,
                range_end=prefix_range_end(raw),
                mod_revision=since_revision + 1,
            )
        ]
        delete_keys = [as_bytes(k) for k in deletes]
        ops = [_put(k, v) for k, v in puts.items()]
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
