"""Commands that validate and write: ``check`` and ``push``."""

from __future__ import annotations

import argparse
from pathlib import Path

from pydantic import BaseModel

from .._validate import build_model
from ..errors import ConfigRejected
from ..source import resolve_key
from ._common import MASK, Subparsers, load_model, make_client, normalize_prefix, out, secret_keys, show
from ._files import flatten, load_file

__all__ = ["register", "cmd_check", "cmd_push"]


async def _current(args: argparse.Namespace) -> tuple[type[BaseModel], str, dict[str, bytes], int]:
    model = load_model(args.model)
    prefix = normalize_prefix(args.prefix)
    async with make_client(args) as client:
        snapshot = await client.get_prefix(prefix)
    return model, prefix, {k[len(prefix) :]: v for k, v in snapshot.items.items()}, snapshot.revision


def _report(error: ConfigRejected) -> None:
    for problem in error.problems:
        out(f"  {problem}")


async def cmd_check(args: argparse.Namespace) -> int:
    model, prefix, items, revision = await _current(args)
    try:
        build_model(model, prefix, items, revision)
    except ConfigRejected as exc:
        out(f"INVALID: {prefix} at revision {revision} does not validate as {model.__name__}:")
        _report(exc)
        return 1
    out(f"OK: {prefix} at revision {revision} is a valid {model.__name__} ({len(items)} keys)")
    return 0


async def cmd_push(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    prefix = normalize_prefix(args.prefix)
    wanted = flatten(load_file(Path(args.file)))
    unknown = sorted(k for k in wanted if resolve_key(model, k) is None)
    if unknown:
        out(f"REFUSED: {args.file} has keys that no field of {model.__name__} reads:")
        for key in unknown:
            out(f"  {prefix}{key}")
        out("nothing was written")
        return 1
    secrets = secret_keys(model, list(wanted))
    async with make_client(args) as client:
        snapshot = await client.get_prefix(prefix)
        current = {k[len(prefix) :]: v for k, v in snapshot.items.items()}
        # A masked secret (from a dump) means "keep the value etcd has".
        for key in [k for k in wanted if k in secrets and wanted[k] == MASK.encode()]:
            if key in current:
                wanted[key] = current[key]
            else:
                del wanted[key]
        puts = {k: v for k, v in wanted.items() if current.get(k) != v}
        extra = sorted(k for k in current if k not in wanted)
        deletes = extra if args.prune else []
        result = {k: v for k, v in current.items() if k not in deletes}
        result.update(puts)
        try:
            build_model(model, prefix, result, snapshot.revision)
        except ConfigRejected as exc:
            out(f"REFUSED: the result would not validate as {model.__name__}:")
            _report(exc)
            out("nothing was written")
            return 1
        guard = args.expect_revision if args.expect_revision is not None else snapshot.revision
        out(f"# {prefix} at revision {snapshot.revision}, changes from {args.file}:")
        all_secrets = secrets | secret_keys(model, list(current))
        for key in sorted(puts):
            secret = key in all_secrets
            if key in current:
                out(f"~ {prefix}{key}: {show(current[key], secret)} -> {show(puts[key], secret)}")
            else:
                out(f"+ {prefix}{key} = {show(puts[key], secret)}")
        for key in deletes:
            out(f"- {prefix}{key}")
        if extra and not args.prune:
            out(f"# {len(extra)} key(s) in etcd but not in the file are kept (use --prune to delete them)")
        if not puts and not deletes:
            out("no changes")
            return 0
        if args.dry_run:
            out(f"dry run: nothing written; apply with --expect-revision {snapshot.revision}")
            return 0
        revision = await client.apply_if_unchanged(
            prefix,
            {prefix + k: v for k, v in puts.items()},
            [prefix + k for k in deletes],
            since_revision=guard,
        )
    out(f"wrote {len(puts)} put(s) and {len(deletes)} delete(s) at revision {revision}")
    return 0


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add this module's commands to the ``aetcdcfg`` parser."""
    check = sub.add_parser("check", parents=[common], help="validate what etcd holds against a model")
    check.add_argument("--model", required=True, help="module:Class of the settings model")
    check.add_argument("--prefix", required=True)
    check.set_defaults(run=cmd_check)
    push = sub.add_parser(
        "push", parents=[common], help="validate a file, show the diff, write it in one txn"
    )
    push.add_argument("file", help="a .yaml, .json or .toml file of settings")
    push.add_argument("--model", required=True, help="module:Class of the settings model")
    push.add_argument("--prefix", required=True)
    push.add_argument("--dry-run", action="store_true", help="show the diff, write nothing")
    push.add_argument("--prune", action="store_true", help="delete keys under the prefix that the file lacks")
    push.add_argument(
        "--expect-revision",
        type=int,
        metavar="R",
        help="refuse if the prefix changed after revision R (a reviewed diff)",
    )
    push.set_defaults(run=cmd_push)
