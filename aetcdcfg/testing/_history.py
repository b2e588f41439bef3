"""etcd's own history of a prefix, read on a plain gRPC watch with no aetcdcfg watch code in the path.

Tests and the soak compare what subscribers saw against this, so a bug in aetcdcfg's watch cannot
hide itself.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from aetcd.rpc import rpc_pb2, rpc_pb2_grpc

from .._keys import prefix_range_end
from ..events import Event
from ._tls import TLSFiles

__all__ = ["Record", "as_records", "etcd_history"]

Record = tuple[int, str, str, bytes]  # (revision, key, "PUT"/"DELETE", value)


async def etcd_history(
    endpoint: str, prefix: str, first: int, last: int, *, tls: TLSFiles | None = None
) -> list[Record]:
    """Every event under ``prefix`` with revision in [first, last], straight from etcd."""
    target = endpoint.split("://", 1)[1]
    records: list[Record] = []
    options = [("grpc.max_receive_message_length", 64 << 20)]
    if tls is not None:
        credentials = grpc.ssl_channel_credentials(
            tls.ca_file.read_bytes(), tls.client_key.read_bytes(), tls.client_cert.read_bytes()
        )
        channel = grpc.aio.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.aio.insecure_channel(target, options=options)
    async with channel:
        call = rpc_pb2_grpc.WatchStub(channel).Watch()
        raw = prefix.encode()
        create = rpc_pb2.WatchCreateRequest(
            key=raw, range_end=prefix_range_end(raw), start_revision=first, progress_notify=True
        )
        await call.write(rpc_pb2.WatchRequest(create_request=create))
        while not records or records[-1][0] < last:
            response = await call.read()
            if response.compact_revision:
                raise AssertionError(f"history compacted at {response.compact_revision}")
            for ev in response.events:
                kind = "DELETE" if ev.type == 1 else "PUT"
                records.append((int(ev.kv.mod_revision), ev.kv.key.decode(), kind, bytes(ev.kv.value)))
            if not response.events and not response.created and response.header.revision >= last:
                break
        call.cancel()
    return [r for r in records if r[0] <= last]


def as_records(events: Iterable[Event]) -> list[Record]:
    """Events in the same shape as :func:`etcd_history` returns."""
    return [(e.revision, e.key, e.type.value, e.value) for e in events]
