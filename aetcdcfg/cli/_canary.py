"""Canary commands: ``set ... --canary SELECTOR`` and ``canary status|promote|abort PREFIX``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from pydantic import BaseModel

from .._canary import Selector, canary_prefix
from .._records import InstanceRecord
from .._rollout import abort_canary, canary_status, open_canary, promote_canary
from ..errors import ConfigRejected, TxnConflict
from ._common import (
    PREFIX_HELP,
    Secrets,
    Subparsers,
    UsageError,
    load_model,
    make_client,
    normalize_prefix,
    out,
    show,
)
from ._fleet import add_wait_options, audit_keep_of, wait_and_report

__all__ = ["cmd_canary", "canary_set", "register"]


async def canary_set(
    args: argparse.Namespace, model: type[BaseModel], prefix: str, values: dict[str, bytes]
) -> int:
    """``set PREFIX KEY=VALUE... --canary SELECTOR``: open a canary instead of writing the prefix."""
    if args.dry_run or args.expect_revision is not None:
        raise UsageError("--canary does not take --dry-run or --expect-revision (it is validated first)")
    try:
        selector = Selector.parse(args.canary)
    except ValueError as exc:
        raise UsageError(f"--canary {args.canary!r}: {exc}") from None
    secrets = Secrets(model)
    async with make_client(args) as client:
        try:
            revision = await open_canary(
                client,
                prefix,
                values,
                selector,
                model=model,
                message=args.message,
                command="set --canary",
                audit_keep=audit_keep_of(args),
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


def _say_unreachable(prefix: str, records: Sequence[InstanceRecord]) -> None:
    if records:
        out(
            f"selected but not following canaries, so reading {prefix} alone: "
            f"{', '.join(r.id for r in records)} (LiveSettings(canary=False), or no read access to "
            f"{canary_prefix(prefix)})"
        )


async def cmd_canary(args: argparse.Namespace) -> int:
    prefix = normalize_prefix(args.prefix)
    secrets = Secrets(load_model(args.model) if getattr(args, "model", None) else None)
    async with make_client(args) as client:
        if args.action == "status":
            canary = await canary_status(client, prefix)
            if canary is None:
                out(f"no canary of {prefix} is open")
                return 0
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
    canary.add_argument("--model", help="module:Class, to mask its secret fields (status)")
    add_wait_options(canary)
    canary.set_defaults(run=cmd_canary)
