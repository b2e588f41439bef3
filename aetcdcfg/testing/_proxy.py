"""FaultProxy: a real TCP proxy on loopback that can reset, black-hole, delay and refuse connections.

It runs its own asyncio loop in a daemon thread and is driven by plain synchronous methods, so a test
on any event loop (or a synchronous benchmark) can break the network between a client and etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar

__all__ = ["FaultProxy"]

T = TypeVar("T")
_EOF = b""


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Connection:
    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.tasks: list[asyncio.Task[None]] = []

    def reset(self) -> None:
        _rst(self.client)
        _rst(self.upstream)
        for task in self.tasks:
            task.cancel()


class FaultProxy:
    """Forwards ``127.0.0.1:<port>`` to ``upstream``; break it with reset/blackhole/set_delay/refuse."""

    def __init__(self, upstream_host: str, upstream_port: int, *, scheme: str = "http") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.scheme = scheme
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_Connection] = set()
        self._delay = 0.0
        self._refuse = False
        self._blackhole = False
        self._drop_on_heal = False
        self._healed: asyncio.Event | None = None
        self.accepted = 0

    @classmethod
    def to(cls, endpoint: str) -> FaultProxy:
        """A proxy in front of an etcd endpoint URL such as ``http://127.0.0.1:2379``."""
        scheme, rest = endpoint.split("://", 1)
        host, port = rest.rsplit(":", 1)
        return cls(host, int(port), scheme=scheme)

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- control (any thread) ----------------------------------------------------------------------

    def start(self) -> FaultProxy:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._main, args=(ready,), name="FaultProxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("FaultProxy did not start")
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._run(self._shutdown())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._loop = self._thread = None

    def reset(self) -> None:
        """RST every open connection, both sides; new connections work as before."""
        self._run_sync(self._reset_all)

    def blackhole(self, on: bool = True, *, drop: bool = False) -> None:
        """While on, hold every byte (no RST, no FIN). Off: deliver what was held, like TCP after a
        partition heals; with ``drop=True`` the held connections are reset instead."""
        self._run_sync(lambda: self._set_blackhole(on, drop))

    def set_delay(self, seconds: float) -> None:
        """Add one-way latency to every chunk in both directions (order kept)."""
        self._delay = seconds

    def refuse(self, on: bool = True) -> None:
        """Reset new connections at once, like a member that is down."""
        self._refuse = on

    def retarget(self, host: str, port: int) -> None:
        """Send new connections to another upstream."""
        self.upstream = (host, port)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def _run_sync(self, fn: Callable[[], T]) -> T:
        async def call() -> T:
            return fn()

        return self._run(call())

    # -- the proxy loop ------------------------------------------------------------------------------

    def _main(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._healed = asyncio.Event()
        self._healed.set()
        self._server = loop.run_until_complete(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port = int(self._server.sockets[0].getsockname()[1])
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        self._reset_all()
        if self._server is not None:
            await self._server.wait_closed()

    def _reset_all(self) -> None:
        for conn in list(self._connections):
            conn.reset()
        self._connections.clear()

    def _set_blackhole(self, on: bool, drop: bool) -> None:
        assert self._healed is not None
        if on:
            self._blackhole = True
            self._drop_on_heal = drop
            self._healed.clear()
            return
        self._blackhole = False
        if self._drop_on_heal:
            self._reset_all()
        self._healed.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._refuse:
            _rst(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            _rst(writer)
            return
        conn = _Connection(writer, up_writer)
        self._connections.add(conn)
        conn.tasks = [
            asyncio.create_task(self._pump(reader, up_writer, conn)),
            asyncio.create_task(self._pump(up_reader, writer, conn)),
        ]

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Connection
    ) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read() -> None:
            try:
                while True:
                    data = await reader.read(65536)
                    queue.put_nowait((time.monotonic(), data))
                    if not data:
                        return
            except (OSError, asyncio.IncompleteReadError):
                queue.put_nowait((time.monotonic(), _EOF))

        reading = asyncio.create_task(read())
        assert self._healed is not None
        try:
            while True:
                received_at, data = await queue.get()
                while self._blackhole:
                    await self._healed.wait()
                if self._delay:
                    wait = received_at + self._delay - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
        except (OSError, ConnectionError):
            conn.reset()
            self._connections.discard(conn)
        finally:
            reading.cancel()
