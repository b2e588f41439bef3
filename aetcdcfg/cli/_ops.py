"""Day-to-day operations on a prefix's revisions: ``history``, ``diff``, ``rollback`` and ``set``.

``rollback`` and ``set`` write through the same path as ``push`` (:func:`write_result`): validate the
resulting state with the model, show the diff, ``--dry-run``, one transaction guarded by the
revision the diff was read at (or ``--expect-revision``).
"""

from __future__ import annotations

import argparse
import json

from .._audit import audit_log
from ._canary import canary_set
from ._common import (
    PREFIX_HELP,
    Subparsers,
    UsageError,
    add_value_options,
    diff_json,
    diff_lines,
    load_model,
    make_client,
    normalize_prefix,
    out,
    positive_int,
    revision,
    say_if_hidden,
    value_secrets,
)
from ._write import add_guard_options, base, refuse_shadowed, refuse_unknown, write_result

__all__ = ["register", "cmd_diff", "cmd_history", "cmd_rollback", "cmd_set"]

#: What the commands print where a revision's time would go: etcd does not store it.
TIME_UNKNOWN = "time unknown"


async def cmd_history(args: argparse.Namespace) -> int:
    prefix = normalize_prefix(args.prefix)
    secrets = value_secrets(args)
    async with make_client(args) as client:
        history = await client.history(prefix, limit=args.limit, max_revisions=args.max_revisions)
        who = await audit_log(client, prefix)
    say_if_hidden(secrets)
    if history.compact_revision is not None:
        scope = f"etcd compacted history up to revision {history.compact_revision}"
    elif len(history.entries) >= args.limit:
        scope = f"--limit {args.limit}"
    else:
        scope = (
            f"--max-revisions {args.max_revisions}" if history.scanned_from > 2 else "etcd's first revision"
        )
    # Audited writes that did not change the prefix itself (a canary opened or aborted), in range.
    shown = {entry.revision for entry in history.entries}
    oldest = min(shown) if len(history.entries) >= args.limit else history.scanned_from
    others = {r: a for r, a in who.items() if r not in shown and oldest <= r <= history.revision}
    if args.json:
        record = {
            "prefix": prefix,
            "revision": history.revision,
            "scanned_from": history.scanned_from,
            "compact_revision": history.compact_revision,
            "entries": [
                {
                    "revision": entry.revision,
                    "time": who[entry.revision].time if entry.revision in who else None,
                    "audit": who[entry.revision].to_dict() if entry.revision in who else None,
                    **diff_json(prefix, entry.diff, secrets),
                    "rewritten": list(entry.rewritten),
                }
                for entry in history.entries
            ],
            "other_writes": [{"revision": r, "audit": a.to_dict()} for r, a in sorted(others.items())[::-1]],
        }
        out(json.dumps(record, indent=2))
        return 0
    out(
        f"# {prefix} at revision {history.revision}: {len(history.entries)} revision(s) changed it "
        f"in revisions {history.scanned_from}..{history.revision} (stopped by {scope}), newest first"
    )
    entries = {entry.revision: entry for entry in history.entries}
    for at in sorted(entries.keys() | others.keys(), reverse=True):
        if at in others:
            out(f"revision {at} ({others[at].describe()}): {prefix} unchanged; {', '.join(others[at].keys)}")
            continue
        entry = entries[at]
        diff = entry.diff
        counts = [f"{len(diff.added)} added", f"{len(diff.changed)} changed", f"{len(diff.removed)} removed"]
        made = who[entry.revision].describe() if entry.revision in who else TIME_UNKNOWN
        out(f"revision {entry.revision} ({made}): {', '.join(counts)}")
        for line in diff_lines(prefix, diff, secrets, indent="  "):
            out(line)
        for key in entry.rewritten:
            out(f"  = {key} (written again with the same value)")
    return 0


async def cmd_diff(args: argparse.Namespace) -> int:
    prefix = normalize_prefix(args.prefix)
    secrets = value_secrets(args)
    async with make_client(args) as client:
        diff = await client.diff(prefix, args.from_revision, args.to_revision)
    say_if_hidden(secrets)
    if args.json:
        record = {
            "prefix": prefix,
            "from_revision": diff.old_revision,
            "to_revision": diff.new_revision,
            **diff_json(prefix, diff, secrets),
        }
        out(json.dumps(record, indent=2))
        return 0
    out(
        f"# {prefix} from revision {diff.old_revision} to revision {diff.new_revision}: "
        f"{len(diff.added)} added, {len(diff.changed)} changed, {len(diff.removed)} removed"
    )
    for line in diff_lines(prefix, diff, secrets):
        out(line)
    return 0


async def cmd_rollback(args: argparse.Namespace) -> int:
    prefix = normalize_prefix(args.prefix)
    model = load_model(args.model)
    async with make_client(args) as client:
        current, target = await client.plan_rollback(
            prefix, args.to_revision, at_revision=args.expect_revision
        )
        return await write_result(
            args,
            client,
            model,
            prefix,
            current,
            target.items,
            header=f"# {prefix} at revision {current.revision}, changes to restore revision "
            f"{target.revision}:",
        )


def _assignments(prefix: str, pairs: list[str]) -> dict[str, bytes]:
    """``KEY=VALUE`` arguments as relative keys (a key may also be given with the prefix)."""
    items: dict[str, bytes] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key[len(prefix) :] if key.startswith(prefix) else key.lstrip("/")
        if not sep or not key:
            # Never the argument itself: what follows an "=" may be a secret.
            shown = repr(pair) if not sep else "an argument with no key before '='"
            raise UsageError(f"{shown}: expected KEY=VALUE, e.g. rate_limit=200 or db/url=postgres://db")
        if key in items:
            raise UsageError(f"{key!r} is given twice")
        items[key] = value.encode()
    return items


async def cmd_set(args: argparse.Namespace) -> int:
    prefix = normalize_prefix(args.prefix)
    model = load_model(args.model)
    wanted = _assignments(prefix, args.assignments)
    if refuse_unknown(model, prefix, wanted, "the command line"):
        return 1
    if args.canary:
        return await canary_set(args, model, prefix, wanted)
    async with make_client(args) as client:
        current = await base(args, client, prefix)
        result = {**current.items, **{prefix + k: v for k, v in wanted.items()}}
        relative = {k[len(prefix) :]: v for k, v in result.items()}
        if refuse_shadowed(model, prefix, wanted, relative, "the command line"):
            return 1
        return await write_result(
            args,
            client,
            model,
            prefix,
            current,
            result,
            header=f"# {prefix} at revision {current.revision}, changes from the command line:",
        )


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add this module's commands to the ``aetcdcfg`` parser."""
    history = sub.add_parser(
        "history",
        parents=[common],
        help="recent revisions that changed a prefix, newest first",
        description="List the recent revisions that changed PREFIX, newest first, each with the keys "
        "added, changed and removed. It reads back from now, one keys-only read per revision, and "
        "stops at --limit changes, --max-revisions revisions or etcd's compaction (the first line "
        "says which). etcd does not record when a revision was written. Values are hidden unless "
        "--model or --show-values.",
    )
    history.add_argument("prefix", metavar="PREFIX", help=PREFIX_HELP)
    history.add_argument(
        "--limit", type=positive_int, default=10, metavar="N", help="at most N revisions (10)"
    )
    history.add_argument(
        "--max-revisions",
        type=positive_int,
        default=10_000,
        metavar="N",
        help="look back at most N revisions of etcd (10000): one read each",
    )
    add_value_options(history)
    history.add_argument("--json", action="store_true", help="one JSON object, values included")
    history.set_defaults(run=cmd_history)

    diff = sub.add_parser(
        "diff",
        parents=[common],
        help="how a prefix changed between two revisions",
        description="Compare PREFIX at two revisions: keys added, changed and removed. A revision "
        "older than etcd's last compaction cannot be read (exit 1, naming the oldest one that can). "
        "Values are hidden unless --model or --show-values.",
    )
    diff.add_argument("prefix", metavar="PREFIX", help=PREFIX_HELP)
    diff.add_argument(
        "--from",
        dest="from_revision",
        type=revision,
        required=True,
        metavar="R1",
        help="the revision to compare from",
    )
    diff.add_argument(
        "--to",
        dest="to_revision",
        type=revision,
        metavar="R2",
        help="the revision to compare to (default: now)",
    )
    add_value_options(diff)
    diff.add_argument("--json", action="store_true", help="one JSON object: added, changed, removed")
    diff.set_defaults(run=cmd_diff)

    rollback = sub.add_parser(
        "rollback",
        parents=[common],
        help="restore a prefix as it was at a revision, in one txn",
        description="Restore PREFIX to its state at revision R: keys changed since are put back, "
        "keys added since deleted, keys removed since re-created. Like push: the restored state is "
        "validated with --model first, the diff shown, and it is written in one transaction refused "
        "if the prefix changed meanwhile. A rollback is a new revision.",
    )
    rollback.add_argument("prefix", metavar="PREFIX", help=PREFIX_HELP)
    rollback.add_argument(
        "--to-revision",
        type=revision,
        required=True,
        metavar="R",
        help="the revision whose state to restore",
    )
    add_guard_options(rollback)
    rollback.set_defaults(run=cmd_rollback)

    set_ = sub.add_parser(
        "set",
        parents=[common],
        help="change a few keys, validated, in one txn",
        description="Write KEY=VALUE pairs under PREFIX, the way push writes a file: keys no field of "
        "--model reads (or that another spelling of their field in etcd overrides) are refused, "
        "the resulting state is validated, the diff shown, and it is "
        "written in one transaction refused if the prefix changed meanwhile.",
    )
    set_.add_argument("prefix", metavar="PREFIX", help=PREFIX_HELP)
    set_.add_argument(
        "assignments",
        nargs="+",
        metavar="KEY=VALUE",
        help="keys relative to the prefix (db/url=postgres://db); values are written as given",
    )
    add_guard_options(set_)
    set_.add_argument(
        "--canary",
        metavar="SELECTOR",
        help="only for the instances it selects: zone=b, instance=ID or 10%%; with --dry-run, show "
        "the canary, whom it selects now and the diff they get, and write nothing",
    )
    set_.set_defaults(run=cmd_set)
