"""Canary commands: ``set ... --canary SELECTOR`` and ``canary status|promote|abort PREFIX``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from .._canary import Selector, canary_prefix
from .._records import InstanceRecord
from .._rollout import (
    Canary,
    CanaryPlan,
    abort_canary,
    canary_status,
    open_canary,
    plan_canary,
    promote_canary,
)
from ..errors import ConfigRejected, TxnConflict
from ._common import (
    PREFIX_HELP,
    Secrets,
    Subparsers,
    UsageError,
    add_value_options,
    diff_lines,
    make_client,
    normalize_prefix,
    out,
    say_if_hidden,
    show,
    value_secrets,
)
from ._fleet import add_wait_options, audit_keep_of, wait_and_report

__all__ = ["cmd_canary", "canary_set", "register", "status_json"]


async def canary_set(
    args: argparse.Namespace, model: type[BaseModel], prefix: str, values: dict[str, bytes]
) -> int:
    """``set PREFIX KEY=VALUE... --canary SELECTOR``: open a canary instead of writing the prefix
    (``--dry-run``: show what would be written; ``--expect-revision``: on the prefix as of then)."""
    try:
        selector = Selector.parse(args.canary)
    except ValueError as exc:
        raise UsageError(f"--canary {args.canary!r}: {exc}") from None
    secrets = Secrets(model)
    async with make_client(args) as client:
        try:
            if args.dry_run:
                plan = await plan_canary(
                    client,
                    prefix,
                    values,
                    selector,
                    model=model,
                    at_revision=args.expect_revision,
                    message=args.message,
                    command="set --canary",
                )
                _show_plan(plan, secrets)
                return 0
            revision = await open_canary(
                client,
                prefix,
                values,
                selector,
                model=model,
                message=args.message,
                command="set --canary",
                audit_keep=audit_keep_of(args),
                at_revision=args.expect_revision,
            )
        except ConfigRejected as exc:
            out(f"REFUSED: the canary's result would not validate as {model.__name__}:")
            for problem in exc.problems:
                out(f"  {problem}")
            out("nothing was written")
            return 1
        canary = await canary_status(client, prefix)
        members = [r.id for r in canary.members] if canary is not None else []
        out(f"canary of {prefix} opened at revision {revision} for {selector}: {', '.join(members)}")
        for key, value in values.items():
            out(f"  ~ {prefix}{key} = {show(secrets.mask(key, value))}")
        if canary is not None:
            _say_unreachable(prefix, canary.unreachable)
        if args.wait:
            return await wait_and_report(client, prefix, revision, args.timeout)
    return 0


def _progress(record: InstanceRecord, revision: int) -> str:
    """Whether a member applied the canary's revision, rejected it (or a later one), or not yet."""
    if record.applied_revision >= revision:
        return "applied"
    if record.rejected_revision is not None and record.rejected_revision >= revision:
        return "rejected"
    return "pending"


def status_json(prefix: str, canary: Canary | None) -> dict[str, Any]:
    """``canary status --json``: the canary (null fields when none is open) and per live instance
    whether it is selected and where it is; key names, revisions and problems, never a value."""
    if canary is None:
        return {
            "prefix": prefix,
            "open": False,
            "selector": None,
            "revision": None,
            "base_revision": None,
            "user": None,
            "created_at": None,
            "keys": [],
            "instances": [],
        }
    spec = canary.spec
    rows = []
    for group, selected in ((canary.members, True), (canary.others, False), (canary.unreachable, False)):
        for record in group:
            follows = prefix in record.follows_canary
            rows.append(
                {
                    "id": record.id,
                    "labels": dict(record.labels),
                    "selected": selected,
                    "follows_canary": follows,
                    "in_canary": record.canary,
                    "applied_revision": record.applied_revision,
                    "rejected_revision": record.rejected_revision,
                    "progress": _progress(record, canary.revision) if follows else "not_following",
                    "problems": list(record.problems),
                }
            )
    return {
        "prefix": prefix,
        "open": True,
        "selector": str(spec.selector),
        "revision": canary.revision,
        "base_revision": spec.base_revision,
        "user": spec.user,
        "created_at": spec.created_at,
        "keys": list(spec.keys),
        "instances": sorted(rows, key=lambda row: str(row["id"])),
    }


def _show_plan(plan: CanaryPlan, secrets: Secrets) -> None:
    """A dry run of ``set --canary``: the canary's effect, its spec, whom it selects now."""
    prefix, spec = plan.prefix, plan.spec
    out(
        f"# canary of {prefix} for {spec.selector}, on {prefix} at revision {spec.base_revision}: "
        "the selected instances' changes"
    )
    lines = diff_lines(prefix, plan.diff, secrets, indent="  ")
    for line in lines or ["  (none: the selected instances' config stays as it is)"]:
        out(line)
    out(f"spec: {canary_prefix(prefix)}spec = {spec.to_json().decode()}")
    out(f"would select now: {', '.join(r.id for r in plan.members)}")
    out(f"{len(plan.others)} other live instance(s) would read {prefix} alone")
    _say_unreachable(prefix, plan.unreachable)
    out(f"dry run: nothing written; open it with --expect-revision {spec.base_revision}")


def _say_unreachable(prefix: str, records: Sequence[InstanceRecord]) -> None:
    if records:
        out(
            f"selected but not following canaries, so reading {prefix} alone: "
            f"{', '.join(r.id for r in records)} (LiveSettings(canary=False), or no read access to "
            f"{canary_prefix(prefix)})"
        )


async def cmd_canary(args: argparse.Namespace) -> int:
    prefix = normalize_prefix(args.prefix)
    if args.json and args.action != "status":
        raise UsageError(f"--json is for canary status, not canary {args.action}")
    secrets = value_secrets(args)
    async with make_client(args) as client:
        if args.action == "status":
            canary = await canary_status(client, prefix)
            if args.json:
                out(json.dumps(status_json(prefix, canary), indent=2))
                return 0
            if canary is None:
                out(f"no canary of {prefix} is open")
                return 0
            say_if_hidden(secrets)
            spec = canary.spec
            out(
                f"# canary of {prefix} opened at revision {canary.revision} by {spec.user}: selector "
                f"{spec.selector}, on {prefix} as of revision {spec.base_revision}"
            )
            for key, value in canary.overlay.items():
                out(f"  ~ {prefix}{key} = {show(secrets.mask(key, value))}")
            for record in canary.members:
                done = "applied" if record.applied_revision >= canary.revision else "not yet applied"
                out(f"member {record.id} ({done}, revision {record.applied_revision})")
            out(f"{len(canary.others)} other live instance(s) read {prefix} alone")
            _say_unreachable(prefix, canary.unreachable)
            return 0
        try:
            if args.action == "promote":
                revision = await promote_canary(
                    client, prefix, message=args.message, audit_keep=audit_keep_of(args)
                )
                out(f"promoted: the canary's keys written into {prefix}, canary closed, revision {revision}")
            else:
                revision = await abort_canary(
                    client, prefix, message=args.message, audit_keep=audit_keep_of(args)
                )
                out(f"aborted: canary of {prefix} deleted at revision {revision}")
        except TxnConflict:
            out(
                f"REFUSED: {prefix} changed since the canary was opened on it (or the canary changed); "
                "nothing was written: abort the canary and open it again on the current config"
            )
            return 1
        if args.wait:
            return await wait_and_report(client, prefix, revision, args.timeout)
    return 0


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add ``canary`` to the ``aetcdcfg`` parser (``set --canary`` is registered with ``set``)."""
    canary = sub.add_parser(
        "canary",
        parents=[common],
        help="an open canary: status, promote it into the prefix, or abort it",
        description="A canary (opened with set ... --canary SELECTOR) gives its values to the instances "
        "the selector matches. status shows it and its members; promote writes its values into "
        "PREFIX and closes it in one transaction, refused if PREFIX changed since it was opened; "
        "abort closes it (every instance goes back to PREFIX alone).",
    )
    canary.add_argument("action", choices=["status", "promote", "abort"], help="status, promote or abort")
    canary.add_argument("prefix", metavar="PREFIX", help=PREFIX_HELP)
    add_value_options(canary)
    canary.add_argument(
        "--json",
        action="store_true",
        help="status as one JSON object: selector, revision, keys and per live instance id, labels, "
        "selected, applied/rejected revision, progress and problems (never a value)",
    )
    add_wait_options(canary)
    canary.set_defaults(run=cmd_canary)
