"""One test per fault, against real etcd, while a writer writes.

In each, a subscriber (``client.watch``) and a ``LiveSettings`` on the same watcher client follow a
prefix through the fault. The subscriber's (revision, key, type, value) sequence must equal etcd's
own history (or, after compaction or a wiped cluster, its materialized state must equal
``get_prefix``); every ``LiveSettings`` object ever applied holds two ints written together in one
transaction, so a torn object would show ``a != b``; and everything runs under deadlines, so a hang
fails. Each test prints ``RECOVERY <fault> <seconds>``: from the fault's removal until the
subscriber has the first write made after it (run pytest with ``-s`` to see them).

The watcher uses ``keepalive_time=1, keepalive_timeout=1`` so a stall is found in about 2 s.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from aetcdcfg import (
    ConfigRejected,
    LiveSettings,
    _stream,
)
from aetcdcfg._backoff import Backoff
from aetcdcfg.testing import EtcdCluster, EtcdServer, FaultProxy

from .harness import (
    MEMBER_OPTIONS,
    RECOVERY_BOUND,
    StrictPair,
    following,
    logged,
    report,
    stall_detected,
    start_until_accepting,
    wait_logged,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def server() -> Iterator[EtcdServer]:
    """A single member of this test's own: the test freezes, kills or wipes it."""
    with EtcdServer(**MEMBER_OPTIONS) as private:
        yield private


# -- the network between watcher and etcd ---------------------------------------------------------


async def test_resumes_after_repeated_connection_resets_without_gap(
    etcd_server: EtcdServer, fault_proxy: FaultProxy, etcd_prefix: str
) -> None:
    """Five RSTs, each hitting an established stream while writes go on; LiveSettings stays whole."""
    with anyio.fail_after(60), capture_logs() as logs:
        async with following(etcd_prefix, watch=[fault_proxy.endpoint], write=[etcd_server.endpoint]) as run:
            for _ in range(20):
                await run.write()
            recoveries: list[float] = []

            async def resets() -> None:
                for _ in range(5):
                    fault_proxy.reset()
                    recoveries.append(await run.recovery(time.monotonic()))

            await run.through(resets)
            await run.finish()
            await run.check_history(etcd_server.endpoint)
    assert len(logged(logs, "watch.resumed", etcd_prefix)) >= 5
    report("connection-reset", max(recoveries))


async def test_reconnect_backoff_starts_small_again_after_a_successful_resume(
    etcd_server: EtcdServer, fault_proxy: FaultProxy, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight resets, each of a stream that had resumed and was delivering: each outage must start
    with the first backoff step (50 ms), not a delay grown by the earlier ones. (Until 926f6d3 the
    backoff was never reset, so from about the 6th failure in a watch's life every reconnect waited
    the 2 s cap.)

    The watch's own delays are recorded and checked, not the wall-clock recovery: that also holds
    gRPC's reconnect of the channel, which its settings let take up to 1 s (+20 % jitter), and a
    loaded machine's scheduling, and a bound on it failed on both without the backoff being wrong."""
    delays: dict[int, list[float]] = {}  # per watch loop (the subscriber's and LiveSettings')

    class RecordedBackoff(Backoff):
        def next_delay(self) -> float:
            delay = super().next_delay()
            delays.setdefault(id(self), []).append(delay)
            return delay

    monkeypatch.setattr(_stream, "Backoff", RecordedBackoff)
    first_delays: list[float] = []
    recoveries: list[float] = []
    with anyio.fail_after(60):
        # Without the canary layer: its watch is idle (nothing to wait for), so a reset could find
        # it still reconnecting from the last one, and its first delay then a second step (seen
        # once, 107 ms, with four matrix cells at once): the test can wait only for watches with events.
        async with following(
            etcd_prefix, watch=[fault_proxy.endpoint], write=[etcd_server.endpoint], canary=False
        ) as run:
            for _ in range(8):
                await run.received(await run.write(pair=True))  # resumed, and delivering again
                written = run.writes  # and LiveSettings' watch too (a stream of its own)
                await run.live.wait_for(lambda s, n=written: s.a == n, timeout=RECOVERY_BOUND)
                before = {loop: len(recorded) for loop, recorded in delays.items()}
                fault_proxy.reset()
                recoveries.append(await run.recovery(time.monotonic()))
                first_delays.extend(
                    recorded[before.get(loop, 0)]
                    for loop, recorded in delays.items()
                    if len(recorded) > before.get(loop, 0)
                )
    assert len(first_delays) >= 8  # the subscriber's watch backed off once per reset, at least
    assert max(first_delays) <= 0.05 * 1.3, [round(d, 3) for d in first_delays]  # 50 ms +30 % jitter
    print(f"\nRECOVERIES connection-reset x8 {[round(r, 3) for r in recoveries]}")


async def test_black_hole_past_keepalive_window_is_detected_and_resumed(
    etcd_server: EtcdServer, fault_proxy: FaultProxy, etcd_prefix: str
) -> None:
    """Nothing answers for 4 s (no RST, no FIN): the watch's own probe must notice, not the heal."""
    with anyio.fail_after(60), capture_logs() as logs:
        async with following(etcd_prefix, watch=[fault_proxy.endpoint], write=[etcd_server.endpoint]) as run:
            await run.warm_up()
            detected_after: list[float] = []

            async def black_hole() -> None:
                fault_proxy.blackhole(True, drop=True)
                detected_after.append(await stall_detected(logs, etcd_prefix, hold=4))
                fault_proxy.blackhole(False)  # drop=True: the held connections are reset

            removed = await run.through(black_hole)
            recovery = await run.recovery(removed)
            await run.finish()
            await run.check_history(etcd_server.endpoint)
    # keepalive_time + keepalive_timeout is 2 s; the stream may have been silent for up to 1 s before
    assert detected_after[0] < 3.5
    report("black-hole-4s", recovery)
    print(f"DETECTION black-hole-4s {detected_after[0]:.3f}")


async def test_added_latency_keeps_history_exact_without_reconnects(
    etcd_server: EtcdServer, fault_proxy: FaultProxy, etcd_prefix: str
) -> None:
    """500 ms each way is slow but alive: no reconnect at all, and nothing lost."""
    with anyio.fail_after(60), capture_logs() as logs:
        async with following(etcd_prefix, watch=[fault_proxy.endpoint], write=[etcd_server.endpoint]) as run:
            for _ in range(10):
                await run.write()

            async def latency() -> None:
                fault_proxy.set_delay(0.5)
                await anyio.sleep(4)
                fault_proxy.set_delay(0)

            removed = await run.through(latency)
            recovery = await run.recovery(removed)
            await run.finish()
            await run.check_history(etcd_server.endpoint)
    reconnects = [e for e in logs if e["event"] in ("watch.disconnected", "etcd.failover")]
    assert reconnects == []
    report("latency-500ms", recovery)


# -- the member itself --------------------------------------------------------------------------


async def test_resumes_after_sigstop_without_gap(server: EtcdServer, etcd_prefix: str) -> None:
    """A frozen member keeps its sockets open and answers nothing; the probe must give up on it."""
    with anyio.fail_after(60), capture_logs() as logs:
        async with following(etcd_prefix, watch=[server.endpoint], write=[server.endpoint]) as run:
            for _ in range(20):
                await run.write()
            detected_after: list[float] = []

            async def freeze() -> None:
                server.pause()
                detected_after.append(await stall_detected(logs, etcd_prefix, hold=3))
                server.resume()

            removed = await run.through(freeze)
            recovery = await run.recovery(removed)
            await run.finish()
            await run.check_history(server.endpoint)
    assert detected_after[0] < 3
    report("sigstop-3s", recovery)
    print(f"DETECTION sigstop-3s {detected_after[0]:.3f}")


async def test_resumes_after_sigkill_and_restart_without_gap(server: EtcdServer, etcd_prefix: str) -> None:
    """A crash and a restart on the same data dir: the watch resumes at delivered + 1."""
    with anyio.fail_after(60):
        async with following(etcd_prefix, watch=[server.endpoint], write=[server.endpoint]) as run:
            for _ in range(30):
                await run.write()

            async def crash() -> None:
                server.kill()
                await anyio.sleep(1)
                await anyio.to_thread.run_sync(server.start)

            removed = await run.through(crash)
            recovery = await run.recovery(removed)
            for _ in range(30):
                await run.write()
            await run.finish()
            await run.check_history(server.endpoint)
    report("sigkill-restart", recovery)


async def test_resumes_after_all_endpoints_down_for_10s_with_last_good_settings(
    server: EtcdServer, etcd_prefix: str
) -> None:
    """The issue asks for 30 s down; 10 s reaches the same 2 s backoff ceiling and keeps CI fast."""
    with anyio.fail_after(60):
        async with following(etcd_prefix, watch=[server.endpoint], write=[server.endpoint]) as run:
            for _ in range(30):
                await run.write()
            await run.received(await run.write(pair=True))
            written = run.writes
            good = await run.live.wait_for(lambda s: s.a == written, timeout=5)
            kept: list[bool] = []

            server.kill()
            outage_end = anyio.current_time() + 10
            while anyio.current_time() < outage_end:  # hold the outage, watching what is exposed
                kept.append(run.live.current is good)
                await anyio.sleep(0.1)
            await start_until_accepting(server)
            removed = time.monotonic()
            kept.append(run.live.current is good)
            recovery = await run.recovery(removed)
            await run.finish()
            await run.check_history(server.endpoint)
    assert kept and all(kept)
    assert recovery < 5  # the watch's backoff is capped at 2 s
    report("all-down-10s", recovery)


async def test_resumes_soon_after_every_endpoint_accepts_connections_again(
    etcd_server: EtcdServer, fault_proxy: FaultProxy, etcd_prefix: str
) -> None:
    """Every endpoint refuses connections for 3 s (etcd itself stays healthy), four times: once the
    endpoint accepts again, what remains is the client's own part of a recovery. gRPC retries a
    refused connection with backoff; its ceiling (250 ms) bounds how long a healthy endpoint goes
    unused (it was 1 s: 0.61-1.07 s here)."""
    with anyio.fail_after(90):
        async with following(etcd_prefix, watch=[fault_proxy.endpoint], write=[fault_proxy.endpoint]) as run:
            await run.warm_up()
            recoveries: list[float] = []
            for _ in range(4):
                fault_proxy.refuse()
                fault_proxy.reset()
                await anyio.sleep(3)
                fault_proxy.refuse(False)  # accepting again
                recoveries.append(await run.recovery(time.monotonic()))
            await run.finish()
            await run.check_history(etcd_server.endpoint)
    report("refused-3s", max(recoveries))
    print("RECOVERIES refused-3s " + " ".join(f"{r:.3f}" for r in recoveries))
    assert max(recoveries) < 0.8, recoveries


async def test_compaction_and_defrag_during_outage_resync_to_etcd_state(
    etcd_server: EtcdServer, fault_proxy: FaultProxy, etcd_prefix: str
) -> None:
    """History the watch missed is compacted away: it re-lists and emits the difference, flagged."""
    with anyio.fail_after(60), capture_logs() as logs:
        async with following(etcd_prefix, watch=[fault_proxy.endpoint], write=[etcd_server.endpoint]) as run:
            await run.warm_up()
            seen = len(run.events)

            fault_proxy.refuse(True)
            fault_proxy.reset()
            for _ in range(30):
                await run.write()
            compact_at = await run.write(pair=True)
            await anyio.to_thread.run_sync(etcd_server.etcdctl, "compact", str(compact_at))
            await anyio.to_thread.run_sync(etcd_server.etcdctl, "defrag")
            fault_proxy.refuse(False)
            recovery = await run.recovery(time.monotonic())
            await run.finish()
            final = await run.writer.get_prefix(etcd_prefix)
            after = run.events[seen:]
    assert run.state() == dict(final.items)
    resynced = [e for e in after if e.resync]
    assert resynced == after[: len(resynced)], "the resync comes first, as one batch"
    assert len({e.revision for e in resynced}) == 1 and resynced[0].revision >= compact_at
    assert {e.key for e in resynced} >= {etcd_prefix + "live/a", etcd_prefix + "live/b"}
    # what follows the resync is ordinary history again
    live_after = after[len(resynced) :]
    assert [e.revision for e in live_after] == sorted(e.revision for e in live_after)
    assert all(e.revision > resynced[0].revision for e in live_after)
    assert logged(logs, "watch.compacted", etcd_prefix) and logged(logs, "watch.resynced", etcd_prefix)
    assert [(s.a, s.b) for s in run.applied if s.a != s.b] == []
    report("compaction+defrag", recovery)


async def test_etcd_restarted_empty_is_detected_and_resynced(server: EtcdServer, etcd_prefix: str) -> None:
    """A new data dir: revisions restart at 1, below what was delivered. The watch must notice, say
    so at error level, and end up with exactly the new etcd's keys. LiveSettings follow the keys'
    disappearance too, but never expose an invalid object: a model that needs the keys keeps its
    last good settings until they are written again."""
    strict_applied: list[StrictPair] = []
    with anyio.fail_after(60), capture_logs() as logs:
        async with following(etcd_prefix, watch=[server.endpoint], write=[server.endpoint]) as run:
            for _ in range(30):
                await run.write()
            await run.received(await run.write(pair=True))
            old_revision = run.events[-1].revision
            written = run.writes
            # live/ has a watch of its own (a stream apart from the subscriber's): let it catch up, so
            # StrictPair starts from a state that has both keys
            await run.live.wait_for(lambda s: s.a == written, timeout=5)
            async with LiveSettings(
                StrictPair, prefix=etcd_prefix + "live/", client=run.watcher, on_change=strict_applied.append
            ) as strict:
                good = strict.current

                await anyio.to_thread.run_sync(server.wipe_and_restart)
                removed = time.monotonic()
                marker = uuid.uuid4().hex
                with anyio.fail_after(RECOVERY_BOUND):
                    reseeded = await run.writer.put(etcd_prefix + "reseeded", marker)
                    await run.until(
                        lambda e: e.key == etcd_prefix + "reseeded" and e.value == marker.encode()
                    )
                recovery = time.monotonic() - removed

                # live/ is empty in the new etcd: Pair falls back to its defaults, StrictPair cannot
                await run.live.wait_for(lambda s: (s.a, s.b) == (0, 0), timeout=5)
                with anyio.fail_after(5):
                    while strict.last_error is None:
                        await anyio.sleep(0.02)
                assert isinstance(strict.last_error, ConfigRejected)
                assert strict.current is good

                await run.writer.put_many({etcd_prefix + "live/a": "1000", etcd_prefix + "live/b": "1000"})
                with anyio.fail_after(5):
                    await run.until(lambda e: e.key == etcd_prefix + "live/b" and e.value == b"1000")
                settings = await run.live.wait_for(lambda s: s.a == 1000, timeout=5)
                strict_settings = await strict.wait_for(lambda s: s.a == 1000, timeout=5)
                assert strict.last_error is None
            final = await run.writer.get_prefix(etcd_prefix)
    assert reseeded < old_revision  # the revision really went backwards
    assert run.state() == dict(final.items)
    resets = logged(logs, "watch.revision_reset", etcd_prefix)
    assert resets and all(entry["log_level"] == "error" for entry in resets)
    assert [(s.a, s.b) for s in run.applied if s.a != s.b] == []
    assert [(s.a, s.b) for s in strict_applied if s.a != s.b] == []
    assert (settings.a, settings.b) == (strict_settings.a, strict_settings.b) == (1000, 1000)
    report("wiped-restart", recovery)


# -- the cluster ----------------------------------------------------------------------------------


@pytest.mark.cluster
async def test_leader_change_keeps_history_exact(cluster: EtcdCluster, etcd_prefix: str) -> None:
    with anyio.fail_after(60):
        async with following(etcd_prefix, watch=cluster.endpoints, write=cluster.endpoints) as run:
            for _ in range(20):
                await run.write()

            async def move_leader_twice() -> None:
                for _ in range(2):
                    leader = await anyio.to_thread.run_sync(cluster.wait_leader)
                    await anyio.to_thread.run_sync(cluster.move_leader, (leader + 1) % 3)
                    await anyio.sleep(0.5)  # writes go on under the new leader

            removed = await run.through(move_leader_twice)
            recovery = await run.recovery(removed)
            await run.finish()
            await run.check_history(cluster.endpoints[0])
    report("leader-change", recovery)


@pytest.mark.cluster
async def test_member_removed_from_cluster_is_left_for_the_others(etcd_prefix: str) -> None:
    """The member the watch is on is removed (it shuts down); the watch fails over with nothing
    missed. A private cluster, so the member ids and leadership this test arranges are its own."""
    with EtcdCluster(3, **MEMBER_OPTIONS) as private, anyio.fail_after(60), capture_logs() as logs:
        async with following(etcd_prefix, watch=private.endpoints, write=private.endpoints) as run:
            await run.warm_up()
            connected = logged(logs, "watch.connected", etcd_prefix)
            gone = private.endpoints.index(connected[0]["endpoint"])
            others = [url for i, url in enumerate(private.endpoints) if i != gone]
            # Removing the leader would also stall the writer for an election; keep the number about
            # the watch.
            leader = await anyio.to_thread.run_sync(private.wait_leader)
            if leader == gone:
                await anyio.to_thread.run_sync(private.move_leader, (gone + 1) % 3)

            async def remove() -> None:
                await anyio.to_thread.run_sync(private.remove_member, gone)

            removed = await run.through(remove)
            recovery = await run.recovery(removed)
            await run.finish()
            await run.check_history(others[0])
    resumed = logged(logs, "watch.resumed", etcd_prefix)
    assert resumed and resumed[-1]["endpoint"] in others
    report("member-removed", recovery)


@pytest.mark.cluster
async def test_member_without_leader_fails_the_stream_and_watch_moves_on(
    cluster: EtcdCluster, etcd_prefix: str
) -> None:
    """The watcher reaches every member through a proxy and starts on member 0. Members 1 and 2
    die, so member 0 loses its leader: with require-leader it must end the stream (not keep serving
    a history that can no longer grow) and refuse new ones; once the others are back the watch
    continues with nothing missed."""
    with contextlib.ExitStack() as stack, anyio.fail_after(90), capture_logs() as logs:
        proxies = [stack.enter_context(FaultProxy.to(url)) for url in cluster.endpoints]
        for proxy in proxies[1:]:
            proxy.refuse(True)  # so the watch starts on member 0
        async with following(
            etcd_prefix, watch=[p.endpoint for p in proxies], write=cluster.endpoints
        ) as run:
            for proxy in proxies[1:]:
                proxy.refuse(False)
            await run.warm_up()
            connected = logged(logs, "watch.connected", etcd_prefix)
            assert connected and connected[0]["endpoint"] == proxies[0].endpoint
            lost: dict[str, Any] = {}
            resumed_without_leader: list[dict[str, Any]] = []

            async def isolate_member_0() -> None:
                cluster.kill(1)
                cluster.kill(2)
                lost.update(await wait_logged(logs, "watch.disconnected", etcd_prefix, timeout=15))
                await anyio.sleep(1)  # the watch keeps trying member 0, which must keep refusing
                resumed_without_leader.extend(logged(logs, "watch.resumed", etcd_prefix))
                await anyio.to_thread.run_sync(cluster.restart, 1)
                await anyio.to_thread.run_sync(cluster.restart, 2)

            removed = await run.through(isolate_member_0)
            recovery = await run.recovery(removed)
            await run.finish()
            await run.check_history(cluster.endpoints[0])
    assert lost["endpoint"] == proxies[0].endpoint
    assert "no leader" in lost["cause"]
    assert resumed_without_leader == []
    report("minority-partition", recovery)


# -- authentication -------------------------------------------------------------------------------
