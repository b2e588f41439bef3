"""LiveSettings against real etcd: load, atomic swaps per revision, rejection, defaults, secrets."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import anyio
import anyio.abc
import pytest
from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from structlog.testing import capture_logs

from aetcdcfg import (
    ConfigRejected,
    EtcdClient,
    EtcdSettingsSource,
    EtcdUnavailable,
    LiveSettings,
    SettingsClosed,
)
from aetcdcfg.testing import EtcdServer, FaultProxy

from .harness import WATCHER_OPTIONS, subscriber_of
from .test_validate import LEAKY_VALUES, SECRET, Leaky

pytestmark = pytest.mark.anyio


class Database(BaseModel):
    url: str = "sqlite://"
    pool: int = 5
    password: SecretStr = SecretStr("")


class AppSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MYAPP_")

    rate_limit: int = Field(default=100, ge=1)
    maintenance: bool = False
    name: str = "svc"
    tags: list[str] = []
    db: Database = Database()


class Pair(BaseSettings):
    a: int = 0
    b: int = 0


async def test_initial_load_fills_nested_models_and_parses_values(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put_many(
            {
                etcd_prefix + "rate_limit": "150",
                etcd_prefix + "maintenance": "true",
                etcd_prefix + "name": "123",  # a str field keeps the text, even when it looks like JSON
                etcd_prefix + "tags": '["a", "b"]',
                etcd_prefix + "db": '{"url": "postgres://whole", "pool": 9}',
                etcd_prefix + "db/url": "postgres://deeper-wins",
                etcd_prefix + "unknown/key": "ignored",
            }
        )
        async with LiveSettings(AppSettings, prefix=etcd_prefix, client=client) as live:
            current = live.current
            revision = live.revision
        snapshot = await client.get_prefix(etcd_prefix)
    assert revision == snapshot.revision
    assert current.rate_limit == 150
    assert current.maintenance is True
    assert current.name == "123"
    assert current.tags == ["a", "b"]
    assert current.db.url == "postgres://deeper-wins"
    assert current.db.pool == 9
    assert live.last_error is None


async def test_prefix_without_slash_does_not_match_sibling(etcd_server: EtcdServer, etcd_prefix: str) -> None:
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put_many({etcd_prefix + "app/rate_limit": "7", etcd_prefix + "apple/rate_limit": "abc"})
        async with LiveSettings(AppSettings, prefix=etcd_prefix + "app", client=client) as live:
            assert live.current.rate_limit == 7
            assert live.prefix == etcd_prefix + "app/"


async def test_two_key_transactions_are_never_seen_torn(etcd_server: EtcdServer, etcd_prefix: str) -> None:
    """300 txns set a and b together; every object any reader sees has a == b."""
    seen_current: list[tuple[int, int, int]] = []
    seen_updates: list[tuple[int, int]] = []
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put_many({etcd_prefix + "a": "0", etcd_prefix + "b": "0"})
        async with LiveSettings(Pair, prefix=etcd_prefix, client=client) as live:
            done = anyio.Event()

            async def sampler() -> None:
                while not done.is_set():
                    current, revision = live.current, live.revision
                    seen_current.append((current.a, current.b, revision))
                    await anyio.lowlevel.checkpoint()

            async def reader() -> None:
                async for settings in live.updates():
                    seen_updates.append((settings.a, settings.b))
                    if settings.a == 300:
                        return

            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(sampler)
                    tg.start_soon(reader)
                    await anyio.lowlevel.checkpoint()
                    for i in range(1, 301):
                        await client.put_many({etcd_prefix + "a": str(i), etcd_prefix + "b": str(i)})
                    await live.wait_for(lambda s: s.a == 300)
                    done.set()
    assert all(a == b for a, b, _ in seen_current)
    assert all(a == b for a, b in seen_updates)
    assert [r for _, _, r in seen_current] == sorted(r for _, _, r in seen_current)
    assert [a for a, _ in seen_updates] == sorted(a for a, _ in seen_updates)
    assert seen_updates[-1] == (300, 300)
    assert len({a for a, _, _ in seen_current}) > 10  # it really sampled while changes landed


async def test_updates_iterators_each_get_each_change_and_one_cancelled_leaves_the_rest(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """Twenty iterators share the wake-up of each change; cancelling another (an anyio scope, as a
    request's disconnect would) neither wakes nor stops them, and a new iterator starts fresh."""
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        async with LiveSettings(Pair, prefix=etcd_prefix, client=client) as live:
            seen: list[list[int]] = [[] for _ in range(21)]
            started = anyio.Semaphore(0)
            doomed = anyio.CancelScope()

            async def reader(i: int, until: int) -> None:
                updates = live.updates()
                started.release()
                async for settings in updates:
                    seen[i].append(settings.a)
                    if settings.a == until:
                        return

            async def cancelled_reader() -> None:
                with doomed:
                    await reader(20, 99)

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    for i in range(20):
                        tg.start_soon(reader, i, 3)
                    tg.start_soon(cancelled_reader)
                    for _ in range(21):
                        await started.acquire()
                    for a in (1, 2):
                        await client.put(etcd_prefix + "a", str(a))
                        await live.wait_for(lambda s, a=a: s.a == a)  # type: ignore[misc]
                    doomed.cancel()
                    await client.put(etcd_prefix + "a", "3")
                assert doomed.cancelled_caught
                assert all(values[-1] == 3 and values == sorted(set(values)) for values in seen[:20])
                assert set(seen[20]) <= {1, 2}

                async def fresh() -> int:
                    async for settings in live.updates():
                        return settings.a
                    raise AssertionError("updates() ended")

                async with anyio.create_task_group() as tg:
                    result: list[int] = []

                    async def run_fresh() -> None:
                        result.append(await fresh())

                    tg.start_soon(run_fresh)
                    await anyio.sleep(0.05)
                    await client.put(etcd_prefix + "a", "4")
                assert result == [4]


async def test_bad_value_keeps_last_good_and_fix_applies(etcd_server: EtcdServer, etcd_prefix: str) -> None:
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put(etcd_prefix + "rate_limit", "100")
        async with LiveSettings(AppSettings, prefix=etcd_prefix, client=client) as live:
            good = live.current
            good_revision = live.revision
            with capture_logs() as logs:
                bad_revision = await client.put(etcd_prefix + "rate_limit", "-5")
                with anyio.fail_after(5):
                    while live.last_error is None:
                        await anyio.sleep(0.01)
            assert live.current is good
            assert live.revision == good_revision
            error = live.last_error
            assert isinstance(error, ConfigRejected)
            assert error.revision == bad_revision
            assert error.keys == (etcd_prefix + "rate_limit",)
            assert "greater than or equal to 1" in str(error)
            rejected = [e for e in logs if e["event"] == "config.rejected"]
            assert rejected
            assert rejected[0]["keys"] == [etcd_prefix + "rate_limit"]

            await client.put(etcd_prefix + "tags", "not json")
            with anyio.fail_after(5):
                while live.last_error is None or live.last_error.revision == bad_revision:
                    await anyio.sleep(0.01)
            assert "structured field needs JSON" in str(live.last_error)

            await client.put_many({etcd_prefix + "rate_limit": "250", etcd_prefix + "tags": '["x"]'})
            fixed = await live.wait_for(lambda s: s.rate_limit == 250, timeout=5)
            assert fixed.tags == ["x"]
            assert live.last_error is None


async def test_deleted_key_falls_back_to_default_then_env(
    etcd_server: EtcdServer, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put_many({etcd_prefix + "rate_limit": "300", etcd_prefix + "name": "from-etcd"})
        monkeypatch.setenv("MYAPP_NAME", "from-env")
        async with LiveSettings(AppSettings, prefix=etcd_prefix, client=client) as live:
            assert live.current.rate_limit == 300
            assert live.current.name == "from-etcd"  # etcd over env by default
            await client.delete(etcd_prefix + "rate_limit")
            settings = await live.wait_for(lambda s: s.rate_limit == 100, timeout=5)  # the default
            assert settings.name == "from-etcd"
            await client.delete(etcd_prefix + "name")
            settings = await live.wait_for(lambda s: s.name != "from-etcd", timeout=5)
            assert settings.name == "from-env"  # env, next in the source order
            assert settings.rate_limit == 100


async def test_env_and_dotenv_are_read_when_loading_not_at_every_revision(
    etcd_server: EtcdServer, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env_file = tmp_path / "app.env"
    env_file.write_text("READONCE_B=2\n")

    class ReadOnce(BaseSettings):
        model_config = SettingsConfigDict(env_prefix="READONCE_", env_file=env_file)
        a: int = 0
        b: int = 0
        c: int = 0

    monkeypatch.setenv("READONCE_A", "1")
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        async with LiveSettings(ReadOnce, prefix=etcd_prefix, client=client) as live:
            assert (live.current.a, live.current.b) == (1, 2)
            monkeypatch.setenv("READONCE_A", "10")
            env_file.write_text("READONCE_B=20\n")
            await client.put(etcd_prefix + "c", "3")
            settings = await live.wait_for(lambda s: s.c == 3, timeout=5)
            assert (settings.a, settings.b) == (1, 2)  # as read when it loaded
        async with LiveSettings(ReadOnce, prefix=etcd_prefix, client=client) as live:
            assert (live.current.a, live.current.b, live.current.c) == (10, 20, 3)  # the next load reads them


async def test_user_can_put_env_above_etcd(
    etcd_server: EtcdServer, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    class EnvFirst(BaseSettings):
        model_config = SettingsConfigDict(env_prefix="ENVFIRST_")
        rate_limit: int = 1

        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return init_settings, env_settings, EtcdSettingsSource(settings_cls)

    monkeypatch.setenv("ENVFIRST_RATE_LIMIT", "42")
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put(etcd_prefix + "rate_limit", "7")
        async with LiveSettings(EnvFirst, prefix=etcd_prefix, client=client) as live:
            assert live.current.rate_limit == 42
        monkeypatch.delenv("ENVFIRST_RATE_LIMIT")
        async with LiveSettings(EnvFirst, prefix=etcd_prefix, client=client) as live:
            assert live.current.rate_limit == 7


async def test_invalid_initial_config_fails_entry_naming_the_key(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put(etcd_prefix + "db/pool", "many")
        with pytest.raises(ConfigRejected, match="db/pool") as info:
            async with LiveSettings(AppSettings, prefix=etcd_prefix, client=client):
                pass
        assert info.value.keys == (etcd_prefix + "db/pool",)
        async with LiveSettings(AppSettings, prefix=etcd_prefix, client=client, allow_defaults=True) as live:
            assert live.current.db.pool == 5
            assert live.last_error is not None


async def test_unreachable_etcd_fails_entry_with_etcd_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ETCD_ENDPOINTS", "http://127.0.0.1:1")
    monkeypatch.setenv("ETCD_CONNECT_TIMEOUT", "0.5")
    with pytest.raises(EtcdUnavailable, match="127.0.0.1:1"):
        async with LiveSettings(AppSettings, prefix="/x/"):
            pass


async def test_secrets_never_reach_logs_or_errors(
    etcd_server: EtcdServer, etcd_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    class Secretive(BaseSettings):
        token: SecretStr = Field(default=SecretStr("x" * 12), min_length=12)
        port: int = 1

    caplog.set_level(logging.DEBUG)  # stdlib logging too (grpc, pydantic, anything underneath)
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        async with LiveSettings(Secretive, prefix=etcd_prefix, client=client) as live:
            with capture_logs() as logs:
                await client.put(etcd_prefix + "token", "hunter2")  # too short: rejected
                await client.put(etcd_prefix + "port", "hunter2-port")
                with anyio.fail_after(5):
                    while live.last_error is None or "port" not in str(live.last_error):
                        await anyio.sleep(0.01)
                await client.put_many({etcd_prefix + "token": "s3cr3t-long-token", etcd_prefix + "port": "8"})
                settings = await live.wait_for(lambda s: s.port == 8, timeout=5)
    assert settings.token.get_secret_value() == "s3cr3t-long-token"
    text = repr(logs) + repr(settings) + str(live.last_error) + caplog.text
    for secret in ("hunter2", "s3cr3t-long-token"):
        assert secret not in text
    assert any(e["event"] == "config.rejected" for e in logs)


async def test_updates_survive_connection_resets(
    etcd_server: EtcdServer, fault_proxy: FaultProxy, etcd_prefix: str
) -> None:
    async with (
        EtcdClient(endpoints=[etcd_server.endpoint]) as writer,
        EtcdClient(endpoints=[fault_proxy.endpoint], keepalive_time=1, keepalive_timeout=1) as watcher,
    ):
        await writer.put_many({etcd_prefix + "a": "0", etcd_prefix + "b": "0"})
        async with LiveSettings(Pair, prefix=etcd_prefix, client=watcher) as live:
            seen: list[int] = []

            async def reader() -> None:
                async for settings in live.updates():
                    assert settings.a == settings.b
                    seen.append(settings.a)
                    if settings.a == 100:
                        return

            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(reader)
                    await anyio.lowlevel.checkpoint()
                    for i in range(1, 101):
                        await writer.put_many({etcd_prefix + "a": str(i), etcd_prefix + "b": str(i)})
                        if i % 10 == 0:
                            fault_proxy.reset()
                        await anyio.sleep(0.01)
    assert seen[-1] == 100
    assert seen == sorted(seen)


async def test_rejected_values_never_appear_in_errors_status_or_logs_whatever_the_error_type(
    etcd_server: EtcdServer, etcd_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """pydantic quotes the input in some messages (a tagged union's tag, a UUID parser's position,
    a custom error's template); a rejection is written from the error type and the model instead."""
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        async with LiveSettings(Leaky, prefix=etcd_prefix, client=client) as live:
            with capture_logs() as logs:
                for name, value in LEAKY_VALUES.items():
                    text = value if isinstance(value, str) else json.dumps(value)
                    revision = await client.put(etcd_prefix + name, text)
                    with anyio.fail_after(5):
                        while live.last_error is None or live.last_error.revision != revision:
                            await anyio.sleep(0.01)
                    assert live.last_error.keys == (etcd_prefix + name,)
                    seen.append(str(live.last_error) + repr(live.last_error.problems) + repr(live.status))
                    await client.delete(etcd_prefix + name)
                    await live.wait_for(lambda s: live.last_error is None, timeout=5)
    text = "\n".join(seen) + repr(logs) + caplog.text
    assert len([e for e in logs if e["event"] == "config.rejected"]) == len(LEAKY_VALUES)
    assert SECRET not in text
    assert "`z`" not in text  # the UUID parser's "found `z` at 0"


async def test_updates_end_and_wait_for_raises_settings_closed_when_live_settings_closes(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """Nothing waits forever on a LiveSettings that has closed: ``updates()`` ends, ``wait_for()``
    without a timeout raises SettingsClosed, during the close and after it."""
    ended: list[str] = []
    with anyio.fail_after(10):
        async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
            live = LiveSettings(Pair, prefix=etcd_prefix, client=client)
            async with anyio.create_task_group() as tg:

                async def consume(*, task_status: anyio.abc.TaskStatus[None]) -> None:
                    updates = live.updates()
                    task_status.started()
                    async for _ in updates:
                        pass
                    ended.append("updates")

                async def wait(*, task_status: anyio.abc.TaskStatus[None]) -> None:
                    task_status.started()
                    with pytest.raises(SettingsClosed, match=etcd_prefix):
                        await live.wait_for(lambda s: s.a == 99)
                    ended.append("wait_for")

                async with live:
                    await tg.start(consume)
                    await tg.start(wait)
                    await client.put(etcd_prefix + "a", "1")
                    await live.wait_for(lambda s: s.a == 1)
                    await anyio.wait_all_tasks_blocked()
            assert sorted(ended) == ["updates", "wait_for"]
            async for _ in live.updates():
                raise AssertionError("a closed LiveSettings yields nothing new")
            with pytest.raises(SettingsClosed):
                await live.wait_for(lambda s: s.a == 99)
            assert (await live.wait_for(lambda s: s.a == 1)).a == 1  # the current one still counts


async def test_wait_for_finds_a_state_applied_between_wake_ups(
    etcd_server: EtcdServer, fault_proxy: FaultProxy, etcd_prefix: str
) -> None:
    """While the watcher's connection is refused, maintenance goes on, then off again; the watch
    catches up with both revisions at once. Both were applied, so wait_for must see the first."""
    applied: list[bool] = []
    with anyio.fail_after(30):
        async with (
            EtcdClient(endpoints=[etcd_server.endpoint]) as writer,
            EtcdClient(endpoints=[fault_proxy.endpoint], **WATCHER_OPTIONS) as watcher,
            LiveSettings(
                AppSettings,
                prefix=etcd_prefix,
                client=watcher,
                on_change=lambda s: applied.append(s.maintenance),
            ) as live,
            anyio.create_task_group() as tg,
        ):
            found: list[AppSettings] = []

            async def wait() -> None:
                found.append(await live.wait_for(lambda s: s.maintenance, timeout=20))

            tg.start_soon(wait)
            await anyio.wait_all_tasks_blocked()
            fault_proxy.refuse()
            fault_proxy.reset()
            await writer.put(etcd_prefix + "maintenance", "true")
            last = await writer.put(etcd_prefix + "maintenance", "false")
            fault_proxy.refuse(False)
            with anyio.fail_after(15):
                while live.revision < last:
                    await anyio.sleep(0.01)
    assert applied == [True, False]
    assert [s.maintenance for s in found] == [True]


async def test_a_lag_resumed_below_a_compaction_reads_afresh_instead_of_retrying_for_good(
    etcd_server: EtcdServer, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lagging LiveSettings resumes from its last applied revision + 1. When that is older than
    the shared watch remembers and etcd compacted it meanwhile, every retry raised
    RevisionCompacted (`config.watch_failed` every 2 s): stale settings for good. It re-reads now."""
    import contextlib

    from aetcdcfg import _fanout

    monkeypatch.setattr(_fanout, "HISTORY_EVENTS", 1)  # the shared watch remembers one revision
    real_watch = EtcdClient.watch
    writes: list[int] = []

    @contextlib.asynccontextmanager
    async def watch(self: EtcdClient, prefix: str, **kwargs: object) -> object:
        if kwargs.get("start_revision") is not None and not writes:  # the resume after the lag
            writes.append(await self.put(etcd_prefix + "rate_limit", "2"))
            writes.append(await self.put(etcd_prefix + "rate_limit", "3"))
            while hub.state.delivered < writes[-1]:  # the shared watch moved on without it
                await anyio.sleep(0.01)
            await anyio.to_thread.run_sync(etcd_server.etcdctl, "compact", str(writes[-1]))
        async with real_watch(self, prefix, **kwargs) as sub:  # type: ignore[arg-type]
            yield sub

    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put(etcd_prefix + "rate_limit", "1")
        async with LiveSettings(AppSettings, prefix=etcd_prefix, client=client) as live:
            assert live.current.rate_limit == 1
            layer_sub = live._layers[0].sub
            assert layer_sub is not None
            hub = layer_sub._hub
            monkeypatch.setattr(EtcdClient, "watch", watch)
            mine = subscriber_of(layer_sub)
            with capture_logs() as logs:
                mine.lag(live.revision + 1)
                with anyio.fail_after(10):
                    while live.current.rate_limit != 3:
                        await anyio.sleep(0.02)
                # read afresh at etcd's revision then: the instance's own record writes may be in it
                assert live.revision >= writes[-1]
                last = await client.put(etcd_prefix + "rate_limit", "4")
                with anyio.fail_after(10):
                    while live.revision < last:
                        await anyio.sleep(0.02)
            assert live.current.rate_limit == 4
            events = [e["event"] for e in logs if e["event"].startswith("config.")]
            assert "config.watch_failed" not in events and "config.layers_reread" in events


async def test_a_settings_layer_off_its_watch_is_behind_however_healthy_the_shared_watch(
    etcd_server: EtcdServer, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its status was the shared watch's, which another subscriber keeps healthy: a LiveSettings
    that lagged and could not resume yet said ``live`` and fresh while it served old settings.
    Until it is back to the revision its watch delivered, it is ``behind`` and stale since then."""
    import contextlib

    from aetcdcfg import EtcdUnavailable

    real_watch = EtcdClient.watch
    refused: list[int] = []

    @contextlib.asynccontextmanager
    async def watch(self: EtcdClient, prefix: str, **kwargs: object) -> object:
        if kwargs.get("start_revision") is not None:
            refused.append(int(kwargs["start_revision"]))  # type: ignore[call-overload]
            raise EtcdUnavailable("resume refused by the test", endpoints=[etcd_server.endpoint])
        async with real_watch(self, prefix, **kwargs) as sub:  # type: ignore[arg-type]
            yield sub

    async with (
        EtcdClient(endpoints=[etcd_server.endpoint]) as client,
        client.watch(etcd_prefix) as other,  # another subscriber of the same shared watch
        LiveSettings(AppSettings, prefix=etcd_prefix, client=client, report=False) as live,
    ):
        layer_sub = live._layers[0].sub
        assert layer_sub is not None
        mine = subscriber_of(layer_sub)
        with anyio.fail_after(10):
            while live.status.watch.state != "live":
                await anyio.sleep(0.02)
        monkeypatch.setattr(EtcdClient, "watch", watch)
        mine.lag(live.revision + 1)
        with anyio.fail_after(10):
            while not refused:
                await anyio.sleep(0.02)
        changed = await client.put(etcd_prefix + "rate_limit", "7")
        await anyio.sleep(1.2)
        status = live.status
        assert (status.watch.state, status.revision, live.current.rate_limit) == ("behind", changed - 1, 100)
        assert status.watch.staleness >= 1.2 and not live.is_fresh(1.0)
        assert other.status.state == "live" and other.status.revision == changed  # the shared one
        monkeypatch.setattr(EtcdClient, "watch", real_watch)
        with anyio.fail_after(10):
            while live.current.rate_limit != 7 or live.status.watch.state != "live":
                await anyio.sleep(0.02)
        assert live.is_fresh()  # the shared watch's staleness again


async def test_a_read_afresh_on_a_quiet_prefix_happens_once_not_in_a_loop(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """A lag at the applied revision reads every layer afresh, at etcd's revision, which writes
    elsewhere moved past this prefix's last event. Taking the shared watch's lower revision for a
    replaced history re-read ~1,000 times a second, saying live, until this prefix was written.
    Once; and a write still applies."""
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put(etcd_prefix + "app/rate_limit", "5")
        async with LiveSettings(
            AppSettings, prefix=etcd_prefix + "app/", client=client, report=False
        ) as live:
            for n in range(3):  # etcd moves on, this prefix stays quiet
                await client.put(etcd_prefix + f"elsewhere/{n}", "x")
            layer_sub = live._layers[0].sub
            assert layer_sub is not None
            mine = subscriber_of(layer_sub)
            with capture_logs() as logs:
                mine.lag(live.revision)  # as a lag on a re-list of the revision it applied
                await anyio.sleep(2)
                rereads = [e for e in logs if e["event"] == "config.layers_reread"]
                state = live.status.watch.state
                written = await client.put(etcd_prefix + "app/rate_limit", "6")
                settings = await live.wait_for(lambda s: s.rate_limit == 6, timeout=5)
    assert len(rereads) <= 1 and state == "live", (len(rereads), state)
    assert settings.rate_limit == 6 and live.revision == written


async def test_a_layer_back_on_its_watch_is_not_left_behind_by_a_progress_notification(
    etcd_prefix: str,
) -> None:
    """etcd's progress notification moves the shared watch's revision past this prefix's last
    event. A layer that resubscribed then waited to apply a revision no event would bring, and
    said ``behind`` (and /readyz 503) until the prefix was next written. It follows once it has
    taken everything its watch held."""
    with EtcdServer(keepalive_min_time=1, progress_notify_interval=1) as server:
        async with EtcdClient(endpoints=[server.endpoint], keepalive_time=1, keepalive_timeout=1) as client:
            await client.put(etcd_prefix + "app/rate_limit", "5")
            async with LiveSettings(
                AppSettings, prefix=etcd_prefix + "app/", client=client, report=False
            ) as live:
                elsewhere = await client.put(etcd_prefix + "elsewhere", "x")
                layer_sub = live._layers[0].sub
                assert layer_sub is not None
                with anyio.fail_after(10):
                    while layer_sub.status.revision < elsewhere:  # a progress notification came
                        await anyio.sleep(0.05)
                mine = subscriber_of(layer_sub)
                mine.lag(live.revision + 1)
                with anyio.fail_after(5):
                    while live._layers[0].sub is layer_sub:  # until it resubscribed
                        await anyio.sleep(0.01)
                with anyio.move_on_after(5):
                    while live.status.watch.state != "live":
                        await anyio.sleep(0.05)
                status, fresh = live.status, live.is_fresh()
    assert live.revision < elsewhere  # nothing of this prefix came since
    assert status.watch.state == "live" and fresh


async def test_a_refused_permission_is_not_answered_with_full_reads_every_two_seconds(
    etcd_server: EtcdServer, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed resume reads every layer afresh, except when the failure is a permission or the
    credentials: no read fixes those, and a layer of many keys would be read every 2 s meanwhile."""
    import contextlib

    from aetcdcfg import PermissionDenied
    from aetcdcfg import live as live_module

    real_watch = EtcdClient.watch
    refused: list[int] = []
    reads: list[int] = []
    real_read_all = live_module.read_all

    async def read_all(*args: object) -> object:
        reads.append(1)
        return await real_read_all(*args)  # type: ignore[arg-type]

    @contextlib.asynccontextmanager
    async def watch(self: EtcdClient, prefix: str, **kwargs: object) -> object:
        if kwargs.get("start_revision") is not None:
            refused.append(1)
            raise PermissionDenied("the test revoked it", key=prefix)
        async with real_watch(self, prefix, **kwargs) as sub:  # type: ignore[arg-type]
            yield sub

    async with (
        EtcdClient(endpoints=[etcd_server.endpoint]) as client,
        LiveSettings(AppSettings, prefix=etcd_prefix, client=client, report=False) as live,
    ):
        layer_sub = live._layers[0].sub
        assert layer_sub is not None
        mine = subscriber_of(layer_sub)
        monkeypatch.setattr(EtcdClient, "watch", watch)
        monkeypatch.setattr(live_module, "read_all", read_all)
        mine.lag(live.revision + 1)
        await anyio.sleep(4.5)
    assert len(refused) >= 2  # retried every 2 s
    assert reads == []


async def test_a_layer_whose_catch_up_hands_over_nothing_is_not_left_behind(
    etcd_server: EtcdServer, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its resume was refused once (no re-read for a permission) and its shared watch ended; the
    new one lists etcd above the settings' revision (written elsewhere meanwhile), so the resume
    replays that gap privately, and finds nothing of this prefix in it. No batch comes to wake the
    layer: it said ``behind`` until the prefix was next written. Its status sees it caught up."""
    import contextlib

    from aetcdcfg import PermissionDenied

    real_watch = EtcdClient.watch
    refused: list[int] = []

    @contextlib.asynccontextmanager
    async def watch(self: EtcdClient, prefix: str, **kwargs: object) -> object:
        if kwargs.get("start_revision") is not None and not refused:
            refused.append(1)
            assert hub._scope is not None
            hub._scope.cancel()  # the shared watch ends and is forgotten
            while not hub.closed:
                await anyio.sleep(0.02)
            for n in range(3):  # etcd moves on elsewhere
                await client.put(etcd_prefix + f"elsewhere/{n}", "x")
            raise PermissionDenied("refused once by the test", key=prefix)
        async with real_watch(self, prefix, **kwargs) as sub:  # type: ignore[arg-type]
            yield sub

    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put(etcd_prefix + "app/rate_limit", "5")
        async with LiveSettings(
            AppSettings, prefix=etcd_prefix + "app/", client=client, report=False, canary=False
        ) as live:
            layer_sub = live._layers[0].sub
            assert layer_sub is not None
            hub = layer_sub._hub
            mine = subscriber_of(layer_sub)
            monkeypatch.setattr(EtcdClient, "watch", watch)
            mine.lag(live.revision + 1)
            with anyio.fail_after(10):
                while live._layers[0].sub is layer_sub or live._layers[0].sub._hub is hub:  # type: ignore[union-attr]
                    await anyio.sleep(0.02)  # until it resumed on a new shared watch
            with anyio.move_on_after(5):
                while live.status.watch.state != "live":
                    await anyio.sleep(0.05)
            state = live.status.watch.state
            written = await client.put(etcd_prefix + "app/rate_limit", "6")
            settings = await live.wait_for(lambda s: s.rate_limit == 6, timeout=5)
    assert refused == [1] and state == "live"
    assert (settings.rate_limit, live.revision) == (6, written)
