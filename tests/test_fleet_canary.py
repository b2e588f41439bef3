"""Canaries: some instances get an overlay, validated, in one transaction; promote it or abort it."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import anyio
import pytest
from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings

from aetcdcfg import EtcdClient, LiveSettings, Selector, canary_status
from aetcdcfg._canary import CANARY_ROOT, overlay_of, share_bucket
from aetcdcfg._records import AUDIT_ROOT, RECORDS_ROOT, Identity
from aetcdcfg.testing import EtcdCluster, EtcdServer

from .test_fleet_cli import Settings, Strict, fleet, run, workdir

pytestmark = pytest.mark.anyio
__all__ = ["workdir"]  # the fixture, shared with test_fleet_cli

SET = ("--model", "svc_settings:Settings")


def written_at(out: str) -> int:
    return int(out.split("at revision ", 1)[1].split()[0])


# -- pure ------------------------------------------------------------------------------------------


def test_selectors_parse_and_match_labels_an_instance_or_a_stable_share() -> None:
    b14 = Identity("pod-1", {"zone": "b", "version": "1.4"})
    assert Selector.parse("zone=b").matches(b14)
    assert Selector.parse("zone=b,version=1.4").matches(b14)
    assert not Selector.parse("zone=b,version=1.3").matches(b14)
    assert Selector.parse("instance=pod-1").matches(b14)
    assert not Selector.parse("instance=pod-2").matches(b14)
    assert str(Selector.parse("version=1.4,zone=b")) == "version=1.4,zone=b"
    ids = [f"pod-{n}" for n in range(2000)]
    chosen = [i for i in ids if Selector.parse("10%").matches(Identity(i))]
    assert 140 <= len(chosen) <= 260  # about 10 %
    assert chosen == [i for i in ids if share_bucket(i) < 10]  # the same ones every time
    assert all(Selector.parse("100%").matches(Identity(i)) for i in ids[:50])
    for bad in ("", "zone", "0%", "101%", "x%", "instance=a,zone=b"):
        with pytest.raises(ValueError, match=r"selector|NAME=VALUE|share"):
            Selector.parse(bad)


def test_only_a_selected_instance_gets_the_overlay() -> None:
    spec = b'{"selector":"zone=b","base_revision":5,"keys":["/p/a"],"user":"u","created_at":0}'
    items = {"spec": spec, "values/a": b"1", "values/db/url": b"x"}
    assert overlay_of(items, Identity("i", {"zone": "b"})) == ({"a": b"1", "db/url": b"x"}, True)
    assert overlay_of(items, Identity("i", {"zone": "a"})) == ({}, False)
    assert overlay_of({"values/a": b"1"}, Identity("i", {"zone": "b"})) == ({}, False)  # no spec


# -- against etcd ----------------------------------------------------------------------------------

MEMBERS = [
    ("pod-a", Settings, {"zone": "a"}),
    ("pod-b", Settings, {"zone": "b"}),
    ("pod-c", Settings, {"zone": "b"}),
]


async def test_a_canary_applies_to_the_selected_instances_only_and_set_wait_waits_for_all(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with fleet(etcd_server.endpoint, etcd_prefix, *MEMBERS) as lives:
        with anyio.fail_after(30):
            code, out, err = await run(
                "set", etcd_prefix, "rate_limit=50", *SET, "--canary", "zone=b", "--wait", "-m", "try 50"
            )
        assert code == 0, out + err
        assert "for zone=b: pod-b, pod-c" in out and "OK: 3/3" in out
        assert [live.current.rate_limit for live in lives] == [100, 50, 50]
        assert [live.in_canary for live in lives] == [False, True, True]
        async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
            assert (await client.get_prefix(etcd_prefix)).items == {}  # the prefix itself is untouched
        with anyio.fail_after(10):
            while True:
                code, out, _ = await run("instances", etcd_prefix, "--json")
                rows = {row["id"]: row["canary"] for row in json.loads(out)}
                if rows == {"pod-a": False, "pod-b": True, "pod-c": True}:
                    break
        code, out, _ = await run("canary", "status", etcd_prefix)
        assert "selector zone=b" in out and "member pod-b (applied" in out and "1 other live" in out

        # an instance that starts mid-canary gets what the selector gives it
        async with fleet(
            etcd_server.endpoint,
            etcd_prefix,
            ("late-b", Settings, {"zone": "b"}),
            ("late-c", Settings, {"zone": "c"}),
        ) as late:
            assert [live.current.rate_limit for live in late] == [50, 100]


async def test_promote_writes_the_overlay_into_the_prefix_and_ends_the_canary_in_one_revision(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with fleet(etcd_server.endpoint, etcd_prefix, *MEMBERS) as lives:
        seen: list[list[int]] = [[], [], []]
        for live, values in zip(lives, seen, strict=True):
            live._on_change = lambda s, values=values: values.append(s.rate_limit)
        code, out, _ = await run("set", etcd_prefix, "rate_limit=50", *SET, "--canary", "zone=b", "--wait")
        assert code == 0, out
        opened = written_at(out)
        code, out, err = await run("canary", "promote", etcd_prefix, "--wait", "-m", "looks good")
        assert code == 0, out + err
        promoted = int(out.split("revision ", 1)[1].split()[0])
        assert "OK: 3/3" in out
        assert [live.current.rate_limit for live in lives] == [50, 50, 50]
        # members went 50 -> 50, never back to the base value in between; the other one 100 -> 50
        assert seen[1] == seen[2] == [50, 50] and seen[0] == [100, 50]
        assert all(live.revision == promoted and not live.in_canary for live in lives)
        async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
            assert (await client.get_prefix(etcd_prefix)).items == {etcd_prefix + "rate_limit": b"50"}
            assert (await client.get_prefix(CANARY_ROOT + etcd_prefix)).items == {}
        code, out, _ = await run("history", etcd_prefix)
        lines = [line for line in out.splitlines() if line.startswith("revision ")]
        assert lines[0].startswith(f"revision {promoted} (") and '(canary promote): "looks good"' in lines[0]
        assert lines[1].startswith(f"revision {opened} (") and "(set --canary)" in lines[1]


async def test_abort_returns_every_instance_to_the_prefix_and_history_shows_it(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with fleet(etcd_server.endpoint, etcd_prefix, *MEMBERS) as lives:
        code, out, _ = await run(
            "set", etcd_prefix, "rate_limit=50", *SET, "--canary", "instance=pod-c", "--wait"
        )
        assert code == 0 and [live.current.rate_limit for live in lives] == [100, 100, 50]
        code, out, _ = await run("canary", "abort", etcd_prefix, "--wait")
        assert code == 0, out
        assert [live.current.rate_limit for live in lives] == [100, 100, 100]
        code, out, _ = await run("history", etcd_prefix)
        assert "(canary abort)" in out and "(set --canary)" in out
        code, out, _ = await run("canary", "status", etcd_prefix)
        assert "no canary" in out


async def test_a_selector_matching_no_live_instance_is_refused_and_nothing_written(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with fleet(etcd_server.endpoint, etcd_prefix, *MEMBERS):
        code, _, err = await run("set", etcd_prefix, "rate_limit=50", *SET, "--canary", "zone=z")
        assert code == 1 and "matches no live instance" in err and "pod-a(zone=a)" in err
        assert "nothing was written" in err
        async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
            assert (await client.get_prefix(CANARY_ROOT + etcd_prefix)).items == {}
            assert (await client.get_prefix(AUDIT_ROOT + etcd_prefix)).items == {}


async def test_a_second_canary_is_refused_naming_the_open_one(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with fleet(etcd_server.endpoint, etcd_prefix, *MEMBERS) as lives:
        code, _, _ = await run("set", etcd_prefix, "rate_limit=50", *SET, "--canary", "zone=b")
        assert code == 0
        code, _, err = await run("set", etcd_prefix, "rate_limit=7", *SET, "--canary", "zone=a")
        assert code == 1 and "already open (selector zone=b" in err and "nothing was written" in err
        with anyio.fail_after(5):
            await lives[0].wait_for(lambda s: True)
        assert lives[0].current.rate_limit == 100  # zone=a got nothing


async def test_a_canary_that_does_not_validate_is_refused_before_anything_is_written(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with fleet(etcd_server.endpoint, etcd_prefix, *MEMBERS):
        code, out, _ = await run("set", etcd_prefix, "rate_limit=0", *SET, "--canary", "zone=b")
        assert code == 1 and "REFUSED" in out and "greater than or equal to 1" in out
        async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
            assert (await client.get_prefix(CANARY_ROOT + etcd_prefix)).items == {}


async def test_promote_after_the_config_changed_underneath_is_refused_by_the_guard(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with fleet(etcd_server.endpoint, etcd_prefix, *MEMBERS):
        code, _, _ = await run("set", etcd_prefix, "rate_limit=50", *SET, "--canary", "zone=b")
        assert code == 0
        async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
            changed = await client.put(etcd_prefix + "rate_limit", "60")
            code, out, _ = await run("canary", "promote", etcd_prefix)
            assert code == 1 and "REFUSED" in out and "nothing was written" in out
            assert (await client.get_prefix(etcd_prefix)).items == {etcd_prefix + "rate_limit": b"60"}
            canary = await canary_status(client, etcd_prefix)
            assert canary is not None and canary.spec.base_revision < changed  # still open, untouched


class Secretive(BaseSettings):
    class Db(BaseModel):
        password: SecretStr = SecretStr("")

    rate_limit: int = Field(default=100, ge=1)
    db: Db = Db()


async def test_records_and_history_never_hold_a_canarys_value(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    secret = "s3cr3t-canary-value"
    async with (
        EtcdClient(endpoints=[etcd_server.endpoint]) as client,
        LiveSettings(
            Secretive, prefix=etcd_prefix, client=client, instance="pod-s", labels={"zone": "b"}
        ) as live,
    ):
        from aetcdcfg import open_canary, wait_applied

        revision = await open_canary(
            client, etcd_prefix, {"db/password": secret.encode()}, Selector.parse("zone=b"), model=Secretive
        )
        result = await wait_applied(client, etcd_prefix, revision, timeout=10)
        assert result.ok and live.current.db.password.get_secret_value() == secret
        stored = await client.get_prefix(RECORDS_ROOT + etcd_prefix)
        audits = await client.get_prefix(AUDIT_ROOT + etcd_prefix)
        raw = b"".join([*stored.items.values(), *audits.items.values()])
        assert raw and secret.encode() not in raw


@pytest.mark.cluster
async def test_a_canary_survives_a_leader_change_and_a_killed_member(
    cluster: EtcdCluster, etcd_prefix: str
) -> None:
    """Instances on a 3-member cluster: the leader moves after the canary opened, then a member is
    killed; promote still reaches every instance, and no member ever went back to the base value."""
    from aetcdcfg import open_canary, promote_canary, wait_applied

    options = {"keepalive_time": 1, "keepalive_timeout": 1, "request_timeout": 3}
    seen: dict[str, list[int]] = {}
    async with contextlib.AsyncExitStack() as stack:
        lives = []
        for name, zone in (("pod-a", "a"), ("pod-b", "b"), ("pod-c", "b")):
            client = await stack.enter_async_context(EtcdClient(endpoints=cluster.endpoints, **options))
            values = seen.setdefault(name, [])
            live = LiveSettings(
                Settings,
                prefix=etcd_prefix,
                client=client,
                instance=name,
                labels={"zone": zone},
                on_change=lambda s, values=values: values.append(s.rate_limit),
            )
            lives.append(await stack.enter_async_context(live))
        admin = await stack.enter_async_context(EtcdClient(endpoints=cluster.endpoints, **options))
        with anyio.fail_after(60):
            for live in lives:
                while live.reporter is None or not live.reporter.in_etcd:
                    await anyio.sleep(0.02)
            opened = await open_canary(admin, etcd_prefix, {"rate_limit": b"50"}, Selector.parse("zone=b"))
            leader = await anyio.to_thread.run_sync(cluster.wait_leader)
            await anyio.to_thread.run_sync(cluster.move_leader, (leader + 1) % 3)
            assert (await wait_applied(admin, etcd_prefix, opened, timeout=20)).ok
            await anyio.to_thread.run_sync(cluster.kill, (leader + 2) % 3)
            promoted = await promote_canary(admin, etcd_prefix)
            result = await wait_applied(admin, etcd_prefix, promoted, timeout=30)
        assert result.ok and not result.gone, result
        assert [live.current.rate_limit for live in lives] == [50, 50, 50]
    assert seen["pod-b"] == seen["pod-c"] == [50, 50] and seen["pod-a"] == [100, 50]


async def test_canary_steps_prune_the_audit_log_like_every_write(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    from aetcdcfg import abort_canary, open_canary

    from .test_fleet_audit import records, seed_audit

    async with (
        EtcdClient(endpoints=[etcd_server.endpoint]) as client,
        LiveSettings(Settings, prefix=etcd_prefix, client=client, instance="pod-a", labels={"zone": "b"}),
    ):
        seeded = await seed_audit(client, etcd_prefix, 3)
        with anyio.fail_after(10):
            while not (await client.get_prefix(RECORDS_ROOT + etcd_prefix)).items:
                await anyio.sleep(0.02)
        await open_canary(client, etcd_prefix, {"rate_limit": b"50"}, Selector.parse("zone=b"), audit_keep=2)
        kept = await records(client, etcd_prefix)
        assert len(kept) == 2 and kept[0] == seeded[-1]
        await abort_canary(client, etcd_prefix, audit_keep=0)
        assert len(await records(client, etcd_prefix)) == 3


async def test_canary_false_watches_no_canary_is_never_selected_and_holds_no_wait_up(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    canary_root = CANARY_ROOT + etcd_prefix
    async with contextlib.AsyncExitStack() as stack:
        shared = await stack.enter_async_context(EtcdClient(endpoints=[etcd_server.endpoint]))
        own = await stack.enter_async_context(EtcdClient(endpoints=[etcd_server.endpoint]))
        lives = [
            LiveSettings(Settings, prefix=etcd_prefix, client=shared, instance="pod-b", labels={"zone": "b"}),
            LiveSettings(Settings, prefix=etcd_prefix, client=shared, instance="pod-c", labels={"zone": "c"}),
            LiveSettings(
                Settings, prefix=etcd_prefix, client=own, instance="pod-x", labels={"zone": "b"}, canary=False
            ),
        ]
        for live in lives:
            await stack.enter_async_context(live)
        with anyio.fail_after(10):
            while not all(live.reporter is not None and live.reporter.in_etcd for live in lives):
                await anyio.sleep(0.02)
        # the two instances on one client share its one watch of the canary; pod-x has none
        assert [w.prefix for w in shared.watch_statuses()].count(canary_root) == 1
        assert [w.prefix for w in own.watch_statuses()] == [etcd_prefix]
        code, out, _ = await run("instances", etcd_prefix, "--json")
        follows = {row["id"]: row["follows_canary"] for row in json.loads(out)}
        assert follows == {"pod-b": [etcd_prefix], "pod-c": [etcd_prefix], "pod-x": []}

        code, _, err = await run("set", etcd_prefix, "rate_limit=50", *SET, "--canary", "instance=pod-x")
        assert code == 1 and "pod-x, which do not follow canaries" in err and "nothing was written" in err

        with anyio.fail_after(40):
            code, out, err = await run(
                "set", etcd_prefix, "rate_limit=50", *SET, "--canary", "zone=b", "--wait", "--timeout", "15"
            )
        assert code == 0, out + err
        assert "for zone=b: pod-b\n" in out and "not following canaries" in out and "OK: 3/3" in out
        assert [live.current.rate_limit for live in lives] == [50, 100, 100]
        assert [live.in_canary for live in lives] == [True, False, False]
        # pod-x cannot see the canary's revision: it is current all the same, and wait agrees
        code, out, _ = await run("instances", etcd_prefix, "--json")
        assert {row["id"]: row["state"] for row in json.loads(out)} == dict.fromkeys(follows, "current")
        code, out, _ = await run("wait", etcd_prefix, "--timeout", "15")
        assert code == 0 and "OK: 3/3" in out, out
        code, out, _ = await run("canary", "abort", etcd_prefix, "--wait", "--timeout", "15")
        assert code == 0 and "OK: 3/3" in out, out
        assert [live.current.rate_limit for live in lives] == [100, 100, 100]


SECRET_MODEL = """
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings


class Settings(BaseSettings):
    rate_limit: int = Field(default=100, ge=1)
    password: SecretStr = SecretStr("")
"""


async def test_set_canary_dry_run_shows_the_spec_the_selection_and_the_masked_diff_and_writes_nothing(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    (workdir / "secret_settings.py").write_text(SECRET_MODEL)
    async with (
        fleet(etcd_server.endpoint, etcd_prefix, *MEMBERS),
        EtcdClient(endpoints=[etcd_server.endpoint]) as client,
    ):
        put = await client.put(etcd_prefix + "rate_limit", "100")
        code, out, err = await run(
            "set", etcd_prefix, "rate_limit=50", "password=hunter2-canary",
            "--model", "secret_settings:Settings", "--canary", "zone=b", "--dry-run",
        )  # fmt: skip
        assert code == 0, out + err
        base = int(out.rsplit("--expect-revision ", 1)[1])  # the revision the prefix was read at
        assert base >= put and f"on {etcd_prefix} at revision {base}:" in out
        assert f"  ~ {etcd_prefix}rate_limit: 100 -> 50" in out
        assert f"  + {etcd_prefix}password = " in out and "hunter2" not in out
        spec = json.loads(out.split(f"{CANARY_ROOT}{etcd_prefix}spec = ", 1)[1].splitlines()[0])
        assert spec["selector"] == "zone=b" and spec["base_revision"] == base
        assert sorted(spec["keys"]) == [etcd_prefix + "password", etcd_prefix + "rate_limit"]
        assert "would select now: pod-b, pod-c" in out and "1 other live instance(s)" in out
        assert f"dry run: nothing written; open it with --expect-revision {base}" in out
        assert (await client.get_prefix(CANARY_ROOT + etcd_prefix)).items == {}
        assert (await client.get_prefix(AUDIT_ROOT + etcd_prefix)).items == {}

        # refused as the real thing would be, still writing nothing: a result that does not validate
        code, out, _ = await run("set", etcd_prefix, "rate_limit=0", *SET, "--canary", "zone=b", "--dry-run")
        assert code == 1 and "REFUSED" in out

        # the reviewed plan, opened on its revision: refused once the prefix changed after it
        await client.put(etcd_prefix + "rate_limit", "101")
        code, _, err = await run(
            "set", etcd_prefix, "rate_limit=50", *SET, "--canary", "zone=b", "--expect-revision", str(base)
        )
        assert code == 1 and "TxnConflict" in err
        assert (await client.get_prefix(CANARY_ROOT + etcd_prefix)).items == {}
        code, out, _ = await run("set", etcd_prefix, "rate_limit=50", *SET, "--canary", "zone=b", "--dry-run")
        reviewed = int(out.rsplit("--expect-revision ", 1)[1])
        code, out, err = await run(
            "set",
            etcd_prefix,
            "rate_limit=50",
            *SET,
            "--canary",
            "zone=b",
            "--expect-revision",
            str(reviewed),
        )
        assert code == 0, out + err
        canary = await canary_status(client, etcd_prefix)
        assert canary is not None and canary.spec.base_revision == reviewed


async def test_canary_status_json_gives_each_instance_its_selection_and_progress_never_a_value(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    code, out, _ = await run("canary", "status", etcd_prefix, "--json")
    assert code == 0 and json.loads(out) == {
        "prefix": etcd_prefix,
        "open": False,
        "selector": None,
        "revision": None,
        "base_revision": None,
        "user": None,
        "created_at": None,
        "keys": [],
        "instances": [],
    }
    value = "987654321"  # a rate no revision reaches, so any appearance would be the value
    async with contextlib.AsyncExitStack() as stack:
        members = [("pod-a", Settings, "a", True), ("pod-b", Settings, "b", True)]
        members += [("pod-c", Strict, "b", True), ("pod-x", Settings, "b", False)]
        for name, model, zone, canary in members:
            client = await stack.enter_async_context(EtcdClient(endpoints=[etcd_server.endpoint]))
            await stack.enter_async_context(
                LiveSettings(model, prefix=etcd_prefix, client=client, instance=name, labels={"zone": zone}, canary=canary)
            )  # fmt: skip
        with anyio.fail_after(10):
            while len((await client.get_prefix(RECORDS_ROOT + etcd_prefix)).items) < 4:
                await anyio.sleep(0.02)
        code, out, err = await run("set", etcd_prefix, f"rate_limit={value}", *SET, "--canary", "zone=b")
        assert code == 0, out + err
        opened = written_at(out)
        with anyio.fail_after(10):
            while True:  # pod-b applied it, pod-c (at most 10) rejected it
                code, out, _ = await run("canary", "status", etcd_prefix, "--json")
                status = json.loads(out)
                rows = {row["id"]: row for row in status["instances"]}
                if rows["pod-b"]["progress"] == "applied" and rows["pod-c"]["progress"] == "rejected":
                    break
    assert value not in out
    assert status["open"] is True and status["selector"] == "zone=b" and status["revision"] == opened
    assert status["keys"] == [etcd_prefix + "rate_limit"] and status["base_revision"] < opened
    assert [row["id"] for row in status["instances"]] == ["pod-a", "pod-b", "pod-c", "pod-x"]
    assert {k: r["selected"] for k, r in rows.items()} == {
        "pod-a": False,
        "pod-b": True,
        "pod-c": True,
        "pod-x": False,
    }
    assert rows["pod-x"]["progress"] == "not_following" and rows["pod-x"]["follows_canary"] is False
    assert rows["pod-b"]["applied_revision"] == opened and rows["pod-b"]["in_canary"] is True
    assert (
        rows["pod-c"]["rejected_revision"] == opened
        and "less than or equal to 10" in rows["pod-c"]["problems"][0]
    )
    assert rows["pod-a"]["labels"] == {"zone": "a"} and rows["pod-a"]["problems"] == []
    # the text hides values unless a model says which are secret (as get, history and diff do)
    code, out, err = await run("canary", "status", etcd_prefix)
    assert code == 0 and value not in out and f"~ {etcd_prefix}rate_limit = **********" in out, out + err
    assert "values hidden" in err
    code, out, _ = await run("canary", "status", etcd_prefix, *SET)
    assert code == 0 and f"~ {etcd_prefix}rate_limit = {value}" in out


async def test_a_canary_spec_holding_a_number_json_has_not_is_no_canary_and_stops_nothing(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """Python's json reads ``1e400`` as infinity and ``NaN``: a spec holding one is no valid spec
    (an empty overlay, as documented), not an OverflowError out of every instance's canary layer."""
    from aetcdcfg._canary import canary_prefix

    spec = {"selector": "zone=b", "base_revision": 1, "keys": [etcd_prefix + "rate_limit"], "user": "u"}
    async with (
        EtcdClient(endpoints=[etcd_server.endpoint]) as client,
        LiveSettings(
            Settings, prefix=etcd_prefix, client=client, instance="pod-b", labels={"zone": "b"}
        ) as live,
    ):
        canary = canary_prefix(etcd_prefix)
        for bad in (
            json.dumps(spec).replace('"base_revision": 1', '"base_revision": 1e400'),
            json.dumps({**spec, "created_at": float("nan")}),
        ):
            await client.put_many({canary + "spec": bad, canary + "values/rate_limit": "50"})
            changed = await client.put(etcd_prefix + "rate_limit", "7")
            with anyio.fail_after(10):
                while live.revision < changed:
                    await anyio.sleep(0.02)
            assert live.current.rate_limit == 7 and not live.in_canary
            await client.delete(etcd_prefix + "rate_limit")
        with pytest.raises(ValueError, match="not a canary spec"):  # the operator is told
            await canary_status(client, etcd_prefix)
