"""The release as users get it: the sdist and wheel ``python -m build`` makes, installed (not editable)
into a fresh virtualenv with every user-facing extra, then used against real etcd.

Slow (a build and a pip install from PyPI: about a minute), so it is marked ``dist`` and runs once,
in the full suite of the main CPython + etcd pair; the matrix cells leave it out.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import aetcdcfg
from aetcdcfg.testing import EtcdServer

pytestmark = [pytest.mark.dist, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parent.parent
#: The extras a user installs (``dev`` is this repository's own tooling, not a feature).
EXTRAS = "fastapi,metrics,cli,testing"

PROGRAM = """
import asyncio
import sys

import aetcdcfg
import aetcdcfg.fastapi
import aetcdcfg.metrics
import aetcdcfg.testing
import aetcdcfg.testing.plugin
import yaml  # the cli extra
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from pydantic_settings import BaseSettings

from aetcdcfg import EtcdClient, LiveSettings
from aetcdcfg.metrics import AetcdcfgCollector


class Settings(BaseSettings):
    rate_limit: int = 100
    password: SecretStr = SecretStr("")


async def main(prefix: str) -> None:
    live = LiveSettings(Settings, prefix=prefix)  # connects with ETCD_* from the environment
    app = FastAPI(lifespan=live.lifespan)
    async with app.router.lifespan_context(app):
        assert live.current.rate_limit == 5, live.current
        CollectorRegistry().register(AetcdcfgCollector(live))
        async with EtcdClient() as client:
            await client.put(prefix + "rate_limit", "200")
        await live.wait_for(lambda s: s.rate_limit == 200, timeout=10)
    print("ok", aetcdcfg.__version__, aetcdcfg.__file__, aetcdcfg.testing.etcd_binary())


asyncio.run(main(sys.argv[1]))
"""

SMOKE_TEST = """
def test_the_plugin_starts_etcd(etcd_server, etcd_prefix):
    etcd_server.etcdctl("put", etcd_prefix + "k", "v")
    assert etcd_server.etcdctl("get", etcd_prefix + "k", "--print-value-only").strip() == "v"
"""


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m build`` of this checkout: the sdist, then the wheel built from that sdist."""
    out = tmp_path_factory.mktemp("dist")
    built = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return out


def only(directory: Path, pattern: str) -> Path:
    (found,) = directory.glob(pattern)
    return found


def test_the_wheel_carries_the_package_its_types_and_license_and_no_tests(dist: Path) -> None:
    wheel = only(dist, "aetcdcfg-*.whl")
    version = aetcdcfg.__version__
    assert wheel.name == f"aetcdcfg-{version}-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    info = f"aetcdcfg-{version}.dist-info"
    for needed in (
        "aetcdcfg/__init__.py",
        "aetcdcfg/py.typed",
        "aetcdcfg/status_page.html",
        "aetcdcfg/cli/__init__.py",
        "aetcdcfg/testing/plugin.py",
        f"{info}/licenses/LICENSE",
        f"{info}/entry_points.txt",
    ):
        assert needed in names, needed
    assert all(n.startswith(("aetcdcfg/", f"{info}/")) for n in names), names  # no tests, examples...
    metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    assert f"\nVersion: {version}\n" in metadata
    assert "License-Expression: Apache-2.0" in metadata
    for extra in EXTRAS.split(","):
        assert f"Provides-Extra: {extra}" in metadata
    entry_points = zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode()
    assert "aetcdcfg = aetcdcfg.cli:main" in entry_points
    assert "aetcdcfg = aetcdcfg.testing.plugin" in entry_points

    sdist = only(dist, "aetcdcfg-*.tar.gz")
    assert sdist.name == f"aetcdcfg-{version}.tar.gz"
    checked = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_installed_wheel_works_with_every_extra_against_real_etcd(
    dist: Path, tmp_path: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    wheel = only(dist, "aetcdcfg-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python, script = venv / "bin" / "python", venv / "bin" / "aetcdcfg"
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", f"{wheel}[{EXTRAS}]"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]

    # Away from the checkout, with nothing of it on the path: only the installed wheel can answer.
    home = tmp_path / "elsewhere"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "AETCDCFG_ETCD_BIN")}
    env["ETCD_ENDPOINTS"] = etcd_server.endpoint

    def run(*args: str | Path) -> str:
        done = subprocess.run(
            [str(a) for a in args],
            cwd=home,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    etcd_server.etcdctl("put", etcd_prefix + "rate_limit", "5")
    (home / "quickstart.py").write_text(PROGRAM)
    said = run(python, "quickstart.py", etcd_prefix).split()
    assert said[:2] == ["ok", aetcdcfg.__version__]
    assert Path(said[2]).is_relative_to(venv) and Path(said[3]).is_relative_to(venv), said

    assert run(script, "--version") == f"aetcdcfg {aetcdcfg.__version__}\n"
    listed = run(script, "get", etcd_prefix, "--show-values")
    assert f"{etcd_prefix}rate_limit = 200" in listed

    (home / "test_smoke.py").write_text(SMOKE_TEST)
    assert "1 passed" in run(python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_smoke.py")
