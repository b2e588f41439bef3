"""Layered LiveSettings against real etcd: later prefixes override earlier ones, one object per revision.

A transaction that touches two layers reaches the client as two batches at one revision on two
watch streams; these tests check it is never seen half applied, that layers merge field by field,
that a missing layer is just empty, that deleting an override reveals the lower value, and that all
layers stay consistent through connection faults.
"""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest
from pydantic import BaseModel
from pydantic_settings import BaseSettings
from structlog.testing import capture_logs

from aetcdcfg import ConfigRejected, EtcdClient, LiveSettings
from aetcdcfg.testing import EtcdServer, FaultProxy

from .harness import MEMBER_OPTIONS, RECOVERY_BOUND, WATCHER_OPTIONS, subscriber_of

pytestmark = pytest.mark.anyio


class Database(BaseModel):
    url: str = "sqlite://"
    pool: int = 5


class Service(BaseSettings):
    rate_limit: int = 100
    a: int = 0
    b: int = 0
    region: str = "none"
    db: Database = Database()


async def test_later_layers_override_field_by_field_and_nested_models_merge(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    shared, own = etcd_prefix + "shared/", etcd_prefix + "svc/"
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put_many(
            {shared + "rate_limit": "10", shared + "db/url": "postgres://shared", shared + "db/pool": "7"}
        )
        await client.put_many({own + "rate_limit": "20", own + "db/pool": "3"})
        async with LiveSettings(Service, prefix=[shared, own], client=client) as live:
            assert (live.current.rate_limit, live.current.db) == (
                20,
                Database(url="postgres://shared", pool=3),
            )
            assert live.prefix == own and live.prefixes == (shared, own)
            # deleting the override reveals the lower layer's value
            await client.delete(own + "rate_limit")
            current = await live.wait_for(lambda s: s.rate_limit == 10, timeout=5)
            assert current.db.pool == 3
            status = live.status
            assert [w.prefix for w in status.layers] == [shared, own]


async def test_a_layer_that_does_not_exist_yet_is_empty_until_written(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    region, own = etcd_prefix + "regions/eu/", etcd_prefix + "svc/"
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put(own + "region", "default")
        async with LiveSettings(Service, prefix=[own, region], client=client) as live:
            assert live.current.region == "default"
            await client.put(region + "region", "eu")
            await live.wait_for(lambda s: s.region == "eu", timeout=5)


async def test_a_transaction_across_two_layers_is_never_seen_half_applied(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """300 txns each set a in the lower layer and b in the upper one (and move rate_limit between
    them); every object ever applied, sampled or yielded has a == b."""
    shared, own = etcd_prefix + "shared/", etcd_prefix + "svc/"
    applied: list[Service] = []
    sampled: list[Service] = []
    yielded: list[Service] = []
    async with (
        EtcdClient(endpoints=[etcd_server.endpoint]) as client,
        LiveSettings(Service, prefix=[shared, own], client=client, on_change=applied.append) as live,
    ):

        async def sample() -> None:
            while True:
                sampled.append(live.current)
                await anyio.lowlevel.checkpoint()

        async def follow() -> None:
            async for settings in live.updates():
                yielded.append(settings)

        async with anyio.create_task_group() as tg:
            tg.start_soon(sample)
            tg.start_soon(follow)
            last = 0
            for n in range(1, 301):
                upper, lower = (own, shared) if n % 2 else (shared, own)
                last = await client.apply_if_unchanged(
                    etcd_prefix,
                    {shared + "a": str(n), own + "b": str(n), upper + "rate_limit": str(n)},
                    [lower + "rate_limit"] if n > 1 else [],
                    since_revision=last or await _revision(client),
                )
            with anyio.fail_after(10):
                await live.wait_for(lambda s: s.a == 300)
            tg.cancel_scope.cancel()
    torn = [(s.a, s.b) for s in applied + sampled + yielded if s.a != s.b]
    assert torn == []
    assert (live.current.a, live.current.b, live.current.rate_limit) == (300, 300, 300)
    assert live.revision == last
    assert len(applied) == 300  # one validated object per revision, none skipped


async def test_rejection_names_the_layer_and_key_at_fault(etcd_server: EtcdServer, etcd_prefix: str) -> None:
    shared, own = etcd_prefix + "shared/", etcd_prefix + "svc/"
    async with (
        EtcdClient(endpoints=[etcd_server.endpoint]) as client,
        LiveSettings(Service, prefix=[shared, own], client=client) as live,
    ):
        good = await client.put(own + "rate_limit", "5")
        await live.wait_for(lambda s: s.rate_limit == 5, timeout=5)
        bad = await client.put(shared + "db/pool", "many")
        with anyio.fail_after(5):
            while live.last_error is None:
                await anyio.sleep(0.01)
        error = live.last_error
    assert isinstance(error, ConfigRejected) and error.revision == bad
    assert error.keys == (shared + "db/pool",)
    assert live.revision == good and live.current.rate_limit == 5


async def test_layers_stay_consistent_through_connection_resets(
    etcd_server: EtcdServer, fault_proxy: FaultProxy, etcd_prefix: str
) -> None:
    shared, own = etcd_prefix + "shared/", etcd_prefix + "svc/"
    applied: list[Service] = []
    with capture_logs(), anyio.fail_after(60):
        async with (
            EtcdClient(endpoints=[etcd_server.endpoint]) as writer,
            EtcdClient(endpoints=[fault_proxy.endpoint], **WATCHER_OPTIONS) as watcher,
            LiveSettings(Service, prefix=[shared, own], client=watcher, on_change=applied.append) as live,
        ):
            n = 0
            for _ in range(5):
                for _ in range(20):
                    n += 1
                    await writer.put_many({shared + "a": str(n), own + "b": str(n)})
                fault_proxy.reset()
            final = await writer.put_many({shared + "a": "999", own + "b": "999", own + "region": "end"})
            await live.wait_for(lambda s: s.region == "end", timeout=10)
            assert live.revision == final
    assert [(s.a, s.b) for s in applied if s.a != s.b] == []
    assert (live.current.a, live.current.b) == (999, 999)


async def _revision(client: EtcdClient) -> int:
    return (await client.get_prefix("/nonexistent-for-revision/")).revision


async def test_layers_follow_an_etcd_wiped_and_restarted_empty(etcd_prefix: str) -> None:
    """The new cluster's revisions are below the ones the layers reflected; its (resync) changes
    and every change after them are applied all the same, never torn."""
    shared, own = etcd_prefix + "shared/", etcd_prefix + "svc/"
    applied: list[Service] = []
    with EtcdServer(**MEMBER_OPTIONS) as server, anyio.fail_after(60):
        async with (
            EtcdClient(endpoints=[server.endpoint], **WATCHER_OPTIONS) as watcher,
            LiveSettings(Service, prefix=[shared, own], client=watcher, on_change=applied.append) as live,
        ):
            async with EtcdClient(endpoints=[server.endpoint]) as writer:
                for n in range(1, 31):
                    await writer.put_many({shared + "a": str(n), own + "b": str(n), own + "rate_limit": "5"})
                await live.wait_for(lambda s: s.a == 30, timeout=5)
            old = live.revision
            await anyio.to_thread.run_sync(server.wipe_and_restart)
            async with EtcdClient(endpoints=[server.endpoint]) as writer:
                # the new etcd is empty: both layers lose their keys
                emptied = await live.wait_for(lambda s: (s.a, s.b) == (0, 0), timeout=RECOVERY_BOUND)
                first = await writer.put_many({shared + "a": "7", own + "b": "7", own + "region": "new"})
                settings = await live.wait_for(lambda s: s.region == "new", timeout=RECOVERY_BOUND)
                later = await writer.put(own + "rate_limit", "9")
                await live.wait_for(lambda s: s.rate_limit == 9, timeout=5)
            assert live.revision == later
    assert first < old  # the revisions really went backwards
    assert emptied.rate_limit == 100
    assert (settings.a, settings.b, settings.rate_limit) == (7, 7, 100)
    assert [(s.a, s.b) for s in applied if s.a != s.b] == []


async def test_compaction_right_after_a_write_never_gives_a_torn_or_older_object(etcd_prefix: str) -> None:
    """The watcher's traffic is delayed, so every read of another layer "as of" a revision reaches
    etcd after that revision was compacted. Each object applied is whole (a == b, written in one
    transaction across the layers), and neither revisions nor values ever go backwards."""
    shared, own = etcd_prefix + "shared/", etcd_prefix + "svc/"
    applied: list[tuple[int, int, int]] = []
    with (
        capture_logs() as logs,
        EtcdServer(**MEMBER_OPTIONS) as server,
        FaultProxy.to(server.endpoint) as proxy,
        anyio.fail_after(90),
    ):
        async with (
            EtcdClient(endpoints=[server.endpoint]) as writer,
            EtcdClient(endpoints=[proxy.endpoint], **WATCHER_OPTIONS) as watcher,
        ):
            live: LiveSettings[Service] = LiveSettings(
                Service,
                prefix=[shared, own],
                client=watcher,
                on_change=lambda s: applied.append((live.revision, s.a, s.b)),
            )
            async with live:
                n = 0
                for round in range(6):
                    proxy.set_delay(0.4)
                    await writer.put(own + "region", f"r{round}")  # one layer only
                    for _ in range(2):
                        n += 1
                        last = await writer.put_many({shared + "a": str(n), own + "b": str(n)})
                    await anyio.to_thread.run_sync(server.etcdctl, "compact", str(last))
                    proxy.set_delay(0)
                    await live.wait_for(lambda s, n=n: s.a == n, timeout=10)  # type: ignore[misc]
                    assert (live.current.a, live.current.b) == (n, n)
    assert [(a, b) for _, a, b in applied if a != b] == []  # never torn
    assert [r for r, _, _ in applied] == sorted(r for r, _, _ in applied)  # never an older state
    assert [a for _, a, _ in applied] == sorted(a for _, a, _ in applied)
    assert [e for e in logs if e["event"] == "config.layer_read_compacted"]  # the case really arose


@pytest.mark.parametrize("how", ["same_watch", "read_fails_once", "new_watch"])
async def test_settings_off_their_watch_while_etcd_is_wiped_read_afresh_when_they_resume(
    how: str, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A LiveSettings lags; before it resumes, etcd is wiped and restarted, and the shared watch
    re-lists the new history, whose revisions are below the ones the settings reflect. Resuming
    after its own revision, it waited for revisions the new history had already passed, and kept
    the old cluster's value: it reads afresh instead. Also when that read fails once (the re-read
    stays due), and when the shared watch ended meanwhile and a new one listed the new history."""
    import contextlib

    from aetcdcfg import PermissionDenied
    from aetcdcfg import live as live_module

    real_watch = EtcdClient.watch
    real_read_all = live_module.read_all
    new: list[int] = []
    reads: list[int] = []

    async def read_all(*args: object) -> object:
        reads.append(1)
        if how == "read_fails_once" and len(reads) == 1:
            raise PermissionDenied("refused once by the test")
        return await real_read_all(*args)  # type: ignore[arg-type]

    @contextlib.asynccontextmanager
    async def watch(self: EtcdClient, prefix: str, **kwargs: object) -> object:
        if kwargs.get("start_revision") is not None and not new:  # the resume after the lag
            if how == "new_watch":
                assert hub._scope is not None
                hub._scope.cancel()  # the shared watch ends (as on a failure) and is forgotten
                while not hub.closed:
                    await anyio.sleep(0.02)
            await anyio.to_thread.run_sync(server.wipe_and_restart)
            async with EtcdClient(endpoints=[server.endpoint]) as writer:
                new.append(await writer.put(etcd_prefix + "rate_limit", "7"))
            while how != "new_watch" and (hub.state is None or hub.state.delivered != new[-1]):
                await anyio.sleep(0.02)  # re-listed the new etcd
        async with real_watch(self, prefix, **kwargs) as sub:  # type: ignore[arg-type]
            yield sub

    monkeypatch.setattr(live_module, "read_all", read_all)

    with capture_logs() as logs, EtcdServer(**MEMBER_OPTIONS) as server, anyio.fail_after(60):
        async with (
            EtcdClient(endpoints=[server.endpoint], **WATCHER_OPTIONS) as watcher,
            LiveSettings(Service, prefix=etcd_prefix, client=watcher, report=False) as live,
        ):
            async with EtcdClient(endpoints=[server.endpoint]) as writer:
                for n in range(1, 11):
                    await writer.put(etcd_prefix + "rate_limit", str(10 + n))
            await live.wait_for(lambda s: s.rate_limit == 20, timeout=5)
            old = live.revision
            layer_sub = live._layers[0].sub
            assert layer_sub is not None
            hub = layer_sub._hub
            mine = subscriber_of(layer_sub)
            monkeypatch.setattr(EtcdClient, "watch", watch)
            mine.lag(old + 1)
            with anyio.move_on_after(RECOVERY_BOUND):
                while live.current.rate_limit != 7:
                    await anyio.sleep(0.05)
            current = live.current
            async with EtcdClient(endpoints=[server.endpoint]) as writer:
                later = await writer.put(etcd_prefix + "rate_limit", "9")
            with anyio.move_on_after(5):
                while live.current.rate_limit != 9:
                    await anyio.sleep(0.05)
            assert (current.rate_limit, live.current.rate_limit) == (7, 9)
            assert live.revision == later
    assert new[-1] < old  # the revisions really went backwards
    reasons = [e["reason"] for e in logs if e["event"] == "config.layers_reread"]
    assert reasons == ["history_replaced"]
    assert len(reads) == (2 if how == "read_fails_once" else 1)


async def test_two_layers_resuming_across_a_wiped_etcd_miss_nothing_of_either(
    etcd_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both layers lag; etcd is wiped. The first to resume finds the history replaced and reads
    every layer afresh, at a revision below the one the second is subscribing from (and takes the
    second's epoch, as read). The second then followed the new history from the old revision and
    missed its own writes below it: it resubscribes from where the re-read left every layer."""
    import contextlib

    shared, own = etcd_prefix + "shared/", etcd_prefix + "own/"
    real_watch = EtcdClient.watch
    reread_done = anyio.Event()
    wiped: list[int] = []
    late: list[int] = []

    @contextlib.asynccontextmanager
    async def watch(self: EtcdClient, prefix: str, **kwargs: object) -> object:
        if kwargs.get("start_revision") is not None and prefix == shared and not wiped:
            await anyio.to_thread.run_sync(server.wipe_and_restart)
            async with EtcdClient(endpoints=[server.endpoint]) as writer:
                wiped.append(await writer.put(shared + "a", "7"))
            while hubs[shared].resets == 0 or hubs[own].resets == 0:  # both re-listed the new etcd
                await anyio.sleep(0.02)
        if kwargs.get("start_revision") is not None and prefix == own and not late:
            await reread_done.wait()  # the shared layer's re-read ran while this one subscribed
            async with EtcdClient(endpoints=[server.endpoint]) as writer:
                late.append(await writer.put(own + "b", "8"))
            while hubs[own].state is None or hubs[own].state.delivered < late[-1]:
                await anyio.sleep(0.02)
        async with real_watch(self, prefix, **kwargs) as sub:  # type: ignore[arg-type]
            yield sub

    with capture_logs() as logs, EtcdServer(**MEMBER_OPTIONS) as server, anyio.fail_after(60):
        async with (
            EtcdClient(endpoints=[server.endpoint], **WATCHER_OPTIONS) as watcher,
            LiveSettings(Service, prefix=[shared, own], client=watcher, canary=False, report=False) as live,
        ):
            async with EtcdClient(endpoints=[server.endpoint]) as writer:
                for n in range(1, 11):
                    await writer.put_many({shared + "a": str(n), own + "b": str(n)})
            await live.wait_for(lambda s: (s.a, s.b) == (10, 10), timeout=5)
            old = live.revision
            hubs = {layer.prefix: layer.sub._hub for layer in live._layers}  # type: ignore[union-attr]
            handles = [subscriber_of(layer.sub) for layer in live._layers]
            monkeypatch.setattr(EtcdClient, "watch", watch)

            async def mark_reread() -> None:
                while not any(e["event"] == "config.layers_reread" for e in logs) or live.revision >= old:
                    await anyio.sleep(0.01)
                reread_done.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(mark_reread)
                for handle in handles:
                    handle.lag(old + 1)
            with anyio.move_on_after(RECOVERY_BOUND):
                while (live.current.a, live.current.b) != (7, 8):
                    await anyio.sleep(0.05)
            current = live.current
    assert wiped and wiped[-1] < late[-1] < old  # written in the new history, below the old revision
    assert (current.a, current.b) == (7, 8)


async def test_an_empty_layered_settings_follows_an_etcd_wiped_under_it(etcd_prefix: str) -> None:
    """A service on its defaults: its prefix and its canary layer are empty. etcd is wiped; each
    shared watch re-lists and finds nothing changed, so no resync batch comes, and the settings
    still reflect the old, higher revision. The next writes come at lower revisions and were
    skipped as applied (status ``live``) until etcd's revision passed the old one."""
    with capture_logs() as logs, EtcdServer(**MEMBER_OPTIONS) as server, anyio.fail_after(60):
        async with (
            EtcdClient(endpoints=[server.endpoint], **WATCHER_OPTIONS) as watcher,
            LiveSettings(Service, prefix=etcd_prefix + "svc/", client=watcher, report=False) as live,
        ):
            assert len(live._layers) == 2  # the prefix and its canary layer
            async with EtcdClient(endpoints=[server.endpoint]) as writer:
                for n in range(20):  # etcd's revision moves on elsewhere
                    await writer.put(etcd_prefix + f"elsewhere/{n % 3}", "x")
                await writer.put(etcd_prefix + "svc/b", "1")
            await live.wait_for(lambda s: s.b == 1, timeout=5)
            async with EtcdClient(endpoints=[server.endpoint]) as writer:
                await writer.delete(etcd_prefix + "svc/b")
            await live.wait_for(lambda s: s.b == 0, timeout=5)
            old = live.revision
            await anyio.to_thread.run_sync(server.wipe_and_restart)
            hub = live._layers[0].sub._hub  # type: ignore[union-attr]
            with anyio.fail_after(RECOVERY_BOUND):
                while hub.resets == 0:  # the prefix's watch re-listed the new, empty etcd
                    await anyio.sleep(0.02)
            async with EtcdClient(endpoints=[server.endpoint]) as writer:
                new = await writer.put(etcd_prefix + "svc/b", "7")
            with anyio.move_on_after(5):
                while live.current.b != 7:
                    await anyio.sleep(0.05)
            current = live.current
    assert new < old
    assert current.b == 7
    assert "history_replaced" in [e.get("reason") for e in logs if e["event"] == "config.layers_reread"]


async def test_a_read_afresh_leaves_a_layer_still_off_its_watch_behind(
    etcd_server: EtcdServer, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two layers lag. One's resume keeps failing (a refused permission: retried every 2 s); the
    other's lag is at the applied revision, so it reads every layer afresh. That read marked every
    layer as following, the failing one too: ``live`` (and fresh) until its next failure."""
    import contextlib

    from aetcdcfg import PermissionDenied

    shared, own = etcd_prefix + "shared/", etcd_prefix + "own/"
    real_watch = EtcdClient.watch
    refused: list[int] = []

    @contextlib.asynccontextmanager
    async def watch(self: EtcdClient, prefix: str, **kwargs: object) -> object:
        if kwargs.get("start_revision") is not None and prefix == own:
            refused.append(1)
            raise PermissionDenied("refused by the test", key=prefix)
        async with real_watch(self, prefix, **kwargs) as sub:  # type: ignore[arg-type]
            yield sub

    with anyio.fail_after(60):
        async with (
            EtcdClient(endpoints=[etcd_server.endpoint]) as client,
            LiveSettings(Service, prefix=[shared, own], client=client, canary=False, report=False) as live,
        ):
            await client.put_many({shared + "a": "1", own + "b": "1"})
            await live.wait_for(lambda s: (s.a, s.b) == (1, 1), timeout=5)
            handles = {layer.prefix: subscriber_of(layer.sub) for layer in live._layers}
            monkeypatch.setattr(EtcdClient, "watch", watch)
            handles[own].lag(live.revision + 1)
            with anyio.fail_after(5):
                while not refused:
                    await anyio.sleep(0.01)
            before = live._layers[0].sub
            handles[shared].lag(live.revision)  # at the applied revision: a read afresh
            with anyio.fail_after(5):
                while live._layers[0].sub is before:  # read afresh, then resubscribed
                    await anyio.sleep(0.01)
            await anyio.sleep(0.3)
            states = [watch.state for watch in live.status.layers]
    assert len(refused) == 1  # still in its 2 s pause
    assert states == ["live", "behind"]  # the shared layer follows again; the refused one does not


async def test_a_layer_whose_read_failed_is_behind_until_it_resumed_and_then_applies_the_change(
    etcd_server: EtcdServer, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading the other layer as of a revision is refused once. The layer leaves its watch for
    2 s; its first subscription was still attached, and on a quiet prefix looked caught up: the
    status said ``live`` while nothing consumed it (and it would have overflowed later). It is
    ``behind`` until it resumed, then the refused revision is applied."""
    from aetcdcfg import PermissionDenied
    from aetcdcfg import live as live_module

    shared, own = etcd_prefix + "shared/", etcd_prefix + "own/"
    real_read_at = live_module.read_at
    refused: list[int] = []

    async def read_at(*args: object) -> object:
        if not refused:
            refused.append(1)
            raise PermissionDenied("refused once by the test")
        return await real_read_at(*args)  # type: ignore[arg-type]

    with anyio.fail_after(60):
        async with (
            EtcdClient(endpoints=[etcd_server.endpoint]) as client,
            LiveSettings(Service, prefix=[shared, own], client=client, canary=False, report=False) as live,
        ):
            await client.put_many({shared + "a": "1", own + "b": "1"})
            await live.wait_for(lambda s: (s.a, s.b) == (1, 1), timeout=5)
            monkeypatch.setattr(live_module, "read_at", read_at)
            written = await client.put(own + "b", "2")
            with anyio.fail_after(5):
                while not refused:
                    await anyio.sleep(0.01)
            await anyio.sleep(0.5)  # in its 2 s pause
            during = [watch.state for watch in live.status.layers]
            settings = await live.wait_for(lambda s: s.b == 2, timeout=10)
            with anyio.fail_after(5):
                while [watch.state for watch in live.status.layers] != ["live", "live"]:
                    await anyio.sleep(0.05)
    assert during == ["live", "behind"]
    assert settings.b == 2 and live.revision == written
