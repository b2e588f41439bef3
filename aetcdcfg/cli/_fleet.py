"""Commands about the running instances of a prefix: ``instances`` and ``wait`` (and ``--wait``)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping, Sequence

from .._audit import DEFAULT_AUDIT_KEEP, AuditWrite, audit_keep, audit_write
from .._fleet import WaitResult, instances, wait_applied
from .._records import AuditRecord
from ..client import EtcdClient
from ._common import (
    PREFIX_HELP,
    Subparsers,
    UsageError,
    count,
    make_client,
    normalize_prefix,
    out,
    positive_float,
    revision,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "add_wait_options",
    "audit_entry",
    "audit_keep_of",
    "cmd_instances",
    "cmd_wait",
    "register",
    "wait_and_report",
]

#: Seconds ``wait`` and ``--wait`` wait by default.
DEFAULT_TIMEOUT = 60.0


def _labels(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in labels.items()) or "-"


async def cmd_instances(args: argparse.Namespace) -> int:
    prefix = normalize_prefix(args.prefix)
    async with make_client(args) as client:
        fleet = await instances(client, prefix)
    if args.json:
        rows = [{**view.record.to_dict(), "state": view.state} for view in fleet.instances]
        out(json.dumps(rows, indent=2))
        return 0
    out(
        f"# {prefix}: {len(fleet.instances)} live instance(s); newest change at revision {fleet.newest} "
        f"(etcd at {fleet.revision})"
    )
    now = time.time()
    for view in fleet.instances:
        record = view.record
        rejected = "" if record.rejected_revision is None else f" rejected={record.rejected_revision}"
        out(
            f"{record.id} {view.state} applied={record.applied_revision}{rejected} "
            f"labels={_labels(record.labels)} model={record.model}@{record.schema} "
            f"up={now - record.started_at:.0f}s"
        )
        if view.state == "rejecting":
            for problem in record.problems:
                out(f"  {problem}")
    return 0


def report_wait(result: WaitResult) -> int:
    """Print how a wait ended; 0 if every instance still present applied the revision, else 1."""
    for record in result.rejected:
        out(f"REJECTED by {record.id} (serving revision {record.applied_revision}):")
        for problem in record.problems:
            out(f"  {problem}")
    for view in result.pending:
        why = "stale: its lease was not renewed (cut off from etcd?)" if view.state == "stale" else view.state
        out(f"NOT APPLIED in time by {view.record.id} (at revision {view.record.applied_revision}; {why})")
    for instance in result.gone:
        out(f"GONE: {instance} (its record disappeared during the wait)")
    total = len(result.applied) + len(result.rejected) + len(result.pending)
    if result.ok:
        note = "" if total else " (no live instance reports on this prefix)"
        out(f"OK: {len(result.applied)}/{total} instance(s) applied revision {result.revision}{note}")
        return 0
    out(f"FAILED: {len(result.applied)}/{total} instance(s) applied revision {result.revision}")
    return 1


async def wait_and_report(client: EtcdClient, prefix: str, revision: int | None, timeout: float) -> int:
    """Wait for ``revision`` (default: the newest change) with progress lines; the exit code."""
    result = await wait_applied(client, prefix, revision, timeout, on_progress=out)
    return report_wait(result)


async def cmd_wait(args: argparse.Namespace) -> int:
    prefix = normalize_prefix(args.prefix)
    async with make_client(args) as client:
        return await wait_and_report(client, prefix, args.revision, args.timeout)


def add_wait_options(parser: argparse.ArgumentParser) -> None:
    """``--message``, ``--audit-keep``, ``--wait`` and ``--timeout`` for the commands that write."""
    parser.add_argument(
        "--message",
        "-m",
        help="why: kept with who and when in an audit record written in the same txn (history shows it)",
    )
    parser.add_argument(
        "--audit-keep",
        type=count,
        metavar="N",
        help="keep the prefix's newest N audit records: the same txn deletes older ones, a few per "
        f"write (default: $AETCDCFG_AUDIT_KEEP, else {DEFAULT_AUDIT_KEEP}; 0 keeps all)",
    )
    parser.add_argument(
        "--wait",
        action="store_true",
        help="after writing, wait until every live instance applied it (exit 1 if one rejected it or "
        "did not apply it in time)",
    )
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"with --wait: how long to wait ({DEFAULT_TIMEOUT:.0f})",
    )


def audit_keep_of(args: argparse.Namespace) -> int:
    """``--audit-keep``, else ``AETCDCFG_AUDIT_KEEP``, else the default (a bad variable: UsageError)."""
    try:
        return audit_keep(args.audit_keep)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


async def audit_entry(
    args: argparse.Namespace, client: EtcdClient, prefix: str, keys: Sequence[str]
) -> AuditWrite:
    """The audit record of who makes this change, when and why, and the old ones beyond
    ``--audit-keep`` to delete, for the change's transaction (``also=``, ``prune=``)."""
    record = AuditRecord.now(args.command, keys, args.message)
    return await audit_write(client, prefix, record, keep=audit_keep_of(args))


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add this module's commands to the ``aetcdcfg`` parser."""
    listing = sub.add_parser(
        "instances",
        parents=[common],
        help="the live instances of a prefix and the revision each applied",
        description="Every running LiveSettings of PREFIX, from the records each keeps in etcd: id, "
        "labels, the revision applied, and whether it is current, behind, stale (its watch or its "
        "lease not refreshed: cut off from etcd) or rejecting (with the problems, never values).",
    )
    listing.add_argument("prefix", metavar="PREFIX", help=PREFIX_HELP)
    listing.add_argument(
        "--json",
        action="store_true",
        help="a JSON array of records: id, labels, applied_revision, rejected_revision, fresh, state, ...",
    )
    listing.set_defaults(run=cmd_instances)
    wait = sub.add_parser(
        "wait",
        parents=[common],
        help="wait until every live instance applied a revision",
        description="Follow the instance records of PREFIX until every live instance applied revision "
        "R or later, printing progress (7/10 applied). Exit 0 when every instance still present "
        "applied it; 1 naming each that rejected it (with the problems) or did not apply it in "
        "time. An instance that dies meanwhile is named gone and holds the wait up at most its TTL.",
    )
    wait.add_argument("prefix", metavar="PREFIX", help=PREFIX_HELP)
    wait.add_argument(
        "--revision", type=revision, metavar="R", help="default: the revision of the prefix's newest change"
    )
    wait.add_argument(
        "--timeout",
        type=positive_float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="give up after this long (60)",
    )
    wait.set_defaults(run=cmd_wait)
