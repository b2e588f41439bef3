"""The fault matrix over mTLS: the faults of ``test_faults.py`` (which runs them over plain TCP, with
deeper assertions) again with TLS and client certificates end to end, the proxy passing TLS through.
Each fault runs against real etcd while a writer writes and a subscriber and a LiveSettings follow. For every fault the subscriber's history equals etcd's own, LiveSettings never
shows a torn object, nothing hangs, and the recovery time (fault removed -> subscriber has the next
write) is printed as ``RECOVERY <fault> <seconds>`` (run with ``-s`` to see it).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import pytest
from pydantic_settings import BaseSettings

from aetcdcfg import EtcdClient, EtcdError, Event, LiveSettings
from aetcdcfg.testing import EtcdCluster, EtcdServer, FaultProxy, TLSFiles, as_records, etcd_history

pytestmark = pytest.mark.anyio

Fault = Callable[[], Awaitable[None]]


def tls_options(tls: TLSFiles | None) -> dict[str, Any]:
    if tls is None:
        return {}
    return {"ca_file": tls.ca_file, "cert_file": tls.client_cert, "key_file": tls.client_key}


@pytest.fixture(params=["mtls"])
def security(request: pytest.FixtureRequest, etcd_tls_files: TLSFiles) -> TLSFiles | None:
    """mTLS for every fault here (plain TCP is test_faults.py's); ``"plain"`` also works as a param."""
    return etcd_tls_files if request.param == "mtls" else None


def member_options(tls: TLSFiles | None) -> dict[str, Any]:
    return {
        "keepalive_min_time": 1,
        "progress_notify_interval": 1,
        "tls": tls,
        "client_cert_auth": tls is not None,
    }


@pytest.fixture
def any_cluster(security: TLSFiles | None, etcd_cluster: EtcdCluster) -> Iterator[EtcdCluster]:
    """The shared cluster for plain TCP; a private mTLS cluster otherwise."""
    if security is None:
        etcd_cluster.ensure_all_running()
        yield etcd_cluster
        etcd_cluster.ensure_all_running()
        return
    with EtcdCluster(3, **member_options(security)) as private:
        yield private


class Pair(BaseSettings):
    a: int = 0
    b: int = 0


async def run_fault(
    name: str,
    prefix: str,
    *,
    watch_endpoints: list[str],
    write_endpoints: list[str],
    history_endpoint: Callable[[], str],
    fault: Fault,
    tls: TLSFiles | None = None,
    writes: int = 30,
) -> float:
    """Write before, during and after ``fault`` (which injects, holds and removes the fault);
    check history and settings; return the recovery time: from the fault's removal until the
    subscriber has the first write made after it."""
    torn: list[tuple[int, int]] = []
    events: list[Event] = []
    secure = tls_options(tls)
    async with (
        EtcdClient(endpoints=write_endpoints, request_timeout=3, **secure) as writer,
        EtcdClient(
            endpoints=watch_endpoints, keepalive_time=1, keepalive_timeout=1, request_timeout=3, **secure
        ) as watcher,
        watcher.watch(prefix) as sub,
        LiveSettings(Pair, prefix=prefix, client=watcher) as live,
    ):
        start = sub.start_revision
        counter = 0

        async def write() -> int:
            nonlocal counter
            counter += 1
            while True:  # through the fault: etcd's history, not our log, is the reference
                try:
                    return await writer.put_many({prefix + "a": str(counter), prefix + "b": str(counter)})
                except EtcdError:
                    await anyio.sleep(0.05)

        async def write_during() -> None:
            while True:
                await write()
                await anyio.sleep(0.02)

        async def collect() -> None:
            async for event in sub:
                events.append(event)

        async def sample() -> None:
            while True:
                current = live.current
                if current.a != current.b:
                    torn.append((current.a, current.b))
                await anyio.sleep(0.001)

        with anyio.fail_after(90):
            async with anyio.create_task_group() as tg:
                tg.start_soon(collect)
                tg.start_soon(sample)
                for _ in range(writes):
                    await write()
                async with anyio.create_task_group() as during:
                    during.start_soon(write_during)
                    await fault()
                    removed = time.monotonic()
                    during.cancel_scope.cancel()
                marker = await write()
                while not events or events[-1].revision < marker:
                    await anyio.sleep(0.005)
                recovery = time.monotonic() - removed
                last = await write()
                await live.wait_for(lambda s: s.a == counter)
                while events[-1].revision < last:
                    await anyio.sleep(0.005)
                tg.cancel_scope.cancel()
    expected = await etcd_history(history_endpoint(), prefix, start, last, tls=tls)
    assert as_records(events) == expected
    assert torn == []
    print(f"RECOVERY {name}{' (mTLS)' if tls else ''} {recovery:.3f}")
    return recovery


@pytest.fixture
def server(security: TLSFiles | None) -> Iterator[EtcdServer]:
    """A server of this test's own, since the test freezes, kills or stops it."""
    with EtcdServer(**member_options(security)) as private:
        yield private


async def test_added_latency_of_500ms_keeps_history_exact(
    server: EtcdServer, security: TLSFiles | None, etcd_prefix: str
) -> None:
    with FaultProxy.to(server.endpoint) as proxy:

        async def latency() -> None:
            proxy.set_delay(0.5)
            await anyio.sleep(2)
            proxy.set_delay(0)

        await run_fault(
            "latency-500ms",
            etcd_prefix,
            watch_endpoints=[proxy.endpoint],
            write_endpoints=[server.endpoint],
            history_endpoint=lambda: server.endpoint,
            fault=latency,
            tls=security,
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
    await anyio.to_thread.run_sync(server.start)


@pytest.mark.parametrize(
    ("name", "fault"), [("sigstop-3s", freeze), ("sigkill-restart", crash), ("all-down-30s", outage)]
)
async def test_single_member_fault_resumes_without_gap(
    server: EtcdServer,
    security: TLSFiles | None,
    etcd_prefix: str,
    name: str,
    fault: Callable[[EtcdServer], Awaitable[None]],
) -> None:
    recovery = await run_fault(
        name,
        etcd_prefix,
        watch_endpoints=[server.endpoint],
        write_endpoints=[server.endpoint],
        history_endpoint=lambda: server.endpoint,
        fault=functools.partial(fault, server),
        tls=security,
    )
    assert recovery < 5  # the reconnect backoff is capped at 2 s


async def test_compaction_and_defragmentation_during_outage_resync(
    server: EtcdServer, security: TLSFiles | None, etcd_prefix: str
) -> None:
    secure = tls_options(security)
    with FaultProxy.to(server.endpoint) as proxy:
        async with (
            EtcdClient(endpoints=[server.endpoint], **secure) as writer,
            EtcdClient(
                endpoints=[proxy.endpoint], keepalive_time=1, keepalive_timeout=1, **secure
            ) as watcher,
            LiveSettings(Pair, prefix=etcd_prefix, client=watcher) as live,
        ):
            await writer.put_many({etcd_prefix + "a": "1", etcd_prefix + "b": "1"})
            await live.wait_for(lambda s: s.a == 1, timeout=5)
            proxy.refuse(True)
            proxy.reset()
            for i in range(2, 20):
                last = await writer.put_many({etcd_prefix + "a": str(i), etcd_prefix + "b": str(i)})
            server.etcdctl("compact", str(last))
            server.etcdctl("defrag")
            removed = time.monotonic()
            proxy.refuse(False)
            settings = await live.wait_for(lambda s: s.a == 19, timeout=15)
            print(f"RECOVERY compaction+defrag {time.monotonic() - removed:.3f}")
            assert settings.b == 19


@pytest.mark.cluster
async def test_leader_change_keeps_history_exact(
    any_cluster: EtcdCluster, security: TLSFiles | None, etcd_prefix: str
) -> None:
    cluster = any_cluster

    async def move() -> None:
        leader = await anyio.to_thread.run_sync(cluster.wait_leader)
        await anyio.to_thread.run_sync(cluster.move_leader, (leader + 1) % 3)
        await anyio.sleep(0.5)

    await run_fault(
        "leader-change",
        etcd_prefix,
        watch_endpoints=cluster.endpoints,
        write_endpoints=cluster.endpoints,
        history_endpoint=lambda: cluster.endpoints[0],
        fault=move,
        tls=security,
    )


@pytest.mark.cluster
async def test_member_cut_off_from_majority_is_left_for_one_with_a_leader(
    any_cluster: EtcdCluster, security: TLSFiles | None, etcd_prefix: str
) -> None:
    """The watcher reaches member 0 first; members 1 and 2 go down, so member 0 has no leader.
    require-leader makes member 0 fail the stream instead of serving it silently; once the others
    are back, the watch continues with nothing missed."""
    cluster = any_cluster
    proxies = [FaultProxy.to(endpoint) for endpoint in cluster.endpoints]
    for proxy in proxies:
        proxy.start()
    try:

        async def isolate() -> None:
            cluster.kill(1)
            cluster.kill(2)
            await anyio.sleep(2)  # member 0 notices it has no leader (election timeout 0.5 s)
            await anyio.to_thread.run_sync(cluster.restart, 1)
            await anyio.to_thread.run_sync(cluster.restart, 2)

        await run_fault(
            "minority-partition",
            etcd_prefix,
            watch_endpoints=[p.endpoint for p in proxies],
            write_endpoints=cluster.endpoints,
            history_endpoint=lambda: cluster.endpoints[0],
            fault=isolate,
            tls=security,
        )
    finally:
        for proxy in proxies:
            proxy.stop()


@pytest.mark.cluster
async def test_member_removed_from_cluster_is_left(security: TLSFiles | None, etcd_prefix: str) -> None:
    with EtcdCluster(3, **member_options(security)) as private:  # private: it loses a member

        async def remove() -> None:
            member_id = await anyio.to_thread.run_sync(private.member_id, 0)
            others = private.endpoints[1:]
            with anyio.fail_after(20):
                while True:  # etcd refuses while a member is not yet connected ("unhealthy cluster")
                    try:
                        await anyio.to_thread.run_sync(
                            lambda: private.members[1].etcdctl(
                                "member", "remove", member_id, endpoints=others
                            )
                        )
                        break
                    except RuntimeError:
                        await anyio.sleep(0.5)
            await anyio.sleep(1)

        await run_fault(
            "member-removed",
            etcd_prefix,
            watch_endpoints=private.endpoints,
            write_endpoints=private.endpoints[1:],
            history_endpoint=lambda: private.endpoints[1],
            fault=remove,
            tls=security,
        )
