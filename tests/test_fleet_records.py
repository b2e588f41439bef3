"""Instance records: every running LiveSettings keeps a record of itself in etcd, bound to a lease."""

from __future__ import annotations

import json
import os
import signal
import sys
import uuid
from collections.abc import Mapping

import anyio
import pytest
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings
from structlog.testing import capture_logs

from aetcdcfg import EtcdClient, LiveSettings
from aetcdcfg._records import (
    Identity,
    InstanceRecord,
    WriteSchedule,
    instance_state,
    parse_labels,
    record_key,
    records_prefix,
    report_enabled,
)
from aetcdcfg.testing import EtcdServer

from .harness import INSTANCE_SCRIPT, MEMBER_OPTIONS, WATCHER_OPTIONS

pytestmark = pytest.mark.anyio

SECRET = "hunter2-do-not-leak"


class Service(BaseSettings):
    rate_limit: int = Field(default=100, ge=1)
    password: SecretStr = SecretStr(SECRET)


# -- pure ------------------------------------------------------------------------------------------


def test_labels_parse_from_the_environment_form() -> None:
    assert parse_labels("zone=b,version=1.4") == {"zone": "b", "version": "1.4"}
    assert parse_labels(" zone = b , ") == {"zone": "b"}
    assert parse_labels("") == {}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_labels("zone")
    with pytest.raises(ValueError, match="twice"):
        parse_labels("a=1,a=2")


def test_identity_comes_from_the_constructor_then_the_environment_then_hostname_pid() -> None:
    env = {"AETCDCFG_INSTANCE": "pod-a", "AETCDCFG_LABELS": "zone=b"}
    assert Identity.resolve(environ=env) == Identity("pod-a", {"zone": "b"})
    assert Identity.resolve("x", {"k": "v"}, environ=env) == Identity("x", {"k": "v"})
    default = Identity.resolve(environ={})
    assert default.instance.endswith(f"-{os.getpid()}") and default.labels == {}
    with pytest.raises(ValueError, match="AETCDCFG_LABELS"):
        Identity.resolve(environ={"AETCDCFG_LABELS": "oops"})
    with pytest.raises(ValueError, match="without '/'"):
        Identity.resolve("a/b", environ={})


def test_reporting_is_on_unless_opted_out() -> None:
    assert report_enabled(None, {}) is True
    assert report_enabled(None, {"AETCDCFG_REPORT": "0"}) is False
    assert report_enabled(None, {"AETCDCFG_REPORT": "off"}) is False
    assert report_enabled(False, {"AETCDCFG_REPORT": "1"}) is False


def test_a_burst_of_500_changes_in_5_s_costs_a_bounded_number_of_writes() -> None:
    schedule = WriteSchedule(interval=0.25)
    writes = 0
    for n in range(500):
        now = n * 0.01  # 500 changes, one every 10 ms
        schedule.changed()
        if schedule.should_write(now):
            schedule.wrote(now)
            writes += 1
    assert schedule.dirty  # the last state is still to be written ...
    due = schedule.due_at()
    assert due is not None and due <= 5.0 + 0.25  # ... within one interval
    assert writes <= 5 / 0.25 + 1


def test_a_record_round_trips_and_says_its_state() -> None:
    record = InstanceRecord(
        id="pod-a",
        labels={"zone": "b"},
        model="Service",
        schema="abc",
        prefixes=("/svc/",),
        applied_revision=10,
        rejected_revision=12,
        rejected_keys=("/svc/rate_limit",),
        problems=("rate_limit: Input should be greater than or equal to 1",),
        fresh=True,
        version="0.1.0",
        started_at=1.0,
        updated_at=2.0,
    )
    assert InstanceRecord.from_json(record.to_json()) == record
    assert instance_state(record, 10) == "rejecting"
    assert instance_state(record, 10, renewed=False) == "stale"
    ok = InstanceRecord.from_json(
        record.to_json().replace(b'"rejected_revision":12', b'"rejected_revision":null')
    )
    assert instance_state(ok, 10) == "current"
    assert instance_state(ok, 11) == "behind"
    with pytest.raises(ValueError, match="not an instance record"):
        InstanceRecord.from_json(b"{}")


# -- against etcd ----------------------------------------------------------------------------------


async def read_record(client: EtcdClient, prefix: str, instance: str) -> dict[str, object] | None:
    raw = await client.get(record_key(prefix, instance))
    return None if raw is None else json.loads(raw)


async def until_record(
    client: EtcdClient, prefix: str, instance: str, check: object = None, timeout: float = 10.0
) -> dict[str, object] | None:
    """Poll the record (a read per 50 ms) until ``check(record)`` holds; returns it."""
    predicate = check if callable(check) else (lambda r: r is not None)
    with anyio.fail_after(timeout):
        while True:
            record = await read_record(client, prefix, instance)
            if predicate(record):
                return record
            await anyio.sleep(0.05)


async def test_live_settings_keeps_a_record_outside_the_config_prefix(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with (
        EtcdClient(endpoints=[etcd_server.endpoint]) as client,
        LiveSettings(
            Service, prefix=etcd_prefix, client=client, instance="pod-a", labels={"zone": "b"}
        ) as live,
    ):
        record = await until_record(client, etcd_prefix, "pod-a")
        assert record is not None
        assert record["id"] == "pod-a" and record["labels"] == {"zone": "b"}
        assert record["model"] == "Service" and len(str(record["schema"])) == 12
        assert record["prefixes"] == [etcd_prefix] and record["fresh"] is True
        assert record["applied_revision"] == live.revision and record["rejected_revision"] is None
        assert record_key(etcd_prefix, "pod-a") == f"/aetcdcfg/instances{etcd_prefix}pod-a"
        # nothing was written under the config prefix itself
        assert (await client.get_prefix(etcd_prefix)).items == {}

        revision = await client.put(etcd_prefix + "rate_limit", "7")
        await until_record(client, etcd_prefix, "pod-a", lambda r: r and r["applied_revision"] == revision)
    # a clean exit revokes the lease: the record is gone at once
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        assert await read_record(client, etcd_prefix, "pod-a") is None


async def test_a_rejected_revision_is_recorded_with_its_problems_never_a_value(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with (
        EtcdClient(endpoints=[etcd_server.endpoint]) as client,
        LiveSettings(Service, prefix=etcd_prefix, client=client, instance="pod-r") as live,
    ):
        good = await client.put_many(
            {etcd_prefix + "password": SECRET + "-new", etcd_prefix + "rate_limit": "5"}
        )
        await live.wait_for(lambda s: s.rate_limit == 5, timeout=5)
        bad = await client.put(etcd_prefix + "rate_limit", "0")
        record = await until_record(
            client, etcd_prefix, "pod-r", lambda r: r and r["rejected_revision"] == bad
        )
        assert record is not None
        assert record["applied_revision"] == good
        assert record["rejected_keys"] == [etcd_prefix + "rate_limit"]
        assert any("rate_limit" in p for p in record["problems"])  # type: ignore[attr-defined]
        stored = await client.get_prefix(records_prefix(etcd_prefix))
        assert SECRET.encode() not in b"".join(stored.items.values())
        assert b'"0"' not in b"".join(stored.items.values())


async def test_a_layered_instance_is_listed_under_every_prefix_it_reads(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    shared, own = etcd_prefix + "shared/", etcd_prefix + "svc/"
    async with (
        EtcdClient(endpoints=[etcd_server.endpoint]) as client,
        LiveSettings(Service, prefix=[shared, own], client=client, instance="pod-l"),
    ):
        first = await until_record(client, shared, "pod-l")
        second = await until_record(client, own, "pod-l")
        assert first == second and first is not None and first["prefixes"] == [shared, own]
        # one lease for both
        _, stored = await client.get_stored(records_prefix(etcd_prefix))
        assert len(stored) == 2 and len({s.lease for s in stored}) == 1


@pytest.mark.parametrize("how", ["argument", "environment"])
async def test_a_service_can_opt_out_of_reporting(
    etcd_server: EtcdServer, etcd_prefix: str, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    kwargs: Mapping[str, object] = {"report": False} if how == "argument" else {}
    if how == "environment":
        monkeypatch.setenv("AETCDCFG_REPORT", "0")
    async with (
        EtcdClient(endpoints=[etcd_server.endpoint]) as client,
        LiveSettings(Service, prefix=etcd_prefix, client=client, instance="pod-o", **kwargs) as live,  # type: ignore[arg-type]
    ):
        revision = await client.put(etcd_prefix + "rate_limit", "9")
        await live.wait_for(lambda s: s.rate_limit == 9, timeout=5)
        assert live.reporter is None
        # the change was applied, and a later revision shows no record was written meanwhile
        assert (await client.get_prefix(records_prefix(etcd_prefix))).items == {}
        assert revision == live.revision


async def test_the_record_of_a_killed_process_disappears_within_its_ttl(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        process = await anyio.open_process(
            [sys.executable, "-c", INSTANCE_SCRIPT, etcd_server.endpoint, etcd_prefix, "doomed"]
        )
        try:
            await until_record(client, etcd_prefix, "doomed", timeout=20)
            process.send_signal(signal.SIGKILL)
            killed = anyio.current_time()
            await process.wait()
            await until_record(client, etcd_prefix, "doomed", lambda r: r is None, timeout=3 + 3)
            assert anyio.current_time() - killed <= 3 + 2
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


async def test_records_come_back_once_not_twice_after_etcd_restarts_empty(etcd_prefix: str) -> None:
    with EtcdServer(**MEMBER_OPTIONS) as server, anyio.fail_after(60):
        async with (
            EtcdClient(endpoints=[server.endpoint], **WATCHER_OPTIONS) as client,
            LiveSettings(Service, prefix=etcd_prefix, client=client, instance="pod-w", report_ttl=3) as live,
        ):
            await until_record(client, etcd_prefix, "pod-w")
            assert live.reporter is not None
            old_lease = live.reporter.lease
            await anyio.to_thread.run_sync(server.wipe_and_restart)
            async with EtcdClient(endpoints=[server.endpoint]) as reader:
                record = await until_record(reader, etcd_prefix, "pod-w", timeout=30)
                _, stored = await reader.get_stored(records_prefix(etcd_prefix))
            assert record is not None and [s.key for s in stored] == [record_key(etcd_prefix, "pod-w")]
            assert stored[0].lease != old_lease
            report = live.status.report
            assert report is not None and report.leases_lost >= 1 and report.in_etcd


def user_with_role(server: EtcdServer, name: str, *grants: tuple[str, str]) -> None:
    """A user ``name`` (password ``pw``) with a role of its own: each grant a (permission, key prefix)."""
    root = "root:rootpw"
    server.etcdctl("user", "add", name, "--new-user-password=pw", user=root)
    server.etcdctl("role", "add", name, user=root)
    for permission, prefix in grants:
        server.etcdctl("role", "grant-permission", name, permission, prefix, "--prefix=true", user=root)
    server.etcdctl("user", "grant-role", name, name, user=root)


async def test_least_privilege_role_reads_the_config_and_writes_only_the_records(
    etcd_auth_server: EtcdServer,
) -> None:
    """The role docs/fleet.md documents: read the config prefix, readwrite its records prefix, nothing else."""
    name = f"svc{uuid.uuid4().hex[:6]}"
    prefix = f"/{name}/"
    user_with_role(etcd_auth_server, name, ("read", prefix), ("readwrite", records_prefix(prefix)))
    async with (
        EtcdClient(endpoints=[etcd_auth_server.endpoint], username=name, password="pw") as client,
        LiveSettings(Service, prefix=prefix, client=client, instance="pod-p") as live,
    ):
        assert live.reporter is not None
        with anyio.fail_after(10):
            while not live.reporter.in_etcd:
                await anyio.sleep(0.05)
        assert await read_record(client, prefix, "pod-p") is not None
    async with EtcdClient(
        endpoints=[etcd_auth_server.endpoint], username="root", password="rootpw"
    ) as root_client:
        assert await read_record(root_client, prefix, "pod-p") is None  # revoked on exit


async def test_the_metrics_expose_the_instances_own_record_state(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    from prometheus_client import CollectorRegistry

    from aetcdcfg.metrics import AetcdcfgCollector

    async with (
        EtcdClient(endpoints=[etcd_server.endpoint]) as client,
        LiveSettings(Service, prefix=etcd_prefix, client=client, instance="pod-m") as live,
    ):
        registry = CollectorRegistry()
        registry.register(AetcdcfgCollector(live))
        labels = {"prefix": etcd_prefix, "model": "Service", "instance": "pod-m"}
        with anyio.fail_after(10):
            while registry.get_sample_value("aetcdcfg_instance_record_up", labels) != 1.0:
                await anyio.sleep(0.02)
        writes = registry.get_sample_value("aetcdcfg_instance_record_writes_total", labels)
        assert writes is not None and writes >= 1
        assert registry.get_sample_value("aetcdcfg_instance_record_leases_lost_total", labels) == 0


async def test_a_real_burst_of_500_changes_costs_each_instance_a_bounded_number_of_writes(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with (
        EtcdClient(endpoints=[etcd_server.endpoint]) as client,
        LiveSettings(Service, prefix=etcd_prefix, client=client, instance="pod-burst") as live,
    ):
        assert live.reporter is not None
        with anyio.fail_after(10):
            while not live.reporter.in_etcd:
                await anyio.sleep(0.02)
        before = live.reporter.writes
        started = anyio.current_time()
        for n in range(1, 501):
            await client.put(etcd_prefix + "rate_limit", str(n))
            await anyio.sleep(max(0.0, started + n * 0.01 - anyio.current_time()))  # pacing, ~5 s
        last = await client.put(etcd_prefix + "rate_limit", "501")
        took = anyio.current_time() - started
        await until_record(client, etcd_prefix, "pod-burst", lambda r: r and r["applied_revision"] == last)
        writes = live.reporter.writes - before
    print(f"BURST 501 changes in {took:.1f}s: {writes} record writes")
    assert writes <= took / 0.25 + 2


def test_a_lost_lease_is_recognised_from_etcd_and_from_its_grpc_proxy() -> None:
    import grpc

    from aetcdcfg._grpc_errors import Failure, LeaseNotFound, classify, to_error

    for code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNKNOWN):  # etcd, etcd's gRPC proxy
        exc = grpc.aio.AioRpcError(
            code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="etcdserver: requested lease not found"
        )
        assert classify(exc) is Failure.LEASE_NOT_FOUND
        assert isinstance(to_error(exc, endpoint="e"), LeaseNotFound)


async def test_records_outlive_their_ttl_through_etcds_grpc_proxy(
    etcd_server: EtcdServer, etcd_grpc_proxy: object, etcd_prefix: str
) -> None:
    """The proxy cancels a half-closed LeaseKeepAlive stream unanswered: refreshed all the same."""
    endpoint = etcd_grpc_proxy.endpoint  # type: ignore[attr-defined]
    async with (
        EtcdClient(endpoints=[endpoint]) as client,
        LiveSettings(Service, prefix=etcd_prefix, client=client, instance="pod-x", report_ttl=3) as live,
    ):
        reporter = live.reporter
        assert reporter is not None
        with anyio.fail_after(15):
            while reporter.refreshes < 5:  # about 5 s: past the 3 s TTL
                await anyio.sleep(0.1)
        assert reporter.leases_lost == 0 and reporter.failures == 0
        assert await read_record(client, etcd_prefix, "pod-x") is not None


def test_every_fleet_log_event_is_in_the_docs_log_table() -> None:
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    source = "".join(p.read_text() for p in (root / "aetcdcfg").rglob("*.py"))
    events = set(re.findall(r'"(fleet\.[a-z_]+)"', source))
    table = (root / "docs" / "production.md").read_text().split("## Logging", 1)[1]
    assert events and not {e for e in events if f"`{e}`" not in table}


def keepalive_streams_started(server: EtcdServer) -> int:
    """How many LeaseKeepAlive streams etcd has seen opened (its own gRPC server metrics)."""
    import re
    import urllib.request

    with urllib.request.urlopen(f"{server.metrics_url}/metrics", timeout=2) as response:
        text = response.read().decode()
    found = re.search(r'grpc_server_started_total\{grpc_method="LeaseKeepAlive",[^}]*\} (\S+)', text)
    return 0 if found is None else int(float(found.group(1)))


async def test_a_lease_is_refreshed_over_one_stream_kept_open(etcd_server: EtcdServer) -> None:
    """A stream per refresh cost etcd about 1.5x the CPU (200 leases); one stream serves them all."""
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        lease, granted = await client.grant_lease(30)
        keeper = client.lease_keeper(lease)
        before = keepalive_streams_started(etcd_server)
        try:
            assert [await keeper.refresh() for _ in range(5)] == [granted] * 5
        finally:
            keeper.close()
        assert keepalive_streams_started(etcd_server) - before == 1
        await client.revoke_lease(lease)
        keeper = client.lease_keeper(lease)
        assert await keeper.refresh() == 0  # etcd no longer holds it
        keeper.close()


async def test_an_unanswered_refresh_fails_in_time_and_the_next_one_opens_a_new_stream(
    etcd_server: EtcdServer,
) -> None:
    from aetcdcfg import EtcdUnavailable
    from aetcdcfg.testing import FaultProxy

    with FaultProxy.to(etcd_server.endpoint) as proxy:
        async with EtcdClient(
            endpoints=[proxy.endpoint], request_timeout=1.0, keepalive_time=30, keepalive_timeout=30
        ) as client:
            lease, granted = await client.grant_lease(30)
            keeper = client.lease_keeper(lease)
            assert await keeper.refresh() == granted
            proxy.blackhole()
            started = anyio.current_time()
            with pytest.raises(EtcdUnavailable, match="LeaseKeepAlive unanswered within 1s"):
                await keeper.refresh()
            assert anyio.current_time() - started < 3
            proxy.blackhole(False)
            proxy.reset()
            with anyio.fail_after(10):
                while True:
                    try:
                        assert await keeper.refresh() == granted
                        break
                    except EtcdUnavailable:
                        await anyio.sleep(0.2)
            keeper.close()


async def test_a_layered_instance_sees_the_fleet_of_every_prefix_it_reads_each_judged_by_its_own_changes(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    from aetcdcfg import status_report

    shared, mine, theirs = etcd_prefix + "shared/", etcd_prefix + "a/", etcd_prefix + "b/"
    async with (
        EtcdClient(endpoints=[etcd_server.endpoint]) as client,
        LiveSettings(Service, prefix=[shared, mine], client=client, instance="svc-a") as a,
        LiveSettings(Service, prefix=[shared, theirs], client=client, instance="svc-b") as b,
    ):
        views = a.fleets()
        assert list(views) == [shared, mine] and a.fleet() is views[mine] and a.fleet(shared) is views[shared]
        with pytest.raises(ValueError, match="not one of its prefixes"):
            a.fleet(theirs)

        def states(prefix: str) -> dict[str, str]:
            return {row["id"]: row["state"] for row in views[prefix].rows()}

        # a change only the other service reads: everyone is still current on /shared/ and on a/
        changed = await client.put(theirs + "rate_limit", "7")
        with anyio.fail_after(10):
            while (
                views[shared].records.get("svc-b") is None
                or views[shared].records["svc-b"].applied_revision < changed
            ):
                await anyio.sleep(0.02)
        assert states(shared) == {"svc-a": "current", "svc-b": "current"} and states(mine) == {
            "svc-a": "current"
        }
        # a change of /shared/ is rolled out to both services: it shows who has it
        changed = await client.put(shared + "rate_limit", "9")
        with anyio.fail_after(10):
            while states(shared) != {"svc-a": "current", "svc-b": "current"} or any(
                r.applied_revision < changed for r in views[shared].records.values()
            ):
                await anyio.sleep(0.02)
        assert a.current.rate_limit == 9 and b.current.rate_limit == 7
        report = status_report(a)
        assert [(f["prefix"], f["following"]) for f in report["fleet"]] == [(shared, True), (mine, True)]
        assert [row["id"] for row in report["fleet"][0]["instances"]] == ["svc-a", "svc-b"]
        assert [row["id"] for row in report["fleet"][1]["instances"]] == ["svc-a"]


async def test_a_record_write_never_waits_for_a_lease_refresh_in_flight(
    etcd_server: EtcdServer, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through etcd's gRPC proxy a keepalive is answered at the proxy's own next tick, up to TTL/3
    later (measured: 1-2.5 s with a 10 s TTL), and a refresh can hang on a dead link until its
    timeout. The change applied meanwhile must be reported at once: here every refresh after the
    first hangs, and the records still follow two changes."""
    from aetcdcfg._connection import LeaseKeeper

    refresh = LeaseKeeper.refresh
    hanging = anyio.Event()
    calls = 0

    async def hangs_after_the_first(self: LeaseKeeper) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            return await refresh(self)
        hanging.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    monkeypatch.setattr(LeaseKeeper, "refresh", hangs_after_the_first)
    async with (
        EtcdClient(endpoints=[etcd_server.endpoint]) as client,
        LiveSettings(Service, prefix=etcd_prefix, client=client, instance="pod-r", report_ttl=3),
    ):
        with anyio.fail_after(10):
            await hanging.wait()  # the second refresh (at ~2 s) is in flight, and stays there
        for limit in (7, 8):
            revision = await client.put(etcd_prefix + "rate_limit", str(limit))
            await until_record(
                client, etcd_prefix, "pod-r", lambda r, at=revision: r and r["applied_revision"] == at
            )


async def test_one_refresh_that_times_out_does_not_cost_the_lease(
    etcd_server: EtcdServer, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a failed refresh the next one follows after a short backoff, not a whole TTL/3 more:
    with a 6 s TTL, a refresh that times out after 2.5 s at ~4 s was retried at ~8.7 s, after
    the lease (last refreshed at ~2 s) had expired, and the records vanished."""
    from aetcdcfg import EtcdUnavailable
    from aetcdcfg._connection import LeaseKeeper

    refresh = LeaseKeeper.refresh
    calls = 0

    async def second_times_out(self: LeaseKeeper) -> int:
        nonlocal calls
        calls += 1
        if calls == 2:
            await anyio.sleep(2.5)
            raise EtcdUnavailable("LeaseKeepAlive unanswered within 2.5s", endpoints=["e"])
        return await refresh(self)

    monkeypatch.setattr(LeaseKeeper, "refresh", second_times_out)
    async with (
        EtcdClient(endpoints=[etcd_server.endpoint]) as client,
        LiveSettings(Service, prefix=etcd_prefix, client=client, instance="pod-t", report_ttl=6) as live,
    ):
        reporter = live.reporter
        assert reporter is not None
        with anyio.fail_after(20):
            while calls < 4:
                await anyio.sleep(0.1)
        assert (reporter.leases_lost, reporter.failures) == (0, 1)
        assert await read_record(client, etcd_prefix, "pod-t") is not None


async def test_a_writer_that_may_not_read_the_audit_records_still_writes_unpruned(
    etcd_auth_server: EtcdServer,
) -> None:
    """Pruning lists the audit records first; a role granted only 'write' there got PermissionDenied
    for every set, push and canary. The write goes on, with a warning, and prunes nothing."""
    from aetcdcfg._audit import audit_write
    from aetcdcfg._records import AUDIT_ROOT, AuditRecord

    name = f"wr{uuid.uuid4().hex[:6]}"
    prefix = f"/{name}/"
    user_with_role(etcd_auth_server, name, ("readwrite", prefix), ("write", AUDIT_ROOT + prefix))
    async with EtcdClient(endpoints=[etcd_auth_server.endpoint], username=name, password="pw") as client:
        with capture_logs() as logs:
            planned = await audit_write(client, prefix, AuditRecord.now("set", [prefix + "a"]), keep=1)
        assert planned.prune == () and len(planned.puts) == 1
        assert [e["event"] for e in logs if e["event"].startswith("fleet.")] == ["fleet.audit_not_pruned"]


async def test_leaving_while_etcd_is_silent_gives_up_the_revoke_without_a_stray_cancel(
    fault_proxy: object, etcd_prefix: str
) -> None:
    """The lease's revoke on exit is bounded by a 2 s anyio timeout around a grpc.aio call: grpc's
    bare CancelledError came out of it unrecognised, so `async with live:` raised CancelledError."""
    proxy = fault_proxy
    async with EtcdClient(endpoints=[proxy.endpoint]) as client:  # type: ignore[attr-defined]
        with anyio.fail_after(20):
            async with LiveSettings(Service, prefix=etcd_prefix, client=client, instance="pod-s") as live:
                assert live.reporter is not None
                while not live.reporter.in_etcd:
                    await anyio.sleep(0.05)
                proxy.blackhole()  # type: ignore[attr-defined]
            proxy.blackhole(False)  # type: ignore[attr-defined]


async def test_canaries_made_unreadable_after_start_up_do_not_stall_the_config(
    etcd_auth_server: EtcdServer,
) -> None:
    """Each change to a prefix is applied with its canary layer read as of that revision; with
    read access to the canaries revoked after start-up that read failed, and every change waited
    in a retry loop. The canary layer now reads as empty, as for a role without it from the start."""
    from aetcdcfg._canary import canary_prefix

    name = f"cr{uuid.uuid4().hex[:6]}"
    prefix = f"/{name}/"
    root = "root:rootpw"
    user_with_role(etcd_auth_server, name, ("read", prefix), ("read", canary_prefix(prefix)))
    async with (
        EtcdClient(endpoints=[etcd_auth_server.endpoint], username="root", password="rootpw") as admin,
        EtcdClient(endpoints=[etcd_auth_server.endpoint], username=name, password="pw") as client,
        LiveSettings(Service, prefix=prefix, client=client, report=False) as live,
    ):
        etcd_auth_server.etcdctl(
            "role", "revoke-permission", name, canary_prefix(prefix), "--prefix=true", user=root
        )
        await admin.put(prefix + "rate_limit", "7")
        with anyio.fail_after(10):
            while live.current.rate_limit != 7:
                await anyio.sleep(0.05)


async def test_refreshes_that_keep_failing_show_in_status_and_end_in_etcd(
    etcd_server: EtcdServer, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer loop cleared `last_error` every second, so a refresh failure rarely showed, and
    `in_etcd` stayed true after the lease had expired for want of a refresh. Now the refresh's
    error stays until a refresh succeeds, and `in_etcd` turns false once the TTL has passed."""
    from aetcdcfg import EtcdUnavailable
    from aetcdcfg._connection import LeaseKeeper

    async def fails(self: LeaseKeeper) -> int:
        raise EtcdUnavailable("LeaseKeepAlive unanswered (test)", endpoints=["e"])

    async with (
        EtcdClient(endpoints=[etcd_server.endpoint]) as client,
        LiveSettings(Service, prefix=etcd_prefix, client=client, instance="pod-f", report_ttl=3) as live,
    ):
        reporter = live.reporter
        assert reporter is not None
        with anyio.fail_after(10):
            while not reporter.in_etcd:
                await anyio.sleep(0.05)
        monkeypatch.setattr(LeaseKeeper, "refresh", fails)
        with anyio.fail_after(10):
            while reporter.failures == 0:
                await anyio.sleep(0.02)
        seen = []
        with anyio.fail_after(10):
            while reporter.in_etcd:
                seen.append(reporter.status().last_error)
                await anyio.sleep(0.05)
        error = "LeaseKeepAlive unanswered (test); endpoints tried: e"
        assert len(seen) > 10 and set(seen) == {error}
        status = reporter.status()
        assert (status.in_etcd, status.last_error) == (False, error)
        with anyio.fail_after(5):  # etcd revokes an expired lease within its own tick
            while await read_record(client, etcd_prefix, "pod-f") is not None:
                await anyio.sleep(0.1)
