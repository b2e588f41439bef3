"""Large revisions: whole responses by default, etcd's fragments only when one is too large for us.

etcd 3.5 splits responses larger than its ``--max-request-bytes`` only for watches created with
``fragment=True``, and doing so is expensive, so aetcdcfg asks for it only after a response exceeded
the client's ``max_message_bytes``. These tests shrink both limits so a revision of a few MB shows it.
"""

from __future__ import annotations

import anyio
import pytest
from structlog.testing import capture_logs

from aetcdcfg import EtcdClient, EtcdError, EventType
from aetcdcfg.testing import EtcdServer, as_records, etcd_history

pytestmark = pytest.mark.anyio

MIB = 1024 * 1024
#: The client's smallest allowed receive limit.
CLIENT_LIMIT = 4 * MIB
KEYS = 5_000
#: Long key names make the delete events of one ``delete_prefix`` about 5 MB: over CLIENT_LIMIT.
NAME_PAD = "n" * 1_000


async def _fill(client: EtcdClient, prefix: str) -> None:
    for start in range(0, KEYS, 100):
        await client.put_many({f"{prefix}{NAME_PAD}{i:05d}": "v" for i in range(start, start + 100)})


async def test_revision_larger_than_the_receive_limit_arrives_whole_as_one_batch(etcd_prefix: str) -> None:
    with EtcdServer(extra_args=["--max-request-bytes", str(MIB)]) as server:
        async with EtcdClient(endpoints=[server.endpoint], max_message_bytes=CLIENT_LIMIT) as client:
            await _fill(client, etcd_prefix)
            with capture_logs() as logs:
                async with client.watch(etcd_prefix) as sub:
                    deleted_at = await client.delete_prefix(etcd_prefix)
                    after = await client.put(etcd_prefix + "after", "1")
                    with anyio.fail_after(30):
                        batches = sub.batches()
                        big = await anext(batches)
                        next_one = await anext(batches)
            history = await etcd_history(server.endpoint, etcd_prefix, deleted_at, after)
    assert len(big) == KEYS
    assert {e.revision for e in big} == {deleted_at}
    assert all(e.type is EventType.DELETE for e in big)
    assert as_records(big) == [r for r in history if r[0] == deleted_at]
    assert [(e.revision, e.key) for e in next_one] == [(after, etcd_prefix + "after")]
    fragmenting = [entry for entry in logs if entry["event"] == "watch.fragmenting"]
    assert len(fragmenting) == 1 and fragmenting[0]["revision"] == deleted_at - 1


async def test_revision_too_large_even_fragmented_ends_the_watch_with_a_clear_error(etcd_prefix: str) -> None:
    # etcd splits at 8 MiB, so a 5 MB response stays whole and still exceeds our 4 MiB.
    with EtcdServer(extra_args=["--max-request-bytes", str(8 * MIB)]) as server:
        async with EtcdClient(endpoints=[server.endpoint], max_message_bytes=CLIENT_LIMIT) as client:
            await _fill(client, etcd_prefix)
            async with client.watch(etcd_prefix) as sub:
                await client.delete_prefix(etcd_prefix)
                with anyio.fail_after(30), pytest.raises(EtcdError, match="max_message_bytes") as info:
                    async for _ in sub:
                        pass
    assert "--max-request-bytes" in str(info.value)
