"""The faults of ``test_faults.py`` again over mTLS: TLS and client certificates end to end, the fault
proxy passing TLS through untouched. Same harness, same checks: the subscriber's history equals
etcd's own, LiveSettings is never torn, nothing hangs; ``RECOVERY <fault> (mTLS) <seconds>``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Iterator

import anyio
import pytest

from aetcdcfg.testing import EtcdCluster, EtcdServer, FaultProxy, TLSFiles

from .harness import MEMBER_OPTIONS, following, report, start_until_accepting, tls_options

pytestmark = pytest.mark.anyio


def tls_member(tls: TLSFiles) -> dict[str, object]:
    return {**MEMBER_OPTIONS, "tls": tls, "client_cert_auth": True}


@pytest.fixture
def server(etcd_tls_files: TLSFiles) -> Iterator[EtcdServer]:
    """An mTLS member of this test's own: the test freezes, kills or stops it."""
    with EtcdServer(**tls_member(etcd_tls_files)) as private:  # type: ignore[arg-type]
        yield private


async def run_fault(
    name: str,
    prefix: str,
    tls: TLSFiles,
    *,
    watch: list[str],
    write: list[str],
    history: Callable[[], str],
    fault: Callable[[], Awaitable[None]],
) -> float:
    """Write before, during and after ``fault``; check history and settings; the recovery time."""
    with anyio.fail_after(90):
        async with following(prefix, watch=watch, write=write, **tls_options(tls)) as run:
            await run.warm_up()
            removed = await run.through(fault)
            recovery = await run.recovery(removed)
            await run.finish()
            await run.check_history(history(), tls=tls)
    report(f"{name} (mTLS)", recovery)
    return recovery


async def test_added_latency_of_500ms_keeps_history_exact(
    server: EtcdServer, etcd_tls_files: TLSFiles, etcd_prefix: str
) -> None:
    with FaultProxy.to(server.endpoint) as proxy:

        async def latency() -> None:
            proxy.set_delay(0.5)
            await anyio.sleep(2)
            proxy.set_delay(0)

        await run_fault(
            "latency-500ms",
            etcd_prefix,
            etcd_tls_files,
            watch=[proxy.endpoint],
            write=[server.endpoint],
            history=lambda: server.endpoint,
            fault=latency,
        )


async def freeze(server: EtcdServer) -> None:
    server.pause()  # SIGSTOP: sockets stay open, nothing answers
    await anyio.sleep(3)  # longer than keepalive_time + keepalive_timeout
    server.resume()


async def crash(server: EtcdServer) -> None:
    server.kill()  # SIGKILL, then a restart on the same data dir
    await anyio.sleep(1)
    await anyio.to_thread.run_sync(server.start)


async def outage(server: EtcdServer) -> None:
    server.stop()  # every endpoint down for 30 s
    await anyio.sleep(30)
    await start_until_accepting(server)  # recovery counts from here, not from etcd being healthy


@pytest.mark.parametrize(
    ("name", "fault"), [("sigstop-3s", freeze), ("sigkill-restart", crash), ("all-down-30s", outage)]
)
async def test_single_member_fault_resumes_without_gap(
    server: EtcdServer,
    etcd_tls_files: TLSFiles,
    etcd_prefix: str,
    name: str,
    fault: Callable[[EtcdServer], Awaitable[None]],
) -> None:
    recovery = await run_fault(
        name,
        etcd_prefix,
        etcd_tls_files,
        watch=[server.endpoint],
        write=[server.endpoint],
        history=lambda: server.endpoint,
        fault=functools.partial(fault, server),
    )
    assert recovery < 5  # the reconnect backoff is capped at 2 s


async def test_compaction_and_defragmentation_during_outage_resync(
    server: EtcdServer, etcd_tls_files: TLSFiles, etcd_prefix: str
) -> None:
    with FaultProxy.to(server.endpoint) as proxy, anyio.fail_after(60):
        options = tls_options(etcd_tls_files)
        async with following(etcd_prefix, watch=[proxy.endpoint], write=[server.endpoint], **options) as run:
            await run.warm_up()
            proxy.refuse(True)
            proxy.reset()
            for _ in range(20):
                await run.write()
            last = await run.write(pair=True)
            server.etcdctl("compact", str(last))
            server.etcdctl("defrag")
            removed = time.monotonic()
            proxy.refuse(False)
            recovery = await run.recovery(removed)
            await run.finish()
            final = await run.writer.get_prefix(etcd_prefix)
            assert run.state() == dict(final.items)
            assert any(event.resync for event in run.events)
    report("compaction+defrag (mTLS)", recovery)


@pytest.fixture
def tls_cluster(etcd_tls_files: TLSFiles) -> Iterator[EtcdCluster]:
    with EtcdCluster(3, **tls_member(etcd_tls_files)) as private:  # type: ignore[arg-type]
        yield private


@pytest.mark.cluster
async def test_leader_change_keeps_history_exact(
    tls_cluster: EtcdCluster, etcd_tls_files: TLSFiles, etcd_prefix: str
) -> None:
    async def move() -> None:
        leader = await anyio.to_thread.run_sync(tls_cluster.wait_leader)
        await anyio.to_thread.run_sync(tls_cluster.move_leader, (leader + 1) % 3)
        await anyio.sleep(0.5)

    await run_fault(
        "leader-change",
        etcd_prefix,
        etcd_tls_files,
        watch=tls_cluster.endpoints,
        write=tls_cluster.endpoints,
        history=lambda: tls_cluster.endpoints[0],
        fault=move,
    )


@pytest.mark.cluster
async def test_member_cut_off_from_majority_is_left_for_one_with_a_leader(
    tls_cluster: EtcdCluster, etcd_tls_files: TLSFiles, etcd_prefix: str
) -> None:
    """The watcher reaches member 0 first; members 1 and 2 go down, so member 0 has no leader and
    require-leader makes it fail the stream; once the others are back, nothing was missed."""
    proxies = [FaultProxy.to(endpoint).start() for endpoint in tls_cluster.endpoints]
    try:

        async def isolate() -> None:
            tls_cluster.kill(1)
            tls_cluster.kill(2)
            await anyio.sleep(2)  # member 0 notices it has no leader (election timeout 0.5 s)
            await anyio.to_thread.run_sync(tls_cluster.restart, 1)
            await anyio.to_thread.run_sync(tls_cluster.restart, 2)

        await run_fault(
            "minority-partition",
            etcd_prefix,
            etcd_tls_files,
            watch=[p.endpoint for p in proxies],
            write=tls_cluster.endpoints,
            history=lambda: tls_cluster.endpoints[0],
            fault=isolate,
        )
    finally:
        for proxy in proxies:
            proxy.stop()


@pytest.mark.cluster
async def test_member_removed_from_cluster_is_left(
    tls_cluster: EtcdCluster, etcd_tls_files: TLSFiles, etcd_prefix: str
) -> None:
    async def remove() -> None:
        await anyio.to_thread.run_sync(tls_cluster.remove_member, 0)
        await anyio.sleep(1)

    await run_fault(
        "member-removed",
        etcd_prefix,
        etcd_tls_files,
        watch=tls_cluster.endpoints,
        write=tls_cluster.endpoints[1:],
        history=lambda: tls_cluster.endpoints[1],
        fault=remove,
    )
