"""pytest fixtures that start real etcd (registered as the ``aetcdcfg`` pytest11 plugin).

Servers are session-scoped and shared; ``etcd_prefix`` gives each test its own key prefix so tests
never see each other's keys. The cluster fixture ``cluster`` restarts members a test killed.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ._proxy import FaultProxy
from ._server import EtcdCluster, EtcdServer
from ._tls import TLSFiles

__all__ = [
    "cluster",
    "etcd_auth_server",
    "etcd_cluster",
    "etcd_prefix",
    "etcd_server",
    "etcd_tls_files",
    "etcd_tls_server",
    "fault_proxy",
]

#: Fast keepalive and progress notifications, so tests can use short client keepalives.
TEST_OPTIONS: dict[str, float] = {"keepalive_min_time": 1, "progress_notify_interval": 1}


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    """One single-member etcd shared by the whole session."""
    with EtcdServer(**TEST_OPTIONS) as server:  # type: ignore[arg-type]
        yield server


@pytest.fixture
def etcd_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix of this test's own, e.g. ``/t/test_name-1a2b3c4d/``."""
    name = re.sub(r"[^A-Za-z0-9_]+", "_", request.node.name)[:60]
    return f"/t/{name}-{uuid.uuid4().hex[:8]}/"


@pytest.fixture(scope="session")
def etcd_cluster() -> Iterator[EtcdCluster]:
    """A 3-member cluster shared by the session; use ``cluster`` in tests that kill members."""
    with EtcdCluster(3, **TEST_OPTIONS) as started:
        yield started


@pytest.fixture
def cluster(etcd_cluster: EtcdCluster) -> Iterator[EtcdCluster]:
    """The session cluster, with every member running again after the test."""
    etcd_cluster.ensure_all_running()
    yield etcd_cluster
    etcd_cluster.ensure_all_running()


@pytest.fixture(scope="session")
def etcd_tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return TLSFiles.create(Path(tmp_path_factory.mktemp("tls")))


@pytest.fixture(scope="session")
def etcd_tls_server(etcd_tls_files: TLSFiles) -> Iterator[EtcdServer]:
    """etcd on https that requires a client certificate signed by ``etcd_tls_files.ca_file``."""
    with EtcdServer(tls=etcd_tls_files, client_cert_auth=True, **TEST_OPTIONS) as server:  # type: ignore[arg-type]
        yield server


@pytest.fixture(scope="session")
def etcd_auth_server() -> Iterator[EtcdServer]:
    """etcd with auth on and 2 s simple tokens: root/rootpw, app/apppw (readwrite /app/),
    reader/readerpw (read-only /app/)."""
    with EtcdServer(auth_token_ttl=2, **TEST_OPTIONS) as server:  # type: ignore[arg-type]
        server.enable_auth("rootpw")
        server.add_user("app", "apppw", readwrite_prefix="/app/")
        server.add_user("reader", "readerpw", read_prefix="/app/")
        yield server


@pytest.fixture
def fault_proxy(etcd_server: EtcdServer) -> Iterator[FaultProxy]:
    """A FaultProxy in front of ``etcd_server``."""
    with FaultProxy.to(etcd_server.endpoint) as proxy:
        yield proxy
