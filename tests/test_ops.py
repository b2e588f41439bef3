"""Revisions as operations, against real etcd: reads at a revision, history, diff, rollback and set."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import anyio
import pytest

from aetcdcfg import (
    ConfigDiff,
    ConfigRejected,
    EtcdClient,
    FutureRevision,
    HistoryEntry,
    RequestTooLarge,
    RevisionCompacted,
    Snapshot,
    TxnConflict,
    unchanged_keys,
)
from aetcdcfg.testing import EtcdServer, etcd_history

from .test_cli import MODEL, run

pytestmark = pytest.mark.anyio

M = ("--model", "svc_settings:Settings")


@pytest.fixture
def workdir(tmp_path: Path, etcd_server: EtcdServer, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "svc_settings.py").write_text(MODEL)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ETCD_ENDPOINTS", etcd_server.endpoint)
    return tmp_path


def etcdctl_state(server: EtcdServer, prefix: str, revision: int) -> dict[str, bytes]:
    """etcd's own answer (etcdctl, no aetcdcfg code) for the prefix at ``revision``."""
    text = server.etcdctl("get", prefix, "--prefix", f"--rev={revision}", "-w", "json")
    kvs = json.loads(text).get("kvs", [])
    return {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv["value"]) for kv in kvs}


async def compact_to(server: EtcdServer, client: EtcdClient, prefix: str) -> int:
    """Compact etcd's history up to now (a throwaway write makes "now" a revision of its own)."""
    revision = await client.put(prefix + "zz-compaction-marker", "x")
    await anyio.to_thread.run_sync(server.etcdctl, "compact", str(revision))
    await client.delete(prefix + "zz-compaction-marker")
    return revision


# -- library API -------------------------------------------------------------------------------------


async def test_get_prefix_at_a_revision_equals_etcds_state_then(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    p = etcd_prefix
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        revisions = [
            await client.put_many({p + "a": "1", p + "b": "2"}),
            await client.put(p + "a", "10"),
            await client.delete(p + "b"),
            await client.put(p + "c", "3"),
        ]
        for revision in revisions:
            snapshot = await client.get_prefix(p, revision=revision)
            expected = await anyio.to_thread.run_sync(etcdctl_state, etcd_server, p, revision)
            assert snapshot == Snapshot(revision, expected)
        assert (await client.get_prefix(p, revision=revisions[1])).items == {p + "a": b"10", p + "b": b"2"}
        assert (await client.get_prefix(p, revision=revisions[0] - 1)).items == {}

        current = (await client.get_prefix(p)).revision
        with pytest.raises(FutureRevision) as future:
            await client.get_prefix(p, revision=current + 1000)
        assert future.value.current_revision >= current
        assert f"pick a revision <= {future.value.current_revision}" in str(future.value)


async def test_reading_a_compacted_revision_says_the_oldest_one_left(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        old = await client.put(etcd_prefix + "a", "1")
        compacted = await compact_to(etcd_server, client, etcd_prefix)
        with pytest.raises(RevisionCompacted) as info:
            await client.get_prefix(etcd_prefix, revision=old)
        assert info.value.compact_revision == compacted
        assert info.value.requested_revision == old
        assert "etcd keeps history only until compaction" in str(info.value)
        assert f"pick a revision >= {compacted}" in str(info.value)
        # the compact revision itself is still readable
        snapshot = await client.get_prefix(etcd_prefix, revision=compacted)
        assert snapshot.items[etcd_prefix + "a"] == b"1"


async def test_history_is_every_change_newest_first_and_matches_etcds_watch_history(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    p = etcd_prefix
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        r1 = await client.put_many({p + "a": "1", p + "b": "2"})
        await client.put("/elsewhere/" + p, "not ours")  # a revision that does not touch the prefix
        r2 = await client.put(p + "a", "3")
        r3 = await client.delete(p + "b")
        r4 = await client.put(p + "a", "3")  # same value again: a revision, but no value change
        r5 = await client.put_many({p + "c": "x", p + "d": "y"})
        r6 = await client.delete(p + "c")
        r7 = await client.apply_if_unchanged(p, {p + "e": "1"}, [p + "d"], since_revision=r6)
        history = await client.history(p, limit=7)
        raw = await etcd_history(etcd_server.endpoint, p, r1, r7)
    assert [e.revision for e in history.entries] == [r7, r6, r5, r4, r3, r2, r1]
    assert sorted({r[0] for r in raw}, reverse=True) == [e.revision for e in history.entries]
    assert history.revision >= r7 and history.scanned_from == r1
    by_rev = {e.revision: e for e in history.entries}
    assert by_rev[r1].diff == ConfigDiff(r1 - 1, r1, added={p + "a": b"1", p + "b": b"2"})
    assert by_rev[r2].diff == ConfigDiff(r2 - 1, r2, changed={p + "a": (b"1", b"3")})
    assert by_rev[r3].diff == ConfigDiff(r3 - 1, r3, removed={p + "b": b"2"})
    assert by_rev[r4] == HistoryEntry(r4, ConfigDiff(r4 - 1, r4), rewritten=(p + "a",))
    assert by_rev[r6].diff.removed == {p + "c": b"x"}
    assert by_rev[r7].diff == ConfigDiff(r7 - 1, r7, added={p + "e": b"1"}, removed={p + "d": b"y"})

    # --limit stops early; max_revisions bounds the look-back
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        newest = await client.history(p, limit=2)
        assert [e.revision for e in newest.entries] == [r7, r6]
        window = await client.history(p, limit=100, max_revisions=history.revision - r5 + 1)
        assert [e.revision for e in window.entries] == [r7, r6, r5]
        assert window.scanned_from == r5


async def test_history_stops_where_etcd_compacted(etcd_server: EtcdServer, etcd_prefix: str) -> None:
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        await client.put(etcd_prefix + "a", "1")
        compacted = await compact_to(etcd_server, client, etcd_prefix)
        after = await client.put(etcd_prefix + "a", "2")
        history = await client.history(etcd_prefix, limit=50)
    assert history.compact_revision == compacted
    assert history.scanned_from == compacted + 1
    # the marker's delete (compacted + 1) and the put after it; nothing older can be compared
    assert [e.revision for e in history.entries] == [after, compacted + 1]


async def test_rollback_restores_the_old_state_as_one_new_revision(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    p = etcd_prefix
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        good = await client.put_many({p + "rate_limit": "5", p + "maintenance": "false"})
        await client.put_many({p + "rate_limit": "50", p + "tags": '["x"]'})
        await client.delete(p + "maintenance")
        diff, revision = await client.rollback(p, good)
        assert diff.deletes == [p + "tags"]
        assert diff.puts == {p + "maintenance": b"false", p + "rate_limit": b"5"}
        after = await client.get_prefix(p)
        assert after.revision == revision
        assert after.items == (await client.get_prefix(p, revision=good)).items
        assert (await client.history(p, limit=1)).entries[0].revision == revision  # one revision


async def test_rollback_is_refused_when_another_key_changed_after_the_plan(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    p = etcd_prefix
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        old = await client.put(p + "rate_limit", "1")
        await client.put(p + "rate_limit", "2")
        current, target = await client.plan_rollback(p, old)
        diff = ConfigDiff.between(current, target)
        assert diff.puts == {p + "rate_limit": b"1"} and diff.deletes == []
        concurrent = await client.put(p + "maintenance", "true")  # another writer, another key
        with pytest.raises(TxnConflict):
            await client.apply_diff(p, diff)
        assert (await client.get_prefix(p)).revision == concurrent  # nothing written
        assert await client.get(p + "maintenance") == b"true"
        assert await client.get(p + "rate_limit") == b"2"


async def test_rollback_with_a_model_refuses_an_invalid_old_state(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    from pydantic import BaseModel, Field

    class Strict(BaseModel):
        rate_limit: int = Field(default=1, ge=1)

    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        bad = await client.put(etcd_prefix + "rate_limit", "0")
        now = await client.put(etcd_prefix + "rate_limit", "3")
        with pytest.raises(ConfigRejected) as info:
            await client.rollback(etcd_prefix, bad, model=Strict)
        assert info.value.keys == (etcd_prefix + "rate_limit",)
        assert (await client.get_prefix(etcd_prefix)).revision == now


async def test_a_change_over_max_txn_ops_is_refused_before_sending(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        before = await client.put(etcd_prefix + "k", "v")
        current = await client.get_prefix(etcd_prefix)
        wanted = Snapshot(0, {f"{etcd_prefix}k{i:03}": b"v" for i in range(129)})
        with pytest.raises(RequestTooLarge, match="--max-txn-ops allows 128"):
            await client.apply_diff(etcd_prefix, ConfigDiff.between(current, wanted))
        assert (await client.get_prefix(etcd_prefix)).revision == before
        # at the limit it goes through, as one revision
        fits = Snapshot(0, {f"{etcd_prefix}k{i:03}": b"v" for i in range(127)})
        written = await client.apply_diff(etcd_prefix, ConfigDiff.between(current, fits))
        assert written == before + 1


# -- commands ----------------------------------------------------------------------------------------


async def test_history_command_prints_each_revision_with_secrets_masked(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    p = etcd_prefix
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        r1 = await client.put_many({p + "rate_limit": "5", p + "db/password": "hunter2"})
        r2 = await client.put_many({p + "rate_limit": "6", p + "db/password": "swordfish"})
        r3 = await client.delete(p + "db/password")
    _, out, _ = await run("history", p, "--limit", "3", *M)
    assert out.splitlines() == [
        f"# {p} at revision {r3}: 3 revision(s) changed it in revisions {r1}..{r3} (stopped by "
        "--limit 3), newest first",
        f"revision {r3} (time unknown): 0 added, 0 changed, 1 removed",
        f"  - {p}db/password",
        f"revision {r2} (time unknown): 0 added, 2 changed, 0 removed",
        f"  ~ {p}db/password: ********** -> **********",
        f"  ~ {p}rate_limit: 5 -> 6",
        f"revision {r1} (time unknown): 2 added, 0 changed, 0 removed",
        f"  + {p}db/password = **********",
        f"  + {p}rate_limit = 5",
    ]
    _, out, _ = await run("history", p, "--limit", "3", "--json", *M)
    assert "hunter2" not in out and "swordfish" not in out
    data = json.loads(out)
    assert data["revision"] == r3 and data["scanned_from"] == r1
    assert data["entries"][1] == {
        "revision": r2,
        "time": None,
        "audit": None,  # written with etcdctl: no audit record (see test_fleet_audit.py)
        "added": {},
        "changed": {
            p + "db/password": {"old": "**********", "new": "**********"},
            p + "rate_limit": {"old": "5", "new": "6"},
        },
        "removed": {},
        "rewritten": [],
    }
    _, out, _ = await run("history", p, "--limit", "1")  # without a model nothing is known secret
    assert out.splitlines()[1:] == [
        f"revision {r3} (time unknown): 0 added, 0 changed, 1 removed",
        f"  - {p}db/password",
    ]


async def test_diff_command_between_revisions_and_to_now(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    p = etcd_prefix
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        r1 = await client.put_many({p + "rate_limit": "5", p + "maintenance": "true"})
        r2 = await client.put_many({p + "rate_limit": "7", p + "db/password": "hunter2"})
        r3 = await client.delete(p + "maintenance")
    _, out, _ = await run("diff", p, "--from", str(r1), "--to", str(r2), *M)
    assert out.splitlines() == [
        f"# {p} from revision {r1} to revision {r2}: 1 added, 1 changed, 0 removed",
        f"+ {p}db/password = **********",
        f"~ {p}rate_limit: 5 -> 7",
    ]
    _, out, _ = await run("diff", p, "--from", str(r1), "--json", *M)
    assert json.loads(out) == {
        "prefix": p,
        "from_revision": r1,
        "to_revision": r3,
        "added": {p + "db/password": "**********"},
        "changed": {p + "rate_limit": {"old": "5", "new": "7"}},
        "removed": {p + "maintenance": "true"},
    }


async def test_rollback_command_dry_run_then_apply_restores_revision(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    p = etcd_prefix
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        good = await client.put_many({p + "rate_limit": "5", p + "db/password": "old-secret"})
        await client.put_many({p + "rate_limit": "500", p + "db/password": "new-secret"})
        now = await client.put(p + "maintenance", "true")
        _, out, _ = await run("rollback", p, "--to-revision", str(good), "--dry-run", *M)
        assert out.splitlines() == [
            f"# {p} at revision {now}, changes to restore revision {good}:",
            f"~ {p}db/password: ********** -> **********",
            f"- {p}maintenance",
            f"~ {p}rate_limit: 500 -> 5",
            f"dry run: nothing written; apply with --expect-revision {now}",
        ]
        assert (await client.get_prefix(p)).revision == now
        _, out, _ = await run("rollback", p, "--to-revision", str(good), "--expect-revision", str(now), *M)
        assert out.splitlines()[-1] == f"wrote 2 put(s) and 1 delete(s) at revision {now + 1}"
        assert (await client.get_prefix(p)).items == {
            p + "rate_limit": b"5",
            p + "db/password": b"old-secret",
        }
        _, out, _ = await run("rollback", p, "--to-revision", str(good), *M)
        assert out.splitlines()[-1] == "no changes"


async def test_rollback_command_refuses_an_old_state_that_fails_todays_model(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    p = etcd_prefix
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        bad = await client.put_many({p + "rate_limit": "0", p + "tags": "not json"})
        now = await client.put_many({p + "rate_limit": "5", p + "tags": '["a"]'})
        code, out, _ = await run("rollback", p, "--to-revision", str(bad), *M, check=False)
        assert code == 1
        assert out.splitlines() == [
            "REFUSED: the result would not validate as Settings:",
            f"  {p}tags: structured field needs JSON: Expecting value at line 1 column 1",
            "nothing was written",
        ]
        await client.put(p + "tags", '["b"]')
        fixed_tags = await client.put(p + "rate_limit", "0")
        now = await client.put(p + "rate_limit", "5")
        code, out, _ = await run("rollback", p, "--to-revision", str(fixed_tags), *M, check=False)
        assert code == 1
        assert f"  {p}rate_limit: Input should be greater than or equal to 1" in out
        assert out.splitlines()[-1] == "nothing was written"
        assert (await client.get_prefix(p)).revision == now  # etcd's revision did not move


async def test_rollback_command_to_a_compacted_revision_fails_in_one_line_with_a_hint(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        old = await client.put(etcd_prefix + "rate_limit", "5")
        compacted = await compact_to(etcd_server, client, etcd_prefix)
        now = (await client.get_prefix(etcd_prefix)).revision
        code, out, err = await run("rollback", etcd_prefix, "--to-revision", str(old), *M, check=False)
        assert (await client.get_prefix(etcd_prefix)).revision == now
    assert code == 1
    assert out == ""
    assert err.splitlines() == [
        f"aetcdcfg: RevisionCompacted: rollback of {etcd_prefix!r} at revision {old} is impossible: etcd "
        f"keeps history only until compaction, and it compacted up to revision {compacted}; pick a "
        f"revision >= {compacted}"
    ]


async def test_rollback_command_apply_is_refused_after_a_concurrent_write_and_keeps_it(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    p = etcd_prefix
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        good = await client.put(p + "rate_limit", "5")
        reviewed = await client.put(p + "rate_limit", "9")
        await run("rollback", p, "--to-revision", str(good), "--dry-run", *M)
        await client.put(p + "maintenance", "true")  # someone else, another key, after the review
        code, _, err = await run(
            "rollback", p, "--to-revision", str(good), "--expect-revision", str(reviewed), *M, check=False
        )
        assert code == 1
        assert err.strip() == (
            f"aetcdcfg: TxnConflict: {p!r} changed after revision {reviewed}; nothing was written, "
            "read it again"
        )
        assert (await client.get_prefix(p)).items == {p + "rate_limit": b"9", p + "maintenance": b"true"}


async def test_set_command_validates_diffs_and_writes_one_guarded_revision(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    p = etcd_prefix
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        now = await client.put_many({p + "rate_limit": "100", p + "maintenance": "false"})
        _, out, _ = await run("set", p, "rate_limit=200", "db/password=hunter2", "--dry-run", *M)
        assert out.splitlines() == [
            f"# {p} at revision {now}, changes from the command line:",
            f"+ {p}db/password = **********",
            f"~ {p}rate_limit: 100 -> 200",
            f"dry run: nothing written; apply with --expect-revision {now}",
        ]
        _, out, _ = await run("set", p, "rate_limit=200", "db/password=hunter2", *M)
        assert out.splitlines()[-1] == f"wrote 2 put(s) and 0 delete(s) at revision {now + 1}"
        assert (await client.get_prefix(p)).items == {
            p + "rate_limit": b"200",
            p + "maintenance": b"false",
            p + "db/password": b"hunter2",
        }

        code, out, _ = await run("set", p, "rate_limt=5", *M, check=False)
        assert (code, out.splitlines()) == (
            1,
            [
                "REFUSED: the command line has keys that no field of Settings reads:",
                f"  {p}rate_limt",
                "nothing was written",
            ],
        )
        code, out, _ = await run("set", p, "rate_limit=0", *M, check=False)
        assert code == 1
        assert f"  {p}rate_limit: Input should be greater than or equal to 1" in out
        code, _, err = await run("set", p, "rate_limit", *M, check=False)
        assert code == 2 and "expected KEY=VALUE" in err

        # a write to another key between the reviewed dry run and the apply: refused, that key kept
        reviewed = (await client.get_prefix(p)).revision
        await client.put(p + "maintenance", "true")
        code, _, err = await run(
            "set", p, "rate_limit=300", "--expect-revision", str(reviewed), *M, check=False
        )
        assert code == 1 and "TxnConflict" in err
        assert await client.get(p + "maintenance") == b"true"
        assert await client.get(p + "rate_limit") == b"200"


async def test_rollback_apply_writes_exactly_the_reviewed_dry_run_or_refuses(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    """Between the dry run (at revision R) and ``--expect-revision R``, a key is deleted: one the
    reviewed diff changes, or one it leaves alone. Re-diffing against the state after the deletion
    would re-create that key, which the dry run never showed: the apply must refuse, writing nothing."""
    p = etcd_prefix
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        for deleted in ("maintenance", "rate_limit"):  # untouched by the diff / changed by it
            good = await client.put_many({p + "rate_limit": "5", p + "maintenance": "true"})
            reviewed = await client.put(p + "rate_limit", "9")
            _, out, _ = await run("rollback", p, "--to-revision", str(good), "--dry-run", *M)
            assert out.splitlines()[1:] == [
                f"~ {p}rate_limit: 9 -> 5",
                f"dry run: nothing written; apply with --expect-revision {reviewed}",
            ]
            after = await client.delete(p + deleted)  # after the review
            code, out, err = await run(
                "rollback", p, "--to-revision", str(good), "--expect-revision", str(reviewed), *M, check=False
            )
            assert code == 1, out
            assert "TxnConflict" in err, err
            assert (await client.get_prefix(p)).revision == after  # nothing written
            assert await client.get(p + deleted) is None  # not re-created

            # the library's rollback, guarded the same way
            with pytest.raises(TxnConflict):
                await client.rollback(p, good, expect_revision=reviewed)
            assert (await client.get_prefix(p)).revision == after


async def test_set_apply_refuses_when_a_key_it_changes_was_deleted_after_the_review(
    workdir: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    p = etcd_prefix
    async with EtcdClient(endpoints=[etcd_server.endpoint]) as client:
        reviewed = await client.put_many({p + "rate_limit": "100", p + "maintenance": "false"})
        _, out, _ = await run("set", p, "rate_limit=200", "--dry-run", *M)
        assert f"~ {p}rate_limit: 100 -> 200" in out
        after = await client.delete(p + "rate_limit")
        code, _, err = await run(
            "set", p, "rate_limit=200", "--expect-revision", str(reviewed), *M, check=False
        )
        assert code == 1 and "TxnConflict" in err, err
        assert (await client.get_prefix(p)).revision == after


def test_keys_a_diff_leaves_alone_are_guarded_while_they_fit_etcds_compare_limit() -> None:
    base = Snapshot(5, {f"/p/k{i:03}": b"v" for i in range(126)})
    diff = ConfigDiff.between(base, Snapshot(5, {**base.items, "/p/k000": b"w", "/p/new": b"n"}))
    kept = unchanged_keys(base, diff)
    assert kept == [f"/p/k{i:03}" for i in range(1, 126)]  # 1 range + 1 changed + 125 kept = 127
    bigger = Snapshot(5, {**base.items, "/p/k126": b"v", "/p/k127": b"v"})
    assert (
        unchanged_keys(bigger, ConfigDiff.between(bigger, Snapshot(5, {**bigger.items, "/p/k000": b"w"})))
        == []
    )
