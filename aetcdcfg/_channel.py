"""One grpc.aio channel per etcd endpoint, and picking a member that is reachable.

Channel options carry what aetcd's own client lacks: TLS/mTLS, keepalive that respects etcd's ping
enforcement, a large receive limit, and fast reconnect backoff so a restarted member is used again soon.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import grpc
from aetcd.rpc import rpc_pb2, rpc_pb2_grpc

from ._grpc_errors import describe
from ._log import get_logger
from .errors import ConfigurationError, EtcdUnavailable
from .settings import EtcdSettings

__all__ = ["Endpoint", "EndpointPool"]

log = get_logger()

#: Seconds a member that just failed is passed over while another one is reachable.
FAILURE_PENALTY = 10.0
#: How long a connection to such a member waits for a healthier one to connect before it is used.
PENALTY_GRACE = 0.5


def _read(setting: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(setting, f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc


def _credentials(settings: EtcdSettings) -> grpc.ChannelCredentials:
    """TLS credentials; verification against ``ca_file`` (or the system roots) is always on."""
    root = None
    if settings.ca_file is not None:
        root = _read("ca_file", settings.ca_file)
        try:
            ssl.create_default_context(cadata=root.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigurationError("ca_file", f"{str(settings.ca_file)!r} is not a PEM CA bundle") from exc
    cert = key = None
    if settings.cert_file is not None and settings.key_file is not None:
        cert = _read("cert_file", settings.cert_file)
        key = _read("key_file", settings.key_file)
        try:
            ssl.create_default_context().load_cert_chain(settings.cert_file, settings.key_file)
        except ssl.SSLError as exc:
            raise ConfigurationError(
                "key_file",
                f"{str(settings.key_file)!r} does not match cert_file {str(settings.cert_file)!r} "
                f"or is not PEM ({exc.reason or exc})",
            ) from exc
    return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=cert)


def channel_options(settings: EtcdSettings) -> list[tuple[str, Any]]:
    """gRPC channel arguments derived from the settings."""
    options: list[tuple[str, Any]] = [
        ("grpc.keepalive_time_ms", int(settings.keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout * 1000)),
        # Ping only while a call is active: etcd's default policy GOAWAYs idle pings.
        ("grpc.keepalive_permit_without_calls", 0),
        # A quiet watch stream sends no data; without this gRPC stops pinging after two pings.
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.initial_reconnect_backoff_ms", 100),
        # gRPC core takes this as the *minimum connect timeout*: the time one connection attempt
        # (TCP, TLS, HTTP/2 SETTINGS) may take. At 100 ms a handshake slower than the backoff
        # (a loaded host, a far member, a reconnect storm) never completed and was retried forever.
        ("grpc.min_reconnect_backoff_ms", int(settings.connect_timeout * 1000)),
        # How long a member that accepts connections again may go unused: gRPC retries a refused
        # connection with backoff up to this (±20 %). At 1 s, a recovery took 0.57-0.83 s from
        # the moment the endpoint accepted; at 250 ms, 0.11-0.32 s (tests/test_faults.py). A
        # refused attempt costs a SYN and an RST; a black-holed one still waits the connect timeout.
        ("grpc.max_reconnect_backoff_ms", 250),
        # We retry ourselves, knowing which etcd requests are safe to repeat.
        ("grpc.enable_retries", 0),
        # Each client gets its own connections, not ones shared process-wide with other clients.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    if settings.server_name:
        options.append(("grpc.ssl_target_name_override", settings.server_name))
    return options


@dataclass(eq=False)
class Endpoint:
    """One member URL with its channel and stubs; ``last_error`` is the latest failure seen there."""

    url: str
    channel: grpc.aio.Channel
    kv: Any = field(init=False)
    watch: Any = field(init=False)
    auth: Any = field(init=False)
    maintenance: Any = field(init=False)
    cluster: Any = field(init=False)
    lease: Any = field(init=False)
    last_error: str | None = None
    failed_at: float | None = None
    #: Whether the endpoint answers a watch progress request (etcd does, its gRPC proxy does not);
    #: ``None`` until a watch's liveness probe has found out.
    answers_progress: bool | None = None
    #: Set before the channel is closed: a call cut off by that close ends in grpc.aio's own
    #: ``CancelledError``, which the connection layer turns into ours (see ``_grpc_errors``).
    closed: bool = False

    def __post_init__(self) -> None:
        self.kv = rpc_pb2_grpc.KVStub(self.channel)
        self.watch = rpc_pb2_grpc.WatchStub(self.channel)
        self.auth = rpc_pb2_grpc.AuthStub(self.channel)
        self.maintenance = rpc_pb2_grpc.MaintenanceStub(self.channel)
        self.cluster = rpc_pb2_grpc.ClusterStub(self.channel)
        self.lease = rpc_pb2_grpc.LeaseStub(self.channel)

    def is_ready(self) -> bool:
        return bool(self.channel.get_state(try_to_connect=False) == grpc.ChannelConnectivity.READY)


class EndpointPool:
    """The client's endpoints; ``ready()`` returns a member with a live connection, failing over."""

    def __init__(self, settings: EtcdSettings) -> None:
        self._settings = settings
        options = channel_options(settings)
        creds = _credentials(settings) if settings.tls else None
        self._options = options
        self._creds = creds
        self.endpoints: list[Endpoint] = [self._open(url) for url in settings.endpoints]
        self._current: Endpoint | None = None
        self._last_used: Endpoint | None = None

    def _open(self, url: str) -> Endpoint:
        target = url.split("://", 1)[1]
        if self._creds is not None:
            channel = grpc.aio.secure_channel(target, self._creds, options=self._options)
        else:
            channel = grpc.aio.insecure_channel(target, options=self._options)
        return Endpoint(url, channel)

    async def update(self, urls: list[str]) -> None:
        """Follow the cluster's membership: add new members' URLs, drop departed ones.

        The configured endpoints stay first in the preference order; a dropped member's channel
        is closed unless it is the one in use (then it goes when it fails).
        """
        known = {ep.url: ep for ep in self.endpoints}
        wanted = list(dict.fromkeys([*self._settings.endpoints, *urls]))
        endpoints = [known.get(url) or self._open(url) for url in wanted]
        if self._current is not None and self._current not in endpoints:
            endpoints.append(self._current)
        added = [url for url in wanted if url not in known]
        removed = [ep for ep in self.endpoints if ep not in endpoints]
        if not added and not removed:
            return
        self.endpoints = endpoints
        log.info("etcd.endpoints_changed", added=added, removed=[ep.url for ep in removed])
        for ep in removed:
            ep.closed = True
            await ep.channel.close(grace=None)

    @property
    def current(self) -> Endpoint | None:
        return self._current

    def mark_failed(self, endpoint: Endpoint, cause: str) -> None:
        """Forget ``endpoint`` as the preferred member; the next ``ready()`` looks for another."""
        endpoint.last_error = cause
        endpoint.failed_at = anyio.current_time()
        if self._current is endpoint:
            self._current = None

    async def ready(self, timeout: float) -> Endpoint:
        """A member whose channel is connected, preferring the current one, then endpoint order.

        All endpoints connect in parallel, so one dead or black-holed member costs no extra time.
        Raises :class:`EtcdUnavailable` when none is ready within ``timeout`` seconds.
        """
        current = self._current
        if current is not None and current.is_ready():
            return current
        now = anyio.current_time()

        def penalized(ep: Endpoint) -> bool:
            # failed recently while its connection may still look fine (a frozen or cut-off member)
            return ep.failed_at is not None and now - ep.failed_at < FAILURE_PENALTY

        ready = [ep for ep in self.endpoints if ep.is_ready() and not penalized(ep)]
        if not ready:
            with anyio.move_on_after(max(timeout, 0.0)):
                async with anyio.create_task_group() as tg:

                    async def wait_ready(ep: Endpoint) -> None:
                        try:
                            await ep.channel.channel_ready()
                        except grpc.aio.UsageError:
                            return  # its channel was closed meanwhile (a member dropped, the pool closing)
                        ready.append(ep)
                        if penalized(ep) and len(self.endpoints) > 1:
                            await anyio.sleep(PENALTY_GRACE)  # give a healthy member a moment
                        tg.cancel_scope.cancel()

                    for ep in self.endpoints:
                        tg.start_soon(wait_ready, ep)
        # Several may be ready by now: configured order, members that failed recently last.
        candidates = sorted(
            (ep for ep in self.endpoints if ep in ready or ep.is_ready()),
            key=penalized,
        )
        if not candidates:
            await self._probe_causes()
            raise EtcdUnavailable(
                f"no etcd endpoint reachable within {timeout:.3g}s (connect_timeout)",
                endpoints=[ep.url for ep in self.endpoints],
                cause=self._last_cause(),
            )
        chosen = candidates[0]
        previous = self._last_used
        if previous is None:
            log.info("etcd.connected", endpoint=chosen.url)
        elif chosen is not previous:
            log.warning(
                "etcd.failover", endpoint=chosen.url, previous=previous.url, cause=previous.last_error
            )
        self._last_used = self._current = chosen
        return chosen

    async def _probe_causes(self) -> None:
        """Ask each unreachable channel for its connection error, so EtcdUnavailable can name it."""

        async def probe(ep: Endpoint) -> None:
            try:
                await ep.maintenance.Status(rpc_pb2.StatusRequest(), timeout=0.2, wait_for_ready=False)
            except grpc.aio.AioRpcError as exc:
                ep.last_error = describe(exc)
            except grpc.aio.UsageError:  # closed meanwhile
                ep.last_error = "channel closed"

        with anyio.move_on_after(0.3):
            async with anyio.create_task_group() as tg:
                for ep in self.endpoints:
                    tg.start_soon(probe, ep)

    def _last_cause(self) -> str:
        causes = [f"{ep.url}: {ep.last_error}" for ep in self.endpoints if ep.last_error]
        if causes:
            return "; ".join(causes)
        states = [f"{ep.url}: {ep.channel.get_state().name}" for ep in self.endpoints]
        return "connection state " + ", ".join(states)

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            for ep in self.endpoints:
                ep.closed = True
            for ep in self.endpoints:
                await ep.channel.close(grace=None)
