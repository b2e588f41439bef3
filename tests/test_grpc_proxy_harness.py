"""The grpc-proxy harness (aetcdcfg.testing.EtcdGrpcProxy): a real ``etcd grpc-proxy`` we can break.

Reachability is checked with raw sockets and etcdctl; one round trip uses aetcdcfg's EtcdClient, the
way the proxy will be used by the library's own tests.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest

from aetcdcfg import EtcdClient
from aetcdcfg.testing import EtcdGrpcProxy, EtcdServer, etcd_flags, etcd_version


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``condition`` until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(0.02)


def accepts_tcp(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def quick_get(server: EtcdServer, proxy: EtcdGrpcProxy, key: str) -> str:
    """``etcdctl get`` through the proxy, giving up after 500 ms; its stdout ("" on failure)."""
    return server.etcdctl(
        "get",
        key,
        "--print-value-only",
        "--dial-timeout=500ms",
        "--command-timeout=500ms",
        endpoints=[proxy.endpoint],
        check=False,
    ).strip()


@pytest.mark.anyio
async def test_client_puts_and_gets_through_the_proxy(
    etcd_grpc_proxy: EtcdGrpcProxy, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    assert etcd_grpc_proxy.endpoint == f"http://127.0.0.1:{etcd_grpc_proxy.port}"
    assert etcd_grpc_proxy.endpoint != etcd_server.endpoint
    async with EtcdClient(endpoints=[etcd_grpc_proxy.endpoint]) as client:
        revision = await client.put(etcd_prefix + "k", "via-grpc-proxy")
        assert await client.get(etcd_prefix + "k") == b"via-grpc-proxy"
    # It really went to etcd, and the revision is etcd's.
    assert etcd_server.etcdctl("get", f"{etcd_prefix}k", "--print-value-only").strip() == "via-grpc-proxy"
    assert f'"mod_revision":{revision}' in etcd_server.etcdctl("get", f"{etcd_prefix}k", "-w", "json")


def test_metrics_are_the_proxys_own(
    etcd_grpc_proxy: EtcdGrpcProxy, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    etcd_server.etcdctl("get", f"{etcd_prefix}k", "--consistency=s", endpoints=[etcd_grpc_proxy.endpoint])
    text = etcd_grpc_proxy.metrics()
    assert "etcd_grpc_proxy_cache_misses_total" in text  # a gauge only the proxy has
    assert 'grpc_server_handled_total{grpc_code="OK",grpc_method="Range"' in text
    assert etcd_grpc_proxy.health()


def test_restart_comes_back_on_the_same_port(
    etcd_grpc_proxy: EtcdGrpcProxy, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    proxy = etcd_grpc_proxy
    endpoint, pid = proxy.endpoint, proxy.pid
    etcd_server.etcdctl("put", f"{etcd_prefix}k", "v1", endpoints=[proxy.endpoint])
    proxy.restart()
    assert proxy.endpoint == endpoint and proxy.pid != pid and proxy.running
    assert quick_get(etcd_server, proxy, f"{etcd_prefix}k") == "v1"


def test_kill_makes_it_unreachable_and_leaves_etcd_alone(
    etcd_grpc_proxy: EtcdGrpcProxy, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    proxy = etcd_grpc_proxy
    etcd_server.etcdctl("put", f"{etcd_prefix}k", "v1")
    assert quick_get(etcd_server, proxy, f"{etcd_prefix}k") == "v1"
    proxy.kill()
    assert not proxy.running and proxy.pid is None
    assert not accepts_tcp(proxy.port)
    assert quick_get(etcd_server, proxy, f"{etcd_prefix}k") == ""
    assert etcd_server.health()
    proxy.start()
    assert quick_get(etcd_server, proxy, f"{etcd_prefix}k") == "v1"


def test_pause_freezes_the_proxy_until_resume(
    etcd_grpc_proxy: EtcdGrpcProxy, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    proxy = etcd_grpc_proxy
    etcd_server.etcdctl("put", f"{etcd_prefix}k", "v1")
    proxy.pause()
    assert proxy.paused and proxy.running
    assert accepts_tcp(proxy.port)  # the kernel still completes handshakes: silence, not refusal
    assert quick_get(etcd_server, proxy, f"{etcd_prefix}k") == ""
    proxy.resume()
    assert not proxy.paused
    assert quick_get(etcd_server, proxy, f"{etcd_prefix}k") == "v1"


def test_proxy_waits_for_etcd_when_started_before_it(etcd_server: EtcdServer) -> None:
    """``wait=False`` + ``wait_ready()``: the proxy listens with etcd down, and serves once etcd is up."""
    with EtcdServer() as server:
        server.kill()
        proxy = EtcdGrpcProxy([server.endpoint])
        try:
            proxy.start(wait=False)
            proxy.wait_ready()
            assert not proxy.health()
            server.start()
            proxy.wait_healthy()
            server.etcdctl("put", "k", "late", endpoints=[proxy.endpoint])
            assert quick_get(server, proxy, "k") == "late"
        finally:
            proxy.cleanup()


def test_leaving_the_with_block_kills_the_proxy_and_removes_its_files(etcd_server: EtcdServer) -> None:
    with EtcdGrpcProxy([etcd_server.endpoint]) as proxy:
        pid, base_dir = proxy.pid, proxy.base_dir
        assert pid is not None and proxy.log_file.is_file()
    assert not proxy.running
    assert not base_dir.exists()
    wait_for(lambda: not accepts_tcp(proxy.port))


def test_tls_endpoints_are_refused() -> None:
    with pytest.raises(ValueError, match="plain TCP"):
        EtcdGrpcProxy(["https://127.0.0.1:2379"])


def test_keepalive_minimum_is_passed_only_to_a_proxy_that_takes_it() -> None:
    """etcd 3.4's grpc-proxy refuses --grpc-keepalive-min-time ("unknown flag"); 3.5's takes it.

    What the binary's own help lists decides, and the proxy says which minimum is in force.
    """
    proxy = EtcdGrpcProxy(["http://127.0.0.1:1"], keepalive_min_time=1)
    try:
        listed = "--grpc-keepalive-min-time" in etcd_flags("grpc-proxy", "start")
        assert listed == (etcd_version() >= (3, 5, 0))
        assert ("--grpc-keepalive-min-time=1s" in proxy.args()) == listed
        assert proxy.keepalive_min_time_in_force == (1 if listed else 300)
        proxy.start(wait=False)  # an unknown flag would end it at once
        proxy.wait_ready()
    finally:
        proxy.cleanup()
