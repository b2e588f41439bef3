"""EtcdGrpcProxy: a real ``etcd grpc-proxy`` in front of etcd members, for tests of the proxy's behaviour.

The proxy coalesces watches, caches serializable reads and keeps its own gRPC server (keepalive
policy, message limits), so a client that works against etcd can still misbehave through it. The same
etcd binary runs it, with the same lifecycle as :class:`EtcdMember`: free loopback ports fixed for the
object's lifetime (``restart()`` comes back on the same URL), a temp dir for its log and data dir, and
no proxy outliving the interpreter (``_binary.spawn``: atexit hook plus PR_SET_PDEATHSIG).

etcd 3.4's proxy has no ``/proxy/health`` and ``/proxy/metrics``: there :meth:`EtcdGrpcProxy.health`
reads its ``/health`` (a Get through the proxy's own client, not through its listen port) and
:meth:`EtcdGrpcProxy.metrics` its ``/metrics``. Nor has it ``--grpc-keepalive-min-time`` (etcd added
it in 3.5, PR 11711): there the flag is left out, and that proxy enforces grpc-go's default instead,
5 minutes between client pings: closer pings count as strikes, and a few strikes with no data sent
in between end the connection (GOAWAY "too_many_pings"). The proxy tests pass against it all the
same (``tests/test_grpc_proxy.py``: idle watches through it see no reconnect).
:attr:`EtcdGrpcProxy.keepalive_min_time_in_force` says which minimum applies.

Plain TCP only, on both sides. etcd 3.5's proxy insists on an *empty* CN in the client certificate it
presents to etcd (``--cert``; etcd issue 11970), which our ``TLSFiles`` client certificate does not
have, so TLS would need certificates of its own; no test needs that yet.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from . import _tempdirs
from ._binary import etcd_binary, etcd_flags, etcd_version
from ._ports import free_port
from ._process import ManagedProcess

__all__ = ["GRPC_GO_KEEPALIVE_MIN_TIME", "EtcdGrpcProxy"]

#: grpc-go's own minimum between client pings, in seconds: what a proxy without
#: ``--grpc-keepalive-min-time`` (etcd 3.4's) enforces.
GRPC_GO_KEEPALIVE_MIN_TIME = 300.0
#: The flag etcd 3.4's grpc-proxy does not know.
_KEEPALIVE_FLAG = "--grpc-keepalive-min-time"


def _get_json_health(url: str) -> bool | None:
    """An etcd-style health endpoint: True or False as it answers, None if no answer within 5 s."""
    try:
        # /proxy/health does a Get (1 s) and a Watch (3 s) through the proxy before answering.
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read()
    except urllib.error.HTTPError as err:  # 503 {"health":"false","reason":"..."}
        with err:
            body = err.read()
    except (OSError, http.client.HTTPException):
        return None
    try:
        return bool(json.loads(body).get("health") == "true")
    except (ValueError, AttributeError):
        return False


def _host_port(endpoint: str) -> str:
    """``http://127.0.0.1:2379`` -> ``127.0.0.1:2379``; https is refused (plain TCP only)."""
    if endpoint.startswith("https://"):
        raise ValueError(f"EtcdGrpcProxy speaks plain TCP only, not TLS: {endpoint}")
    return endpoint.removeprefix("http://")


class EtcdGrpcProxy(ManagedProcess):
    """``etcd grpc-proxy start`` forwarding to ``endpoints``: ``with EtcdGrpcProxy([server.endpoint]) as p:``.

    Clients use :attr:`endpoint`. :meth:`metrics` is the proxy's *own* Prometheus text (its
    ``/proxy/metrics``: cache hits and misses, gRPC counters...), read from a separate
    ``--metrics-addr`` port; the proxy's ``/metrics`` would only relay an etcd member's. Count etcd
    watchers with the member's ``watcher_count()``: 3.5.1's ``etcd_grpc_proxy_watchers_coalescing_total``
    goes negative once coalesced watches end (it is not decremented the way it is incremented).
    The proxy logs at info level (3.5 has no ``--log-level`` for it) to ``<base_dir>/grpc-proxy.log``.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        base_dir: Path | None = None,
        listen_port: int | None = None,
        keepalive_min_time: float | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        if not endpoints:
            raise ValueError("EtcdGrpcProxy needs at least one etcd endpoint")
        self.upstreams = [_host_port(e) for e in endpoints]
        self._own_dir = base_dir is None
        self.base_dir = _tempdirs.make("aetcdcfg-grpcproxy-") if base_dir is None else base_dir
        self.base_dir.mkdir(parents=True, exist_ok=True)
        # Only --auto-tls writes here, but the default is "default.proxy" in the working directory.
        self.data_dir = self.base_dir / "grpc-proxy.data"
        self.log_file = self.base_dir / "grpc-proxy.log"
        #: ``--grpc-keepalive-min-time`` in seconds; None keeps the proxy's default (5 s, like etcd).
        #: Left out where the binary lacks the flag (etcd 3.4): see :attr:`keepalive_min_time_in_force`.
        self.keepalive_min_time = keepalive_min_time
        self.extra_args = list(extra_args)
        self.drawn_ports = []
        if listen_port is None:
            listen_port = free_port()
            self.drawn_ports.append(listen_port)
        self.port = listen_port
        self.metrics_port = free_port()
        self.drawn_ports.append(self.metrics_port)
        self.process: subprocess.Popen[bytes] | None = None
        self._paused = False

    def __repr__(self) -> str:
        state = "paused" if self.paused else "running" if self.running else "stopped"
        return f"<EtcdGrpcProxy {self.endpoint} -> {','.join(self.upstreams)} {state} pid={self.pid}>"

    def __enter__(self) -> EtcdGrpcProxy:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()

    # -- addresses and state

    @property
    def endpoint(self) -> str:
        """The URL clients use instead of etcd's, e.g. ``http://127.0.0.1:23790``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        """Plain-http ``/proxy/metrics``, ``/proxy/health``, ``/health`` and (relayed) ``/metrics``."""
        return f"http://127.0.0.1:{self.metrics_port}"

    @property
    def takes_keepalive_min_time(self) -> bool:
        """Whether this etcd's grpc-proxy has ``--grpc-keepalive-min-time`` (3.5 does, 3.4 not)."""
        return _KEEPALIVE_FLAG in etcd_flags("grpc-proxy", "start")

    @property
    def keepalive_min_time_in_force(self) -> float:
        """Seconds a client must leave between pings to this proxy, or be disconnected."""
        if not self.takes_keepalive_min_time:
            return GRPC_GO_KEEPALIVE_MIN_TIME
        return 5.0 if self.keepalive_min_time is None else self.keepalive_min_time

    def args(self) -> list[str]:
        """The ``etcd grpc-proxy start`` command line (``--grpc-keepalive-min-time`` only where the
        binary has it)."""
        args = [
            str(etcd_binary()),
            "grpc-proxy",
            "start",
            f"--endpoints={','.join(self.upstreams)}",
            f"--listen-addr=127.0.0.1:{self.port}",
            # /proxy/health checks through this address; its default (127.0.0.1:23790) is not ours.
            f"--advertise-client-url=127.0.0.1:{self.port}",
            f"--metrics-addr={self.metrics_url}",
            f"--data-dir={self.data_dir}",
        ]
        if self.keepalive_min_time is not None and self.takes_keepalive_min_time:
            args.append(f"{_KEEPALIVE_FLAG}={self.keepalive_min_time:g}s")
        return args + self.extra_args

    # -- lifecycle

    def start(self, *, wait: bool = True, timeout: float = 30.0) -> EtcdGrpcProxy:
        """Start; with ``wait`` (the default) return once a Get and a Watch through the proxy succeed.

        With etcd down the proxy can never be healthy: start it with ``wait=False`` and call
        :meth:`wait_ready`. If it does not get there in time the process is killed and the error
        carries the tail of its log.
        """
        self.spawn()
        if wait:
            try:
                self.wait_healthy(timeout)
            except BaseException:
                self.kill()
                raise
        return self

    @property
    def _paths(self) -> str:
        """Where the proxy's own ``health`` and ``metrics`` are: ``/proxy/`` from etcd 3.5 on."""
        return "/proxy/" if etcd_version() >= (3, 5, 0) else "/"

    def health(self) -> bool:
        """Whether the proxy serves end to end right now: its ``/proxy/health`` runs a Get (1 s) and
        creates a Watch (3 s) through the proxy's own listen port, so this can take seconds to say no.
        (etcd 3.4: ``/health``, a Get through the proxy's client to etcd.)"""
        return _get_json_health(f"{self.metrics_url}{self._paths}health") is True

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until ``/proxy/health`` says true: a Get and a Watch through the proxy work."""
        self._wait(self.health, "healthy", timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the listen port accepts TCP and the metrics port answers; etcd may still be down."""

        def ready() -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                if self._paths == "/":  # etcd 3.4: /metrics relays etcd's; /health answers without it
                    return _get_json_health(f"{self.metrics_url}/health") is not None
                self.metrics()
            except (OSError, http.client.HTTPException):
                return False
            return True

        self._wait(ready, "ready", timeout)

    # -- looking inside

    def metrics(self) -> str:
        """The proxy's own Prometheus text (``/proxy/metrics``), not the relayed etcd ``/metrics``
        (etcd 3.4 has only ``/metrics``)."""
        with urllib.request.urlopen(f"{self.metrics_url}{self._paths}metrics", timeout=5) as response:
            return str(response.read().decode())

    @property
    def label(self) -> str:
        return "grpc-proxy"
