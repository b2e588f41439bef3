"""Commands that validate and write: ``check`` and ``push``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel

from .._diff import ConfigDiff
from .._kv import MAX_TXN_OPS, unchanged_keys
from .._validate import build_model
from ..client import EtcdClient
from ..errors import ConfigRejected
from ..events import Snapshot
from ..source import decode_items, resolve_key
from ._common import (
    PREFIX_HELP,
    Secrets,
    Subparsers,
    UsageError,
    diff_lines,
    load_model,
    make_client,
    normalize_prefix,
    out,
    revision,
)
from ._files import flatten, load_file
from ._fleet import add_wait_options, audit_entry, wait_and_report
from ._secrets import MaskedSecretMissing

__all__ = [
    "add_guard_options",
    "base",
    "register",
    "cmd_check",
    "cmd_push",
    "refuse_shadowed",
    "refuse_unknown",
    "write_result",
]


def _check_prefix(args: argparse.Namespace) -> str:
    """``check``'s prefix: positional, or the deprecated ``--prefix`` (one of them, or the same)."""
    given = {p for p in (args.prefix, args.prefix_option) if p is not None}
    if not given:
        raise UsageError("check needs the prefix: aetcdcfg check /myservice/ --model module:Class")
    if len(given) > 1:
        raise UsageError(f"two prefixes given ({args.prefix!r} and --prefix {args.prefix_option!r})")
    if args.prefix is None:
        print(
            "aetcdcfg: check --prefix is deprecated: give the prefix first, as other commands take it "
            f"(aetcdcfg check {args.prefix_option} --model ...)",
            file=sys.stderr,
            flush=True,
        )
    return normalize_prefix(given.pop())


def _push_target(args: argparse.Namespace) -> tuple[str, str]:
    """``push``'s (prefix, file): ``push PREFIX FILE``, or the deprecated ``push FILE --prefix PREFIX``."""
    if args.prefix_option is None:
        if args.file is None:
            raise UsageError(
                "push needs the prefix and the file: aetcdcfg push /myservice/ cfg.yaml --model ..."
            )
        return normalize_prefix(args.prefix), args.file
    if args.file is not None:
        raise UsageError(f"two prefixes given ({args.prefix!r} and --prefix {args.prefix_option!r})")
    print(
        "aetcdcfg: push FILE --prefix is deprecated: give the prefix first, as other commands take it "
        f"(aetcdcfg push {args.prefix_option} {args.prefix} --model ...)",
        file=sys.stderr,
        flush=True,
    )
    return normalize_prefix(args.prefix_option), args.prefix


async def _current(args: argparse.Namespace) -> tuple[type[BaseModel], str, dict[str, bytes], int]:
    model = load_model(args.model)
    prefix = _check_prefix(args)
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


def refuse_unknown(model: type[BaseModel], prefix: str, keys: Iterable[str], source: str) -> bool:
    """Print a refusal and return True if some relative ``keys`` are read by no field of ``model``."""
    unknown = sorted(k for k in keys if resolve_key(model, k) is None)
    if not unknown:
        return False
    out(f"REFUSED: {source} has keys that no field of {model.__name__} reads:")
    for key in unknown:
        out(f"  {prefix}{key}")
    out("nothing was written")
    return True


def refuse_shadowed(
    model: type[BaseModel], prefix: str, keys: Iterable[str], result: Mapping[str, str | bytes], source: str
) -> bool:
    """Print a refusal and return True if some relative ``keys`` would be written and not read:
    another spelling of the same field (``RATE_LIMIT``, ``rate_limit/`` beside ``rate_limit``) in
    ``result`` (relative keys) is the one the model takes. The write would succeed and change nothing."""
    origins = decode_items(
        model, {k: v if isinstance(v, bytes) else v.encode() for k, v in result.items()}
    ).origins
    shadowed = []
    for key in keys:
        resolved = resolve_key(model, key)
        taken = origins.get(resolved[0]) if resolved is not None else None
        if taken is not None and taken != key:
            shadowed.append((key, taken))
    if not shadowed:
        return False
    out(f"REFUSED: {source} has keys that {model.__name__} would not read (another key fills their field):")
    for key, taken in sorted(shadowed):
        out(f"  {prefix}{key}  (its field is read from {prefix}{taken}: write that key)")
    out("nothing was written")
    return True


async def write_result(
    args: argparse.Namespace,
    client: EtcdClient,
    model: type[BaseModel],
    prefix: str,
    current: Snapshot,
    result: Mapping[str, bytes],
    *,
    header: str,
    notes: Sequence[str] = (),
) -> int:
    """Turn the prefix from ``current`` into ``result`` (full keys), as push, set and rollback do.

    ``current`` is the prefix as of ``--expect-revision`` when given (see :func:`base`), else now.
    The result is validated with ``model`` first (refused, writing nothing, if it does not
    validate); the diff is shown with secrets masked; ``--dry-run`` stops there; otherwise exactly
    that diff is written, in one transaction refused if the prefix changed after
    ``current.revision`` (a key created, changed or deleted: see :meth:`KV.apply_diff`).
    """
    try:
        build_model(model, prefix, {k[len(prefix) :]: v for k, v in result.items()}, current.revision)
    except ConfigRejected as exc:
        out(f"REFUSED: the result would not validate as {model.__name__}:")
        _report(exc)
        out("nothing was written")
        return 1
    diff = ConfigDiff.between(current, Snapshot(current.revision, result))
    out(header)
    for line in diff_lines(prefix, diff, Secrets(model)):
        out(line)
    for note in notes:
        out(note)
    if not diff:
        out("no changes")
        return 0
    unchanged = unchanged_keys(current, diff)
    if len(unchanged) < len(current.items) - len(diff.changed) - len(diff.removed):
        out(
            f"# the prefix has {len(current.items)} keys, more than etcd's --max-txn-ops ({MAX_TXN_OPS}) "
            "compares can guard: a deletion of a key this change leaves alone would not be detected"
        )
    if args.dry_run:
        out(f"dry run: nothing written; apply with --expect-revision {current.revision}")
        return 0
    audit = await audit_entry(args, client, prefix, diff.keys)
    revision = await client.apply_diff(prefix, diff, unchanged=unchanged, also=audit.puts, prune=audit.prune)
    out(f"wrote {len(diff.puts)} put(s) and {len(diff.deletes)} delete(s) at revision {revision}")
    if args.wait:
        return await wait_and_report(client, prefix, revision, args.timeout)
    return 0


async def base(args: argparse.Namespace, client: EtcdClient, prefix: str) -> Snapshot:
    """The state a write is computed from: the prefix as of ``--expect-revision`` (a reviewed dry
    run's), so that the diff written is the one reviewed, or now."""
    if args.expect_revision is not None:
        return await client.get_prefix(prefix, revision=args.expect_revision)
    return await client.get_prefix(prefix)


async def cmd_push(args: argparse.Namespace) -> int:
    prefix, file = _push_target(args)
    model = load_model(args.model)
    data = load_file(Path(file))
    try:
        wanted = flatten(data)
    except UsageError as exc:
        raise UsageError(f"{file!r}: {exc}") from None
    if refuse_unknown(model, prefix, wanted, file):
        return 1
    secrets = Secrets(model)
    async with make_client(args) as client:
        snapshot = await base(args, client, prefix)
        current = {k[len(prefix) :]: v for k, v in snapshot.items.items()}
        # A masked secret (from a dump), whole or inside a JSON value, means "keep etcd's value".
        for key in list(wanted):
            try:
                restored = secrets.restore(key, wanted[key], current.get(key))
            except MaskedSecretMissing as exc:
                raise UsageError(
                    f"{file}: {prefix}{key} has a masked secret at {'/'.join(exc.path)!r} that "
                    "etcd does not hold there to keep; write the real value (or dump with "
                    "--reveal-secrets)"
                ) from None
            if restored is None:
                del wanted[key]
            else:
                wanted[key] = restored
        extra = sorted(k for k in current if k not in wanted)
        result = {k: v for k, v in current.items() if not (args.prune and k in extra)}
        result.update(wanted)
        if refuse_shadowed(model, prefix, wanted, result, file):
            return 1
        notes = []
        if extra and not args.prune:
            notes.append(
                f"# {len(extra)} key(s) in etcd but not in the file are kept (use --prune to delete them)"
            )
        return await write_result(
            args,
            client,
            model,
            prefix,
            snapshot,
            {prefix + k: v for k, v in result.items()},
            header=f"# {prefix} at revision {snapshot.revision}, changes from {file}:",
            notes=notes,
        )


def add_guard_options(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--dry-run`` and ``--expect-revision``: what every command that writes takes."""
    parser.add_argument(
        "--model",
        required=True,
        metavar="MODULE:CLASS",
        help="the settings model, e.g. myservice.settings:Settings: the result must validate as it, "
        "and its secrets are masked in the diff",
    )
    parser.add_argument("--dry-run", action="store_true", help="show the diff, write nothing")
    parser.add_argument(
        "--expect-revision",
        type=revision,
        metavar="R",
        help="write the diff from the prefix as of revision R (a reviewed dry run's), and refuse if "
        "the prefix changed after R",
    )
    add_wait_options(parser)


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add this module's commands to the ``aetcdcfg`` parser."""
    check = sub.add_parser(
        "check",
        parents=[common],
        help="validate what etcd holds against a model",
        description="Validate the keys under PREFIX as the settings model, as a service would load "
        "them (with this command's own environment, dotenv and secrets files), and list every "
        "problem by key. Exit 0 if valid, 1 if not.",
    )
    check.add_argument("prefix", nargs="?", metavar="PREFIX", help=PREFIX_HELP)
    check.add_argument(
        "--model",
        required=True,
        metavar="MODULE:CLASS",
        help="the settings model, e.g. myservice.settings:Settings",
    )
    check.add_argument(
        "--prefix",
        dest="prefix_option",
        metavar="PREFIX",
        help="deprecated: give the prefix first, as every other command takes it",
    )
    check.set_defaults(run=cmd_check)

    push = sub.add_parser(
        "push",
        parents=[common],
        help="validate a file, show the diff, write it in one txn",
        description="Write a YAML, JSON or TOML file of settings under PREFIX: the resulting state "
        "is validated with --model first (refused, writing nothing, if invalid or if the file has "
        "keys no field reads, or that another spelling of their field overrides), the diff is "
        "shown with secrets masked, and it is written in one transaction that is refused if the "
        "prefix changed meanwhile. Keys etcd has and the file lacks are kept unless --prune.",
    )
    push.add_argument("prefix", metavar="PREFIX", help=PREFIX_HELP)
    push.add_argument("file", nargs="?", metavar="FILE", help="a .yaml, .json or .toml file of settings")
    push.add_argument(
        "--prefix",
        dest="prefix_option",
        metavar="PREFIX",
        help="deprecated: give the prefix first (push PREFIX FILE), as every other command takes it",
    )
    push.add_argument("--prune", action="store_true", help="delete keys under the prefix that the file lacks")
    add_guard_options(push)
    push.set_defaults(run=cmd_push)
