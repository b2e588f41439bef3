"""EtcdClient against real etcd: KV helpers, failover, TLS, auth and unreachable endpoints."""

from __future__ import annotations

import logging
import time
import uuid

import anyio
import pytest
from pydantic_settings import BaseSettings
from structlog.testing import capture_logs

from aetcdcfg import (
    AuthenticationFailed,
    ClientClosedError,
    EtcdClient,
    EtcdUnavailable,
    LiveSettings,
    PermissionDenied,
    RequestTooLarge,
    Snapshot,
)
from aetcdcfg._channel import Endpoint
from aetcdcfg.testing import EtcdCluster, EtcdServer, FaultProxy, TLSFiles

pytestmark = pytest.mark.anyio


async def test_put_get_delete_round_trip(etcd_server: EtcdServer, etcd_prefix: str) -> None:
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        revision = await client.put(etcd_prefix + "a", "1")
        assert await client.get(etcd_prefix + "a") == b"1"
        assert await client.put((etcd_prefix + "b").encode(), b"\x00\xff") == revision + 1
        assert await client.get(etcd_prefix + "b") == b"\x00\xff"
        assert await client.get(etcd_prefix + "missing") is None
        assert await client.delete(etcd_prefix + "a") == revision + 2
        assert await client.get(etcd_prefix + "a") is None


async def test_put_many_commits_one_revision(etcd_server: EtcdServer, etcd_prefix: str) -> None:
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        revision = await client.put_many({etcd_prefix + "x": "1", etcd_prefix + "y": b"2"})
        snapshot = await client.get_prefix(etcd_prefix)
    assert snapshot == Snapshot(revision, {etcd_prefix + "x": b"1", etcd_prefix + "y": b"2"})


async def test_get_prefix_does_not_match_sibling_prefixes(etcd_server: EtcdServer, etcd_prefix: str) -> None:
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put_many({etcd_prefix + "app/a": "1", etcd_prefix + "apple/b": "2"})
        snapshot = await client.get_prefix(etcd_prefix + "app/")
    assert list(snapshot.items) == [etcd_prefix + "app/a"]


async def test_get_prefix_reads_40000_keys_whole_at_one_revision(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """40,000 keys of 100 bytes are over gRPC's default 4 MiB message limit; pagination keeps them whole."""
    value = b"v" * 100
    keys = [f"{etcd_prefix}k{i:05d}" for i in range(40_000)]
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        async with anyio.create_task_group() as tg:
            for start in range(0, len(keys), 128):  # etcd's --max-txn-ops default is 128
                chunk = {k: value for k in keys[start : start + 128]}
                tg.start_soon(client.put_many, chunk)
        last = await client.put(etcd_prefix + "zz-last", "end")
        snapshot = await client.get_prefix(etcd_prefix)
    assert sum(len(k) + len(v) for k, v in snapshot.items.items()) > 4 * 1024 * 1024
    assert len(snapshot.items) == 40_001
    assert snapshot.revision == last
    assert all(snapshot.items[k] == value for k in keys)


async def test_oversized_value_is_a_typed_error_naming_the_key(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        with pytest.raises(RequestTooLarge, match="too large|larger than") as info:
            await client.put(etcd_prefix + "big", b"x" * (2 * 1024 * 1024))
        assert etcd_prefix + "big" in str(info.value)
        assert await client.get(etcd_prefix + "big") is None


async def test_unreachable_endpoints_raise_within_connect_timeout() -> None:
    started = time.monotonic()
    with pytest.raises(EtcdUnavailable) as info:
        async with EtcdClient(endpoints=["http://127.0.0.1:1", "http://127.0.0.1:2"], connect_timeout=1.0):
            pass
    elapsed = time.monotonic() - started
    assert elapsed < 2.0, elapsed
    message = str(info.value)
    assert "http://127.0.0.1:1" in message and "http://127.0.0.1:2" in message
    assert "connect_timeout" in message
    assert info.value.cause  # the last cause is named
    assert info.value.endpoints == ("http://127.0.0.1:1", "http://127.0.0.1:2")


async def test_requests_need_an_open_client(etcd_server: EtcdServer) -> None:
    client = EtcdClient(endpoints=[etcd_server.endpoint])
    with pytest.raises(ClientClosedError, match="async with"):
        await client.get("/x")


@pytest.mark.cluster
async def test_cluster_with_dead_first_endpoint_still_serves(cluster: EtcdCluster, etcd_prefix: str) -> None:
    cluster.kill(0)
    await anyio.to_thread.run_sync(cluster.wait_leader)
    async with EtcdClient(endpoints=cluster.endpoints, connect_timeout=3) as client:
        revision = await client.put(etcd_prefix + "k", "v")
        assert await client.get(etcd_prefix + "k") == b"v"
        assert client.endpoint != cluster.endpoints[0]
    assert revision > 0


@pytest.mark.cluster
async def test_member_killed_mid_requests_never_hangs(cluster: EtcdCluster, etcd_prefix: str) -> None:
    """Requests in flight when their member dies succeed elsewhere or fail with EtcdUnavailable in time."""
    outcomes: list[str] = []
    async with EtcdClient(endpoints=cluster.endpoints, request_timeout=3, connect_timeout=2) as client:
        await client.put(etcd_prefix + "k", "0")
        used = cluster.endpoints.index(client.endpoint or "")

        async def hammer(n: int) -> None:
            for i in range(40):
                started = time.monotonic()
                try:
                    if i % 2:
                        await client.put(f"{etcd_prefix}k{n}", str(i))
                    else:
                        await client.get(f"{etcd_prefix}k{n}")
                    outcomes.append("ok")
                except EtcdUnavailable:
                    outcomes.append("unavailable")
                assert time.monotonic() - started < 3 + 1.0

        async with anyio.create_task_group() as tg:
            for n in range(4):
                tg.start_soon(hammer, n)
            await anyio.sleep(0.05)
            cluster.kill(used)
        assert client.endpoint is not None and client.endpoint != cluster.endpoints[used]
        assert await client.get(etcd_prefix + "k") == b"0"
    assert outcomes.count("ok") >= len(outcomes) - 8


async def test_mtls_with_client_certificate(
    etcd_tls_server: EtcdServer, etcd_tls_files: TLSFiles, etcd_prefix: str
) -> None:
    async with EtcdClient(
        endpoints=[etcd_tls_server.endpoint],
        ca_file=etcd_tls_files.ca_file,
        cert_file=etcd_tls_files.client_cert,
        key_file=etcd_tls_files.client_key,
    ) as client:
        await client.put(etcd_prefix + "tls", "yes")
        assert await client.get(etcd_prefix + "tls") == b"yes"


async def test_mtls_server_refuses_client_without_certificate(
    etcd_tls_server: EtcdServer, etcd_tls_files: TLSFiles
) -> None:
    with pytest.raises(EtcdUnavailable):
        async with EtcdClient(
            endpoints=[etcd_tls_server.endpoint], ca_file=etcd_tls_files.ca_file, connect_timeout=1.5
        ) as client:
            await client.get("/x")


async def test_tls_verification_rejects_unknown_ca(
    etcd_tls_server: EtcdServer, etcd_tls_files: TLSFiles
) -> None:
    with pytest.raises(EtcdUnavailable):
        async with EtcdClient(
            endpoints=[etcd_tls_server.endpoint],
            ca_file=etcd_tls_files.other_ca_file,
            cert_file=etcd_tls_files.client_cert,
            key_file=etcd_tls_files.client_key,
            connect_timeout=1.5,
        ) as client:
            await client.get("/x")


async def test_auth_right_password_reads_and_writes(etcd_auth_server: EtcdServer) -> None:
    async with EtcdClient(endpoints=[etcd_auth_server.endpoint], username="app", password="apppw") as client:
        await client.put("/app/k", "v")
        assert await client.get("/app/k") == b"v"


async def test_auth_wrong_password_is_authentication_failed_without_the_password(
    etcd_auth_server: EtcdServer,
) -> None:
    with capture_logs() as logs, pytest.raises(AuthenticationFailed) as info:
        async with EtcdClient(endpoints=[etcd_auth_server.endpoint], username="app", password="WRONGpw"):
            pass
    assert "WRONGpw" not in str(info.value)
    assert "WRONGpw" not in repr(logs)


async def test_auth_without_credentials_is_authentication_failed(etcd_auth_server: EtcdServer) -> None:
    async with EtcdClient(endpoints=[etcd_auth_server.endpoint]) as client:
        with pytest.raises(AuthenticationFailed, match="ETCD_USERNAME"):
            await client.get("/app/k")


async def test_role_without_write_permission_is_permission_denied(etcd_auth_server: EtcdServer) -> None:
    async with EtcdClient(
        endpoints=[etcd_auth_server.endpoint], username="reader", password="readerpw"
    ) as client:
        await client.get("/app/k")
        with pytest.raises(PermissionDenied, match="/app/k"):
            await client.put("/app/k", "nope")
        with pytest.raises(PermissionDenied):
            await client.get("/other/k")


async def test_expired_token_is_renewed_transparently(
    etcd_auth_server: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The server's --auth-token-ttl is 2 s; after it passes the next request re-authenticates."""
    caplog.set_level(logging.DEBUG)
    async with EtcdClient(endpoints=[etcd_auth_server.endpoint], username="app", password="apppw") as client:
        await client.put("/app/ttl", "1")
        old_token = client._conn.token
        await anyio.sleep(3.2)  # waiting out the server's token TTL, not synchronising
        with capture_logs() as logs:
            assert await client.get("/app/ttl") == b"1"
        new_token = client._conn.token
    assert old_token and new_token and old_token != new_token
    for token in (old_token, new_token):
        assert token not in repr(logs) + caplog.text
    assert [entry["event"] for entry in logs].count("etcd.reauthenticated") == 1
    assert "apppw" not in repr(logs) + caplog.text


class _SilentAfter:
    """Black-holes ``proxy`` right after the ``n``-th ``EndpointPool.ready()`` returns a member: etcd
    goes silent at that step of opening (authenticating, discovering members, listing a layer)."""

    def __init__(self, proxy: FaultProxy, n: int, monkeypatch: pytest.MonkeyPatch) -> None:
        from aetcdcfg._channel import EndpointPool

        ready = EndpointPool.ready
        self.calls = 0

        async def then_silent(pool: EndpointPool, timeout: float) -> Endpoint:
            endpoint = await ready(pool, timeout)
            self.calls += 1
            if self.calls == n:
                proxy.blackhole()
            return endpoint

        monkeypatch.setattr(EndpointPool, "ready", then_silent)


@pytest.mark.parametrize(("discover", "silent_after"), [(False, 1), (True, 1), (True, 2)])
async def test_opening_with_credentials_on_an_etcd_gone_silent_raises_etcd_unavailable(
    etcd_auth_server: EtcdServer, monkeypatch: pytest.MonkeyPatch, discover: bool, silent_after: int
) -> None:
    """A member is ready, then answers nothing (authenticating, or reading the member list): opening
    must fail with EtcdUnavailable within request_timeout, never hang nor raise a bare
    CancelledError (grpc.aio's own, from a call nobody cancelled)."""
    with FaultProxy.to(etcd_auth_server.endpoint) as proxy:
        silent = _SilentAfter(proxy, silent_after, monkeypatch)
        started = time.monotonic()
        with pytest.raises(EtcdUnavailable), anyio.fail_after(10):
            async with EtcdClient(
                endpoints=[proxy.endpoint],
                username="app",
                password="apppw",
                request_timeout=2,
                discover_endpoints=discover,
            ):
                pass
        elapsed = time.monotonic() - started
    assert silent.calls == silent_after, "etcd never went silent: the test did not test anything"
    assert elapsed < 2 + 1.0  # request_timeout, and a loaded machine's slack


class _Pair(BaseSettings):
    a: int = 0
    b: int = 0


@pytest.mark.parametrize("silent_after", [1, 2, 3, 4])
async def test_opening_live_settings_with_credentials_on_an_etcd_gone_silent_raises_etcd_unavailable(
    etcd_auth_server: EtcdServer, monkeypatch: pytest.MonkeyPatch, silent_after: int
) -> None:
    """LiveSettings opening its own client (from ETCD_* variables) with credentials: etcd goes silent
    after authenticating (1), after listing a layer (2, 4) or once a layer's watch has a member (3).
    Opening fails with EtcdUnavailable within request_timeout, never with a bare CancelledError."""
    prefix = f"/app/{uuid.uuid4().hex[:8]}/"
    with FaultProxy.to(etcd_auth_server.endpoint) as proxy:
        for name, value in {
            "ETCD_ENDPOINTS": proxy.endpoint,
            "ETCD_USERNAME": "app",
            "ETCD_PASSWORD": "apppw",
            "ETCD_REQUEST_TIMEOUT": "2",
        }.items():
            monkeypatch.setenv(name, value)
        silent = _SilentAfter(proxy, silent_after, monkeypatch)
        started = time.monotonic()
        with pytest.raises(EtcdUnavailable), anyio.fail_after(10):
            async with LiveSettings(_Pair, prefix=prefix):
                pass
        elapsed = time.monotonic() - started
    assert silent.calls >= silent_after, "etcd never went silent: the test did not test anything"
    assert elapsed < 2 + 1.0  # request_timeout, and a loaded machine's slack


@pytest.mark.cluster
async def test_discovery_follows_the_cluster_from_one_configured_member(
    cluster: EtcdCluster, etcd_prefix: str
) -> None:
    async with EtcdClient(
        endpoints=[cluster.endpoints[0]], discover_endpoints=True, connect_timeout=3
    ) as client:
        assert sorted(await client.sync_endpoints()) == sorted(cluster.endpoints)
        await client.put(etcd_prefix + "k", "1")
        cluster.kill(0)
        await anyio.to_thread.run_sync(cluster.wait_leader)
        assert await client.get(etcd_prefix + "k") == b"1"
        assert client.endpoint in cluster.endpoints[1:]


@pytest.mark.cluster
async def test_read_on_a_frozen_member_fails_over_within_request_timeout(
    cluster: EtcdCluster, etcd_prefix: str
) -> None:
    async with EtcdClient(endpoints=cluster.endpoints, request_timeout=4, keepalive_time=10) as client:
        await client.put(etcd_prefix + "k", "v")
        used = cluster.endpoints.index(client.endpoint or "")
        cluster.members[used].pause()  # SIGSTOP: the TCP connection stays up, nothing answers
        await anyio.to_thread.run_sync(cluster.wait_leader)
        started = time.monotonic()
        assert await client.get(etcd_prefix + "k") == b"v"
        assert time.monotonic() - started < 4
        assert client.endpoint != cluster.endpoints[used]


async def test_connects_through_a_path_slower_than_the_reconnect_backoff(etcd_server: EtcdServer) -> None:
    """0.7 s each way: the HTTP/2 handshake takes ~1.4 s, more than the 1 s maximum reconnect backoff.

    gRPC gives one connection attempt max(backoff, min_reconnect_backoff_ms) to finish; with that at
    100 ms every attempt was abandoned before etcd's SETTINGS frame arrived, forever.
    """
    with FaultProxy.to(etcd_server.endpoint) as proxy:
        proxy.set_delay(0.7)
        async with EtcdClient(endpoints=[proxy.endpoint], connect_timeout=8, request_timeout=12) as client:
            with anyio.fail_after(15):
                assert await client.get("/no/such/key") is None
