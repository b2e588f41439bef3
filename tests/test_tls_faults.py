"""mTLS under faults: TLS goes through the fault proxy untouched, and the watch history stays exact."""

from __future__ import annotations

import anyio
import pytest

from aetcdcfg import EtcdClient, Event
from aetcdcfg.testing import EtcdServer, FaultProxy, TLSFiles, as_records, etcd_history

pytestmark = pytest.mark.anyio


async def test_mtls_watch_survives_resets_and_black_hole_with_exact_history(
    etcd_tls_server: EtcdServer, etcd_tls_files: TLSFiles, etcd_prefix: str
) -> None:
    tls = {
        "ca_file": etcd_tls_files.ca_file,
        "cert_file": etcd_tls_files.client_cert,
        "key_file": etcd_tls_files.client_key,
    }
    with FaultProxy.to(etcd_tls_server.endpoint) as proxy:
        async with (
            EtcdClient(endpoints=[etcd_tls_server.endpoint], **tls) as writer,
            EtcdClient(endpoints=[proxy.endpoint], keepalive_time=1, keepalive_timeout=1, **tls) as watcher,
            watcher.watch(etcd_prefix) as sub,
        ):
            start = sub.start_revision
            events: list[Event] = []

            async def read() -> None:
                async for event in sub:
                    events.append(event)
                    if event.key.endswith("end"):
                        return

            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(read)
                    for i in range(150):
                        await writer.put(f"{etcd_prefix}k{i % 7}", str(i))
                        if i % 30 == 10:
                            proxy.reset()
                        if i == 100:
                            proxy.blackhole(True, drop=True)
                        if i == 120:
                            await anyio.sleep(2.5)  # longer than keepalive_time + keepalive_timeout
                            proxy.blackhole(False)
                    last = await writer.put(etcd_prefix + "end", "done")
    expected = await etcd_history(etcd_tls_server.endpoint, etcd_prefix, start, last, tls=etcd_tls_files)
    assert as_records(events) == expected
    assert len(expected) == 151
