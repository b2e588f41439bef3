"""Authentication under a running watch: token expiry mid-stream, and permissions that do not fit."""

from __future__ import annotations

import uuid

import anyio
import pytest
from pydantic_settings import BaseSettings
from structlog.testing import capture_logs

from aetcdcfg import EtcdClient, Event, LiveSettings, PermissionDenied, Subscription
from aetcdcfg.testing import EtcdServer, FaultProxy, TLSFiles

pytestmark = pytest.mark.anyio

APP = {"username": "app", "password": "apppw"}


async def test_watch_survives_token_expiry_and_reconnect_without_gap(etcd_auth_server: EtcdServer) -> None:
    """Tokens live 2 s; the stream breaks after they expired, so the new stream needs a new token."""
    prefix = f"/app/{uuid.uuid4().hex[:8]}/"
    written: list[tuple[int, str, str, bytes]] = []
    with FaultProxy.to(etcd_auth_server.endpoint) as proxy:
        async with (
            EtcdClient(endpoints=[etcd_auth_server.endpoint], **APP) as writer,
            EtcdClient(endpoints=[proxy.endpoint], keepalive_time=1, keepalive_timeout=1, **APP) as watcher,
            watcher.watch(prefix) as sub,
        ):

            async def write(n: int) -> None:
                for i in range(n):
                    key, value = f"{prefix}k{i % 3}", f"v{len(written)}"
                    written.append((await writer.put(key, value), key, "PUT", value.encode()))

            seen: list[Event] = []
            with capture_logs() as logs, anyio.fail_after(30):
                await write(5)
                # Outlive the server's 2 s token TTL. etcd extends a simple token's TTL on each use,
                # and the watch's first liveness probe (1 s into the silence) also reads with it.
                await anyio.sleep(4.5)
                proxy.reset()
                await write(5)
                async for event in sub:
                    seen.append(event)
                    if len(seen) == len(written):
                        break
    assert [(e.revision, e.key, e.type.value, e.value) for e in seen] == written
    # the watcher itself (it alone talks through the proxy) got a new token
    assert any(e["event"] == "etcd.reauthenticated" and e["endpoint"] == proxy.endpoint for e in logs)
    assert "apppw" not in repr(logs)


async def test_watch_outside_the_roles_range_is_permission_denied_not_a_retry_loop(
    etcd_auth_server: EtcdServer,
) -> None:
    async with EtcdClient(
        endpoints=[etcd_auth_server.endpoint], username="reader", password="readerpw"
    ) as client:
        with anyio.fail_after(5), pytest.raises(PermissionDenied, match="/other/"):
            async with client.watch("/other/"):
                pass


async def test_revoked_permission_ends_a_running_watch_with_permission_denied(
    etcd_auth_server: EtcdServer,
) -> None:
    prefix = f"/app/{uuid.uuid4().hex[:8]}/"
    root = "root:rootpw"
    with FaultProxy.to(etcd_auth_server.endpoint) as proxy:
        async with EtcdClient(
            endpoints=[proxy.endpoint],
            username="reader",
            password="readerpw",
            keepalive_time=1,
            keepalive_timeout=1,
        ) as client:
            async with client.watch(prefix) as sub:
                etcd_auth_server.etcdctl(
                    "role", "revoke-permission", "reader-role", "/app/", "--prefix=true", user=root
                )
                try:
                    proxy.reset()  # the new stream is checked against the new permissions
                    with anyio.fail_after(15), pytest.raises(PermissionDenied):
                        async for _ in sub:
                            pass
                finally:
                    etcd_auth_server.etcdctl(
                        "role", "grant-permission", "reader-role", "read", "/app/", "--prefix=true", user=root
                    )


async def until_live(sub: Subscription) -> None:
    with anyio.fail_after(10):
        while sub.status.state != "live":
            await anyio.sleep(0.01)


async def test_revoked_permission_is_noticed_without_a_reconnect(etcd_auth_server: EtcdServer) -> None:
    """etcd checks a watch's permission only when it is created; the periodic check notices a
    revocation on a stream that never breaks, within permission_check_interval."""
    prefix = f"/app/{uuid.uuid4().hex[:8]}/"
    root = "root:rootpw"
    async with EtcdClient(
        endpoints=[etcd_auth_server.endpoint],
        username="reader",
        password="readerpw",
        permission_check_interval=1,
    ) as client:
        async with client.watch(prefix) as sub:
            await until_live(sub)  # etcd created the watcher: revoking now cannot cancel its creation
            etcd_auth_server.etcdctl(
                "role", "revoke-permission", "reader-role", "/app/", "--prefix=true", user=root
            )
            try:
                with anyio.fail_after(10), pytest.raises(PermissionDenied):
                    async for _ in sub:
                        pass
            finally:
                etcd_auth_server.etcdctl(
                    "role", "grant-permission", "reader-role", "read", "/app/", "--prefix=true", user=root
                )


class Pair(BaseSettings):
    a: int = 0
    b: int = 0


async def test_live_settings_survive_token_expiry(etcd_auth_server: EtcdServer) -> None:
    prefix = f"/app/{uuid.uuid4().hex[:8]}/"
    with FaultProxy.to(etcd_auth_server.endpoint) as proxy:
        async with (
            EtcdClient(endpoints=[etcd_auth_server.endpoint], **APP) as writer,
            EtcdClient(endpoints=[proxy.endpoint], keepalive_time=1, keepalive_timeout=1, **APP) as watcher,
            LiveSettings(Pair, prefix=prefix, client=watcher) as live,
        ):
            await writer.put_many({prefix + "a": "1", prefix + "b": "1"})
            await live.wait_for(lambda s: s.a == 1, timeout=5)
            await anyio.sleep(3)
            proxy.reset()
            await writer.put_many({prefix + "a": "2", prefix + "b": "2"})
            settings = await live.wait_for(lambda s: s.a == 2, timeout=15)
            assert settings.b == 2
            assert live.last_error is None


async def test_kv_recovers_when_an_operator_turns_auth_on_after_the_client_connected() -> None:
    """The client connects with credentials while auth is off (it logs ``etcd.auth_not_enabled`` and
    holds no token); then auth is enabled, disabled and enabled again on the running cluster. Its
    requests must go on working each time, without a restart: a request etcd refuses for lacking a
    token is authenticated and sent again."""
    prefix = f"/app/{uuid.uuid4().hex[:8]}/"
    with EtcdServer(keepalive_min_time=1) as server:
        await anyio.to_thread.run_sync(lambda: server.add_user("app", "apppw", readwrite_prefix="/app/"))
        with capture_logs() as logs, anyio.fail_after(60):
            async with EtcdClient(endpoints=[server.endpoint], **APP) as client:
                assert await client.put(prefix + "k", "off") > 0
                assert [e["event"] for e in logs if e["event"].startswith("etcd.auth")] == [
                    "etcd.auth_not_enabled"
                ]

                await anyio.to_thread.run_sync(server.enable_auth, "rootpw")
                await client.put(prefix + "k", "on")
                assert await client.get(prefix + "k") == b"on"

                await anyio.to_thread.run_sync(server.etcdctl, "auth", "disable")
                await client.put(prefix + "k", "off again")
                assert await client.get(prefix + "k") == b"off again"

                await anyio.to_thread.run_sync(server.etcdctl, "auth", "enable")
                await client.put(prefix + "k", "on again")
                assert await client.get(prefix + "k") == b"on again"
                assert (await client.get_prefix(prefix)).items == {prefix + "k": b"on again"}
    assert "apppw" not in repr(logs)


async def test_a_watch_goes_on_when_an_operator_turns_auth_on_after_the_client_connected() -> None:
    """The watch's own reads (the permission check, the verifications) sent no token after auth was
    turned on, and took etcd's "user name is empty" for rejected credentials: error logs an
    operator is told to page on (``watch.permission_revoked``, ``watch.failed``) and a restart of
    the stream, for a cluster doing what it should. They authenticate once and go on, as requests do."""
    prefix = f"/app/{uuid.uuid4().hex[:8]}/"
    with EtcdServer(keepalive_min_time=1) as server:
        await anyio.to_thread.run_sync(lambda: server.add_user("app", "apppw", readwrite_prefix="/app/"))
        with capture_logs() as logs, anyio.fail_after(60):
            async with (
                EtcdClient(endpoints=[server.endpoint], permission_check_interval=1, **APP) as client,
                client.watch(prefix) as sub,
            ):
                await until_live(sub)
                await anyio.to_thread.run_sync(server.enable_auth, "rootpw")
                await anyio.sleep(2.5)  # two permission checks, now with auth on
                revision = await client.put(prefix + "k", "on")
                event = await anext(sub)
                assert (event.key, event.revision) == (prefix + "k", revision)
                status = sub.status
    assert (status.state, status.reconnects, status.last_error) == ("live", 0, None)
    errors = [e["event"] for e in logs if e.get("log_level") == "error"]
    assert errors == []
    assert "etcd.reauthenticated" in [e["event"] for e in logs]


async def test_revoked_permission_of_a_client_certificate_user_is_noticed_without_a_reconnect(
    etcd_tls_files: TLSFiles,
) -> None:
    """With ``--client-cert-auth`` and auth on, etcd takes the certificate's CN as the user: no
    username is configured, yet the role can be revoked all the same, and the periodic check
    notices it on a stream that never breaks."""
    prefix = f"/app/{uuid.uuid4().hex[:8]}/"
    user = TLSFiles.CLIENT_USER  # the CN of its client certificate
    with EtcdServer(tls=etcd_tls_files, client_cert_auth=True) as server:
        server.enable_auth("rootpw")
        server.add_user(user, "unused-the-certificate-says-who", read_prefix="/app/")
        async with EtcdClient(
            endpoints=[server.endpoint],
            ca_file=etcd_tls_files.ca_file,
            cert_file=etcd_tls_files.client_cert,
            key_file=etcd_tls_files.client_key,
            permission_check_interval=1,
        ) as client:
            with pytest.raises(PermissionDenied):  # the CN's role reads /app/ only
                await client.get("/other/key")
            async with client.watch(prefix) as sub:
                await until_live(sub)  # etcd created the watcher: revoking now cannot cancel its creation
                server.etcdctl("role", "revoke-permission", f"{user}-role", "/app/", "--prefix=true")
                with anyio.fail_after(10), pytest.raises(PermissionDenied):
                    async for _ in sub:
                        pass
