"""aetcdcfg behind etcd's own gRPC proxy (``etcd grpc-proxy start``), the fan-out engine for fleets.

The proxy coalesces identical watches of many clients into one etcd watcher, but it never answers a
watch progress request, ignores ``fragment`` and turns a dead etcd behind it into silence. These tests
run a real proxy in front of a real etcd whose progress notifications are at etcd's default (10 min),
so a quiet watch through the proxy really is silent, as in production.

The watcher probes a silent stream after 1 s and gives up on it 1 s later (``WATCHER_OPTIONS``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import anyio
import pytest
from pydantic_settings import BaseSettings
from structlog.testing import capture_logs

from aetcdcfg import EtcdClient, EtcdError, Event, LiveSettings, Subscription
from aetcdcfg._stream import PROXY_REPLAY_LIMIT
from aetcdcfg.testing import EtcdGrpcProxy, EtcdServer, FaultProxy, as_records, etcd_history

from .harness import (
    WATCHER_OPTIONS,
    Dropping,
    apply_events,
    drop_revisions,
    following,
    learned_not_etcd,
    logged,
    report,
    stall_detected,
    subscriber_of,
    wait_logged,
)

pytestmark = pytest.mark.anyio

#: keepalive_time + keepalive_timeout of WATCHER_OPTIONS: a frozen path is found within this.
WINDOW = WATCHER_OPTIONS["keepalive_time"] + WATCHER_OPTIONS["keepalive_timeout"]


@pytest.fixture
def quiet_etcd() -> Iterator[EtcdServer]:
    """An etcd of this test's own, with etcd's default (10 min) progress notification interval."""
    with EtcdServer(keepalive_min_time=1) as server:
        yield server


@pytest.fixture
def proxy(quiet_etcd: EtcdServer) -> Iterator[EtcdGrpcProxy]:
    with EtcdGrpcProxy([quiet_etcd.endpoint], keepalive_min_time=1) as running:
        yield running


@pytest.fixture
def dropping(monkeypatch: pytest.MonkeyPatch, etcd_prefix: str) -> Dropping:
    return drop_revisions(monkeypatch, etcd_prefix)


async def test_idle_watches_behind_the_proxy_never_reconnect(
    quiet_etcd: EtcdServer, proxy: EtcdGrpcProxy, etcd_prefix: str
) -> None:
    """Ten clients idle through the proxy for five probe windows: no watch is declared dead."""
    with capture_logs() as logs, anyio.fail_after(60):
        async with contextlib.AsyncExitStack() as stack:
            writer = await stack.enter_async_context(EtcdClient(endpoints=[quiet_etcd.endpoint]))
            subs = []
            for _ in range(10):
                client = await stack.enter_async_context(
                    EtcdClient(endpoints=[proxy.endpoint], **WATCHER_OPTIONS)
                )
                subs.append(await stack.enter_async_context(client.watch(etcd_prefix)))
            await anyio.sleep(5 * WINDOW)
            # the liveness reads also confirm the watches current through the proxy
            assert [sub.status.is_fresh(WINDOW + 0.5) for sub in subs] == [True] * len(subs)
            revision = await writer.put(etcd_prefix + "after-idle", "1")
            for sub in subs:
                event = await anext(sub)
                assert (event.key, event.revision) == (etcd_prefix + "after-idle", revision)
    assert logged(logs, "watch.disconnected", etcd_prefix) == []
    assert logged(logs, "watch.retry", etcd_prefix) == []
    # each client found out once that the proxy does not answer progress requests
    assert len(logged(logs, "watch.progress_unanswered", etcd_prefix)) == len(subs)


async def test_frozen_proxy_is_detected_within_the_keepalive_window(
    quiet_etcd: EtcdServer, proxy: EtcdGrpcProxy, etcd_prefix: str
) -> None:
    with capture_logs() as logs, anyio.fail_after(60):
        async with following(etcd_prefix, watch=[proxy.endpoint], write=[quiet_etcd.endpoint]) as run:
            await run.warm_up()

            async def freeze() -> None:
                proxy.pause()
                try:
                    detected = await stall_detected(logs, etcd_prefix, hold=WINDOW + 3)
                finally:
                    proxy.resume()
                assert detected <= WINDOW + 1.5, detected

            report("proxy SIGSTOP", await run.recovery(await run.through(freeze)))
            await run.finish()
            await run.check_history(quiet_etcd.endpoint)


async def test_frozen_etcd_behind_a_live_proxy_is_detected(
    quiet_etcd: EtcdServer, proxy: EtcdGrpcProxy, etcd_prefix: str
) -> None:
    """The proxy keeps the client's stream open and silent; the liveness read finds etcd frozen."""
    with capture_logs() as logs, anyio.fail_after(60):
        async with following(etcd_prefix, watch=[proxy.endpoint], write=[quiet_etcd.endpoint]) as run:
            await run.warm_up()
            quiet_etcd.pause()
            try:
                detected = await stall_detected(logs, etcd_prefix, hold=WINDOW + 3)
            finally:
                quiet_etcd.resume()
            assert detected <= WINDOW + 1.5, detected
            report("etcd SIGSTOP behind proxy", await run.recovery(anyio.current_time()))
            await run.finish()
            await run.check_history(quiet_etcd.endpoint)


async def test_exact_history_across_proxy_restarts(
    quiet_etcd: EtcdServer, proxy: EtcdGrpcProxy, etcd_prefix: str
) -> None:
    """kill -9 the proxy three times under writes (made straight to etcd); restart it on its port."""
    with anyio.fail_after(90):
        async with following(etcd_prefix, watch=[proxy.endpoint], write=[quiet_etcd.endpoint]) as run:
            await run.warm_up()
            for _ in range(3):

                async def crash() -> None:
                    proxy.kill()
                    await anyio.sleep(1.0)
                    await anyio.to_thread.run_sync(proxy.restart)

                report("proxy kill -9 + restart", await run.recovery(await run.through(crash)))
            await run.finish()
            await run.check_history(quiet_etcd.endpoint)


async def test_revision_too_large_for_the_client_through_the_proxy_fails_clearly(etcd_prefix: str) -> None:
    """The proxy ignores ``fragment``: a revision over ``max_message_bytes`` cannot be split there."""
    with (
        EtcdServer(keepalive_min_time=1, extra_args=["--max-request-bytes", str(1 << 20)]) as server,
        EtcdGrpcProxy([server.endpoint]) as proxy,
    ):
        async with (
            EtcdClient(endpoints=[server.endpoint]) as writer,
            EtcdClient(endpoints=[proxy.endpoint], max_message_bytes=4 << 20) as watcher,
        ):
            for start in range(0, 5_000, 100):  # ~5 MB of delete events in one revision
                await writer.put_many(
                    {f"{etcd_prefix}{'n' * 1_000}{i:05d}": "v" for i in range(start, start + 100)}
                )
            async with watcher.watch(etcd_prefix) as sub:
                await writer.delete_prefix(etcd_prefix)
                with anyio.fail_after(30), pytest.raises(EtcdError, match="max_message_bytes") as info:
                    async for _ in sub:
                        pass
    assert "proxy" in str(info.value)


async def test_resume_through_the_proxy_after_a_long_backlog_relists_instead_of_losing_revisions(
    quiet_etcd: EtcdServer, proxy: EtcdGrpcProxy, etcd_prefix: str
) -> None:
    """etcd's proxy drops revisions of a watcher resuming more than ~1,000 revisions behind. Behind
    the proxy, a watch that far behind re-lists: its state (and the settings) equal etcd's."""
    keys = [f"{etcd_prefix}k{i}" for i in range(20)]
    with capture_logs() as logs, anyio.fail_after(90):
        async with (
            EtcdClient(endpoints=[quiet_etcd.endpoint]) as writer,
            EtcdClient(endpoints=[proxy.endpoint], **WATCHER_OPTIONS) as watcher,
            watcher.watch(etcd_prefix, with_snapshot=True, buffer_size=100_000) as sub,
        ):
            while not logged(logs, "watch.progress_unanswered", etcd_prefix):  # it knows: a proxy
                await anyio.sleep(0.05)
            proxy.kill()
            for n in range(1_500):  # while the proxy is down: 1,500 revisions, puts and deletes
                key = keys[n % len(keys)]
                if n % 7 == 3:
                    await writer.delete(key)
                else:
                    await writer.put(key, str(n))
            await anyio.to_thread.run_sync(proxy.restart)
            last = await writer.put(etcd_prefix + "end", "1")
            state = dict(sub.snapshot.items) if sub.snapshot else {}
            async for batch in sub.batches():
                for event in batch:
                    if event.type.value == "PUT":
                        state[event.key] = event.value
                    else:
                        state.pop(event.key, None)
                if batch[-1].revision >= last:
                    break
            expected = await writer.get_prefix(etcd_prefix, revision=last)
    assert state == dict(expected.items)
    backlog = logged(logs, "watch.proxy_backlog", etcd_prefix)
    assert len(backlog) == 1 and backlog[0]["behind"] >= 1_000
    assert any(e.get("reason") == "proxy_backlog" for e in logged(logs, "watch.resynced", etcd_prefix))


async def test_an_old_start_revision_through_the_proxy_past_the_replay_limit_fails_clearly(
    quiet_etcd: EtcdServer, proxy: EtcdGrpcProxy, etcd_prefix: str
) -> None:
    """A ``start_revision`` older than the shared watch's history is replayed on a private stream,
    which keeps no state to re-list from: through the proxy, which loses revisions of a long
    catch-up, it ends with an EtcdError saying so instead of replaying with holes."""
    async with (
        EtcdClient(endpoints=[quiet_etcd.endpoint]) as writer,
        EtcdClient(endpoints=[proxy.endpoint], **WATCHER_OPTIONS) as watcher,
    ):
        first = await writer.put(etcd_prefix + "k", "0")
        for n in range(PROXY_REPLAY_LIMIT):
            await writer.put(etcd_prefix + "k", str(n + 1))
        async with watcher.watch(etcd_prefix, start_revision=first) as sub:
            with anyio.fail_after(30), pytest.raises(EtcdError, match="gRPC proxy") as info:
                async for _ in sub:
                    pass
    assert f"replaying {PROXY_REPLAY_LIMIT + 1} revisions of {etcd_prefix!r}" in str(info.value)
    assert "read old revisions from an etcd member directly" in str(info.value)


async def test_a_black_hole_right_after_creation_is_not_mistaken_for_a_proxy(
    quiet_etcd: EtcdServer, etcd_prefix: str
) -> None:
    """Straight to etcd, the path black-holed just after the watch was created: the unanswered
    progress request proves nothing (the liveness read failed too), so the resume replays every
    revision exactly instead of re-listing as it would behind a proxy."""
    with FaultProxy.to(quiet_etcd.endpoint) as path, capture_logs() as logs, anyio.fail_after(60):
        async with (
            EtcdClient(endpoints=[quiet_etcd.endpoint]) as writer,
            EtcdClient(endpoints=[path.endpoint], **WATCHER_OPTIONS) as watcher,
        ):
            path.set_delay(0.3)  # so etcd's answer to the first progress request is still on its way
            async with watcher.watch(etcd_prefix) as sub:
                start = sub.start_revision
                while not logged(logs, "watch.connected", etcd_prefix):
                    await anyio.sleep(0.005)
                path.blackhole(True)  # ... when the path goes silent: held, not delivered
                path.set_delay(0)
                events = await _through_outage(writer, path, sub, etcd_prefix)
            expected = await etcd_history(quiet_etcd.endpoint, etcd_prefix, start, events[-1].revision)
    assert as_records(events) == expected
    assert logged(logs, "watch.proxy_backlog", etcd_prefix) == []
    assert logged(logs, "watch.progress_unanswered", etcd_prefix) == []


async def _through_outage(
    writer: EtcdClient, path: FaultProxy, sub: Subscription, prefix: str
) -> list[Event]:
    """700 revisions written while ``path`` is black-holed; healed after a probe window; returns the
    subscriber's events up to a last write made after healing."""
    for n in range(700):
        await writer.put(f"{prefix}k{n % 5}", str(n))
    await anyio.sleep(WINDOW + 1)
    path.blackhole(False)
    last = await writer.put(prefix + "end", "1")
    events: list[Event] = []
    async for event in sub:
        events.append(event)
        if event.revision >= last:
            break
    return events


class Three(BaseSettings):
    """The keys the gap tests write, one field each."""

    a: int = 0
    b: int = 0
    c: int = 0


async def test_a_revision_the_proxy_drops_reaches_every_subscriber_even_with_nothing_written_after(
    quiet_etcd: EtcdServer, proxy: EtcdGrpcProxy, etcd_prefix: str, dropping: Dropping
) -> None:
    """The stream loses the revision that writes ``b``, delivers the next (``c``), and nothing is
    written after it: the verification finds the gap at ``c``'s revision and re-lists at that same
    revision. The re-listed ``b`` reaches a snapshot subscriber (marked ``resync``), a LiveSettings
    of the one prefix and one with a layer under it (the canary layer): each ends equal to etcd."""
    own, shared = etcd_prefix + "own/", etcd_prefix + "shared/"
    want = Three(a=1, b=1, c=1)
    no_writes = {"report": False}  # their records would be writes (and revisions) of their own
    with capture_logs() as logs, anyio.fail_after(60):
        async with contextlib.AsyncExitStack() as stack:
            writer = await stack.enter_async_context(EtcdClient(endpoints=[quiet_etcd.endpoint]))
            watcher = await stack.enter_async_context(
                EtcdClient(endpoints=[proxy.endpoint], **WATCHER_OPTIONS)
            )
            await writer.put(shared + "c", "0")
            sub = await stack.enter_async_context(watcher.watch(own, with_snapshot=True))
            lives = [
                await stack.enter_async_context(
                    LiveSettings(Three, prefix=prefixes, client=watcher, **options, **no_writes)
                )
                for prefixes, options in [
                    (own, {"canary": False}),  # one layer: batches applied as they come
                    (own, {}),  # the canary layer above it: batches applied as of one revision
                    ([shared, own], {}),
                ]
            ]
            assert sub.snapshot is not None
            state = dict(sub.snapshot.items)
            events: list[Event] = []
            while not learned_not_etcd(logs, proxy.endpoint):  # verified by reads from now on
                await anyio.sleep(0.05)
            a = await writer.put(own + "a", "1")
            async for event in sub:
                events.append(event)
                if event.revision >= a:
                    break
            apply_events(state, events)
            dropping.revisions.add(a + 1)
            assert await writer.put(own + "b", "1") == a + 1
            c = await writer.put(own + "c", "1")  # then nothing more is written
            expected = dict((await writer.get_prefix(own)).items)
            with anyio.move_on_after(4 * WINDOW):
                async for batch in sub.batches():
                    events.extend(batch)
                    apply_events(state, batch)
                    if state == expected:
                        break
            with anyio.move_on_after(2 * WINDOW):
                while any(live.current != want for live in lives):
                    await anyio.sleep(0.05)
            currents = [live.current for live in lives]
    assert state == expected, [(e.key, e.revision, e.resync) for e in events]
    assert [(e.key, e.revision, e.resync) for e in events[-2:]] == [
        (own + "c", c, False),
        (own + "b", c, True),
    ]
    assert currents == [want] * len(lives)
    assert [entry["revision"] for entry in logged(logs, "watch.gap_detected", own)] == [c]
    assert [(e["reason"], e["revision"]) for e in logged(logs, "watch.resynced", own)] == [("gap", c)]


async def test_live_settings_lagging_on_the_resync_of_a_revision_it_applied_still_gets_the_correction(
    quiet_etcd: EtcdServer,
    proxy: EtcdGrpcProxy,
    etcd_prefix: str,
    dropping: Dropping,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The proxy loses ``b``'s revision; ``c``'s arrives and is applied; the re-list at ``c``'s own
    revision overflows the LiveSettings' buffer. The lag says resume at ``c``, a revision the
    settings already reflect: resuming after it (``c + 1``) skipped the correction and ``b`` stayed 0
    for good. A lag at or below the applied revision reads every layer afresh."""
    from aetcdcfg import _fanout

    want = Three(a=1, b=1, c=1)
    real_offer = _fanout._Subscriber.offer
    lagged: list[int] = []

    def offer(sub: _fanout._Subscriber, batch: tuple[Event, ...]) -> None:
        if batch[0].resync and sub.subscription is not None and sub.subscription in watched:
            lagged.append(batch[0].revision)
            sub.lag(batch[0].revision)  # as a full buffer does
            return
        real_offer(sub, batch)

    watched: list[Subscription] = []
    with capture_logs() as logs, anyio.fail_after(60):
        async with contextlib.AsyncExitStack() as stack:
            writer = await stack.enter_async_context(EtcdClient(endpoints=[quiet_etcd.endpoint]))
            watcher = await stack.enter_async_context(
                EtcdClient(endpoints=[proxy.endpoint], **WATCHER_OPTIONS)
            )
            live = await stack.enter_async_context(
                LiveSettings(Three, prefix=etcd_prefix, client=watcher, canary=False, report=False)
            )
            layer_sub = live._layers[0].sub
            assert layer_sub is not None
            watched.append(layer_sub)
            monkeypatch.setattr(_fanout._Subscriber, "offer", offer)
            while not logged(logs, "watch.progress_unanswered", etcd_prefix):
                await anyio.sleep(0.05)
            a = await writer.put(etcd_prefix + "a", "1")
            while live.revision < a:
                await anyio.sleep(0.02)
            dropping.revisions.add(a + 1)
            assert await writer.put(etcd_prefix + "b", "1") == a + 1
            c = await writer.put(etcd_prefix + "c", "1")  # then nothing more is written
            with anyio.move_on_after(3 * WINDOW):
                while live.current != want:
                    await anyio.sleep(0.05)
            current = live.current
    assert lagged == [c]
    assert current == want
    assert [e["resume_revision"] for e in logs if e["event"] == "config.lagged"] == [c]


async def test_a_deletion_not_yet_replayed_after_a_resume_does_not_confirm_the_watch_fresh(
    quiet_etcd: EtcdServer, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Straight to etcd, a key deleted during an outage: the read that confirms a resumed watch
    current at once finds no key changed after the delivered revision (a deletion leaves none), but
    one key fewer. Until the replayed delete arrives, the watch is not called fresh."""
    dropping = drop_revisions(monkeypatch, etcd_prefix)
    dropping.held = True
    options = {"keepalive_time": 3, "keepalive_timeout": 1, "request_timeout": 3}
    with FaultProxy.to(quiet_etcd.endpoint) as path, capture_logs() as logs, anyio.fail_after(60):
        async with (
            EtcdClient(endpoints=[quiet_etcd.endpoint]) as writer,
            EtcdClient(endpoints=[path.endpoint], **options) as watcher,
        ):
            await writer.put_many({etcd_prefix + "a": "1", etcd_prefix + "b": "1"})
            async with watcher.watch(etcd_prefix) as sub:
                endpoint = watcher._conn.pool().endpoints[0]
                while endpoint.answers_progress is not True:  # it knows: etcd itself
                    await anyio.sleep(0.05)
                path.refuse(True)
                path.reset()
                await wait_logged(logs, "watch.disconnected", etcd_prefix, timeout=5)
                dropping.revisions.add(await writer.delete(etcd_prefix + "a"))
                await anyio.sleep(1)  # the outage
                path.refuse(False)
                await wait_logged(logs, "watch.resumed", etcd_prefix, timeout=10)
                await anyio.sleep(0.5)  # the confirming read is long done
                status = sub.status
    assert status.state == "live"
    assert status.staleness > 1.2, status  # last confirmed before the outage


async def test_live_settings_whose_resume_the_proxy_refuses_to_replay_reads_afresh(
    quiet_etcd: EtcdServer, proxy: EtcdGrpcProxy, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lag resumed from further back than the shared watch remembers needs a private catch-up;
    through the proxy, one of ``PROXY_REPLAY_LIMIT`` revisions or more is refused (EtcdError), and
    LiveSettings retried that same resume every 2 s for good (the backlog only grows), serving old
    settings. It reads every layer afresh after a failed resume now."""
    from aetcdcfg import _fanout, _stream

    monkeypatch.setattr(_fanout, "HISTORY_EVENTS", 1)  # the shared watch remembers one revision
    monkeypatch.setattr(_stream, "PROXY_REPLAY_LIMIT", 2)
    real_watch = EtcdClient.watch
    writes: list[int] = []

    @contextlib.asynccontextmanager
    async def watch(self: EtcdClient, prefix: str, **kwargs: object) -> object:
        if kwargs.get("start_revision") is not None and not writes:  # the resume after the lag
            for value in (1, 2, 3):
                writes.append(await writer.put(etcd_prefix + "a", str(value)))
            while hub.state is None or hub.state.delivered < writes[-1]:  # moved on without it
                await anyio.sleep(0.01)
        async with real_watch(self, prefix, **kwargs) as sub:  # type: ignore[arg-type]
            yield sub

    with capture_logs() as logs, anyio.fail_after(60):
        async with contextlib.AsyncExitStack() as stack:
            writer = await stack.enter_async_context(EtcdClient(endpoints=[quiet_etcd.endpoint]))
            watcher = await stack.enter_async_context(
                EtcdClient(endpoints=[proxy.endpoint], **WATCHER_OPTIONS)
            )
            live = await stack.enter_async_context(
                LiveSettings(Three, prefix=etcd_prefix, client=watcher, report=False)
            )
            layer_sub = live._layers[0].sub
            assert layer_sub is not None
            hub = layer_sub._hub
            mine = subscriber_of(layer_sub)
            monkeypatch.setattr(EtcdClient, "watch", watch)
            mine.lag(live.revision + 1)
            with anyio.move_on_after(10):
                while live.current.a != 3:
                    await anyio.sleep(0.05)
            current = live.current
            last = await writer.put(etcd_prefix + "b", "1")
            with anyio.move_on_after(10):
                while live.revision < last:
                    await anyio.sleep(0.05)
            after = live.current
    refusals = [e for e in logs if e["event"] == "config.watch_failed"]
    assert current == Three(a=3), [e["error"] for e in refusals]
    assert after == Three(a=3, b=1)
    assert len(refusals) == 1 and "gRPC proxy" in refusals[0]["error"]
