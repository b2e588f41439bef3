"""Commands that read: ``get``, ``watch`` and ``dump``."""

from __future__ import annotations

import argparse
import json
import sys

from ..events import Event, EventType
from ._common import (
    PREFIX_HELP,
    Secrets,
    Subparsers,
    add_value_options,
    json_value,
    load_model,
    make_client,
    normalize_prefix,
    out,
    revision,
    say_if_hidden,
    show,
    stop_on_signals,
    value_secrets,
)
from ._files import dumps

__all__ = ["register", "cmd_dump", "cmd_get", "cmd_watch"]


async def cmd_get(args: argparse.Namespace) -> int:
    prefix = args.prefix
    secrets = value_secrets(args)
    async with make_client(args) as client:
        snapshot = await client.get_prefix(prefix)
    say_if_hidden(secrets)
    shown = {key: secrets.mask(key[len(prefix) :], value) for key, value in snapshot.items.items()}
    if args.json:
        items = {key: json_value(value) for key, value in shown.items()}
        out(json.dumps({"revision": snapshot.revision, "prefix": prefix, "items": items}, indent=2))
        return 0
    out(f"# {prefix} at revision {snapshot.revision}: {len(snapshot.items)} keys")
    for key, value in shown.items():
        out(f"{key} = {show(value)}")
    return 0


async def cmd_watch(args: argparse.Namespace) -> int:
    prefix = args.prefix
    secrets = value_secrets(args)

    def line(event: Event) -> str:
        shown = secrets.mask(event.key[len(prefix) :], event.value)
        if args.json:
            record = {
                "revision": event.revision,
                "type": event.type.value,
                "key": event.key,
                "value": json_value(shown) if event.type is EventType.PUT else None,
                "resync": event.resync,
            }
            return json.dumps(record)
        value = f" = {show(shown)}" if event.type is EventType.PUT else ""
        flag = " (resync)" if event.resync else ""
        return f"{event.revision} {event.type.value} {event.key}{value}{flag}"

    async with (
        stop_on_signals(),
        make_client(args) as client,
        client.watch(prefix, start_revision=args.from_revision) as events,
    ):
        print(f"# watching {prefix} from revision {events.start_revision}", file=sys.stderr, flush=True)
        say_if_hidden(secrets)
        async for event in events:
            out(line(event))
    return 0


async def cmd_dump(args: argparse.Namespace) -> int:
    prefix = normalize_prefix(args.prefix)
    async with make_client(args) as client:
        snapshot = await client.get_prefix(prefix)
    items = {k[len(prefix) :]: v for k, v in snapshot.items.items()}
    if args.model and not args.reveal_secrets:
        secrets = Secrets(load_model(args.model))
        # push keeps etcd's value for a masked secret, whole or inside a JSON value
        items = {key: secrets.mask(key, value) for key, value in items.items()}
    header = f"# {prefix} at revision {snapshot.revision}; aetcdcfg push {prefix} FILE reads it back\n"
    out(dumps(items, as_json=args.json, header=header))
    return 0


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add this module's commands to the ``aetcdcfg`` parser."""
    get = sub.add_parser(
        "get",
        parents=[common],
        help="keys and values under a prefix, with the revision",
        description="Print every key under PREFIX and its value, as of one revision (printed first). "
        "Values are hidden unless --model says which fields are secret or --show-values asks for "
        "them all.",
    )
    get.add_argument("prefix", metavar="PREFIX", help=PREFIX_HELP)
    get.add_argument("--json", action="store_true", help="one JSON object: revision, prefix, items")
    add_value_options(get)
    get.set_defaults(run=cmd_get)

    watch = sub.add_parser(
        "watch",
        parents=[common],
        help="live events, one per line, until Ctrl-C",
        description="Print every change under PREFIX as it happens, one event per line (revision, "
        "PUT or DELETE, key, value), until Ctrl-C or SIGTERM (exit 0). Reconnects by itself and "
        "misses nothing; a resync after compaction is marked. Values are hidden unless --model or "
        "--show-values.",
    )
    watch.add_argument("prefix", metavar="PREFIX", help=PREFIX_HELP)
    watch.add_argument(
        "--from-revision",
        type=revision,
        metavar="R",
        help="start at revision R: its changes and every later one (default: only new ones)",
    )
    watch.add_argument("--json", action="store_true", help="one JSON object per event")
    add_value_options(watch)
    watch.set_defaults(run=cmd_watch)

    dump = sub.add_parser(
        "dump",
        parents=[common],
        help="the prefix as a file that push reads back",
        description="Print the keys under PREFIX as a YAML (or JSON) file of settings that "
        "`aetcdcfg push` writes back byte for byte: a backup. Without --model nothing is masked "
        "(write it to a file, not a shared log); with --model its secrets are masked, and pushing "
        "the masked file back keeps etcd's values.",
    )
    dump.add_argument("prefix", metavar="PREFIX", help=PREFIX_HELP)
    dump.add_argument("--json", action="store_true", help="JSON instead of YAML")
    dump.add_argument(
        "--model",
        metavar="MODULE:CLASS",
        help="the settings model: mask its secrets (push then keeps etcd's values)",
    )
    dump.add_argument("--reveal-secrets", action="store_true", help="with --model, print secrets in clear")
    dump.set_defaults(run=cmd_dump)
