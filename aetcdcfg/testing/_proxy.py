"""FaultProxy: a real TCP proxy on loopback that can reset, black-hole, delay and refuse connections.

It runs its own event loop (anyio on asyncio) in a daemon thread and is driven by plain synchronous,
thread-safe methods, so a test on any event loop (or a synchronous benchmark) can break the network
between a client and etcd. It forwards bytes only; TLS passes through untouched.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from types import TracebackType

import anyio
from anyio.abc import SocketAttribute, SocketStream, TaskGroup
from anyio.from_thread import BlockingPortal
from anyio.streams.memory import MemoryObjectSendStream

__all__ = ["FaultProxy"]

_CHUNK = 65536
#: Chunks held per direction while delayed or black-holed; beyond that the proxy stops reading and
#: TCP flow control pushes back on the sender, so memory stays bounded.
_HELD_CHUNKS = 256
_BROKEN = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


def _rst_on_close(stream: SocketStream) -> None:
    """Make closing ``stream`` send a TCP RST instead of a FIN (SO_LINGER on, timeout 0)."""
    with contextlib.suppress(OSError):
        sock = stream.extra(SocketAttribute.raw_socket)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _Link:
    """One proxied connection: the accepted client side, the upstream side once connected, and the
    cancel scope that ends both."""

    def __init__(self, client: SocketStream) -> None:
        self.client = client
        self.upstream: SocketStream | None = None
        self.scope = anyio.CancelScope()
        self.rst = False

    async def close(self) -> None:
        """Close both sides: with RST if the link was reset or broke, else gracefully."""
        for stream in (self.client, self.upstream):
            if stream is not None:
                if self.rst:
                    _rst_on_close(stream)
                await stream.aclose()

    async def reset(self) -> None:
        """RST both sides now, and end the link's tasks."""
        self.rst = True
        self.scope.cancel()
        with anyio.CancelScope(shield=True):
            await self.close()


class FaultProxy:
    """Forwards ``127.0.0.1:<port>`` to ``upstream``; break it with reset, blackhole, set_delay, refuse.

    ``with FaultProxy.to(server.endpoint) as proxy:`` then point the client at ``proxy.endpoint``.
    """

    def __init__(self, upstream_host: str, upstream_port: int, *, scheme: str = "http") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.scheme = scheme
        #: The port clients connect to (0 until started).
        self.port = 0
        #: Connections accepted since start, including refused ones.
        self.accepted = 0
        self._delay = 0.0
        self._refusing = False
        self._blackholed = False
        self._drop_on_heal = False
        self._stopping = False
        self._healed: anyio.Event | None = None
        self._links: set[_Link] = set()
        self._portal: BlockingPortal | None = None
        self._task_group: TaskGroup | None = None
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._lock = threading.Lock()

    @classmethod
    def to(cls, endpoint: str) -> FaultProxy:
        """A proxy in front of an etcd endpoint URL such as ``http://127.0.0.1:2379``."""
        scheme, rest = endpoint.split("://", 1)
        host, port = rest.rstrip("/").rsplit(":", 1)
        return cls(host, int(port), scheme=scheme)

    def __repr__(self) -> str:
        return f"<FaultProxy {self.endpoint} -> {self.upstream[0]}:{self.upstream[1]}>"

    @property
    def endpoint(self) -> str:
        """What clients use instead of the upstream's URL: ``http(s)://127.0.0.1:<port>``."""
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def connection_count(self) -> int:
        """Client connections open through the proxy now."""
        return len(self._links)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- control (from any thread) -----------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Bind a free loopback port and start forwarding; returns once clients can connect."""
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("FaultProxy is already running")
            started: concurrent.futures.Future[None] = concurrent.futures.Future()
            thread = threading.Thread(
                target=self._thread_main, args=(started,), name=f"FaultProxy-{self.upstream[1]}", daemon=True
            )
            self._stopping, self._failure = False, None
            thread.start()
            try:
                started.result(10)
            except BaseException:
                thread.join(10)
                raise
            self._thread = thread
        return self

    def stop(self) -> None:
        """Reset every connection, close the port and end the proxy's thread (idempotent)."""
        with self._lock:
            thread, portal = self._thread, self._portal
            self._thread = None
            if thread is None:
                return
            if portal is not None:
                with contextlib.suppress(RuntimeError):  # the loop already ended
                    portal.call(self._shutdown)
            thread.join(10)
            if thread.is_alive():
                raise RuntimeError("FaultProxy's thread did not stop within 10 s")
        if self._failure is not None:
            raise RuntimeError("FaultProxy failed while running") from self._failure

    def reset(self) -> None:
        """RST every open connection on both sides; new connections work as before.

        Returns once the resets have been sent.
        """
        self._call(self._reset_all)

    def blackhole(self, on: bool = True, *, drop: bool = False) -> None:
        """While on, hold every byte in both directions: no RST, no FIN, connections stay open, and
        new ones are accepted but get nothing either. Off ("heal"): deliver what was held and go on,
        as TCP does once a partition heals. With ``drop=True`` (when turning it on, or off) healing
        resets the held connections instead."""
        self._call(self._set_blackhole, on, drop)

    def blackhole_drop(self) -> None:
        """``blackhole(True, drop=True)``: a partition after which the held connections are gone."""
        self.blackhole(True, drop=True)

    def set_delay(self, seconds: float) -> None:
        """Add ``seconds`` of one-way latency to every chunk in both directions (order kept); 0 ends it."""
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        self._delay = float(seconds)

    def refuse(self, on: bool = True) -> None:
        """While on, new connections are closed at once with RST, as if the upstream were down.

        Open connections are untouched; call :meth:`reset` too to drop them.
        """
        self._refusing = on

    def retarget(self, host: str, port: int) -> None:
        """Send new connections to another upstream; open ones stay where they are."""
        self.upstream = (host, port)

    def _call(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        portal = self._portal
        if portal is None:
            raise RuntimeError("FaultProxy is not running; call start() or use it as a context manager")
        portal.call(fn, *args)

    # -- the proxy's event loop ------------------------------------------------------------------------

    def _thread_main(self, started: concurrent.futures.Future[None]) -> None:
        try:
            anyio.run(self._main, started, backend="asyncio")
        except BaseException as exc:  # reported by start() or stop(), not as an unhandled thread error
            if started.done():
                self._failure = exc
            else:
                started.set_exception(exc)
        finally:
            self._portal = None

    async def _main(self, started: concurrent.futures.Future[None]) -> None:
        async with BlockingPortal() as portal:
            listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
            async with listener, anyio.create_task_group() as task_group:
                self.port = int(listener.extra(SocketAttribute.local_port))
                self._healed = anyio.Event()
                self._healed.set()
                self._task_group = task_group
                self._portal = portal
                started.set_result(None)
                await listener.serve(self._serve, task_group=task_group)

    async def _shutdown(self) -> None:
        self._stopping = True
        await self._reset_all()
        assert self._task_group is not None
        self._task_group.cancel_scope.cancel()

    async def _reset_all(self) -> None:
        for link in list(self._links):
            self._links.discard(link)
            await link.reset()

    async def _set_blackhole(self, on: bool, drop: bool) -> None:
        assert self._healed is not None
        if on:
            if not self._blackholed:
                self._healed = anyio.Event()
                self._blackholed = True
            self._drop_on_heal = self._drop_on_heal or drop
            return
        if not self._blackholed:
            return
        if self._drop_on_heal or drop:
            await self._reset_all()
        self._blackholed = self._drop_on_heal = False
        self._healed.set()

    async def _until_healed(self) -> None:
        while self._blackholed:
            assert self._healed is not None
            await self._healed.wait()

    async def _serve(self, client: SocketStream) -> None:
        self.accepted += 1
        link = _Link(client)
        self._links.add(link)
        try:
            with link.scope:
                if self._refusing:
                    link.rst = True
                    return
                await self._until_healed()  # a partition: the upstream does not even see the connection
                try:
                    link.upstream = await anyio.connect_tcp(*self.upstream)
                except OSError:
                    link.rst = True
                    return
                async with anyio.create_task_group() as pipes:
                    pipes.start_soon(self._pipe, link, client, link.upstream)
                    pipes.start_soon(self._pipe, link, link.upstream, client)
        finally:
            self._links.discard(link)
            link.rst = link.rst or self._stopping
            with anyio.CancelScope(shield=True):
                await link.close()

    async def _pipe(self, link: _Link, source: SocketStream, sink: SocketStream) -> None:
        """Forward one direction, chunk by chunk, honouring the black hole and the delay."""
        send, receive = anyio.create_memory_object_stream[tuple[float, bytes]](_HELD_CHUNKS)
        async with anyio.create_task_group() as reading:
            reading.start_soon(self._read, link, source, send)
            async with receive:
                async for received_at, data in receive:
                    await self._until_healed()
                    wait = received_at + self._delay - time.monotonic()
                    if wait > 0:
                        await anyio.sleep(wait)
                    try:
                        await sink.send(data)
                    except _BROKEN:
                        link.rst = True
                        link.scope.cancel()
                        return
        if not link.rst:  # the source sent FIN and everything before it is delivered: pass it on
            with contextlib.suppress(*_BROKEN):
                await sink.send_eof()

    async def _read(
        self, link: _Link, source: SocketStream, send: MemoryObjectSendStream[tuple[float, bytes]]
    ) -> None:
        async with send:
            while True:
                try:
                    data = await source.receive(_CHUNK)
                except anyio.EndOfStream:
                    return
                except _BROKEN:  # the peer reset: pass the RST on to the other side
                    link.rst = True
                    link.scope.cancel()
                    return
                await send.send((time.monotonic(), data))
