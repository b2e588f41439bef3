"""Who changed it, and why: aetcdcfg's writes leave an audit record in the same transaction."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import anyio
import pytest

from aetcdcfg import AuditRecord, EtcdClient, audit_log, wait_applied
from aetcdcfg._audit import DEFAULT_AUDIT_KEEP, PRUNE_BATCH, audit_keep
from aetcdcfg._records import AUDIT_ROOT
from aetcdcfg.testing import EtcdServer

pytestmark = pytest.mark.anyio

SCRIPT = shutil.which("aetcdcfg", path=str(Path(sys.executable).parent)) or "aetcdcfg"
SECRET = "hunter2-do-not-leak"

MODEL = """
from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings


class Database(BaseModel):
    url: str = "sqlite://"
    password: SecretStr = SecretStr("")


class Settings(BaseSettings):
    rate_limit: int = Field(default=100, ge=1)
    flag: bool = False
    db: Database = Database()
"""


@pytest.fixture
def workdir(tmp_path: Path, etcd_server: EtcdServer, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "svc_settings.py").write_text(MODEL)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ETCD_ENDPOINTS", etcd_server.endpoint)
    monkeypatch.setenv("AETCDCFG_USER", "alice")
    return tmp_path


async def run(*args: str) -> tuple[int, str, str]:
    result = await anyio.run_process([SCRIPT, *args], check=False, env=dict(os.environ))
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def written_at(out: str) -> int:
    return int(out.rsplit("at revision ", 1)[1].split()[0])


def test_an_audit_record_round_trips_and_describes_itself() -> None:
    record = AuditRecord("alice", "host1", 0.0, "set", 'raise "the" limit', ("/p/rate_limit",))
    assert AuditRecord.from_json(record.to_json()) == record
    assert record.describe() == '1970-01-01 00:00:00 UTC by alice@host1 (set): "raise \\"the\\" limit"'
    assert record.key("/p/").startswith(f"{AUDIT_ROOT}/p/")
    assert record.key("/p/") != record.key("/p/")  # never derived from a revision


async def test_set_records_who_when_and_why_at_the_revision_of_the_change(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    code, out, err = await run(
        "set",
        etcd_prefix,
        "rate_limit=7",
        "--model",
        "svc_settings:Settings",
        "-m",
        "more headroom for the sale",
    )
    assert code == 0, err
    revision = written_at(out)
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        audits = await audit_log(client, etcd_prefix)
    assert list(audits) == [revision]
    record = audits[revision]
    assert (record.user, record.command, record.message) == ("alice", "set", "more headroom for the sale")
    assert record.keys == (etcd_prefix + "rate_limit",) and record.host


async def test_history_shows_who_changed_it_and_why(workdir: Path, etcd_prefix: str) -> None:
    await run("set", etcd_prefix, "rate_limit=7", "--model", "svc_settings:Settings", "-m", "first")
    (workdir / "cfg.yaml").write_text("rate_limit: 9\nflag: true\n")
    code, out, _ = await run("push", etcd_prefix, "cfg.yaml", "--model", "svc_settings:Settings")
    assert code == 0
    pushed = written_at(out)
    code, out, _ = await run(
        "rollback",
        etcd_prefix,
        "--to-revision",
        str(pushed - 1),
        "--model",
        "svc_settings:Settings",
        "-m",
        "undo",
    )
    assert code == 0, out
    code, out, _ = await run("history", etcd_prefix)
    lines = [line for line in out.splitlines() if line.startswith("revision ")]
    assert len(lines) == 3
    assert "by alice@" in lines[0] and '(rollback): "undo"' in lines[0]
    assert "(push)" in lines[1] and '(set): "first"' in lines[2]
    assert "time unknown" not in out
    code, out, _ = await run("history", etcd_prefix, "--json")
    entries = json.loads(out)["entries"]
    assert [e["audit"]["command"] for e in entries] == ["rollback", "push", "set"]
    assert all(isinstance(e["time"], float) for e in entries)


async def test_a_change_made_without_aetcdcfg_still_says_time_unknown(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put(etcd_prefix + "rate_limit", "3")
    code, out, _ = await run("history", etcd_prefix)
    assert code == 0 and "(time unknown)" in out


async def test_audit_records_never_hold_a_value_not_even_a_secret(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    code, _, err = await run(
        "set", etcd_prefix, f"db/password={SECRET}", "rate_limit=12345", "--model", "svc_settings:Settings"
    )
    assert code == 0, err
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        stored = await client.get_prefix(AUDIT_ROOT + etcd_prefix)
    raw = b"".join(stored.items.values())
    assert len(stored.items) == 1 and SECRET.encode() not in raw and b"12345" not in raw
    assert etcd_prefix.encode() + b"db/password" in raw  # the name is there


async def test_a_refused_write_leaves_no_audit_record(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        old = await client.put(etcd_prefix + "rate_limit", "3")
        await client.put(etcd_prefix + "rate_limit", "4")  # changed after the reviewed revision
        code, _, err = await run(
            "set", etcd_prefix, "flag=true", "--model", "svc_settings:Settings", "--expect-revision", str(old)
        )
        assert code == 1 and "TxnConflict" in err
        assert (await client.get_prefix(AUDIT_ROOT + etcd_prefix)).items == {}


async def test_wait_defaults_to_a_change_that_only_deleted_keys(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    (workdir / "cfg.yaml").write_text("rate_limit: 9\n")
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        before = await client.put_many({etcd_prefix + "rate_limit": "9", etcd_prefix + "flag": "true"})
        code, out, _ = await run(
            "push", etcd_prefix, "cfg.yaml", "--model", "svc_settings:Settings", "--prune"
        )
        assert code == 0 and f"- {etcd_prefix}flag" in out and "+ " not in out and "~ " not in out
        pruned = written_at(out)
        assert pruned > before
        result = await wait_applied(client, etcd_prefix, timeout=1)
    assert result.revision == pruned  # not `before`, the newest key's revision


# -- retention -------------------------------------------------------------------------------------


def test_audit_keep_comes_from_the_caller_then_the_environment_then_the_default() -> None:
    assert audit_keep(5, {"AETCDCFG_AUDIT_KEEP": "7"}) == 5
    assert audit_keep(None, {"AETCDCFG_AUDIT_KEEP": " 7 "}) == 7
    assert audit_keep(None, {}) == DEFAULT_AUDIT_KEEP == 1000
    assert audit_keep(0, {}) == 0  # keeps all
    for bad in ("many", "-1"):
        with pytest.raises(ValueError, match="AETCDCFG_AUDIT_KEEP|negative"):
            audit_keep(None, {"AETCDCFG_AUDIT_KEEP": bad})


async def records(client: EtcdClient, prefix: str) -> list[str]:
    """The keys of ``prefix``'s own audit records, oldest first."""
    root = AUDIT_ROOT + prefix
    return sorted(k for k in (await client.get_prefix(root)).items if "/" not in k[len(root) :])


async def seed_audit(client: EtcdClient, prefix: str, count: int) -> list[str]:
    """``count`` old audit records of ``prefix`` (ids 1 ns apart, long ago), oldest first."""
    record = AuditRecord("bob", "old-host", 1.0, "set", None, (prefix + "rate_limit",))
    keys = [f"{AUDIT_ROOT}{prefix}{n:020d}-0000abcd" for n in range(1, count + 1)]
    await client.put_many(dict.fromkeys(keys, record.to_json()))
    return keys


async def test_a_write_deletes_the_audit_records_beyond_audit_keep_in_its_own_transaction(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    root = AUDIT_ROOT + etcd_prefix
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        seeded = await seed_audit(client, etcd_prefix, 4)
        # not records of this prefix: a nested prefix's (its name sorts among the ids) and a stray key
        others = {root + "0/00000000000000000001-0000abcd": b"{}", root + "notes": b"kept"}
        await client.put_many(others)
        code, out, err = await run(
            "set", etcd_prefix, "rate_limit=7", "--model", "svc_settings:Settings", "--audit-keep", "3"
        )
        assert code == 0, out + err
        revision = written_at(out)
        before = await client.get_prefix(root, revision=revision - 1)
        after = await client.get_prefix(root, revision=revision)
        kept = sorted(k for k in after.items if k not in others)
        # the two oldest went in the write's own revision; the new record and the two newest stay
        assert set(seeded) <= set(before.items) and kept[:2] == seeded[2:] and len(kept) == 3
        assert all(after.items.get(k) == v for k, v in others.items())
        assert list(await audit_log(client, etcd_prefix))[-1] == revision

        # AETCDCFG_AUDIT_KEEP is the default: one more write keeps two
        os.environ["AETCDCFG_AUDIT_KEEP"] = "2"
        try:
            code, out, _ = await run("set", etcd_prefix, "rate_limit=8", "--model", "svc_settings:Settings")
        finally:
            del os.environ["AETCDCFG_AUDIT_KEEP"]
        assert code == 0
        audits = await audit_log(client, etcd_prefix)
        assert sorted(audits) == [revision, written_at(out)]
        items = (await client.get_prefix(root)).items
        assert all(k in items for k in others)


async def test_lowering_audit_keep_prunes_a_bounded_batch_per_write(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await seed_audit(client, etcd_prefix, PRUNE_BATCH + 8)
        counts = []
        for value in ("7", "8"):
            code, _, err = await run(
                "set",
                etcd_prefix,
                f"rate_limit={value}",
                "--model",
                "svc_settings:Settings",
                "--audit-keep",
                "3",
            )
            assert code == 0, err
            counts.append(len(await records(client, etcd_prefix)))
    assert counts == [PRUNE_BATCH + 8 + 1 - PRUNE_BATCH, 3]


async def test_a_refused_write_prunes_nothing_and_audit_keep_0_keeps_all(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        seeded = await seed_audit(client, etcd_prefix, 3)
        old = await client.put(etcd_prefix + "rate_limit", "3")
        await client.put(etcd_prefix + "rate_limit", "4")
        code, _, _ = await run(
            "set", etcd_prefix, "flag=true", "--model", "svc_settings:Settings", "--expect-revision", str(old),
            "--audit-keep", "1",
        )  # fmt: skip
        assert code == 1
        assert sorted((await client.get_prefix(AUDIT_ROOT + etcd_prefix)).items) == seeded
        code, _, _ = await run(
            "set", etcd_prefix, "flag=true", "--model", "svc_settings:Settings", "--audit-keep", "0"
        )
        assert code == 0 and len(await records(client, etcd_prefix)) == 4


async def test_a_parent_prefix_counts_only_its_own_records_before_it_lists_any(
    etcd_server: EtcdServer, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A parent prefix's count took in every nested prefix's records, so each write to it listed
    them all (keys only) and pruned nothing. Only the parent's own record ids are counted now."""
    from aetcdcfg._audit import audit_write

    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await seed_audit(client, etcd_prefix + "child/", 5)
        await seed_audit(client, etcd_prefix + "cache/", 5)  # 'c' as a canary id begins
        listed: list[object] = []
        get_stored = EtcdClient.get_stored

        async def spy(self: EtcdClient, prefix: object, **kwargs: bool) -> object:
            listed.append(prefix)
            return await get_stored(self, prefix, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(EtcdClient, "get_stored", spy)
        record = AuditRecord.now("set", [etcd_prefix + "a"])
        planned = await audit_write(client, etcd_prefix, record, keep=3)
        assert (planned.prune, listed) == ((), [])
        await seed_audit(client, etcd_prefix, 3)
        planned = await audit_write(client, etcd_prefix, record, keep=3)
        assert listed == [AUDIT_ROOT + etcd_prefix] and len(planned.prune) == 1
        assert planned.prune[0].rsplit("/", 1)[0] + "/" == AUDIT_ROOT + etcd_prefix


async def test_an_audit_record_holding_a_number_json_has_not_or_no_date_is_skipped(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """Python's json reads ``NaN``/``Infinity``; a time that is one, or so far out that it is no date,
    makes the record no audit record: ``history`` says "time unknown" for its change, and its
    ``--json`` stays JSON."""
    good = json.loads(AuditRecord("mallory", "h", 1.0, "set", None, ()).to_json())
    times: list[object] = [float("nan"), float("inf"), "-inf", 1e300]
    revisions = []
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        for n, time in enumerate(times):
            record = json.dumps({**good, "time": time})
            revisions.append(
                await client.put_many(
                    {etcd_prefix + "rate_limit": str(n + 1), f"{AUDIT_ROOT}{etcd_prefix}{n:020d}-bad": record}
                )
            )
        assert await audit_log(client, etcd_prefix) == {}
    code, out, err = await run("history", etcd_prefix)
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith("revision ")]
    assert [line.split(" (")[1].split(")")[0] for line in lines] == ["time unknown"] * len(times)
    code, out, err = await run("history", etcd_prefix, "--json")
    assert code == 0, err

    def refuse(constant: str) -> object:
        raise ValueError(f"not JSON: {constant}")

    entries = json.loads(out, parse_constant=refuse)["entries"]
    assert [(e["revision"], e["audit"]) for e in entries] == [(r, None) for r in reversed(revisions)]
