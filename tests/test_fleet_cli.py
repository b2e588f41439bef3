"""``aetcdcfg instances`` and ``aetcdcfg wait`` (and ``set --wait``), against real etcd and real instances."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from pydantic import Field
from pydantic_settings import BaseSettings

from aetcdcfg import EtcdClient, LiveSettings, instances, wait_applied
from aetcdcfg._records import InstanceRecord, WaitTally, wait_target
from aetcdcfg.testing import EtcdServer, FaultProxy

from .harness import INSTANCE_SCRIPT

pytestmark = pytest.mark.anyio

SCRIPT = shutil.which("aetcdcfg", path=str(Path(sys.executable).parent)) or "aetcdcfg"

MODEL = """
from pydantic import Field
from pydantic_settings import BaseSettings


class Settings(BaseSettings):
    rate_limit: int = Field(default=100, ge=1)
"""


class Settings(BaseSettings):
    rate_limit: int = Field(default=100, ge=1)


class Strict(BaseSettings):
    """An older build of the service: it accepts at most 10."""

    rate_limit: int = Field(default=5, ge=1, le=10)


@pytest.fixture
def workdir(tmp_path: Path, etcd_server: EtcdServer, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "svc_settings.py").write_text(MODEL)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ETCD_ENDPOINTS", etcd_server.endpoint)
    return tmp_path


async def run(*args: str) -> tuple[int, str, str]:
    result = await anyio.run_process([SCRIPT, *args], check=False, env=dict(os.environ))
    return result.returncode, result.stdout.decode(), result.stderr.decode()


@contextlib.asynccontextmanager
async def fleet(
    endpoint: str, prefix: str, *members: tuple[str, type[BaseSettings], dict[str, str]]
) -> AsyncIterator[list[LiveSettings[BaseSettings]]]:
    """Instances in this process, each with a client of its own, records in etcd before it yields."""
    async with contextlib.AsyncExitStack() as stack:
        lives: list[LiveSettings[BaseSettings]] = []
        for instance, model, labels in members:
            client = await stack.enter_async_context(EtcdClient(endpoints=[endpoint]))
            live = LiveSettings(model, prefix=prefix, client=client, instance=instance, labels=labels)
            lives.append(await stack.enter_async_context(live))
        with anyio.fail_after(10):
            for live in lives:
                while live.reporter is None or not live.reporter.in_etcd:
                    await anyio.sleep(0.02)
        yield lives


def record(instance: str, applied: int, rejected: int | None = None) -> InstanceRecord:
    return InstanceRecord(
        instance, {}, "S", "x", ("/p/",), applied, rejected, (), ("rate_limit: too big",), True, "v", 0.0, 0.0
    )


def test_the_tally_counts_applied_rejected_pending_and_gone() -> None:
    tally = WaitTally(10)
    tally.put(record("a", 10))
    tally.put(record("b", 9, rejected=10))
    tally.put(record("c", 9))
    assert tally.progress() == "1/3 applied, 1 rejected" and not tally.settled
    tally.delete("c")
    assert tally.progress() == "1/2 applied, 1 rejected, 1 gone" and tally.settled
    tally.put(record("b", 11, rejected=10))  # a later revision fixed it
    assert [r.id for r in tally.applied()] == ["a", "b"] and tally.rejected() == []


def test_an_instance_without_canaries_is_waited_for_only_up_to_the_newest_config_change() -> None:
    follower = dataclasses.replace(record("f", 8), follows_canary=("/p/",))
    deaf = record("d", 8)  # follows no canary
    # revision 10 opened a canary; the config itself last changed at 8
    tally = WaitTally(10, prefix="/p/", config_revision=8)
    tally.put(follower)
    tally.put(deaf)
    assert [r.id for r in tally.applied()] == ["d"] and [r.id for r in tally.pending()] == ["f"]
    assert wait_target(deaf, "/p/", 7, 8) == 7  # an older revision: it must have applied that
    assert wait_target(follower, "/p/", 10, 8) == 10
    assert InstanceRecord.from_json(follower.to_json()) == follower
    legacy = json.loads(deaf.to_json())
    del legacy["follows_canary"]  # a record written before the field: it followed every prefix
    assert InstanceRecord.from_json(json.dumps(legacy).encode()).follows_canary == ("/p/",)


async def test_instances_lists_each_live_instance_and_whether_it_is_current_or_rejecting(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    members = [
        ("pod-a", Settings, {"zone": "a"}),
        ("pod-b", Settings, {"zone": "b", "version": "1.4"}),
        ("pod-c", Strict, {"zone": "b", "version": "1.3"}),
    ]
    async with fleet(etcd_server.endpoint, etcd_prefix, *members) as lives:
        async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
            revision = await client.put(etcd_prefix + "rate_limit", "50")
            result = await wait_applied(client, etcd_prefix, revision, timeout=10)
        assert [r.id for r in result.applied] == ["pod-a", "pod-b"]
        assert [r.id for r in result.rejected] == ["pod-c"] and not result.ok
        code, out, err = await run("instances", etcd_prefix, "--json")
        assert code == 0, err
        rows = {row["id"]: row for row in json.loads(out)}
        assert set(rows) == {"pod-a", "pod-b", "pod-c"}
        assert rows["pod-b"]["labels"] == {"zone": "b", "version": "1.4"}
        assert rows["pod-a"]["applied_revision"] == revision and rows["pod-a"]["rejected_revision"] is None
        assert rows["pod-a"]["fresh"] is True and rows["pod-a"]["state"] == "current"
        assert rows["pod-c"]["rejected_revision"] == revision and rows["pod-c"]["state"] == "rejecting"
        assert rows["pod-c"]["applied_revision"] == lives[2].revision < revision
        code, out, _ = await run("instances", etcd_prefix)
        assert code == 0 and "pod-c rejecting" in out and "pod-a current" in out
        assert "less than or equal to 10" in out  # the problem, never the value


async def test_set_wait_returns_0_once_every_instance_applied_it(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    members = [(f"pod-{n}", Settings, {}) for n in range(3)]
    async with fleet(etcd_server.endpoint, etcd_prefix, *members) as lives:
        with anyio.fail_after(20):
            code, out, err = await run(
                "set",
                etcd_prefix,
                "rate_limit=7",
                "--model",
                "svc_settings:Settings",
                "--wait",
                "--timeout",
                "10",
            )
        assert code == 0, out + err
        assert "3/3 applied" in out and "OK: 3/3" in out
        assert all(live.current.rate_limit == 7 for live in lives)
        # wait without --revision: the newest change, already applied everywhere
        code, out, _ = await run("wait", etcd_prefix, "--timeout", "5")
        assert code == 0 and "3/3 applied" in out


async def test_wait_names_the_instance_that_rejected_it_with_its_problems(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with fleet(etcd_server.endpoint, etcd_prefix, ("new", Settings, {}), ("old", Strict, {})):
        with anyio.fail_after(20):
            code, out, _ = await run(
                "set", etcd_prefix, "rate_limit=4321987", "--model", "svc_settings:Settings", "--wait"
            )
        assert code == 1
        assert "REJECTED by old" in out and "less than or equal to 10" in out
        # the rejected value never appears in what the wait prints (a value no revision number can
        # contain: with "50", revision 150 failed this check)
        assert "FAILED: 1/2" in out and "4321987" not in out.split("wrote", 1)[1]


async def test_an_instance_killed_during_the_wait_is_named_gone_and_blocks_it_at_most_its_ttl(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with fleet(etcd_server.endpoint, etcd_prefix, ("alive", Settings, {})):
        process = await anyio.open_process(
            [sys.executable, "-c", INSTANCE_SCRIPT, etcd_server.endpoint, etcd_prefix, "doomed"]
        )
        try:
            async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
                with anyio.fail_after(20):
                    while len((await instances(client, etcd_prefix)).instances) < 2:
                        await anyio.sleep(0.05)
            process.send_signal(signal.SIGSTOP)  # frozen: it applies nothing, until it is killed
            lines: list[str] = []
            async with anyio.create_task_group() as tg:

                async def kill_once_waiting() -> None:
                    with anyio.fail_after(20):
                        while not any("1/2 applied" in line for line in lines):
                            await anyio.sleep(0.02)
                    process.send_signal(signal.SIGKILL)

                tg.start_soon(kill_once_waiting)
                async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
                    revision = await client.put(etcd_prefix + "rate_limit", "3")
                    started = anyio.current_time()
                    result = await wait_applied(
                        client, etcd_prefix, revision, timeout=30, on_progress=lines.append
                    )
                    took = anyio.current_time() - started
            assert result.ok and result.gone == ("doomed",) and [r.id for r in result.applied] == ["alive"]
            assert took < 3 + 3  # the TTL, and a little
            assert lines[-1] == "1/1 applied, 1 gone"
        finally:
            if process.returncode is None:
                process.kill()
            await process.wait()


async def test_an_instance_cut_off_from_etcd_is_reported_stale_and_not_applied(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    with FaultProxy.to(etcd_server.endpoint) as proxy:
        async with (
            EtcdClient(endpoints=[proxy.endpoint], keepalive_time=1, keepalive_timeout=1) as cut_client,
            LiveSettings(
                Settings, prefix=etcd_prefix, client=cut_client, instance="cut", report_ttl=20
            ) as cut,
            fleet(etcd_server.endpoint, etcd_prefix, ("ok", Settings, {})),
        ):
            with anyio.fail_after(10):
                while cut.reporter is None or not cut.reporter.in_etcd:
                    await anyio.sleep(0.02)
            proxy.blackhole()
            with anyio.fail_after(30):
                code, out, _ = await run(
                    "set",
                    etcd_prefix,
                    "rate_limit=4",
                    "--model",
                    "svc_settings:Settings",
                    "--wait",
                    "--timeout",
                    "10",
                )
            assert code == 1
            assert "NOT APPLIED in time by cut" in out and "stale" in out and "FAILED: 1/2" in out
            code, out, _ = await run("instances", etcd_prefix, "--json")
            states = {row["id"]: row["state"] for row in json.loads(out)}
            assert states == {"cut": "stale", "ok": "current"}
            proxy.blackhole(False)
