"""pytest fixtures that start real etcd (registered as the ``aetcdcfg`` pytest11 plugin).

Servers are session-scoped and shared; ``etcd_prefix`` gives each test its own key prefix so tests
never see each other's keys. The function-scoped ``cluster`` fixture restarts members a test killed.
No etcd binary is an error (EtcdBinaryNotFound), never a skip: CI must always run these tests.

A run that is terminated (SIGTERM: CI cancelling a job) still cleans up: the plugin's handler kills
every etcd of the process, removes their data dirs and releases their port claims, then hands the
signal on to the handler that was there before (by default, terminating the process). Python's own
SIGTERM action would skip the ``atexit`` hook that does this.

Fixtures (scope):
    etcd_server (session)      single member, 1 s progress notifications, 1 s keepalive minimum
    etcd_prefix (function)     ``/t/<test-name>-<uuid8>/``
    etcd_cluster (session)     3 members, same options
    cluster (function)         ``etcd_cluster``, with every member running again after the test
                               (paused ones resumed, killed ones restarted, removed ones added back)
    etcd_tls_files (session)   trustme CA + server/client certificates in a temp dir
    etcd_tls_server (session)  https, client certificate required
    etcd_auth_server (session) 2 s simple tokens; root/rootpw, app/apppw (readwrite /app/),
                               reader/readerpw (read /app/)
    fault_proxy (function)     a FaultProxy in front of ``etcd_server``
    etcd_grpc_proxy (function) ``etcd grpc-proxy`` in front of ``etcd_server``, 1 s keepalive minimum
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from ._grpc_proxy import EtcdGrpcProxy
from ._process import cleanup_all
from ._proxy import FaultProxy
from ._server import EtcdCluster, EtcdServer
from ._tls import TLSFiles

__all__ = [
    "cluster",
    "etcd_auth_server",
    "etcd_cluster",
    "etcd_grpc_proxy",
    "etcd_prefix",
    "etcd_server",
    "etcd_tls_files",
    "etcd_tls_server",
    "fault_proxy",
]

#: Our pytest11 entry point's name (pyproject.toml).
_ENTRY_POINT = "aetcdcfg"
#: Fast keepalive and progress notifications, so tests can use short client keepalives.
KEEPALIVE_MIN_TIME = 1.0
PROGRESS_NOTIFY_INTERVAL = 1.0


def pytest_plugin_registered(plugin: object, plugin_name: str, manager: pytest.PytestPluginManager) -> None:
    """Load this plugin once, however it is named: ``-p aetcdcfg.testing.plugin`` or
    ``pytest_plugins = [...]`` alongside the installed entry point would otherwise register the module
    twice under two names, which pytest rejects."""
    if plugin is sys.modules[__name__]:
        for name in (_ENTRY_POINT, __name__):
            if name != plugin_name and not manager.is_blocked(name):
                manager.set_blocked(name)


#: The SIGTERM handler ours replaced (to hand the signal on to), while ours is installed.
_previous_sigterm: Any = None


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Clean up first, then do what SIGTERM did before the plugin: call that handler, or terminate."""
    cleanup_all()
    previous = _previous_sigterm
    if callable(previous):
        previous(signum, frame)
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)  # terminated by the signal, as without the plugin


def pytest_configure(config: pytest.Config) -> None:
    """Install the SIGTERM cleanup, chained to the handler in place (not over SIG_IGN, nor over a
    handler set outside Python, which could not be chained)."""
    global _previous_sigterm
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is _on_sigterm or previous in (signal.SIG_IGN, None):
        return
    _previous_sigterm = previous
    signal.signal(signal.SIGTERM, _on_sigterm)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Put the previous SIGTERM handler back (``atexit`` cleans up after a normal end)."""
    global _previous_sigterm
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) is _on_sigterm
    ):
        signal.signal(signal.SIGTERM, _previous_sigterm)
        _previous_sigterm = None


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    """One single-member etcd shared by the whole session; use ``etcd_prefix`` for your keys."""
    with EtcdServer(
        keepalive_min_time=KEEPALIVE_MIN_TIME, progress_notify_interval=PROGRESS_NOTIFY_INTERVAL
    ) as server:
        yield server


@pytest.fixture
def etcd_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix of this test's own, e.g. ``/t/test_name-1a2b3c4d/``."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:60]
    return f"/t/{name}-{uuid.uuid4().hex[:8]}/"


@pytest.fixture(scope="session")
def etcd_cluster() -> Iterator[EtcdCluster]:
    """A 3-member cluster shared by the session; tests that kill or pause members use ``cluster``."""
    with EtcdCluster(
        3, keepalive_min_time=KEEPALIVE_MIN_TIME, progress_notify_interval=PROGRESS_NOTIFY_INTERVAL
    ) as started:
        yield started


@pytest.fixture
def cluster(etcd_cluster: EtcdCluster) -> Iterator[EtcdCluster]:
    """The session cluster, all members up before the test and again after it (whatever it broke)."""
    etcd_cluster.ensure_all_running()
    yield etcd_cluster
    etcd_cluster.ensure_all_running()


@pytest.fixture(scope="session")
def etcd_tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A throw-away CA with server (127.0.0.1, localhost) and client certificates."""
    return TLSFiles.create(Path(tmp_path_factory.mktemp("tls")))


@pytest.fixture(scope="session")
def etcd_tls_server(etcd_tls_files: TLSFiles) -> Iterator[EtcdServer]:
    """etcd on https that requires a client certificate signed by ``etcd_tls_files.ca_file``."""
    with EtcdServer(
        tls=etcd_tls_files,
        client_cert_auth=True,
        keepalive_min_time=KEEPALIVE_MIN_TIME,
        progress_notify_interval=PROGRESS_NOTIFY_INTERVAL,
    ) as server:
        yield server


@pytest.fixture(scope="session")
def etcd_auth_server() -> Iterator[EtcdServer]:
    """etcd with auth on and 2 s simple tokens: root/rootpw, app/apppw (readwrite on /app/),
    reader/readerpw (read-only on /app/). Its ``etcdctl()`` runs as root unless told otherwise."""
    with EtcdServer(
        auth_token_ttl=2,
        keepalive_min_time=KEEPALIVE_MIN_TIME,
        progress_notify_interval=PROGRESS_NOTIFY_INTERVAL,
    ) as server:
        server.enable_auth("rootpw")
        server.add_user("app", "apppw", readwrite_prefix="/app/")
        server.add_user("reader", "readerpw", read_prefix="/app/")
        yield server


@pytest.fixture
def fault_proxy(etcd_server: EtcdServer) -> Iterator[FaultProxy]:
    """A FaultProxy in front of ``etcd_server``'s client port, stopped after the test."""
    with FaultProxy.to(etcd_server.endpoint) as proxy:
        yield proxy


@pytest.fixture
def etcd_grpc_proxy(etcd_server: EtcdServer) -> Iterator[EtcdGrpcProxy]:
    """A real ``etcd grpc-proxy`` in front of ``etcd_server``, killed after the test.

    Its keepalive minimum matches the server's (1 s), so the same client settings work through both.
    """
    with EtcdGrpcProxy([etcd_server.endpoint], keepalive_min_time=KEEPALIVE_MIN_TIME) as proxy:
        yield proxy
