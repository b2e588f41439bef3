"""``make run`` (examples/demo.py): the measured live change, then copies that keep serving until Ctrl-C.

Two copies instead of ten keep it light; ``--exit``/``DEMO_EXIT=1`` is how a run that must end (CI)
stops after the measurements.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
from pathlib import Path

import anyio
import httpx
import pytest
from anyio.streams.text import TextReceiveStream

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parent.parent
DEMO = [sys.executable, "-m", "examples.demo", "--copies", "2"]


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


async def test_with_demo_exit_it_stops_after_the_measurements() -> None:
    with anyio.fail_after(90):
        done = await anyio.run_process(DEMO, cwd=REPO, env={**os.environ, "DEMO_EXIT": "1"}, check=False)
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    assert "all 2 copies applied all 3 changes" in out
    assert "until Ctrl-C" not in out and "in a browser" not in out


async def test_the_copies_keep_serving_the_linked_status_page_until_ctrl_c() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DEMO_EXIT"}
    async with await anyio.open_process(DEMO, cwd=REPO, env=env) as proc:
        assert proc.stdout is not None
        printed = ""
        with anyio.fail_after(90):
            async for text in TextReceiveStream(proc.stdout):
                printed += text
                if "-m aetcdcfg set" in printed:
                    break
        assert "all 2 copies applied all 3 changes" in printed, printed
        found = re.search(r"open (http://127\.0\.0\.1:(\d+)/status) in a browser", printed)
        assert found is not None, printed
        async with httpx.AsyncClient(timeout=5) as http:
            page = await http.get(found[1], headers={"accept": "text/html"})
        assert page.status_code == 200
        port = int(found[2])
        assert accepts(port)

        proc.send_signal(signal.SIGINT)
        with anyio.fail_after(30):
            assert await proc.wait() == 0
    assert not accepts(port)
