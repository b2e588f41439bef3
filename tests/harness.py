"""The harness the fault tests share: a watcher client with a subscription and a LiveSettings on one
prefix, a writer that writes through faults, and checks against etcd's own history.

Every LiveSettings object ever applied holds two ints written together in one transaction, so a
torn object would show ``a != b``. Recovery is measured from a fault's removal until the
subscriber has the first write made after it, and printed as ``RECOVERY <fault> <seconds>``; for
an endpoint that was down, the removal is the moment its port accepts connections again
(:func:`start_until_accepting`), not the later moment etcd reports itself healthy.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from aetcd.rpc import rpc_pb2
from pydantic_settings import BaseSettings

from aetcdcfg import EtcdClient, EtcdError, Event, EventType, LiveSettings, Subscription
from aetcdcfg._fanout import _Subscriber
from aetcdcfg._resume import Step, StepKind, WatchState
from aetcdcfg.testing import EtcdMember, TLSFiles, as_records, etcd_history

#: What a private etcd (one a test freezes, kills or wipes) runs with, like the shared ones.
MEMBER_OPTIONS: dict[str, Any] = {"keepalive_min_time": 1, "progress_notify_interval": 1}
#: The watcher probes a silent stream after 1 s and gives up on it 1 s later.
WATCHER_OPTIONS: dict[str, Any] = {"keepalive_time": 1, "keepalive_timeout": 1, "request_timeout": 3}
#: The longest a recovery may take: the watch's backoff is capped at 2 s (+30 % jitter), the
#: keepalive window is 2 s, and the endpoint pool waits up to connect_timeout (5 s) for a channel
#: that is still connecting to a member that just came back. Measured values are far lower.
RECOVERY_BOUND = 10.0


class Pair(BaseSettings):
    """Written together in one transaction: a LiveSettings object with ``a != b`` is torn."""

    a: int = 0
    b: int = 0


class StrictPair(BaseSettings):
    """The same keys with no defaults: a prefix without them is invalid."""

    a: int
    b: int


@dataclass
class Run:
    """A watcher client with a subscription and a LiveSettings on one prefix, and a writer client."""

    prefix: str
    writer: EtcdClient
    watcher: EtcdClient
    sub: Subscription
    live: LiveSettings[Pair]
    applied: list[Pair]
    batches: AsyncGenerator[Sequence[Event], None]
    events: list[Event] = field(default_factory=list)
    writes: int = 0
    last: int = 0

    @property
    def start(self) -> int:
        return self.sub.start_revision

    async def write(self, *, pair: bool = False) -> int:
        """One change — a two-key txn for the LiveSettings, a put, or a delete — retried through the
        fault (etcd's history is the reference, so a write that was applied twice is fine).
        Returns etcd's revision after it."""
        self.writes += 1
        n = self.writes
        while True:
            try:
                if pair or n % 3 == 0:
                    return await self.writer.put_many(
                        {self.prefix + "live/a": str(n), self.prefix + "live/b": str(n)}
                    )
                if n % 3 == 1:
                    return await self.writer.put(f"{self.prefix}k{n % 4}", str(n))
                return await self.writer.delete(f"{self.prefix}k{n % 4}")
            except EtcdError:
                await anyio.sleep(0.05)

    async def warm_up(self, writes: int = 20) -> None:
        """Some history, then a pair the subscriber has received: the watch is live and delivering."""
        for _ in range(writes):
            await self.write()
        await self.received(await self.write(pair=True))

    async def keep_writing(self) -> None:
        while True:
            await self.write()
            await anyio.sleep(0.02)

    async def until(self, done: Callable[[Event], bool]) -> None:
        """Take whole revisions from the subscription until an event satisfies ``done``."""
        while True:
            batch = await anext(self.batches)
            self.events.extend(batch)
            if any(done(event) for event in batch):
                return

    async def received(self, revision: int) -> None:
        """Take events until the subscriber has everything up to ``revision``."""
        if self.events and self.events[-1].revision >= revision:
            return
        await self.until(lambda event: event.revision >= revision)

    async def through(self, fault: Callable[[], Awaitable[None]]) -> float:
        """Await ``fault`` (it injects, holds and removes the fault) while writes go on; returns the
        moment it was removed."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.keep_writing)
            await fault()
            removed = time.monotonic()
            tg.cancel_scope.cancel()
        return removed

    async def recovery(self, removed: float) -> float:
        """Seconds from ``removed`` until the subscriber has a write made now."""
        with anyio.fail_after(RECOVERY_BOUND):
            marker = await self.write(pair=True)
            await self.received(marker)
        return time.monotonic() - removed

    async def finish(self) -> None:
        """A last two-key write: the subscriber and the LiveSettings must both get it."""
        self.last = await self.write(pair=True)
        final = self.writes
        with anyio.fail_after(RECOVERY_BOUND):
            await self.received(self.last)
            await self.live.wait_for(lambda s: s.a == final)
        assert [(s.a, s.b) for s in self.applied if s.a != s.b] == []  # never torn
        assert (self.live.current.a, self.live.current.b) == (final, final)

    async def check_history(self, endpoint: str, *, tls: TLSFiles | None = None) -> None:
        assert self.last, "finish() first"
        expected = await etcd_history(endpoint, self.prefix, self.start, self.last, tls=tls)
        assert as_records(self.events) == expected

    def state(self) -> dict[str, bytes]:
        """The prefix as the subscriber knows it: the snapshot at entry plus every event since."""
        assert self.sub.snapshot is not None
        state = dict(self.sub.snapshot.items)
        apply_events(state, self.events)
        return state


def apply_events(state: dict[str, bytes], events: Iterable[Event]) -> None:
    """Bring ``state`` (key -> value) forward by ``events``, as a subscriber would."""
    for event in events:
        if event.type is EventType.PUT:
            state[event.key] = event.value
        else:
            state.pop(event.key, None)


@contextlib.asynccontextmanager
async def following(
    prefix: str, *, watch: list[str], write: list[str], canary: bool = True, **credentials: Any
) -> AsyncIterator[Run]:
    """A writer, a subscriber of ``prefix`` and a LiveSettings of ``prefix``live/ (with its canary
    layer's watch unless ``canary=False``), the watches through ``watch``."""
    applied: list[Pair] = []
    async with (
        EtcdClient(endpoints=write, request_timeout=2, **credentials) as writer,
        EtcdClient(endpoints=watch, **WATCHER_OPTIONS, **credentials) as watcher,
        # big enough for every event of a test, so the subscriber can be read only at checkpoints
        watcher.watch(prefix, buffer_size=100_000, with_snapshot=True) as sub,
        LiveSettings(
            Pair, prefix=prefix + "live/", client=watcher, on_change=applied.append, canary=canary
        ) as live,
    ):
        batches = sub.batches()
        assert isinstance(batches, AsyncGenerator)  # closed when the run ends
        try:
            yield Run(prefix, writer, watcher, sub, live, applied, batches)
        finally:
            await batches.aclose()


def tls_options(tls: TLSFiles | None) -> dict[str, Any]:
    """Client settings for mTLS with ``tls``'s CA and client certificate (none for plain TCP)."""
    if tls is None:
        return {}
    return {"ca_file": tls.ca_file, "cert_file": tls.client_cert, "key_file": tls.client_key}


async def start_until_accepting(server: EtcdMember, timeout: float = 30.0) -> None:
    """Start ``server`` and return as soon as its client port accepts a TCP connection: the moment
    an endpoint is back, from which a recovery is measured (etcd is healthy only some time later)."""

    def wait() -> None:
        server.start(wait=False)
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", server.client_port), timeout=0.05).close()
                return
            except OSError:
                if time.monotonic() > deadline or not server.running:
                    raise
            time.sleep(0.002)

    await anyio.to_thread.run_sync(wait)


def report(fault: str, seconds: float) -> None:
    print(f"\nRECOVERY {fault} {seconds:.3f}")


def logged(logs: list[dict[str, Any]], event: str, prefix: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == event and entry.get("prefix") == prefix]


def learned_not_etcd(logs: list[dict[str, Any]], endpoint: str) -> bool:
    """A watch found that ``endpoint`` answers no progress request (etcd's gRPC proxy). Logged once
    per endpoint of a client, by whichever of its watches (prefixes) learned it first; every watch
    on it is verified by reads from then on."""
    return any(e["event"] == "watch.progress_unanswered" and e.get("endpoint") == endpoint for e in logs)


async def wait_logged(logs: list[dict[str, Any]], event: str, prefix: str, timeout: float) -> dict[str, Any]:
    with anyio.fail_after(timeout):
        while not logged(logs, event, prefix):
            await anyio.sleep(0.02)
    return logged(logs, event, prefix)[0]


async def stall_detected(logs: list[dict[str, Any]], prefix: str, *, hold: float) -> float:
    """Hold a fault for ``hold`` seconds; returns how long the watch took to log that it lost the
    stream (failing if it did not within the hold, i.e. before the fault was removed)."""
    began = anyio.current_time()
    try:
        await wait_logged(logs, "watch.disconnected", prefix, timeout=hold)
    except TimeoutError:
        pytest.fail(f"the watch did not notice the fault within {hold}s")
    detected = anyio.current_time() - began
    await anyio.sleep(max(hold - detected, 0))
    return detected


#: A process with one reporting LiveSettings (argv: endpoint, prefix, instance id); prints "up".
INSTANCE_SCRIPT = """
import anyio, sys
from pydantic_settings import BaseSettings
from aetcdcfg import EtcdClient, LiveSettings

class S(BaseSettings):
    rate_limit: int = 1

async def main():
    async with EtcdClient(endpoints=[sys.argv[1]]) as client:
        async with LiveSettings(S, prefix=sys.argv[2], client=client, instance=sys.argv[3], report_ttl=3):
            print("up", flush=True)
            await anyio.sleep_forever()

anyio.run(main)
"""


@dataclass
class Dropping:
    """Revisions lost on the way to this process's watch streams of a prefix, as etcd's gRPC proxy
    loses revisions of a watcher it merges into a shared one (etcd issue 9988): the response arrives
    without those events (without any event at all, it still proves the stream alive)."""

    prefix: bytes
    revisions: set[int] = field(default_factory=set)
    #: Every revision from this one on (None: only ``revisions``).
    from_revision: int | None = None
    #: A response with a dropped revision does not arrive at all (still on its way), rather than
    #: arriving without those events.
    held: bool = False

    def drops(self, revision: int) -> bool:
        return revision in self.revisions or (
            self.from_revision is not None and revision >= self.from_revision
        )

    def clear(self) -> None:
        self.revisions.clear()
        self.from_revision = None


def subscriber_of(sub: Subscription | None) -> _Subscriber:
    """The shared watch's side of ``sub``, still handed revisions: to lag it as a full buffer would."""
    assert sub is not None
    handle = sub._handle
    assert handle is not None and handle in sub._hub.subscribers
    return handle


def drop_revisions(monkeypatch: pytest.MonkeyPatch, prefix: str) -> Dropping:
    """Lose the revisions the returned ``Dropping`` names on every watch stream of ``prefix`` (and of
    prefixes under it) in this process: ``WatchState.on_response``, where each response arrives, is
    patched for the test."""
    drops = Dropping(prefix.encode())
    original = WatchState.on_response

    def on_response(state: WatchState, response: Any) -> Step:
        if response.events and state.prefix.startswith(drops.prefix):
            kept = [event for event in response.events if not drops.drops(event.kv.mod_revision)]
            if len(kept) != len(response.events) and drops.held:
                return Step(StepKind.NOTHING)
            if len(kept) != len(response.events):
                thinned = rpc_pb2.WatchResponse()
                thinned.CopyFrom(response)
                del thinned.events[:]
                thinned.events.extend(kept)
                response = thinned
        return original(state, response)

    monkeypatch.setattr(WatchState, "on_response", on_response)
    return drops
