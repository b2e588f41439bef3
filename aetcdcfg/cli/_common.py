"""What every command shares: usage errors, model loading, masking, the client, output, signals."""

from __future__ import annotations

import argparse
import base64
import contextlib
import importlib
import json
import signal
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeAlias

import anyio
from pydantic import BaseModel

from .._diff import ConfigDiff
from ..client import EtcdClient
from ..source import MASK
from ._secrets import Secrets

__all__ = [
    "Subparsers",
    "MASK",
    "PREFIX_HELP",
    "Secrets",
    "UsageError",
    "VALUES_HIDDEN",
    "add_value_options",
    "count",
    "diff_json",
    "diff_lines",
    "json_value",
    "load_model",
    "make_client",
    "normalize_prefix",
    "out",
    "positive_float",
    "positive_int",
    "revision",
    "say_if_hidden",
    "show",
    "stop_on_signals",
    "value_secrets",
]

#: What ``argparse.ArgumentParser.add_subparsers()`` returns, for the command groups to add to.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class UsageError(Exception):
    """A problem with the command line or its inputs (a file, a model name)."""


# -- argument types (argparse turns their ArgumentTypeError into a usage error, exit 2) --------------


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of {minimum} or more, got {text!r}"
        ) from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {value}")
    return value


def positive_int(text: str) -> int:
    """A count of 1 or more."""
    return _whole_number(text, 1)


def count(text: str) -> int:
    """A count of 0 or more (a number of records, where 0 means "all" or "none")."""
    return _whole_number(text, 0)


def revision(text: str) -> int:
    """An etcd revision: etcd's revisions start at 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a revision number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"etcd's revisions start at 1, got {value}")
    if value > _MAX_REVISION:  # etcd's revisions are int64: protobuf would refuse it later
        raise argparse.ArgumentTypeError(f"etcd's revisions end at {_MAX_REVISION}, got {value}")
    return value


_MAX_REVISION = 2**63 - 1


def positive_float(text: str) -> float:
    """Seconds, more than 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds above 0, got {text}")
    return value


# -- helpers ---------------------------------------------------------------------------------------


def normalize_prefix(value: str) -> str:
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


#: The help of every command's prefix argument.
PREFIX_HELP = "the key prefix, e.g. /myservice/ (a trailing / is added)"

#: What a command that hides values says on stderr, so nobody mistakes the masks for etcd's values.
VALUES_HIDDEN = (
    "# values hidden: no --model says which are secret (--model module:Class masks only its "
    "secret fields; --show-values prints every value in clear)"
)


def add_value_options(parser: argparse.ArgumentParser) -> None:
    """``--model`` and ``--show-values``: what every command that prints values takes."""
    parser.add_argument(
        "--model",
        metavar="MODULE:CLASS",
        help="the settings model, e.g. myservice.settings:Settings: its secret fields are masked, "
        "every other value is shown",
    )
    parser.add_argument(
        "--show-values",
        action="store_true",
        help="print every value in clear, secrets too (without --model or this, values are hidden: "
        "nothing says which are secret)",
    )


def value_secrets(args: argparse.Namespace) -> Secrets:
    """What a command that prints values masks (see :func:`add_value_options`): the model's
    secrets, nothing with ``--show-values``, every value when no model says which are secret."""
    model = load_model(args.model) if args.model else None
    if args.show_values:
        return Secrets(None)
    return Secrets.hiding_everything() if model is None else Secrets(model)


def say_if_hidden(secrets: Secrets) -> None:
    """Say on stderr, with the output, that every value is masked and how to see them."""
    if secrets.hides_everything:
        print(VALUES_HIDDEN, file=sys.stderr, flush=True)


def show(value: bytes | None) -> str:
    """How a value prints: text if UTF-8, a byte count otherwise (mask secrets first)."""
    if value is None:
        return "(absent)"
    try:
        text = value.decode()
    except UnicodeDecodeError:
        return f"<{len(value)} bytes, not UTF-8>"
    return json.dumps(text, ensure_ascii=False) if ("\n" in text or text != text.strip()) else text


def json_value(value: bytes) -> Any:
    """A value as JSON-ready data: text, or ``{"base64": ...}`` when not UTF-8 (mask secrets first)."""
    try:
        return value.decode()
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(value).decode()}


def _masker(prefix: str, secrets: Secrets) -> Callable[[str, bytes], bytes]:
    """``(full key, value) -> value`` with ``secrets`` masked."""

    def masked(key: str, value: bytes) -> bytes:
        return secrets.mask(key[len(prefix) :], value) if key.startswith(prefix) else value

    return masked


def diff_lines(prefix: str, diff: ConfigDiff, secrets: Secrets, indent: str = "") -> list[str]:
    """``+ key = value``, ``~ key: old -> new`` and ``- key`` lines in key order, secrets masked."""
    mask = _masker(prefix, secrets)
    lines = []
    for key in diff.keys:
        if key in diff.added:
            lines.append(f"{indent}+ {key} = {show(mask(key, diff.added[key]))}")
        elif key in diff.changed:
            old, new = diff.changed[key]
            lines.append(f"{indent}~ {key}: {show(mask(key, old))} -> {show(mask(key, new))}")
        else:
            lines.append(f"{indent}- {key}")
    return lines


def diff_json(prefix: str, diff: ConfigDiff, secrets: Secrets) -> dict[str, Any]:
    """A diff as JSON-ready data: added/removed map keys to values, changed to ``{old, new}``."""
    mask = _masker(prefix, secrets)
    return {
        "added": {k: json_value(mask(k, v)) for k, v in diff.added.items()},
        "changed": {
            k: {"old": json_value(mask(k, old)), "new": json_value(mask(k, new))}
            for k, (old, new) in diff.changed.items()
        },
        "removed": {k: json_value(mask(k, v)) for k, v in diff.removed.items()},
    }


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


def make_client(args: argparse.Namespace) -> EtcdClient:
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


def out(text: str = "") -> None:
    print(text, flush=True)
