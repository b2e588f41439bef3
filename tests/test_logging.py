"""Where the library's log events go when the host app configured nothing, stdlib only, or structlog.

Each case runs in a fresh interpreter, since structlog's configuration is process-wide and the test
session itself configures it (``capture_logs``). The program watches a prefix on real etcd (an
``etcd.connected`` and a ``watch.connected`` info event) and then fails to reach a dead endpoint
(``EtcdUnavailable``), printing only ``DATA ...`` on stdout itself.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from aetcdcfg.testing import EtcdServer

PROGRAM = """
import sys, anyio
{setup}
from aetcdcfg import EtcdClient

async def main():
    async with EtcdClient(endpoints=[sys.argv[1]]) as client, client.watch(sys.argv[2]) as sub:
        await client.put(sys.argv[2] + "k", "v")
        await sub.__anext__()
    try:
        async with EtcdClient(endpoints=["http://127.0.0.1:1"], connect_timeout=0.3):
            pass
    except Exception as exc:
        print("DATA", type(exc).__name__)

anyio.run(main)
"""


def run(setup: str, endpoint: str, prefix: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PROGRAM.format(setup=setup), endpoint, prefix],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def test_nothing_configured_keeps_stdout_for_data_and_info_quiet(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    result = run("", etcd_server.endpoint, etcd_prefix)
    assert result.stdout == "DATA EtcdUnavailable\n"  # no log line on stdout, ever
    assert "etcd.connected" not in result.stderr and "watch.connected" not in result.stderr


def test_stdlib_logging_gets_the_events_with_their_fields(etcd_server: EtcdServer, etcd_prefix: str) -> None:
    setup = (
        "import logging; logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s %(message)s')"
    )
    result = run(setup, etcd_server.endpoint, etcd_prefix)
    assert result.stdout == "DATA EtcdUnavailable\n"
    assert (
        f"INFO aetcdcfg watch.connected prefix='{etcd_prefix}' endpoint='{etcd_server.endpoint}' revision="
        in result.stderr
    )
    assert "INFO aetcdcfg etcd.connected" in result.stderr


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_a_structlog_app_gets_the_events_through_its_own_pipeline(
    etcd_server: EtcdServer, etcd_prefix: str, stream: str
) -> None:
    setup = (
        "import structlog, sys; structlog.configure(processors=[structlog.processors.JSONRenderer()], "
        f"logger_factory=structlog.PrintLoggerFactory(sys.{stream}))"
    )
    result = run(setup, etcd_server.endpoint, etcd_prefix)
    output = getattr(result, stream)
    assert '"event": "watch.connected"' in output and f'"prefix": "{etcd_prefix}"' in output
