"""A process of the fleet benchmark: many EtcdClients that each watch one prefix, or the writer.

``python -m benchmarks.fleet_worker watch ENDPOINT PREFIX OUT`` runs clients in this process, driven
by commands on stdin, answering each with one JSON line on stdout:

- ``open K``: open K more clients (each its own ``EtcdClient`` and one ``client.watch(PREFIX)``);
  answers ``{"open": total}`` once every new watch has entered.
- ``restored NS``: answers ``{"caught_up": true}`` once every client has an event written at or after
  ``NS`` (wall clock, ``time.time_ns()``), or ``{"caught_up": false}`` after a minute.
- ``finish LAST``: waits (at most a minute) until every client has counter LAST, closes the clients,
  writes the results to OUT as JSON and answers ``{"finished": true}``.

Each client checks its own history as it goes: every event must carry the next counter and the next
revision (the writer is the only one writing, one key per revision), the first one the
subscription's ``start_revision``. It keeps the receive latency of every event and the wall-clock
times of its reconnect log events (``watch.disconnected``, ``watch.retry``, ``watch.resumed``),
caught with a structlog processor: this process is an application, so it may configure logging.

``python -m benchmarks.fleet_worker write ENDPOINT PREFIX INTERVAL`` is the writer: it puts
``"<counter> <time_ns>"`` to one of ten keys every INTERVAL seconds until a ``stop`` line on stdin,
then answers ``{"last": counter, "put_ns": [time_ns of each counter]}``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import MutableMapping, Sequence
from typing import Any

import anyio
import structlog

from aetcdcfg import EtcdClient, EtcdError, Event

#: Log events counted as reconnect activity, and the first successful one after an outage.
RECONNECT_EVENTS = ("watch.disconnected", "watch.retry", "watch.resumed")
#: Client settings: etcd's (and its proxy's) default --grpc-keepalive-min-time is 5 s.
CLIENT_SETTINGS: dict[str, Any] = {"keepalive_time": 5.0, "keepalive_timeout": 2.0}
DEADLINE = 60.0
OPEN_ATTEMPTS = 10
OPEN_BATCH = 5


def say(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


class Client:
    """What one client received, checked on arrival."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.start_revision = 0
        self.first = 0  # first counter received
        self.last = 0  # last counter received
        self.last_revision = 0
        self.last_put_ns = 0
        self.latency_us: list[int] = []
        self.errors: list[str] = []
        self.open_failures = 0
        self.last_cause = ""  # of the last watch.retry
        self.jumps: list[tuple[int, int]] = []  # (revision delivered, next revision received) off by != 1
        self.logs: list[tuple[str, int, int]] = []  # (event name, time_ns, revision delivered)
        self.resyncs = 0

    def take(self, value: bytes, revision: int, received_ns: int) -> None:
        counter_text, put_text = value.split()
        counter, put_ns = int(counter_text), int(put_text)
        if not self.first:
            self.first = counter
            if revision != self.start_revision:
                self.error(f"first revision {revision}, subscription started at {self.start_revision}")
        elif counter != self.last + 1 or revision != self.last_revision + 1:
            self.jumps.append((self.last_revision, revision))
            self.error(
                f"counter {self.last} -> {counter}, revision {self.last_revision} -> {revision} "
                f"(received {received_ns}, {len(self.latency_us)} events in)"
            )
        self.last, self.last_revision, self.last_put_ns = counter, revision, put_ns
        self.latency_us.append((received_ns - put_ns) // 1000)

    def resynced(self, batch: Sequence[Event]) -> None:
        """A resync batch (after compaction, or a long backlog behind etcd's gRPC proxy): the keys'
        latest values at one revision; the history goes on from the newest counter among them."""
        counters = [int(event.value.split()[0]) for event in batch if event.value]
        if counters:
            self.last = max(self.last, *counters)
        self.last_revision = batch[-1].revision
        self.resyncs += 1

    def error(self, text: str) -> None:
        if len(self.errors) < 5:
            self.errors.append(text)

    def result(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "start_revision": self.start_revision,
            "first": self.first,
            "last": self.last,
            "latency_us": self.latency_us,
            "errors": self.errors,
            "jumps": self.jumps,
            "open_failures": self.open_failures,
            "last_cause": self.last_cause,
            "logs": self.logs,
            "resyncs": self.resyncs,
        }


class Fleet:
    def __init__(self, endpoint: str, prefix: str) -> None:
        self.endpoint = endpoint
        self.prefix = prefix
        self.clients: list[Client] = []

    def capture(self, _logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> Any:
        """structlog processor: note reconnect events per client (bound by contextvar), drop all."""
        name = event_dict.get("event")
        index = event_dict.get("fleet_client")
        if name in RECONNECT_EVENTS and index is not None:
            client = self.clients[index]
            client.logs.append((name, time.time_ns(), event_dict.get("revision") or 0))
            if name == "watch.retry":
                client.last_cause = str(event_dict.get("cause"))
        elif name in ("watch.failed", "watch.crashed", "watch.subscriber_lagged") and index is not None:
            self.clients[index].error(f"{name}: {event_dict}")
        raise structlog.DropEvent

    async def run_client(self, client: Client, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Open a client and its watch, then take events until cancelled.

        Opening is retried: with 200 clients connecting at once on 2 busy cores, gRPC's connection
        attempt deadline (which the library's 100 ms ``grpc.min_reconnect_backoff_ms`` also sets)
        can pass before the HTTP/2 handshake completes. ``open_failures`` counts those.
        """
        structlog.contextvars.bind_contextvars(fleet_client=client.index)
        for attempt in range(OPEN_ATTEMPTS):
            try:
                async with (
                    EtcdClient(endpoints=[self.endpoint], **CLIENT_SETTINGS) as etcd,
                    etcd.watch(self.prefix, buffer_size=8192) as sub,
                ):
                    client.start_revision = sub.start_revision
                    task_status.started()
                    async for batch in sub.batches():
                        now = time.time_ns()
                        if batch[0].resync:  # a re-list: the net change, documented, not each write
                            client.resynced(batch)
                            continue
                        for event in batch:
                            client.take(event.value, event.revision, now)
                return
            except EtcdError as exc:
                if not client.start_revision:
                    client.open_failures += 1
                if client.start_revision or attempt == OPEN_ATTEMPTS - 1:  # the watch gave up
                    client.error(f"{type(exc).__name__}: {exc}")
                    print(f"client {client.index}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                    if not client.start_revision:  # never opened: a failed client, not a failed run
                        task_status.started()
                    return
                await anyio.sleep(0.5)

    async def wait_all(self, done: Any) -> bool:
        with anyio.move_on_after(DEADLINE):
            while not all(done(c) for c in self.clients):
                await anyio.sleep(0.02)
            return True
        return False

    async def main(self, out: str) -> None:
        async with anyio.create_task_group() as tg:
            say({"ready": True})
            while True:
                line = await anyio.to_thread.run_sync(sys.stdin.readline)
                command, _, arg = line.strip().partition(" ")
                if command == "open":
                    # A few at a time: 200 handshakes at once through a Python FaultProxy on 2 busy
                    # cores miss gRPC's connect deadline (see run_client).
                    wanted = len(self.clients) + int(arg)
                    while len(self.clients) < wanted:
                        async with anyio.create_task_group() as opening:
                            for _ in range(min(OPEN_BATCH, wanted - len(self.clients))):
                                client = Client(len(self.clients))
                                self.clients.append(client)
                                opening.start_soon(tg.start, self.run_client, client)
                    say({"open": len(self.clients)})
                elif command == "restored":
                    since = int(arg)

                    async def report(since: int = since) -> None:
                        ok = await self.wait_all(lambda c: c.last_put_ns >= since)
                        say({"caught_up": ok})

                    tg.start_soon(report)
                elif command == "finish" or not line:
                    last = int(arg or 0)
                    complete = await self.wait_all(lambda c, last=last: c.last >= last)
                    tg.cancel_scope.cancel()
                    break
        results = {"complete": complete, "clients": [c.result() for c in self.clients]}
        await anyio.Path(out).write_text(json.dumps(results))
        say({"finished": True})


async def write(endpoint: str, prefix: str, interval: float) -> None:
    stop = anyio.Event()
    counter = 0
    put_ns: list[int] = []

    async def wait_for_stop() -> None:
        await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        stop.set()

    async with anyio.create_task_group() as tg, EtcdClient(endpoints=[endpoint]) as client:
        tg.start_soon(wait_for_stop)
        say({"ready": True})
        next_at = time.monotonic()
        while not stop.is_set():
            counter += 1
            put_ns.append(time.time_ns())
            await client.put(f"{prefix}k{counter % 10}", f"{counter} {put_ns[-1]}")
            next_at = max(next_at + interval, time.monotonic())  # late: no burst to catch up
            await anyio.sleep(max(0.0, next_at - time.monotonic()))
        say({"last": counter, "put_ns": put_ns})


def main(argv: list[str]) -> None:
    mode, endpoint, prefix, arg = argv
    if mode == "write":  # stdout carries the answers: warnings and up go to stderr
        structlog.configure(
            logger_factory=structlog.PrintLoggerFactory(sys.stderr),
            wrapper_class=structlog.make_filtering_bound_logger(30),
        )
        anyio.run(write, endpoint, prefix, float(arg))
        return
    fleet = Fleet(endpoint, prefix)
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, fleet.capture],
        wrapper_class=structlog.make_filtering_bound_logger(0),
    )
    anyio.run(fleet.main, arg)


if __name__ == "__main__":
    main(sys.argv[1:])
